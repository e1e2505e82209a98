//! Routing-quality benchmark: sollol's strategies side by side with "everything to the fastest node",
//! on an emulated heterogeneous cluster, in one run. Run it with `scripts/bench/routing`.
//!
//! The cluster and workload follow `shared/baselines.md`: five emulated Ollama nodes (fast: 120 tok/s,
//! 2 slots, 1.5 s cold load; two mid: 40 tok/s, 2 slots, 3 s; two slow: 10 tok/s, 1 slot, 6 s),
//! 120 seeded non-streaming `/api/chat` requests (70% smollm2:135m, 30% qwen2:0.5b, num_predict 24–48,
//! prompts of 20–400 characters), at 6 and 12 clients; every run starts with all models cold and a
//! coordinator that has learned nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sollol::app::{self, AgentHandle, CoordinatorHandle};
use sollol::config::Config;
use sollol_ollama_emulator::{Emulator, EmulatorConfig};

const REQUESTS: usize = 120;
const SEED: u64 = 42;

struct NodeSpec {
    name: &'static str,
    decode: f64,
    slots: usize,
    load_seconds: f64,
    max_loaded: usize,
}

const NODES: [NodeSpec; 5] = [
    NodeSpec {
        name: "fast",
        decode: 120.0,
        slots: 2,
        load_seconds: 1.5,
        max_loaded: 3,
    },
    NodeSpec {
        name: "mid1",
        decode: 40.0,
        slots: 2,
        load_seconds: 3.0,
        max_loaded: 2,
    },
    NodeSpec {
        name: "mid2",
        decode: 40.0,
        slots: 2,
        load_seconds: 3.0,
        max_loaded: 1,
    },
    NodeSpec {
        name: "slow1",
        decode: 10.0,
        slots: 1,
        load_seconds: 6.0,
        max_loaded: 1,
    },
    NodeSpec {
        name: "slow2",
        decode: 10.0,
        slots: 1,
        load_seconds: 6.0,
        max_loaded: 1,
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Balancer {
    FastestOnly,
    Strategy(&'static str),
}

impl Balancer {
    fn label(self) -> String {
        match self {
            Self::FastestOnly => "fastest node only (no balancer)".to_owned(),
            Self::Strategy(name) => format!("sollol {name}"),
        }
    }
}

struct RunResult {
    latencies: Vec<Duration>,
    failed: usize,
    wall: Duration,
    spread: BTreeMap<String, usize>,
}

impl RunResult {
    fn percentile(&self, fraction: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((fraction * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1].as_secs_f64()
    }

    /// Requests served per node, `fast/mid1/mid2/slow1/slow2`.
    fn spread_text(&self) -> String {
        NODES
            .iter()
            .map(|spec| self.spread.get(spec.name).copied().unwrap_or(0).to_string())
            .collect::<Vec<_>>()
            .join("/")
    }

    fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }
}

fn workload() -> Vec<serde_json::Value> {
    let mut rng = StdRng::seed_from_u64(SEED);
    (0..REQUESTS)
        .map(|index| {
            let model = if rng.random_bool(0.7) {
                "smollm2:135m"
            } else {
                "qwen2:0.5b"
            };
            let tokens: u32 = rng.random_range(24..=48);
            let length: usize = rng.random_range(20..=400);
            let prompt: String = format!("request {index}: ")
                .chars()
                .chain(std::iter::repeat('x'))
                .take(length)
                .collect();
            json!({
                "model": model,
                "stream": false,
                "messages": [{"role": "user", "content": prompt}],
                "options": {"num_predict": tokens},
            })
        })
        .collect()
}

/// One emulated node: the Rust emulator in this process, or the independent Python emulation
/// (`scripts/bench/ollama_sim.py`) in a process of its own.
enum Node {
    Rust(Emulator),
    Python {
        process: std::process::Child,
        url: String,
    },
}

impl Node {
    fn url(&self) -> String {
        match self {
            Self::Rust(emulator) => emulator.url(),
            Self::Python { url, .. } => url.clone(),
        }
    }

    fn rust(&self) -> &Emulator {
        match self {
            Self::Rust(emulator) => emulator,
            Self::Python { .. } => panic!("faults need the Rust emulator"),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Self::Python { process, .. } = self {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// Which emulation the nodes run: `SOLLOL_BENCH_EMULATION=python` picks the Python one.
fn python_emulation() -> bool {
    std::env::var("SOLLOL_BENCH_EMULATION").is_ok_and(|value| value == "python")
}

/// Starts the Python emulation of `spec` and reads its address from its first line.
fn start_python(spec: &NodeSpec, seed: usize) -> Node {
    use std::io::BufRead;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/bench/ollama_sim.py"
    );
    let mut process = std::process::Command::new("python3")
        .arg(script)
        .args(["--name", spec.name])
        .args(["--decode", &spec.decode.to_string()])
        .args(["--slots", &spec.slots.to_string()])
        .args(["--load-seconds", &spec.load_seconds.to_string()])
        .args(["--max-loaded", &spec.max_loaded.to_string()])
        .args(["--seed", &seed.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs scripts/bench/ollama_sim.py");
    let stdout = process.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the emulation says where it listens");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line from ollama_sim.py: {line:?}"))
        .to_owned();
    Node::Python { process, url }
}

async fn start_emulators() -> Vec<Node> {
    if python_emulation() {
        return NODES
            .iter()
            .enumerate()
            .map(|(index, spec)| start_python(spec, index))
            .collect();
    }
    let mut emulators = Vec::new();
    for spec in &NODES {
        emulators.push(Node::Rust(
            Emulator::start(EmulatorConfig {
                name: spec.name.to_owned(),
                models: vec![
                    "smollm2:135m".into(),
                    "qwen2:0.5b".into(),
                    "nomic-embed-text:latest".into(),
                ],
                decode_tokens_per_second: spec.decode,
                prompt_tokens_per_second: spec.decode * 10.0,
                parallel: spec.slots,
                load_time: Duration::from_secs_f64(spec.load_seconds),
                max_loaded_models: spec.max_loaded,
                ..EmulatorConfig::default()
            })
            .await
            .expect("emulator starts"),
        ));
    }
    emulators
}

/// A coordinator with one agent per emulated node, once every node has joined.
async fn start_cluster(
    strategy: &str,
    emulators: &[Node],
    dirs: &[tempfile::TempDir],
) -> (CoordinatorHandle, Vec<AgentHandle>) {
    let data_dir = dirs[0].path().display().to_string();
    let config = Config::from_pairs(&[
        ("data_dir", &data_dir),
        ("coordinator.gateway_bind", "127.0.0.1:0"),
        ("coordinator.cluster_bind", "127.0.0.1:0"),
        ("coordinator.strategy", strategy),
        ("log_level", "warn"),
    ])
    .expect("config");
    let started = app::start_coordinator(&config).await.expect("coordinator");
    let mut agents = Vec::new();
    for (index, emulator) in emulators.iter().enumerate() {
        let data_dir = dirs[index + 1].path().display().to_string();
        let url = emulator.url();
        let agent_config = Config::from_pairs(&[
            ("data_dir", &data_dir),
            ("agent.name", NODES[index].name),
            ("agent.ollama_url", &url),
            ("agent.heartbeat_interval", "500ms"),
        ])
        .expect("agent config");
        agents.push(
            app::start_agent(
                &agent_config,
                started.cluster_address.to_string(),
                started.token.clone(),
            )
            .await
            .expect("agent"),
        );
    }
    let wait = Instant::now();
    while started.view().backends.len() < NODES.len() {
        assert!(
            wait.elapsed() < Duration::from_secs(10),
            "nodes never joined"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (started, agents)
}

/// One request: its latency, whether it succeeded, and the node that answered.
type Sent = (Duration, (bool, String));

/// Sends `body` to `url`; a slow request's decision is printed with `BENCH_VERBOSE=SECONDS`.
async fn send(client: &Client<HttpConnector, Full<Bytes>>, url: &str, body: &Value) -> Sent {
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("json"),
        )))
        .expect("request");
    let sent = Instant::now();
    let outcome = match client.request(request).await {
        Ok(response) => {
            let ok = response.status().is_success();
            let node = response
                .headers()
                .get("x-sollol-node")
                .and_then(|value| value.to_str().ok())
                .unwrap_or("fast")
                .to_owned();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let decision = format!(
                "{} {}",
                header("x-sollol-decision"),
                header("x-sollol-candidates")
            );
            let complete = response.into_body().collect().await.is_ok();
            if std::env::var_os("BENCH_VERBOSE").is_some()
                && sent.elapsed()
                    > Duration::from_secs_f64(
                        std::env::var("BENCH_VERBOSE")
                            .ok()
                            .and_then(|text| text.parse().ok())
                            .unwrap_or(3.0),
                    )
            {
                eprintln!("slow request: {:?} on {node}: {decision}", sent.elapsed());
            }
            (ok && complete, node)
        }
        Err(_) => (false, String::new()),
    };
    (sent.elapsed(), outcome)
}

/// What the coordinator knows when the measured run starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// A coordinator that has seen no traffic; the clients start as soon as the nodes joined.
    Fresh,
    /// The coordinator's history (and the agents' identities) from an earlier run of the same workload;
    /// every node restarted cold, as after a power cut; the clients come back `SETTLE` after the nodes
    /// joined (the same pause for every balancer).
    History,
}

/// How long after the cluster is up the clients start in the `History` scenario.
const SETTLE: Duration = Duration::from_secs(10);

fn data_dirs() -> Vec<tempfile::TempDir> {
    (0..=NODES.len())
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect()
}

/// Runs the workload through `balancer` in `scenario`.
async fn run_scenario(balancer: Balancer, clients: usize, scenario: Scenario) -> RunResult {
    let dirs = data_dirs();
    match scenario {
        Scenario::Fresh => run(balancer, clients, false, &dirs, Duration::ZERO).await,
        Scenario::History => {
            if matches!(balancer, Balancer::Strategy(_)) {
                // The earlier run whose history the measured one starts from; its nodes go away with it.
                run(balancer, clients, false, &dirs, Duration::ZERO).await;
            }
            run(balancer, clients, false, &dirs, SETTLE).await
        }
    }
}

/// Runs the workload through `balancer` with fresh (cold) emulated nodes, the coordinator and agents
/// keeping their data in `dirs`, the clients starting `settle` after the cluster is up; with `faults`,
/// halfway through one mid node starts answering HTTP 500 and the other is killed (the failover
/// scenario of `shared/baselines.md`).
async fn run(
    balancer: Balancer,
    clients: usize,
    faults: bool,
    dirs: &[tempfile::TempDir],
    settle: Duration,
) -> RunResult {
    let emulators = start_emulators().await;
    let mut coordinator = None;
    let mut agents = Vec::new();
    let target = match balancer {
        Balancer::FastestOnly => emulators[0].url(),
        Balancer::Strategy(strategy) => {
            let (started, joined) = start_cluster(strategy, &emulators, dirs).await;
            agents = joined;
            let url = format!("http://{}", started.gateway_address);
            coordinator = Some(started);
            url
        }
    };

    tokio::time::sleep(settle).await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let requests = Arc::new(std::sync::Mutex::new(
        workload()
            .into_iter()
            .collect::<std::collections::VecDeque<_>>(),
    ));
    let started = Instant::now();
    let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers = (0..clients).map(|_| {
        let finished = Arc::clone(&finished);
        let requests = Arc::clone(&requests);
        let client = client.clone();
        let url = format!("{target}/api/chat");
        tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let Some(body) = requests.lock().expect("queue").pop_front() else {
                    break;
                };
                results.push(send(&client, &url, &body).await);
                finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            results
        })
    });
    let mut result = RunResult {
        latencies: Vec::new(),
        failed: 0,
        wall: Duration::ZERO,
        spread: NODES.iter().map(|spec| (spec.name.to_owned(), 0)).collect(),
    };
    let workers: Vec<_> = workers.collect();
    if faults {
        while finished.load(std::sync::atomic::Ordering::Relaxed) < REQUESTS / 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        emulators[1]
            .rust()
            .set_fault(sollol_ollama_emulator::Fault::InternalError);
        emulators[2].rust().kill();
    }
    for worker in futures_util::future::join_all(workers).await {
        for (latency, (ok, node)) in worker.expect("worker") {
            if ok {
                result.latencies.push(latency);
                *result.spread.entry(node).or_default() += 1;
            } else {
                result.failed += 1;
            }
        }
    }
    result.wall = started.elapsed();
    for agent in agents {
        let _ = agent.stop(Duration::from_secs(2)).await;
    }
    if let Some(coordinator) = coordinator {
        coordinator.shutdown(Duration::from_secs(2)).await;
    }
    drop(emulators);
    result
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let clients_list: Vec<usize> = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "6,12".to_owned())
        .split(',')
        .filter_map(|text| text.trim().parse().ok())
        .collect();
    let all = [
        Balancer::Strategy("intelligent"),
        Balancer::Strategy("round_robin"),
        Balancer::Strategy("least_loaded"),
        Balancer::Strategy("random"),
        Balancer::FastestOnly,
    ];
    // An optional second argument limits the run to some balancers, e.g. `intelligent,fastest`.
    let only: Option<Vec<String>> = std::env::args()
        .nth(2)
        .map(|text| text.split(',').map(|name| name.trim().to_owned()).collect());
    let balancers: Vec<Balancer> = all
        .into_iter()
        .filter(|balancer| {
            only.as_ref().is_none_or(|names| {
                names.iter().any(|name| match balancer {
                    Balancer::FastestOnly => name == "fastest",
                    Balancer::Strategy(strategy) => name == strategy,
                })
            })
        })
        .collect();
    if std::env::args().nth(1).as_deref() == Some("failover") {
        failover().await;
        return;
    }
    // An optional third argument picks the scenarios: `fresh` (default), `history` or `both`.
    let scenarios: Vec<Scenario> = match std::env::args().nth(3).as_deref() {
        Some("history") => vec![Scenario::History],
        Some("both") => vec![Scenario::Fresh, Scenario::History],
        _ => vec![Scenario::Fresh],
    };
    println!(
        "routing benchmark: {REQUESTS} requests, seed {SEED}, nodes fast/mid1/mid2/slow1/slow2, every node cold at the start of each run, {} emulation",
        if python_emulation() {
            "Python (scripts/bench/ollama_sim.py)"
        } else {
            "Rust (tests/emulator)"
        }
    );
    for clients in clients_list {
        for &scenario in &scenarios {
            table(&balancers, clients, scenario).await;
        }
    }
}

/// One table: every balancer at `clients` in `scenario`, and our ratios against fastest-node-only.
async fn table(balancers: &[Balancer], clients: usize, scenario: Scenario) {
    {
        println!();
        match scenario {
            Scenario::Fresh => {
                println!("{clients} clients in parallel, a coordinator that has seen no traffic")
            }
            Scenario::History => println!(
                "{clients} clients in parallel, the coordinator's history from an earlier run, every node restarted cold, clients back {} s after the nodes joined",
                SETTLE.as_secs()
            ),
        }
        println!(
            "| balancer | p50 (s) | p95 (s) | p99 (s) | req/s | failed | spread fast/mid1/mid2/slow1/slow2 |"
        );
        println!("|---|---|---|---|---|---|---|");
        let mut p95 = BTreeMap::new();
        let mut throughput = BTreeMap::new();
        for &balancer in balancers {
            let result = run_scenario(balancer, clients, scenario).await;
            let spread = result.spread_text();
            println!(
                "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
                balancer.label(),
                result.percentile(0.50),
                result.percentile(0.95),
                result.percentile(0.99),
                result.throughput(),
                result.failed,
                spread
            );
            p95.insert(balancer.label(), result.percentile(0.95));
            throughput.insert(balancer.label(), result.throughput());
        }
        let fastest = Balancer::FastestOnly.label();
        let ours = Balancer::Strategy("intelligent").label();
        if let (Some(p95_ours), Some(p95_fastest), Some(rate_ours), Some(rate_fastest)) = (
            p95.get(&ours),
            p95.get(&fastest),
            throughput.get(&ours),
            throughput.get(&fastest),
        ) {
            println!(
                "intelligent vs fastest node only: p95 {:.2}x, throughput {:.2}x",
                p95_ours / p95_fastest,
                rate_ours / rate_fastest
            );
        }
        let ours = p95
            .get(&Balancer::Strategy("intelligent").label())
            .copied()
            .unwrap_or(f64::NAN);
        let best_other = p95
            .iter()
            .filter(|(label, _)| **label != Balancer::Strategy("intelligent").label())
            .map(|(_, value)| *value)
            .fold(f64::INFINITY, f64::min);
        println!(
            "intelligent p95 / best other p95 = {:.2} (target <= 0.70)",
            ours / best_other
        );
    }
}

/// The failover scenario: the same run with and without faults halfway (mid1 answers 500, mid2 is killed).
async fn failover() {
    println!(
        "failover: 6 clients, {REQUESTS} requests; halfway through mid1 starts answering HTTP 500 and mid2 is killed"
    );
    println!(
        "| balancer | faults | p50 (s) | p95 (s) | req/s | failed | spread fast/mid1/mid2/slow1/slow2 |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut p95 = Vec::new();
    for faults in [false, true] {
        let result = run(
            Balancer::Strategy("intelligent"),
            6,
            faults,
            &data_dirs(),
            Duration::ZERO,
        )
        .await;
        let spread = result.spread_text();
        println!(
            "| sollol intelligent | {} | {:.2} | {:.2} | {:.2} | {} | {} |",
            if faults { "yes" } else { "no" },
            result.percentile(0.50),
            result.percentile(0.95),
            result.throughput(),
            result.failed,
            spread
        );
        p95.push(result.percentile(0.95));
    }
    println!(
        "p95 with faults / without = {:.2} (target <= 1.50, and 0 failed)",
        p95[1] / p95[0]
    );
}
