//! Several coordinators against one, in this process on loopback (run it with `scripts/bench/group`):
//!
//! 1. **Convergence.** Three coordinators, every agent joined to all three, four closed-loop clients on
//!    each for 8 s; 5 s after the traffic stops, the largest relative difference between the
//!    coordinators' learned figures (decode and prompt speed, time to first token) of each
//!    (node, model) pair. Beside it, the same three coordinators without `coordinator.peers` (each
//!    learns alone). Target: within 5 %.
//! 2. **Load sharing.** A heterogeneous cluster (fast: 120 tok/s, 2 slots; mid: 40 tok/s, 2 slots;
//!    slow: 10 tok/s, 1 slot) and 12 closed-loop clients of non-streaming chats: one coordinator
//!    serving all of them; two coordinators in a group, 6 clients each; two coordinators that do not
//!    share, 6 clients each. Target: the group's p95 within 1.2x of one coordinator's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sollol::app::{self, AgentHandle, CoordinatorHandle};
use sollol::config::Config;
use sollol_ollama_emulator::{Emulator, EmulatorConfig};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// (name, decode tokens per second, slots)
const NODES: [(&str, f64, usize); 3] = [("fast", 120.0, 2), ("mid", 40.0, 2), ("slow", 10.0, 1)];
const CLIENTS: usize = 12;
const REQUESTS_PER_CLIENT: usize = 12;

