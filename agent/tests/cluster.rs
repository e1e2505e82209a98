//! In-process cluster tests: a real coordinator and real agents on 127.0.0.1:0, with short heartbeats.

use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::get;
use serde_json::json;
use sollol::app::{self, AgentHandle, CoordinatorHandle, Shutdown};
use sollol::config::Config;
use sollol::http_client::HttpClient;
use sollol_shared::api::{NodeDetail, NodeEventKind, NodeList, NodeStatus};

const HEARTBEAT_MS: u64 = 200;

fn config(data_dir: &std::path::Path, name: &str, extra: &[(&'static str, &str)]) -> Config {
    let data_dir = data_dir.display().to_string();
    let heartbeat = format!("{HEARTBEAT_MS}ms");
    let mut pairs: Vec<(&'static str, &str)> = vec![
        ("data_dir", &data_dir),
        ("coordinator.gateway_bind", "127.0.0.1:0"),
        ("coordinator.cluster_bind", "127.0.0.1:0"),
        ("agent.name", name),
        ("agent.heartbeat_interval", &heartbeat),
        // Tests stay on loopback: no mDNS on the machine's interfaces.
        ("discovery.mdns", "false"),
        ("agent.reconnect_initial_backoff", "50ms"),
        ("agent.reconnect_max_backoff", "300ms"),
    ];
    pairs.extend_from_slice(extra);
    Config::from_pairs(&pairs).expect("valid test config")
}

async fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

fn status_of(coordinator: &CoordinatorHandle, name: &str) -> Option<NodeStatus> {
    coordinator
        .view()
        .nodes
        .iter()
        .find(|node| node.name == name)
        .map(|node| node.status)
}

async fn start_agent(
    coordinator: &CoordinatorHandle,
    dir: &std::path::Path,
    name: &str,
) -> AgentHandle {
    let config = config(dir, name, &[]);
    app::start_agent(
        &config,
        coordinator.cluster_address.to_string(),
        coordinator.token.clone(),
    )
    .await
    .expect("agent starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_join_go_down_come_back_and_leave() {
    let dirs: Vec<tempfile::TempDir> = (0..4)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let coordinator = app::start_coordinator(&config(dirs[0].path(), "coordinator", &[]))
        .await
        .expect("coordinator starts");
    let mut agents = Vec::new();
    for (index, name) in ["alpha", "beta", "gamma"].iter().enumerate() {
        agents.push(start_agent(&coordinator, dirs[index + 1].path(), name).await);
    }

    wait_until("3 nodes up with hardware", Duration::from_secs(10), || {
        let view = coordinator.view();
        view.nodes.len() == 3
            && view.nodes.iter().all(|node| {
                node.status == NodeStatus::Up
                    && node
                        .hardware
                        .as_ref()
                        .is_some_and(|hw| hw.memory.total_bytes > 0 && hw.cpu.logical_cores > 0)
            })
    })
    .await;

    // The same view through the HTTP API.
    let client = HttpClient::default();
    let base = format!("http://{}/api/sollol/v1", coordinator.gateway_address);
    let list: NodeList = client
        .get_json(&format!("{base}/nodes"), Duration::from_secs(5))
        .await
        .expect("nodes API");
    let mut names: Vec<&str> = list.nodes.iter().map(|node| node.name.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["alpha", "beta", "gamma"]);
    assert!(list.nodes.iter().all(|node| {
        node.hardware
            .as_ref()
            .is_some_and(|hw| hw.memory.available_bytes > 0)
    }));

    // alpha crashes (no goodbye): down within 3 heartbeats of its last report.
    let alpha = agents.remove(0);
    let alpha_id = alpha.node_id.clone();
    alpha.abort();
    let took = wait_until("alpha down", Duration::from_secs(5), || {
        status_of(&coordinator, "alpha") == Some(NodeStatus::Down)
    })
    .await;
    let limit = Duration::from_millis(3 * HEARTBEAT_MS + 250);
    assert!(
        took <= limit,
        "alpha took {took:?} to go down (limit {limit:?})"
    );

    // alpha restarts from the same data directory: same id, up again.
    let alpha = start_agent(&coordinator, dirs[1].path(), "alpha").await;
    assert_eq!(alpha.node_id, alpha_id);
    wait_until("alpha up again", Duration::from_secs(5), || {
        status_of(&coordinator, "alpha") == Some(NodeStatus::Up)
    })
    .await;
    assert_eq!(coordinator.view().nodes.len(), 3);

    // beta stops cleanly: left, not down.
    let beta = agents.remove(0);
    assert_eq!(
        beta.stop(Duration::from_secs(5)).await.expect("stop"),
        Shutdown::Graceful
    );
    wait_until("beta left", Duration::from_secs(5), || {
        status_of(&coordinator, "beta") == Some(NodeStatus::Left)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(4 * HEARTBEAT_MS)).await;
    assert_eq!(
        status_of(&coordinator, "beta"),
        Some(NodeStatus::Left),
        "a node that left never turns down"
    );

    // The detail endpoint tells alpha's story, newest first.
    let detail: NodeDetail = client
        .get_json(&format!("{base}/nodes/{alpha_id}"), Duration::from_secs(5))
        .await
        .expect("node detail");
    let kinds: Vec<NodeEventKind> = detail.events.iter().rev().map(|event| event.kind).collect();
    let expected_story = [
        NodeEventKind::Joined,
        NodeEventKind::Suspect,
        NodeEventKind::Down,
        NodeEventKind::Up,
    ];
    assert!(
        kinds.starts_with(&expected_story),
        "alpha's events: {kinds:?}"
    );

    alpha
        .stop(Duration::from_secs(5))
        .await
        .expect("stop alpha");
    for agent in agents {
        agent.stop(Duration::from_secs(5)).await.expect("stop");
    }
    assert_eq!(
        coordinator.shutdown(Duration::from_secs(5)).await,
        Shutdown::Graceful
    );
}

/// A coordinator restarted on the same data directory remembers every node, down until it reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_a_coordinator_restart() {
    let coordinator_dir = tempfile::tempdir().expect("tempdir");
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let coordinator = app::start_coordinator(&config(coordinator_dir.path(), "c", &[]))
        .await
        .expect("coordinator");
    let agent = start_agent(&coordinator, agent_dir.path(), "remembered").await;
    wait_until(
        "node up with a hardware report",
        Duration::from_secs(5),
        || {
            coordinator.view().nodes.iter().any(|node| {
                node.name == "remembered"
                    && node.status == NodeStatus::Up
                    && node.hardware.is_some()
            })
        },
    )
    .await;
    agent.abort();
    assert_eq!(
        coordinator.shutdown(Duration::from_secs(5)).await,
        Shutdown::Graceful
    );

    let restarted = app::start_coordinator(&config(coordinator_dir.path(), "c", &[]))
        .await
        .expect("restart");
    let view = restarted.view();
    assert_eq!(view.nodes.len(), 1);
    assert_eq!(view.nodes[0].name, "remembered");
    assert_eq!(view.nodes[0].status, NodeStatus::Down);
    assert!(!view.nodes[0].connected);
    assert!(
        view.nodes[0].hardware.is_some(),
        "the last hardware sample is remembered"
    );
    assert_eq!(restarted.token, coordinator_token(coordinator_dir.path()));
    restarted.shutdown(Duration::from_secs(5)).await;
}

fn coordinator_token(dir: &std::path::Path) -> sollol::cluster::identity::ClusterToken {
    sollol::cluster::identity::ClusterToken::load(dir)
        .expect("read")
        .expect("token exists")
}

/// An agent with an Ollama URL reports that Ollama's version, installed and loaded models.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_report_their_ollama() {
    let emulator = axum::Router::new()
        .route("/api/version", get(|| async { Json(json!({"version": "0.12.3"})) }))
        .route(
            "/api/tags",
            get(|| async {
                Json(json!({"models": [
                    {"name": "smollm2:135m", "model": "smollm2:135m", "size": 270898672, "digest": "9077fe9d",
                     "details": {"family": "llama", "parameter_size": "134.52M", "quantization_level": "F16"}},
                    {"name": "qwen2:0.5b", "model": "qwen2:0.5b", "size": 352164041, "digest": "6f48b936", "details": {}}
                ]}))
            }),
        )
        .route(
            "/api/ps",
            get(|| async {
                Json(json!({"models": [{"name": "smollm2:135m", "model": "smollm2:135m", "size": 400000000,
                  "size_vram": 123456, "digest": "9077fe9d", "expires_at": "2026-11-28T12:00:00Z", "details": {}}]}))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let ollama_url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, emulator).await });

    let coordinator_dir = tempfile::tempdir().expect("tempdir");
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let coordinator = app::start_coordinator(&config(coordinator_dir.path(), "c", &[]))
        .await
        .expect("coordinator");
    let agent_config = config(
        agent_dir.path(),
        "with-ollama",
        &[("agent.ollama_url", &ollama_url)],
    );
    let agent = app::start_agent(
        &agent_config,
        coordinator.cluster_address.to_string(),
        coordinator.token.clone(),
    )
    .await
    .expect("agent");
    wait_until("ollama state reported", Duration::from_secs(5), || {
        coordinator
            .view()
            .nodes
            .iter()
            .any(|node| node.ollama.is_some())
    })
    .await;
    let view = coordinator.view();
    let ollama = view.nodes[0].ollama.as_ref().expect("ollama");
    assert!(ollama.reachable);
    assert_eq!(ollama.version.as_deref(), Some("0.12.3"));
    let names: Vec<&str> = ollama
        .models
        .iter()
        .map(|model| model.name.as_str())
        .collect();
    assert_eq!(names, vec!["smollm2:135m", "qwen2:0.5b"]);
    assert_eq!(ollama.loaded.len(), 1);
    assert_eq!(ollama.loaded[0].vram_bytes, 123_456);
    agent.stop(Duration::from_secs(5)).await.expect("stop");
    coordinator.shutdown(Duration::from_secs(5)).await;
}

/// Sends a raw HTTP/1.1 request and returns the status code and body.
async fn raw_http(address: std::net::SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Ollama's root probe, health endpoints, and Ollama-shaped errors for everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_answers_like_ollama() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = app::start_coordinator(&config(dir.path(), "c", &[]))
        .await
        .expect("coordinator");
    let address = coordinator.gateway_address;
    let request = |method: &str, path: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
    };
    fn check(actual: (u16, String), status: u16, body: &str) {
        assert_eq!(actual.0, status, "{actual:?}");
        assert!(actual.1.contains(body), "{actual:?} lacks {body:?}");
    }
    check(
        raw_http(address, &request("GET", "/")).await,
        200,
        "Ollama is running",
    );
    check(raw_http(address, &request("HEAD", "/")).await, 200, "");
    check(
        raw_http(address, &request("GET", "/healthz")).await,
        200,
        "\"ready\":true",
    );
    // Up, but no node to route to: not ready, and it says why.
    check(
        raw_http(address, &request("GET", "/readyz")).await,
        503,
        "cannot route: no node is up with a reachable Ollama (0 known)",
    );
    check(
        raw_http(address, &request("GET", "/api/sollol/v1/nodes")).await,
        200,
        "{\"nodes\":[],\"load\":{}}",
    );
    check(
        raw_http(address, &request("GET", "/api/sollol/v1/nodes/nope")).await,
        404,
        "{\"error\":\"node \\\"nope\\\" not found\"}",
    );
    check(
        raw_http(address, &request("GET", "/api/nothing")).await,
        404,
        "{\"error\":\"no such endpoint: /api/nothing\"}",
    );
    check(
        raw_http(address, &request("POST", "/healthz")).await,
        405,
        "{\"error\":",
    );
    check(
        raw_http(address, &request("GET", "/dashboard/nope.js")).await,
        404,
        "{\"error\":",
    );
    check(
        raw_http(address, &request("GET", "/dashboard/")).await,
        200,
        "<html",
    );
    coordinator.shutdown(Duration::from_secs(5)).await;
}

/// A client that opens a connection and dribbles its headers is cut off; others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = app::start_coordinator(&config(
        dir.path(),
        "c",
        &[("coordinator.header_read_timeout", "300ms")],
    ))
    .await
    .expect("coordinator");
    let mut slow = tokio::net::TcpStream::connect(coordinator.gateway_address)
        .await
        .expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let (status, body) = raw_http(
        coordinator.gateway_address,
        "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "Ollama is running"));
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the slow client was never disconnected");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "cut off too early: {:?}",
        started.elapsed()
    );
    coordinator.shutdown(Duration::from_secs(5)).await;
}
