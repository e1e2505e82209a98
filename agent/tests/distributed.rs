//! Distributed inference across real agent processes on loopback: each `sollol agent` holds only its
//! layers of the test model, the pipeline reproduces the single-process model, a stage killed mid-answer
//! is planned around, and incompatible stages are refused at plan time.
//!
//! The coordinator is this test process (`app::start_coordinator`); it learns the agents' stage ports
//! from their reports, as the gateway does.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sollol::app::{self, CoordinatorHandle};
use sollol::config::Config;
use sollol::distributed::pipeline::{
    Answer, Candidate, Distributed, Pipeline, PipelineError, Timeouts,
};
use sollol_engine::model::Model;
use sollol_engine::sampling::greedy;
use sollol_shared::layers::Sampling;

mod support;

const SOLLOL: &str = env!("CARGO_BIN_EXE_sollol");

/// An agent process, killed when the test ends however it ends.
struct Agent {
    child: Child,
    name: String,
}

impl Agent {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cluster {
    coordinator: CoordinatorHandle,
    agents: Vec<Agent>,
    _dirs: Vec<tempfile::TempDir>,
}

/// Agents whose name starts with this get an empty models directory.
const WITHOUT_MODEL: &str = "empty";
/// Agents whose name starts with this get a copy of the test model of their own (others, a link to it).
const OWN_COPY: &str = "copy";
/// Agents whose name starts with this hold the second test model, Gemma 3 270M Q4_K_M, as
/// `gemma3:270m` (a link to it).
const GEMMA: &str = "gemma";

/// A coordinator here and `names.len()` agent processes, each with its own models directory holding
/// the test model (or, for a name in `altered`, a copy with one weight byte changed).
async fn cluster(names: &[&str], altered: &[&str]) -> Cluster {
    let coordinator_dir = tempfile::tempdir().expect("tempdir");
    let data = coordinator_dir.path().display().to_string();
    let pairs = [
        ("data_dir", data.as_str()),
        ("coordinator.gateway_bind", "127.0.0.1:0"),
        ("coordinator.cluster_bind", "127.0.0.1:0"),
        ("coordinator.probe_interval", "200ms"),
    ];
    let coordinator = app::start_coordinator(&Config::from_pairs(&pairs).expect("config"))
        .await
        .expect("coordinator");
    let mut dirs = vec![coordinator_dir];
    let mut agents = Vec::new();
    for name in names {
        let (agent, dir) = spawn_agent(
            name,
            &coordinator.cluster_address.to_string(),
            coordinator.token.expose(),
            altered.contains(name),
        );
        agents.push(agent);
        dirs.push(dir);
    }
    let cluster = Cluster {
        coordinator,
        agents,
        _dirs: dirs,
    };
    let started = Instant::now();
    while cluster.candidates(names).len() < names.len() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the agents never reported their stage ports"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster
}

/// Starts `sollol agent NAME` joining `join` with `token`, its models directory holding the test model
/// (a copy with one byte changed when `altered`; nothing for names starting with [`WITHOUT_MODEL`]).
fn spawn_agent(name: &str, join: &str, token: &str, altered: bool) -> (Agent, tempfile::TempDir) {
    // Stages only: the agents do not serve the model whole.
    spawn_agent_with(name, join, token, altered, &[("SOLLOL_ENGINE", "off")])
}

/// An agent process holding the test model (unless `altered` or named without), with `env` set.
fn spawn_agent_with(
    name: &str,
    join: &str,
    token: &str,
    altered: bool,
    env: &[(&str, &str)],
) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).expect("models dir");
    let target = models.join("smollm2:135m.gguf");
    if name.starts_with(GEMMA) {
        std::os::unix::fs::symlink(support::gemma_model(), models.join("gemma3:270m.gguf"))
            .expect("link model");
    } else if name.starts_with(WITHOUT_MODEL) {
        // No copy at all: this agent fetches its part from a peer.
    } else if name.starts_with(OWN_COPY) {
        std::fs::copy(support::test_model(), &target).expect("copy model");
    } else if altered {
        let mut bytes = std::fs::read(support::test_model()).expect("read model");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&target, bytes).expect("write altered copy");
    } else {
        std::os::unix::fs::symlink(support::test_model(), &target).expect("link model");
    }
    let child = Command::new(SOLLOL)
        .args([
            "agent",
            "--join",
            join,
            "--data-dir",
            &dir.path().display().to_string(),
            "--name",
            name,
            "--heartbeat-interval",
            "200ms",
        ])
        .env("SOLLOL_MODELS_DIR", &models)
        // The token through the environment, never on a command line.
        .env("SOLLOL_TOKEN", token)
        // Tests stay on loopback: no mDNS on the machine's interfaces.
        .env("SOLLOL_MDNS", "false")
        .envs(env.iter().copied())
        // Several stage processes share two cores.
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start agent");
    (
        Agent {
            child,
            name: name.to_owned(),
        },
        dir,
    )
}