struct Cluster {
    coordinators: Vec<CoordinatorHandle>,
    agents: Vec<AgentHandle>,
    _emulators: Vec<Emulator>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    /// `count` coordinators with one token, agents for `NODES` joined to all of them; with `share`,
    /// the coordinators are each other's peers.
    async fn start(count: usize, share: bool) -> Self {
        let mut dirs = Vec::new();
        let mut coordinators: Vec<CoordinatorHandle> = Vec::new();
        for index in 0..count {
            let dir = tempfile::tempdir().expect("tempdir");
            let data_dir = dir.path().display().to_string();
            let mut pairs = vec![
                ("data_dir", data_dir.clone()),
                ("coordinator.gateway_bind", "127.0.0.1:0".to_owned()),
                ("coordinator.cluster_bind", "127.0.0.1:0".to_owned()),
                ("agent.name", format!("c{index}")),
                ("discovery.mdns", "false".to_owned()),
                ("log_level", "warn".to_owned()),
            ];
            if let Some(first) = coordinators.first() {
                pairs.push(("agent.token", first.token.expose().to_owned()));
                if share {
                    pairs.push(("coordinator.peers", first.cluster_address.to_string()));
                }
            }
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let config = Config::from_pairs(&pairs).expect("config");
            coordinators.push(app::start_coordinator(&config).await.expect("coordinator"));
            dirs.push(dir);
        }
        let join: Vec<String> = coordinators
            .iter()
            .map(|coordinator| coordinator.cluster_address.to_string())
            .collect();
        let (mut emulators, mut agents) = (Vec::new(), Vec::new());
        for (name, speed, slots) in NODES {
            let emulator = Emulator::start(EmulatorConfig {
                name: name.to_owned(),
                decode_tokens_per_second: speed,
                prompt_tokens_per_second: speed * 10.0,
                parallel: slots,
                ..EmulatorConfig::default()
            })
            .await
            .expect("emulator");
            let dir = tempfile::tempdir().expect("tempdir");
            let (data_dir, url) = (dir.path().display().to_string(), emulator.url());
            let config = Config::from_pairs(&[
                ("data_dir", data_dir.as_str()),
                ("agent.name", name),
                ("agent.ollama_url", url.as_str()),
                ("agent.heartbeat_interval", "300ms"),
                ("discovery.mdns", "false"),
                ("log_level", "warn"),
            ])
            .expect("agent config");
            agents.push(
                app::start_agent(&config, join.clone(), coordinators[0].token.clone())
                    .await
                    .expect("agent"),
            );
            emulators.push(emulator);
            dirs.push(dir);
        }
        let cluster = Self {
            coordinators,
            agents,
            _emulators: emulators,
            _dirs: dirs,
        };
        let client = client();
        let started = Instant::now();
        loop {
            let mut ready = true;
            for coordinator in &cluster.coordinators {
                let nodes = coordinator.view().backends.len() == NODES.len();
                let list = get(&client, &url(coordinator, "/api/sollol/v1/coordinators")).await;
                let alive = list["coordinators"].as_array().map_or(0, |all| {
                    all.iter().filter(|c| c["state"] == "alive").count()
                });
                ready &= nodes && (!share || alive == count - 1);
            }
            if ready {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the cluster never formed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cluster
    }

    async fn stop(self) {
        for agent in self.agents {
            let _ = agent.stop(Duration::from_secs(5)).await;
        }
        for coordinator in self.coordinators {
            coordinator.shutdown(Duration::from_secs(5)).await;
        }
    }
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

fn url(coordinator: &CoordinatorHandle, path: &str) -> String {
    format!("http://{}{path}", coordinator.gateway_address)
}

async fn get(client: &HttpClient, url: &str) -> Value {
    let request = hyper::Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    match client.request(request).await {
        Ok(response) => {
            let body = response
                .into_body()
                .collect()
                .await
                .map(|body| body.to_bytes());
            body.ok()
                .and_then(|body| serde_json::from_slice(&body).ok())
                .unwrap_or(Value::Null)
        }
        Err(_) => Value::Null,
    }
}

/// One chat; its latency and whether it succeeded.
async fn chat(client: &HttpClient, url: &str, content: &str) -> (Duration, bool) {
    let body = json!({
        "model": "smollm2:135m",
        "messages": [{"role": "user", "content": content}],
        "stream": false,
        "options": {"num_predict": 32},
    });
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let sent = Instant::now();
    let ok = match client.request(request).await {
        Ok(response) => {
            let ok = response.status().is_success();
            ok && response.into_body().collect().await.is_ok()
        }
        Err(_) => false,
    };
    (sent.elapsed(), ok)
}

/// `clients` closed-loop clients on each coordinator of `targets`, `requests` each (or, with
/// `for_time`, until it has passed); every latency, and the failures.
async fn traffic(
    targets: &[&CoordinatorHandle],
    clients: usize,
    requests: usize,
    for_time: Option<Duration>,
) -> (Vec<Duration>, usize) {
    let mut running = tokio::task::JoinSet::new();
    let started = Instant::now();
    for (target_index, target) in targets.iter().enumerate() {
        let chat_url = url(target, "/api/chat");
        for client_index in 0..clients {
            let chat_url = chat_url.clone();
            running.spawn(async move {
                let client = client();
                let mut seen = Vec::new();
                let mut failed = 0;
                for request in 0.. {
                    let done = match for_time {
                        Some(limit) => started.elapsed() >= limit,
                        None => request >= requests,
                    };
                    if done {
                        break;
                    }
                    let content =
                        format!("client {target_index}-{client_index}, request {request}");
                    let (latency, ok) = chat(&client, &chat_url, &content).await;
                    seen.push(latency);
                    failed += usize::from(!ok);
                }
                (seen, failed)
            });
        }
    }
    let (mut latencies, mut failed) = (Vec::new(), 0);
    while let Some(result) = running.join_next().await {
        let (seen, failures) = result.expect("client task");
        latencies.extend(seen);
        failed += failures;
    }
    latencies.sort();
    (latencies, failed)
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

/// The largest relative difference between the coordinators' learned figures, per field, over every
/// (node, model) pair any of them knows (a pair one of them lacks counts as 100 %).
async fn spread(cluster: &Cluster) -> BTreeMap<&'static str, f64> {
    let client = client();
    let mut tables = Vec::new();
    for coordinator in &cluster.coordinators {
        let learned = get(&client, &url(coordinator, "/api/sollol/v1/learned")).await;
        let mut table = BTreeMap::new();
        for pair in learned["pairs"].as_array().into_iter().flatten() {
            let key = format!("{}/{}", pair["node_id"], pair["model"]);
            table.insert(key, pair.clone());
        }
        tables.push(table);
    }
    let keys: std::collections::BTreeSet<String> = tables
        .iter()
        .flat_map(|table| table.keys().cloned())
        .collect();
    let mut worst = BTreeMap::new();
    for field in [
        "decode_tokens_per_second",
        "prompt_tokens_per_second",
        "time_to_first_token_ms",
    ] {
        let mut field_worst: f64 = 0.0;
        for key in &keys {
            let values: Vec<f64> = tables
                .iter()
                .filter_map(|table| table.get(key).and_then(|pair| pair[field].as_f64()))
                .collect();
            let difference = if values.len() < tables.len() {
                1.0
            } else {
                let (min, max) = values
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(min, max), value| {
                        (min.min(*value), max.max(*value))
                    });
                if max > 0.0 { (max - min) / max } else { 0.0 }
            };
            field_worst = field_worst.max(difference);
        }
        worst.insert(field, field_worst);
    }
    worst
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "1. convergence: 3 coordinators, 4 clients on each for 8 s, figures compared 5 s after"
    );
    for (label, share) in [
        ("group (coordinator.peers)", true),
        ("each alone (no peers)", false),
    ] {
        let cluster = Cluster::start(3, share).await;
        let targets: Vec<&CoordinatorHandle> = cluster.coordinators.iter().collect();
        let (latencies, failed) = traffic(&targets, 4, 0, Some(Duration::from_secs(8))).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let worst = spread(&cluster).await;
        println!(
            "   {label:<28} {} requests ({failed} failed); largest difference between coordinators: decode {:.2} %, prompt {:.2} %, time to first token {:.2} %",
            latencies.len(),
            worst["decode_tokens_per_second"] * 100.0,
            worst["prompt_tokens_per_second"] * 100.0,
            worst["time_to_first_token_ms"] * 100.0,
        );
        cluster.stop().await;
    }

    println!(
        "2. load sharing: fast/mid/slow nodes, {CLIENTS} closed-loop clients x {REQUESTS_PER_CLIENT} chats (num_predict 32)"
    );
    let mut results = Vec::new();
    for (label, count, share) in [
        ("1 coordinator, all clients", 1, true),
        ("2 coordinators in a group, half each", 2, true),
        ("2 coordinators not sharing, half each", 2, false),
    ] {
        let cluster = Cluster::start(count, share).await;
        let targets: Vec<&CoordinatorHandle> = cluster.coordinators.iter().collect();
        let (latencies, failed) =
            traffic(&targets, CLIENTS / count, REQUESTS_PER_CLIENT, None).await;
        let (p50, p95) = (percentile(&latencies, 0.5), percentile(&latencies, 0.95));
        println!(
            "   {label:<40} p50 {p50:>7.0} ms   p95 {p95:>7.0} ms   ({} requests, {failed} failed)",
            latencies.len()
        );
        results.push(p95);
        cluster.stop().await;
    }
    println!(
        "   p95 ratio, group / one coordinator: {:.2} (target <= 1.2); not sharing / one coordinator: {:.2}",
        results[1] / results[0],
        results[2] / results[0]
    );
}
