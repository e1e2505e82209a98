//! Gateway overhead: the same requests sent straight to an instant emulated Ollama node and through the
//! gateway, side by side in one run; prints the latency the gateway adds and both request rates.
//! Run it with `scripts/bench/overhead`.
//!
//! Non-streaming `/api/chat` (full answer) and streaming `/api/chat` (time to first byte), at 1 and 64
//! clients. The node answers at once (no emulated generation time), so what is measured is HTTP plus
//! routing. Client, gateway and node share this machine's cores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sollol::app;
use sollol::config::Config;
use sollol_ollama_emulator::{Emulator, EmulatorConfig};

const DURATION: Duration = Duration::from_secs(5);

#[derive(Clone, Copy)]
enum Mode {
    Whole,
    FirstByte,
}

struct Measured {
    latencies: Vec<Duration>,
    rate: f64,
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((fraction * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

async fn measure(url: &str, clients: usize, mode: Mode) -> Measured {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients)
        .build(connector);
    let stream = matches!(mode, Mode::FirstByte);
    let body = Bytes::from(
        serde_json::json!({"model": "smollm2:135m", "stream": stream, "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": 4}})
        .to_string(),
    );
    let deadline = Instant::now() + DURATION;
    let started = Instant::now();
    let workers = (0..clients).map(|_| {
        let client = client.clone();
        let url = url.to_owned();
        let body = body.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let request = hyper::Request::post(&url)
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .expect("request");
                let sent = Instant::now();
                let Ok(response) = client.request(request).await else {
                    continue;
                };
                assert!(
                    response.status().is_success(),
                    "HTTP {} from {url}",
                    response.status()
                );
                let mut body = response.into_body();
                let latency = match mode {
                    Mode::Whole => {
                        let _ = body.collect().await;
                        sent.elapsed()
                    }
                    Mode::FirstByte => {
                        let _ = body.frame().await;
                        let latency = sent.elapsed();
                        while let Some(Ok(_)) = body.frame().await {}
                        latency
                    }
                };
                latencies.push(latency);
            }
            latencies
        })
    });
    let mut latencies: Vec<Duration> = futures_util::future::join_all(workers)
        .await
        .into_iter()
        .flat_map(|worker| worker.expect("worker"))
        .collect();
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    latencies.sort();
    Measured { latencies, rate }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let emulator = Arc::new(
        Emulator::start(EmulatorConfig {
            parallel: 1024,
            ..EmulatorConfig::default()
        })
        .await
        .expect("emulator"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().display().to_string();
    let node = emulator.url();
    let config = Config::from_pairs(&[
        ("data_dir", &data_dir),
        ("coordinator.gateway_bind", "127.0.0.1:0"),
        ("coordinator.cluster_bind", "127.0.0.1:0"),
        ("coordinator.nodes", &node),
        ("coordinator.probe_interval", "1s"),
        ("coordinator.node_slots", "1024"),
        ("coordinator.calibration", "false"),
        ("log_level", "warn"),
    ])
    .expect("config");
    let coordinator = app::start_coordinator(&config).await.expect("coordinator");
    while coordinator.view().backends.is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let direct = format!("{node}/api/chat");
    let gateway = format!("http://{}/api/chat", coordinator.gateway_address);
    // Warm both paths (connections, the model "load").
    measure(&direct, 4, Mode::Whole).await;
    measure(&gateway, 4, Mode::Whole).await;

    println!(
        "gateway overhead: instant emulated node, {} s per cell, same process for client, gateway and node",
        DURATION.as_secs()
    );
    println!(
        "| request | clients | direct p50 / p99 (ms) | gateway p50 / p99 (ms) | added p50 / p99 (ms) | direct req/s | gateway req/s | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (label, mode) in [
        ("chat, whole answer", Mode::Whole),
        ("chat stream, first byte", Mode::FirstByte),
    ] {
        for clients in [1usize, 64] {
            let straight = measure(&direct, clients, mode).await;
            let routed = measure(&gateway, clients, mode).await;
            let (d50, d99) = (
                percentile(&straight.latencies, 0.5),
                percentile(&straight.latencies, 0.99),
            );
            let (g50, g99) = (
                percentile(&routed.latencies, 0.5),
                percentile(&routed.latencies, 0.99),
            );
            println!(
                "| {label} | {clients} | {d50:.3} / {d99:.3} | {g50:.3} / {g99:.3} | {:.3} / {:.3} | {:.0} | {:.0} | {:.2} |",
                g50 - d50,
                g99 - d99,
                straight.rate,
                routed.rate,
                routed.rate / straight.rate
            );
        }
    }
    coordinator.shutdown(Duration::from_secs(2)).await;
}