impl Cluster {
    /// The named agents' stages, in that order, as the coordinator knows them.
    fn candidates(&self, names: &[&str]) -> Vec<Candidate> {
        let view = self.coordinator.view();
        names
            .iter()
            .filter_map(|name| {
                let node = view
                    .nodes
                    .iter()
                    .find(|node| node.name == *name && node.connected)?;
                Some(Candidate {
                    node_id: node.id.clone(),
                    name: node.name.clone(),
                    address: node.stage_address.clone()?,
                })
            })
            .collect()
    }
}

/// A coordinator process with distributed inference on (and `env`): the process, its gateway URL, the
/// join address and token from its banner, and its data directory.
fn start_coordinator(env: &[(&str, &str)]) -> (Agent, String, String, String, tempfile::TempDir) {
    let coordinator_dir = tempfile::tempdir().expect("tempdir");
    let mut coordinator = Command::new(SOLLOL)
        .args([
            "coordinator",
            "--data-dir",
            &coordinator_dir.path().display().to_string(),
            "--gateway-bind",
            "127.0.0.1:0",
            "--cluster-bind",
            "127.0.0.1:0",
        ])
        .env("SOLLOL_MODEL_SHARDING_ENABLED", "true")
        .env("SOLLOL_PROBE_INTERVAL", "200ms")
        .env("SOLLOL_MDNS", "false")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start coordinator");
    let (mut gateway, mut join, mut token) = (String::new(), None, None);
    let lines = std::io::BufRead::lines(std::io::BufReader::new(
        coordinator.stdout.take().expect("stdout"),
    ));
    for line in lines {
        let line = line.expect("banner line");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Gateway:", url, ..] => gateway = (*url).to_owned(),
            ["sollol", "agent", "--join", address, "--token-file", _] => {
                join = Some((*address).to_owned());
            }
            ["Token:", text, ..] => token = Some((*text).to_owned()),
            _ => {}
        }
        if join.is_some() && token.is_some() {
            break;
        }
    }
    let (join, token) = (
        join.expect("the banner's join line"),
        token.expect("the banner's token line"),
    );
    (
        Agent {
            child: coordinator,
            name: "coordinator".to_owned(),
        },
        gateway,
        join,
        token,
        coordinator_dir,
    )
}

fn whole_model() -> Model {
    Model::load_whole(&support::test_model()).expect("load")
}

/// The first reference prompt (its rendered chat prompt's token ids).
fn prompt() -> Vec<u32> {
    prompts().swap_remove(0)
}

/// Every reference prompt's token ids.
fn prompts() -> Vec<Vec<u32>> {
    prompts_of("smollm2-135m-q4_1.llamacpp.json")
}

/// Every prompt's token ids in the reference file `name` (in `tests/reference/`).
fn prompts_of(name: &str) -> Vec<Vec<u32>> {
    let path = support::root().join("tests/reference").join(name);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("reference")).expect("JSON");
    reference["completions"]
        .as_array()
        .expect("completions")
        .iter()
        .map(|completion| {
            completion["prompt_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|id| id.as_u64().expect("id") as u32)
                .collect()
        })
        .collect()
}

/// Greedy tokens sampled on the last stage for `prompt`.
async fn sampled_run(pipeline: &Pipeline, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut sequence = pipeline
        .open(greedy_sampling(), prompt)
        .await
        .expect("open");
    let mut input = prompt.to_vec();
    let mut sampled = Vec::new();
    for _ in 0..steps {
        let Answer::Token(token) = sequence.feed(&input, false).await.expect("forward") else {
            panic!("asked for a token");
        };
        sampled.push(token);
        input = vec![token];
    }
    sampled
}

/// Greedy tokens and every step's logits of the whole model in this process.
fn local_run(model: &Model, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let hidden = model
            .layers(model.embed(&input).expect("embed"), &mut cache)
            .expect("layers");
        cache.length += input.len();
        let logits = model.head(&hidden).expect("head");
        let token = greedy(&logits);
        tokens.push(token);
        all.push(logits);
        input = vec![token];
    }
    (tokens, all)
}

