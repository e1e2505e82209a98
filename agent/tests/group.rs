//! Several coordinators of one cluster, in this process on 127.0.0.1: they find each other, share what
//! routing learned and their load on the nodes, and refuse each other when their shared configuration
//! differs.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sollol::app::{self, AgentHandle, CoordinatorHandle};
use sollol_ollama_emulator::{Emulator, EmulatorConfig};

mod support;

use support::cluster::config;
use support::{get, send};

/// A loopback address with a port nobody listens on now, for a coordinator started later.
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").to_string()
}

struct Coordinator {
    handle: CoordinatorHandle,
    _dir: tempfile::TempDir,
}

impl Coordinator {
    async fn start(name: &str, cluster_bind: &str, extra: &[(&'static str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pairs = vec![("coordinator.cluster_bind", cluster_bind)];
        pairs.extend_from_slice(extra);
        let handle = app::start_coordinator(&config(dir.path(), name, &pairs))
            .await
            .expect("coordinator");
        Self { handle, _dir: dir }
    }

    /// A coordinator in `first`'s group: its token, and `first` as its peer.
    async fn join_group(first: &Self, name: &str, cluster_bind: &str) -> Self {
        let token = first.handle.token.expose().to_owned();
        let peer = first.handle.cluster_address.to_string();
        Self::start(
            name,
            cluster_bind,
            &[
                ("coordinator.peers", peer.as_str()),
                ("agent.token", token.as_str()),
            ],
        )
        .await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.handle.gateway_address)
    }

    async fn api(&self, path: &str) -> Value {
        let answer = get(&self.url(&format!("/api/sollol/v1/{path}"))).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        answer.json()
    }

    /// A short chat through this coordinator (with `headers`), which must succeed.
    async fn chat(&self, content: &str, headers: &[(&str, &str)]) -> support::Answer {
        let answer = send("POST", &self.url("/api/chat"), chat(content), headers).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        answer
    }

    /// Waits until `check` holds for `GET /api/sollol/v1/PATH`; returns that answer.
    async fn until(&self, path: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let answer = self.api(path).await;
            if check(&answer) {
                return answer;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{what}: never happened; last {path}: {answer:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn stop(agents: Vec<AgentHandle>, coordinators: impl IntoIterator<Item = Coordinator>) {
    for agent in agents {
        agent.stop(Duration::from_secs(5)).await.expect("stop");
    }
    for coordinator in coordinators {
        coordinator.handle.shutdown(Duration::from_secs(5)).await;
    }
}

fn alive_others(list: &Value) -> usize {
    list["coordinators"]
        .as_array()
        .map(|all| all.iter().filter(|c| c["state"] == "alive").count())
        .unwrap_or(0)
}

/// Emulated nodes, each behind an agent that joins every one of `join`.
async fn nodes(
    specs: &[(&str, f64)],
    join: &[String],
    token: &sollol::cluster::identity::ClusterToken,
) -> (Vec<AgentHandle>, Vec<Emulator>, Vec<tempfile::TempDir>) {
    let (mut agents, mut emulators, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
    for (name, speed) in specs {
        let emulator = Emulator::start(EmulatorConfig {
            name: (*name).to_owned(),
            decode_tokens_per_second: *speed,
            prompt_tokens_per_second: speed * 10.0,
            ..EmulatorConfig::default()
        })
        .await
        .expect("emulator");
        let dir = tempfile::tempdir().expect("tempdir");
        let url = emulator.url();
        let agent_config = config(
            dir.path(),
            name,
            &[
                ("agent.ollama_url", url.as_str()),
                ("agent.reconnect_initial_backoff", "100ms"),
                ("agent.reconnect_max_backoff", "300ms"),
            ],
        );
        agents.push(
            app::start_agent(&agent_config, join.to_vec(), token.clone())
                .await
                .expect("agent"),
        );
        emulators.push(emulator);
        dirs.push(dir);
    }
    (agents, emulators, dirs)
}

async fn until_backends(coordinator: &Coordinator, count: usize) {
    let started = Instant::now();
    while coordinator.handle.view().backends.len() < count {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the nodes never joined"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn chat(content: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "model": "smollm2:135m",
        "stream": false,
        "messages": [{"role": "user", "content": content}],
        "options": {"num_predict": 20},
    }))
    .expect("json")
}

/// The figures of `/learned` by (node, model), for comparing two coordinators.
fn figures(learned: &Value) -> Vec<(String, f64, f64)> {
    learned["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .map(|pair| {
            (
                format!("{}/{}", pair["node_id"], pair["model"]),
                pair["decode_tokens_per_second"].as_f64().expect("decode"),
                pair["time_to_first_token_ms"].as_f64().expect("ttft"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_started_after_traffic_starts_warm_and_both_route_alike() {
    let second_address = free_address();
    let first = Coordinator::start(
        "first",
        "127.0.0.1:0",
        &[("coordinator.peers", second_address.as_str())],
    )
    .await;
    let join = vec![
        first.handle.cluster_address.to_string(),
        second_address.clone(),
    ];
    let (agents, _emulators, _dirs) = nodes(
        &[("fast", 2000.0), ("mid", 400.0), ("slow", 100.0)],
        &join,
        &first.handle.token,
    )
    .await;
    until_backends(&first, 3).await;
    // Traffic through the first coordinator only, spread so that it measures every node.
    for round in 0..6 {
        first
            .chat(
                &format!("round {round}"),
                &[("x-sollol-strategy", "round_robin")],
            )
            .await;
    }
    first
        .until(
            "learned",
            "the first coordinator measures 3 nodes",
            |learned| {
                learned["pairs"].as_array().is_some_and(|pairs| {
                    pairs.len() == 3
                        && pairs
                            .iter()
                            .map(|pair| pair["samples"].as_u64().unwrap_or(0))
                            .sum::<u64>()
                            >= 6
                })
            },
        )
        .await;
    // Traffic has stopped: what the first coordinator knows no longer changes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taught = first.api("learned").await;

    // The second coordinator starts with an empty history, joins the group and takes what the first
    // learned before it serves anything.
    let second = Coordinator::join_group(&first, "second", &second_address).await;
    first
        .until("coordinators", "the first sees the second", |list| {
            alive_others(list) == 1
        })
        .await;
    let warm = second
        .until(
            "learned",
            "the second takes the first's figures",
            |learned| figures(learned) == figures(&taught),
        )
        .await;
    assert_eq!(figures(&warm), figures(&taught), "warm start: {warm:#}");
    assert!(
        warm["pairs"]
            .as_array()
            .expect("pairs")
            .iter()
            .all(|pair| pair["coordinators"] == 1)
    );
    until_backends(&second, 3).await;
    // Its first request goes where the first coordinator's measurements say: the fast node.
    let answer = second.chat("warm?", &[]).await;
    assert_eq!(
        answer.node.as_deref(),
        Some("fast"),
        "{:?}",
        answer.decision
    );

    // Once both have served and the gossip settled, both route on the very same figures.
    let second_learned = second
        .until(
            "learned",
            "the second's own measurement is merged",
            |learned| {
                learned["pairs"]
                    .as_array()
                    .is_some_and(|pairs| pairs.iter().any(|pair| pair["coordinators"] == 2))
            },
        )
        .await;
    let first_learned = first
        .until("learned", "the first merges the second's", |learned| {
            figures(learned) == figures(&second_learned)
        })
        .await;
    assert_eq!(figures(&first_learned), figures(&second_learned));

    // One of them leads (replicas); the list says who and shows both.
    let list = second.api("coordinators").await;
    let coordinators = list["coordinators"].as_array().expect("coordinators");
    assert_eq!(coordinators.len(), 2, "{list:#}");
    assert_eq!(coordinators[0]["state"], "this");
    assert_eq!(list["this"], coordinators[0]["id"]);
    assert_eq!(
        coordinators.iter().filter(|c| c["leader"] == true).count(),
        1,
        "{list:#}"
    );
    assert!(
        coordinators[1]["gateway_url"]
            .as_str()
            .is_some_and(|url| url.ends_with(&first.handle.gateway_address.port().to_string())),
        "{list:#}"
    );
    // A run-time replica count would hold on one coordinator only: refused, saying what to do.
    let refused = send(
        "PUT",
        &second.url("/api/sollol/v1/replicas/smollm2:135m"),
        br#"{"replicas": 2}"#.to_vec(),
        &[],
    )
    .await;
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert!(
        refused.text().contains("models.replicas"),
        "{}",
        refused.text()
    );

    stop(agents, [second, first]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_busy_through_one_coordinator_is_busy_for_the_other() {
    let (first_address, second_address) = (free_address(), free_address());
    let first = Coordinator::start(
        "first",
        &first_address,
        &[("coordinator.peers", second_address.as_str())],
    )
    .await;
    let second = Coordinator::join_group(&first, "second", &second_address).await;
    // Two nodes alike: each runs one request at a time, slowly.
    let join = vec![first_address.clone(), second_address.clone()];
    let (agents, _emulators, _dirs) = nodes(
        &[("left", 20.0), ("right", 20.0)],
        &join,
        &first.handle.token,
    )
    .await;
    until_backends(&first, 2).await;
    until_backends(&second, 2).await;
    second
        .until("coordinators", "the group forms", |list| {
            alive_others(list) == 1
        })
        .await;

    // Both nodes measured (one request each, through the second coordinator).
    for round in 0..2 {
        second
            .chat(
                &format!("measure {round}"),
                &[("x-sollol-strategy", "round_robin")],
            )
            .await;
    }
    second
        .until("learned", "both nodes measured", |learned| {
            learned["pairs"]
                .as_array()
                .is_some_and(|pairs| pairs.len() == 2)
        })
        .await;
    // A long request through the first coordinator, pinned to "left".
    let long = serde_json::to_vec(&json!({
        "model": "smollm2:135m",
        "stream": false,
        "messages": [{"role": "user", "content": "long"}],
        "options": {"num_predict": 200},
    }))
    .expect("json");
    let url = first.url("/api/chat");
    let busy =
        tokio::spawn(async move { send("POST", &url, long, &[("x-sollol-node", "left")]).await });
    // The second coordinator hears of it within a few gossip rounds…
    let asked = Instant::now();
    second
        .until("coordinators", "the first's request shows", |list| {
            list["coordinators"].as_array().is_some_and(|all| {
                all.iter()
                    .any(|c| c["state"] == "alive" && c["in_flight"] == 1)
            })
        })
        .await;
    let heard_after = asked.elapsed();
    // …and sends its own requests to the idle node.
    for round in 0..3 {
        let answer = second.chat(&format!("short {round}"), &[]).await;
        assert_eq!(
            answer.node.as_deref(),
            Some("right"),
            "{:?}",
            answer.decision
        );
    }
    assert!(
        heard_after < Duration::from_secs(2),
        "in-flight count took {heard_after:?} to cross"
    );
    let busy = busy.await.expect("long request");
    assert_eq!(busy.status, 200, "{}", busy.text());
    assert_eq!(busy.node.as_deref(), Some("left"));

    stop(agents, [second, first]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_with_different_shared_configuration_refuse_each_other_and_say_why() {
    let (first_address, second_address) = (free_address(), free_address());
    let first = Coordinator::start(
        "first",
        &first_address,
        &[
            ("coordinator.peers", second_address.as_str()),
            ("models.replicas", "smollm2:135m=2"),
        ],
    )
    .await;
    let second = Coordinator::join_group(&first, "second", &second_address).await;
    for coordinator in [&first, &second] {
        let list = coordinator
            .until("coordinators", "the refusal shows", |list| {
                list["coordinators"].as_array().is_some_and(|all| {
                    all.iter().any(|c| {
                        c["state"] == "refused"
                            && c["detail"]
                                .as_str()
                                .is_some_and(|detail| detail.contains("models.replicas"))
                    })
                })
            })
            .await;
        assert_eq!(alive_others(&list), 0, "{list:#}");
        let detail = list["coordinators"]
            .as_array()
            .expect("list")
            .iter()
            .find_map(|c| c["detail"].as_str())
            .expect("detail")
            .to_owned();
        assert!(
            !detail.contains("coordinator.api_keys") && !detail.contains("coordinator.nodes"),
            "only the differing section is named: {detail}"
        );
    }
    // Each still serves on its own.
    for coordinator in [&first, &second] {
        assert_eq!(
            get(&coordinator.url("/healthz")).await.status,
            200,
            "a refused peer does not stop a coordinator"
        );
    }
    stop(Vec::new(), [second, first]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_given_one_coordinator_joins_the_others_the_group_names() {
    let first = Coordinator::start("first", "127.0.0.1:0", &[]).await;
    let first_cluster = first.handle.cluster_address.to_string();
    let second = Coordinator::join_group(&first, "second", "127.0.0.1:0").await;
    first
        .until("coordinators", "the first sees the second", |list| {
            alive_others(list) == 1
        })
        .await;
    // The agent is given the first coordinator only; the first tells it about the second.
    let (agents, _emulators, _dirs) =
        nodes(&[("solo", 2000.0)], &[first_cluster], &first.handle.token).await;
    until_backends(&first, 1).await;
    until_backends(&second, 1).await;
    let answer = second.chat("through the second", &[]).await;
    assert_eq!(answer.node.as_deref(), Some("solo"));
    // One link to each: the node never reconnects (two links from one agent to one coordinator
    // would close each other, and the node would flap).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for coordinator in [&first, &second] {
        let nodes = coordinator.api("nodes").await;
        let solo = &nodes["nodes"][0];
        assert_eq!(solo["status"], "up", "{nodes:#}");
        let id = solo["id"].as_str().expect("id");
        let detail = coordinator.api(&format!("nodes/{id}")).await;
        let events = detail["events"].as_array().expect("events");
        assert!(
            events.iter().all(|event| event["kind"] == "joined"),
            "the node joined once and stayed: {events:#?}"
        );
    }
    stop(agents, [first, second]).await;
}
