//! Response cache: the same 64-input embedding batch, repeated, through a coordinator without the cache
//! and through one with it, against the same emulated node; prints the medians and their ratio.
//! Run it with `scripts/bench/cache [REPEATS [PROMPT_TOKENS_PER_SECOND]]`.
//!
//! The node is an emulated Ollama serving `nomic-embed-text` with 768 dimensions (the real model's) at
//! `PROMPT_TOKENS_PER_SECOND` (default 8,000, a fast machine's figure for that model), one request
//! at a time; the batch is 64 sentences of about 120 characters (about 30 tokens each to the
//! emulator). Both coordinators run in this process with the client and the node, on the same cores,
//! each with the node as a static `coordinator.nodes` entry. The cached coordinator's first request
//! fills the cache and is not counted. A second table does the same against a node that answers at
//! once, which isolates what the cache saves in the gateway itself.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sollol::app::{self, CoordinatorHandle};
use sollol::config::Config;
use sollol_ollama_emulator::{Emulator, EmulatorConfig};

const INPUTS: usize = 64;
const MODEL: &str = "nomic-embed-text:latest";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A coordinator in front of `node`, with or without the cache, and its temporary data directory.
async fn coordinator(node: &str, cache: bool) -> (CoordinatorHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().display().to_string();
    let config = Config::from_pairs(&[
        ("data_dir", &data_dir),
        ("coordinator.gateway_bind", "127.0.0.1:0"),
        ("coordinator.cluster_bind", "127.0.0.1:0"),
        ("coordinator.nodes", node),
        ("coordinator.probe_interval", "500ms"),
        ("coordinator.calibration", "false"),
        ("discovery.mdns", "false"),
        ("log_level", "warn"),
        ("cache.enabled", if cache { "true" } else { "false" }),
    ])
    .expect("config");
    let started = app::start_coordinator(&config).await.expect("coordinator");
    // The coordinator probes its static node before routing to it.
    let since = Instant::now();
    while !started
        .view()
        .backends
        .iter()
        .any(|backend| backend.has_model(MODEL))
    {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "the coordinator never listed the node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (started, dir)
}

/// Sends the batch once; returns the time to the answer's last byte and its `X-Sollol-Cache` header.
async fn embed(client: &HttpClient, url: &str, body: &Bytes) -> (Duration, Option<String>) {
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .expect("request");
    let sent = Instant::now();
    let response = client.request(request).await.expect("answer");
    assert!(
        response.status().is_success(),
        "HTTP {} from {url}",
        response.status()
    );
    let cache = response
        .headers()
        .get("x-sollol-cache")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let answer = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let elapsed = sent.elapsed();
    assert!(
        answer.len() > INPUTS * 768,
        "a short answer: {} bytes",
        answer.len()
    );
    (elapsed, cache)
}

/// The median of `repeats` sends, each expected to carry `expected` as its cache header.
async fn median(
    client: &HttpClient,
    url: &str,
    body: &Bytes,
    repeats: usize,
    expected: Option<&str>,
) -> Duration {
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let (elapsed, cache) = embed(client, url, body).await;
        assert_eq!(cache.as_deref(), expected, "{url}");
        times.push(elapsed);
    }
    times.sort();
    times[times.len() / 2]
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// One table row set: direct, uncached and cached medians against a node at `speed` prompt tokens/s.
async fn run(client: &HttpClient, body: &Bytes, repeats: usize, speed: f64) {
    let emulator = Emulator::start(EmulatorConfig {
        name: "embedder".to_owned(),
        models: vec![MODEL.to_owned()],
        prompt_tokens_per_second: speed,
        embedding_dimensions: 768,
        parallel: 1,
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let node = emulator.url();
    let (uncached, _uncached_dir) = coordinator(&node, false).await;
    let (cached, _cached_dir) = coordinator(&node, true).await;
    let direct_url = format!("{node}/api/embed");
    let uncached_url = format!("http://{}/api/embed", uncached.gateway_address);
    let cached_url = format!("http://{}/api/embed", cached.gateway_address);
    // Warm the connections and the model's "load"; the cached coordinator's first request fills it.
    embed(client, &direct_url, body).await;
    embed(client, &uncached_url, body).await;
    let (_, first) = embed(client, &cached_url, body).await;
    assert_eq!(first.as_deref(), Some("miss"));
    let direct = median(client, &direct_url, body, repeats, None).await;
    let without = median(client, &uncached_url, body, repeats, None).await;
    let with = median(client, &cached_url, body, repeats, Some("hit")).await;
    let node_label = if speed.is_finite() {
        format!("{speed:.0} prompt tokens/s")
    } else {
        "instant".to_owned()
    };
    println!(
        "| {node_label} | {:.3} | {:.3} | {:.3} | {:.1}× |",
        milliseconds(direct),
        milliseconds(without),
        milliseconds(with),
        without.as_secs_f64() / with.as_secs_f64()
    );
    cached.shutdown(Duration::from_secs(5)).await;
    uncached.shutdown(Duration::from_secs(5)).await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let repeats: usize = args
        .next()
        .map(|text| text.parse().expect("REPEATS: a whole number"))
        .unwrap_or(30);
    let speed: f64 = args
        .next()
        .map(|text| text.parse().expect("PROMPT_TOKENS_PER_SECOND: a number"))
        .unwrap_or(8000.0);
    let inputs: Vec<String> = (0..INPUTS)
        .map(|index| {
            format!(
                "Sentence {index:02}: the gateway answers a repeated embedding batch from its cache without asking any node."
            )
        })
        .collect();
    let body = Bytes::from(serde_json::json!({"model": MODEL, "input": inputs}).to_string());
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    println!(
        "response cache: one {INPUTS}-input /api/embed batch ({} bytes, 768 dimensions), median of {repeats} sends each, one client",
        body.len()
    );
    println!(
        "| node | direct (ms) | sollol, no cache (ms) | sollol, cache hit (ms) | no cache / hit |"
    );
    println!("|---|---|---|---|---|");
    run(&client, &body, repeats, speed).await;
    run(&client, &body, repeats, f64::INFINITY).await;
}