/// Each stage's layers in a pipeline's plan.
fn layer_ranges(pipeline: &Pipeline) -> Vec<std::ops::Range<usize>> {
    pipeline
        .plan
        .stages
        .iter()
        .map(|stage| stage.layers.clone())
        .collect()
}

/// The same through a pipeline, asking the last stage for logits at every step.
async fn pipeline_run(
    pipeline: &Pipeline,
    prompt: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut sequence = pipeline
        .open(greedy_sampling(), prompt)
        .await
        .expect("open");
    let mut input = prompt.to_vec();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let Answer::Logits(logits) = sequence.feed(&input, true).await.expect("forward") else {
            panic!("asked for logits");
        };
        let token = greedy(&logits);
        tokens.push(token);
        all.push(logits);
        input = vec![token];
    }
    (tokens, all)
}

/// 16 greedy tokens after `prompt`, no stop token.
fn generation(prompt: &[u32]) -> sollol_engine::remote::RemoteGeneration<'_> {
    sollol_engine::remote::RemoteGeneration {
        sampling: greedy_sampling(),
        prompt,
        limit: 16,
        stop_tokens: &[],
        choose: None,
    }
}

fn greedy_sampling() -> Sampling {
    Sampling {
        temperature: 0.0,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed: 7,
    }
}

fn worst_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_stages_reproduce_the_single_process_model() {
    let cluster = cluster(&["stage-a", "stage-b", "stage-c", "whole"], &[]).await;
    let token = cluster.coordinator.token.clone();
    let prompt = prompt();
    let model = whole_model();
    let (expected_tokens, expected_logits) = local_run(&model, &prompt, 16);
    let all_prompts = prompts();
    let expected_each: Vec<Vec<u32>> = all_prompts
        .iter()
        .map(|prompt| local_run(&model, prompt, 12).0)
        .collect();
    drop(model);

    // The whole model in a stage process of its own (the allocator keeps freed memory, so a process
    // that held the whole model once is no yardstick for its later parts): the memory each stage of a
    // split must stay under.
    let whole = Pipeline::start(
        "smollm2:135m",
        &cluster.candidates(&["whole"]),
        1,
        &token,
        Timeouts::default(),
    )
    .await
    .expect("one-stage plan");
    let whole_bytes = whole.resident_bytes[0];
    drop(whole);

    for names in [
        &["stage-a", "stage-b"][..],
        &["stage-a", "stage-b", "stage-c"][..],
    ] {
        let pipeline = Pipeline::start(
            "smollm2:135m",
            &cluster.candidates(names),
            names.len(),
            &token,
            Timeouts::default(),
        )
        .await
        .expect("plan");
        let ranges = layer_ranges(&pipeline);
        let expected_ranges = if names.len() == 2 {
            vec![0..15, 15..30]
        } else {
            vec![0..10, 10..20, 20..30]
        };
        assert_eq!(ranges, expected_ranges, "{:?}", pipeline.plan.reasons);
        for (name, bytes) in names.iter().zip(&pipeline.resident_bytes) {
            assert!(
                *bytes < whole_bytes,
                "{name} holds {} MiB, the whole model's process {} MiB",
                bytes >> 20,
                whole_bytes >> 20
            );
        }
        let (tokens, logits) = pipeline_run(&pipeline, &prompt, 16).await;
        assert_eq!(tokens, expected_tokens, "{} stages", names.len());
        let worst = worst_difference(&logits, &expected_logits);
        assert!(
            worst <= 1e-4,
            "{} stages: logits differ by up to {worst}",
            names.len()
        );

        // Sampling on the last stage (greedy) gives the same tokens, and only token ids come back.
        assert_eq!(
            sampled_run(&pipeline, &prompt, 16).await,
            expected_tokens,
            "{} stages, sampled on the last",
            names.len()
        );

        // Four sequences at once: the stages run them in batches, and each gets its own answer.
        let concurrent = futures_util::future::join_all(
            all_prompts.iter().map(|p| sampled_run(&pipeline, p, 12)),
        )
        .await;
        assert_eq!(
            concurrent,
            expected_each,
            "{} stages, 4 sequences",
            names.len()
        );
        let largest = pipeline.stats().largest_batch;
        assert!(
            largest >= 2,
            "the stages never ran two sequences in one batch ({largest})"
        );
    }
}

/// Gemma 3 (another family, K-quants, sliding-window layers) split over two stages gives the whole
/// model's tokens and logits, for one sequence and for four at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma_split_over_two_stages_reproduces_the_single_process_model() {
    let cluster = cluster(&["gemma-a", "gemma-b"], &[]).await;
    let token = cluster.coordinator.token.clone();
    let prompts: Vec<Vec<u32>> = prompts_of("gemma-3-270m-q4_k_m.llamacpp.json")
        .into_iter()
        .take(4)
        .collect();
    let model = Model::load_whole(&support::gemma_model()).expect("load");
    let (expected_tokens, expected_logits) = local_run(&model, &prompts[0], 12);
    let expected_each: Vec<Vec<u32>> = prompts
        .iter()
        .map(|prompt| local_run(&model, prompt, 8).0)
        .collect();
    drop(model);
    let pipeline = Pipeline::start(
        "gemma3:270m",
        &cluster.candidates(&["gemma-a", "gemma-b"]),
        2,
        &token,
        Timeouts::default(),
    )
    .await
    .expect("plan");
    let ranges = layer_ranges(&pipeline);
    assert_eq!(ranges, vec![0..9, 9..18], "{:?}", pipeline.plan.reasons);
    let (tokens, logits) = pipeline_run(&pipeline, &prompts[0], 12).await;
    assert_eq!(tokens, expected_tokens);
    let worst = worst_difference(&logits, &expected_logits);
    assert!(worst <= 1e-4, "logits differ by up to {worst}");
    let concurrent =
        futures_util::future::join_all(prompts.iter().map(|p| sampled_run(&pipeline, p, 8))).await;
    assert_eq!(concurrent, expected_each, "4 sequences");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_killed_mid_answer_is_planned_around() {
    let mut cluster = cluster(&["first", "middle", "last"], &[]).await;
    let token = cluster.coordinator.token.clone();
    let prompt = prompt();
    let names = ["first", "middle", "last"];
    let distributed = Distributed::new("smollm2:135m", 3, token.clone(), Timeouts::default());
    let candidates = || cluster.candidates(&names);
    let undisturbed = distributed
        .generate(candidates, generation(&prompt), |_| true)
        .await
        .expect("undisturbed run");
    assert_eq!(undisturbed.replans, 0);

    // Kill -9 the middle stage after the fourth token of the next answer.
    let middle = cluster
        .agents
        .iter()
        .position(|agent| agent.name == "middle")
        .expect("middle agent");
    let mut killer = Some(cluster.agents.remove(middle));
    let mut seen = 0;
    let started = Instant::now();
    let disturbed = distributed
        .generate(
            || cluster.candidates(&names),
            generation(&prompt),
            |_| {
                seen += 1;
                if seen == 4
                    && let Some(mut agent) = killer.take()
                {
                    agent.kill();
                }
                true
            },
        )
        .await
        .expect("the answer completes despite the dead stage");
    assert_eq!(disturbed.tokens, undisturbed.tokens);
    assert_eq!(disturbed.replans, 1);
    let pipeline = distributed
        .pipeline(&cluster.candidates(&names))
        .await
        .expect("new plan");
    let stages: Vec<String> = pipeline.stage_names();
    assert_eq!(stages, ["first", "last"], "{:?}", pipeline.plan.reasons);
    // The new plan splits by the speed the stages showed on the earlier ones.
    assert!(
        pipeline.plan.reasons[0].contains("speed measured on earlier plans"),
        "{:?}",
        pipeline.plan.reasons
    );
    eprintln!(
        "killed stage: answer finished in {:?} with {} re-plan",
        started.elapsed(),
        disturbed.replans
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_stages_are_refused_at_plan_time() {
    let cluster = cluster(&["good", "altered"], &["altered"]).await;
    let token = cluster.coordinator.token.clone();
    let refused = Pipeline::start(
        "smollm2:135m",
        &cluster.candidates(&["good", "altered"]),
        2,
        &token,
        Timeouts::default(),
    )
    .await
    .expect_err("different copies of the model");
    let message = refused.to_string();
    assert!(
        matches!(refused, PipelineError::Refused { ref node, .. } if node == "altered")
            && message.contains("every stage must hold the same file"),
        "{message}"
    );

    // A peer of another layer protocol version is refused in the handshake, both versions named.
    let address = cluster.candidates(&["good"])[0].address.clone();
    let refusal = refuse_other_version(&address).await;
    assert!(
        refusal.contains(&format!(
            "v{}",
            sollol_shared::layers::LAYER_PROTOCOL_VERSION
        )) && refusal.contains("v99")
            && refusal.contains("version mismatch"),
        "{refusal}"
    );

    // And a client without the cluster token gets nowhere.
    let wrong = sollol::cluster::identity::ClusterToken::parse("0123456789abcdef0123456789abcdef")
        .expect("token");
    let error = sollol::distributed::stage::dial(&address, &wrong, Duration::from_secs(5))
        .await
        .expect_err("wrong token");
    assert!(error.to_string().contains("cluster token"), "{error}");
}

/// Speaks the layer handshake as a client of protocol version 99; returns the stage's refusal.
async fn refuse_other_version(address: &str) -> String {
    use sollol_shared::layers::{LAYER_MAGIC, LayerChallenge, LayerHello};
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream.write_all(&LAYER_MAGIC).await.expect("magic");
    let hello = LayerHello {
        protocol_version: 99,
        build_version: "9.9.9".to_owned(),
        nonce: [0; 32],
    };
    sollol::cluster::wire::write_message(&mut stream, &hello)
        .await
        .expect("hello");
    match sollol::cluster::wire::read_message::<LayerChallenge, _>(&mut stream)
        .await
        .expect("answer")
    {
        LayerChallenge::Refused(refusal) => refusal.message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A distributed model asked for by its name through the gateway, with the official clients: the
/// coordinator plans it over two agents on the first request and answers llama.cpp's greedy text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_model_is_served_through_the_gateway() {
    // The coordinator in a process of its own, so that its memory and mappings are its own.
    let (coordinator, gateway, join, token, _coordinator_dir) = start_coordinator(&[
        ("SOLLOL_DISTRIBUTED_MODELS", "smollm2:135m"),
        ("SOLLOL_DISTRIBUTED_MAX_STAGES", "2"),
    ]);

    let mut keep = Vec::new();
    for name in ["left", "right"] {
        keep.push(spawn_agent(name, &join, &token, false));
    }
    let started = Instant::now();
    loop {
        let tags = support::get(&format!("{gateway}/api/tags")).await.text();
        let nodes: sollol_shared::api::NodeList = serde_json::from_slice(
            &support::get(&format!("{gateway}/api/sollol/v1/nodes"))
                .await
                .body,
        )
        .expect("node list");
        let stages = nodes
            .nodes
            .iter()
            .filter(|node| node.connected && node.stage_address.is_some())
            .count();
        if tags.contains("smollm2:135m") && stages == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the distributed front never listed the model with two stages up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    support::run_client_script(
        "distributed_clients.py",
        &[&gateway, "smollm2:135m"],
        "distributed clients: 4 passed, 0 failed",
    )
    .await;
    // `sollol distribute` shows the plan (already loaded: it answers at once); a model that is not
    // distributed is a clear error.
    let cli = |model: &str| {
        std::process::Command::new(SOLLOL)
            .args(["distribute", model, "--url", &gateway])
            .output()
            .expect("run sollol distribute")
    };
    let shown = cli("smollm2:135m");
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.status.success()
            && text.contains("over 2 stages")
            && text.contains("0-14")
            && text.contains("15-29"),
        "{text}{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let refused = cli("llama3:70b");
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && error.contains("is not a distributed model"),
        "{error}"
    );

    // The plan and what its steps cost, in the API and the metrics.
    let answer = support::get(&format!("{gateway}/api/sollol/v1/distributed")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let list: sollol_shared::api::DistributedList =
        serde_json::from_slice(&answer.body).expect("distributed list");
    let model = &list.models[0];
    assert!(model.planned && model.model == "smollm2:135m", "{model:?}");
    let layers: Vec<_> = model
        .stages
        .iter()
        .map(|stage| {
            (
                stage.layers_start,
                stage.layers_end,
                stage.embed,
                stage.head,
            )
        })
        .collect();
    assert_eq!(
        layers,
        [(0, 15, true, false), (15, 30, false, true)],
        "{model:?}"
    );
    // 4 chats of 16 tokens; the first token of each comes with its prompt, not a generation step.
    assert!(model.tokens >= 60, "{model:?}");
    let bytes = model.bytes_per_token.expect("bytes per token");
    assert!(
        (2_300.0..3_000.0).contains(&bytes),
        "{bytes} bytes per token"
    );
    assert!(
        model.hop_ms.is_some()
            && model
                .stages
                .iter()
                .all(|stage| stage.compute_ms_per_token.is_some())
    );
    let metrics = support::get(&format!("{gateway}/metrics")).await.text();
    for line in [
        "sollol_distributed_bytes_per_token{model=\"smollm2:135m\"}",
        "sollol_distributed_stage_compute_seconds{model=\"smollm2:135m\",stage=\"1\",node=",
        "sollol_distributed_replans_total{model=\"smollm2:135m\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }
    // The coordinator holds no weights: it never maps the file, and its memory stays well under the
    // model's 94 MiB of tensors.
    let pid = coordinator.child.id();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    assert!(!maps.contains(".gguf"), "the coordinator maps a model file");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS");
    eprintln!("coordinator RSS: {} MiB", rss_kib >> 10);
    assert!(
        rss_kib < 90 << 10,
        "the coordinator's RSS is {} MiB",
        rss_kib >> 10
    );

    // A structured output on the distributed model: the last stage sends each step's logits back,
    // the coordinator's engine masks them with the schema's grammar and picks the token.
    let answer = support::post(
        &format!("{gateway}/api/generate"),
        serde_json::json!({
            "model": "smollm2:135m",
            "prompt": "Describe a cat: its name and its age in years.",
            "format": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "age": {"type": "integer", "minimum": 0, "maximum": 30}
                },
                "required": ["name", "age"],
                "additionalProperties": false
            },
            "stream": false,
            "options": {"temperature": 0, "num_predict": 80}
        }),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let response = answer.json()["response"]
        .as_str()
        .expect("response")
        .to_owned();
    let cat: serde_json::Value = serde_json::from_str(&response).expect("the answer is JSON");
    assert!(
        cat["name"].is_string()
            && cat["age"].is_u64()
            && cat.as_object().expect("object").len() == 2,
        "{cat}"
    );
    drop(keep);
}

/// An agent without the file fetches just its part's tensors from an agent that has it, keeps them in
/// a sparse partial copy, and computes the same logits; a later, larger part fetches only what it lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_without_the_file_fetches_its_part_from_a_peer() {
    let cluster = cluster(&["empty-stage", "holder"], &[]).await;
    let token = cluster.coordinator.token.clone();
    let prompt = prompt();
    let (expected_tokens, expected_logits) = local_run(&whole_model(), &prompt, 8);
    let file_bytes = std::fs::metadata(support::test_model())
        .expect("model")
        .len();

    let reports = std::sync::Mutex::new(Vec::new());
    let pipeline = Pipeline::start_with_speeds(
        "smollm2:135m",
        &cluster.candidates(&["empty-stage", "holder"]),
        2,
        &token,
        Timeouts::default(),
        &std::collections::HashMap::new(),
        &|progress: &sollol::distributed::pipeline::Progress| {
            let loaded = progress.stages.iter().filter(|stage| stage.loaded).count();
            let first = progress
                .stages
                .first()
                .map(|stage| (stage.loaded, stage.fetched_bytes, stage.fetch_total_bytes));
            reports
                .lock()
                .expect("reports")
                .push((progress.phase, loaded, first));
        },
    )
    .await
    .expect("plan with a stage that has no copy");
    // Progress: describing, then loading with 0, 1 and 2 stages ready; meanwhile the stage without a
    // copy reports its fetch chunk by chunk, up to all of it.
    use sollol_shared::api::PlanPhase::{Describing, Loading};
    let reports = reports.into_inner().expect("reports");
    let mut phases: Vec<_> = reports
        .iter()
        .map(|(phase, loaded, _)| (*phase, *loaded))
        .collect();
    phases.dedup();
    assert_eq!(
        phases,
        [(Describing, 0), (Loading, 0), (Loading, 1), (Loading, 2)]
    );
    let mut fetching: Vec<(u64, u64)> = reports
        .iter()
        .filter_map(|(_, _, first)| *first)
        .filter(|(loaded, _, total)| !loaded && *total > 0)
        .map(|(_, done, total)| (done, total))
        .collect();
    // Each report shows every stage: the other stage's reports repeat this one's state.
    fetching.dedup();
    assert!(
        fetching.len() >= 3
            && fetching.windows(2).all(|pair| pair[0].0 < pair[1].0)
            && fetching
                .last()
                .is_some_and(|(done, total)| done == total && *total == pipeline.fetched_bytes[0]),
        "{fetching:?}"
    );
    assert!(
        pipeline
            .plan
            .reasons
            .iter()
            .any(|reason| reason.contains("fetches its part from holder")),
        "{:?}",
        pipeline.plan.reasons
    );
    let fetched = pipeline.fetched_bytes[0];
    assert!(
        fetched > file_bytes / 4 && fetched < file_bytes * 3 / 4,
        "the first stage fetched {fetched} of {file_bytes} bytes"
    );
    assert_eq!(pipeline.fetched_bytes[1], 0, "the holder fetches nothing");
    let (tokens, logits) = pipeline_run(&pipeline, &prompt, 8).await;
    assert_eq!(tokens, expected_tokens);
    assert!(worst_difference(&logits, &expected_logits) <= 1e-4);

    // The partial copy is sparse: it occupies about what was fetched, not the file's length.
    let partial_dir = cluster._dirs[1].path().join("models/.partial");
    let partial = std::fs::read_dir(&partial_dir)
        .expect("partial copies")
        .flatten()
        .find(|entry| {
            entry
                .path()
                .extension()
                .is_some_and(|extension| extension == "gguf")
        })
        .expect("a partial copy")
        .path();
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&partial).expect("metadata"))
            * 512;
    assert!(
        allocated < file_bytes * 3 / 4,
        "the partial copy occupies {allocated} bytes"
    );
    drop(pipeline);

    // The whole model on the same agent: only the tensors it lacks travel.
    let whole = Pipeline::start(
        "smollm2:135m",
        &cluster.candidates(&["empty-stage", "holder"]),
        1,
        &token,
        Timeouts::default(),
    )
    .await
    .expect("one-stage plan on the agent without a copy");
    let second = whole.fetched_bytes[0];
    assert!(
        second > 0 && fetched + second < file_bytes,
        "fetched {fetched} then {second} of {file_bytes} bytes"
    );
    let (tokens, _) = pipeline_run(&whole, &prompt, 8).await;
    assert_eq!(tokens, expected_tokens);
}

/// A holder whose copy changed after it took its digest (a disk that rots, a file rewritten in place
/// with its time kept, or a holder that lies) still names the old digest and manifest: a stage fetching
/// from it checks each tensor against the plan's manifest, refuses the changed one and keeps only the
/// tensors that matched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetched_tensors_are_checked_against_the_plans_manifest() {
    let cluster = cluster(&["empty-stage", "copy-holder"], &[]).await;
    let token = cluster.coordinator.token.clone();
    // The holder takes its digest and manifest once, for this plan.
    let whole = Pipeline::start(
        "smollm2:135m",
        &cluster.candidates(&["copy-holder"]),
        1,
        &token,
        Timeouts::default(),
    )
    .await
    .expect("the holder alone");
    drop(whole);

    // One byte of the token embedding (the first stage's) changes on the holder's disk, its time kept.
    let copy = cluster._dirs[2].path().join("models/smollm2:135m.gguf");
    let gguf = sollol_engine::gguf::Gguf::open(&copy).expect("gguf");
    let embedding = gguf.tensor("token_embd.weight").expect("token embedding");
    let modified = std::fs::metadata(&copy)
        .and_then(|metadata| metadata.modified())
        .expect("mtime");
    let mut bytes = std::fs::read(&copy).expect("read copy");
    bytes[(embedding.offset + embedding.size / 2) as usize] ^= 0x10;
    std::fs::write(&copy, &bytes).expect("rewrite copy");
    std::fs::File::options()
        .write(true)
        .open(&copy)
        .and_then(|file| file.set_modified(modified))
        .expect("keep mtime");

    let refused = Pipeline::start(
        "smollm2:135m",
        &cluster.candidates(&["empty-stage", "copy-holder"]),
        2,
        &token,
        Timeouts::default(),
    )
    .await
    .expect_err("a tensor that does not match the manifest");
    let message = refused.to_string();
    assert!(
        message.contains(
            "tensor \"token_embd.weight\" from copy-holder does not match the plan's manifest"
        ),
        "{message}"
    );
    // The tensors that matched are kept; the changed one is not.
    let partial_dir = cluster._dirs[1].path().join("models/.partial");
    let present = std::fs::read_dir(&partial_dir)
        .expect("partial copies")
        .flatten()
        .find(|entry| entry.path().to_string_lossy().ends_with(".tensors.json"))
        .map(|entry| std::fs::read_to_string(entry.path()).expect("present list"))
        .expect("a partial copy");
    assert!(present.contains("blk.0."), "{present}");
    assert!(!present.contains("token_embd"), "{present}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_no_node_can_hold_is_distributed_automatically() {
    // Nothing listed in distributed.models: the coordinator decides by itself.
    let (_coordinator, gateway, join, token, _dir) =
        start_coordinator(&[("SOLLOL_DISTRIBUTED_MAX_STAGES", "2")]);
    // Two agents that serve their models with the engine, each offering 64 MiB to models: less than the
    // model's 94 MiB, enough for half of it.
    let mut keep = Vec::new();
    for name in ["pi-left", "pi-right"] {
        keep.push(spawn_agent_with(
            name,
            &join,
            &token,
            false,
            &[
                ("SOLLOL_ENGINE", "on"),
                ("SOLLOL_ENGINE_MAX_MEMORY", "64MiB"),
            ],
        ));
    }
    let started = Instant::now();
    let listed = loop {
        let list: sollol_shared::api::DistributedList = serde_json::from_slice(
            &support::get(&format!("{gateway}/api/sollol/v1/distributed"))
                .await
                .body,
        )
        .expect("distributed list");
        // Routable once the coordinator's own engine node ("distributed") is up and lists the model.
        let nodes: sollol_shared::api::NodeList = serde_json::from_slice(
            &support::get(&format!("{gateway}/api/sollol/v1/nodes"))
                .await
                .body,
        )
        .expect("node list");
        let routable = nodes.nodes.iter().any(|node| {
            node.name == "distributed"
                && node.status == sollol_shared::api::NodeStatus::Up
                && node.ollama.as_ref().is_some_and(|ollama| {
                    ollama.reachable
                        && ollama
                            .models
                            .iter()
                            .any(|model| model.name.starts_with("smollm2:135m"))
                })
        });
        if let Some(model) = list.models.first()
            && routable
        {
            break model.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the coordinator never distributed the model"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(listed.model, "smollm2:135m");
    assert!(
        listed.reasons[0].starts_with("automatic: no node that holds it has the memory (93 MiB")
            && listed.reasons[0].contains("the most any offers is 64 MiB"),
        "{:?}",
        listed.reasons
    );

    // A holder's own engine will not load it whole, and says why.
    let nodes: sollol_shared::api::NodeList = serde_json::from_slice(
        &support::get(&format!("{gateway}/api/sollol/v1/nodes"))
            .await
            .body,
    )
    .expect("node list");
    let holder = nodes
        .nodes
        .iter()
        .find(|node| node.name == "pi-left")
        .expect("pi-left");
    assert_eq!(holder.memory_limit_bytes, Some(64 << 20));
    let engine = &holder.ollama.as_ref().expect("engine state").url;
    let refused = support::post(
        &format!("{engine}/api/generate"),
        serde_json::json!({"model": "smollm2:135m", "prompt": "hi", "stream": false}),
    )
    .await;
    assert!(
        refused.status == 500
            && refused
                .text()
                .contains("than this node offers (64 MiB, engine.max_memory)"),
        "{} {}",
        refused.status,
        refused.text()
    );

    // Through the gateway it is served by its stages: greedy chat gives llama.cpp's reference text.
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            support::root().join("tests/reference/smollm2-135m-q4_1.llamacpp.json"),
        )
        .expect("reference"),
    )
    .expect("JSON");
    let reference = &reference["completions"][0];
    let chat = serde_json::json!({
        "model": "smollm2:135m",
        "messages": [{"role": "user", "content": reference["user_message"]}],
        "stream": false,
        "options": {"temperature": 0, "num_predict": 16, "seed": 1, "repeat_penalty": 1.0},
    });
    // The first request plans the pipeline (digests and loads on both agents): unoptimised test builds
    // sharing two cores with the other tests take a while.
    let answer = support::send_within(
        "POST",
        &format!("{gateway}/api/chat"),
        serde_json::to_vec(&chat).expect("JSON"),
        &[],
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.node.as_deref(), Some("distributed"));
    let body: serde_json::Value = serde_json::from_slice(&answer.body).expect("chat JSON");
    let text = body["message"]["content"].as_str().expect("content");
    assert!(
        text.len() > 40
            && reference["output_text"]
                .as_str()
                .expect("reference text")
                .starts_with(text),
        "{text:?}"
    );

    // The plan stays within what each agent offers: both stages, 15 layers each.
    let list: sollol_shared::api::DistributedList = serde_json::from_slice(
        &support::get(&format!("{gateway}/api/sollol/v1/distributed"))
            .await
            .body,
    )
    .expect("distributed list");
    let model = &list.models[0];
    let layers: Vec<_> = model
        .stages
        .iter()
        .map(|stage| (stage.layers_start, stage.layers_end))
        .collect();
    assert_eq!(layers, [(0, 15), (15, 30)], "{model:?}");
    assert!(
        model
            .stages
            .iter()
            .all(|stage| stage.free_memory_bytes <= 64 << 20),
        "{model:?}"
    );
    drop(keep);
}
