//! Soak: steady load through the release `sollol coordinator` (`SOLLOL_BIN`, a process of its own)
//! for a while, with faults injected in turn every few minutes — a node killed and brought back, a
//! node answering HTTP 500 — while the coordinator's resident memory, open files and threads are
//! sampled. Run it with `scripts/bench/soak [MINUTES]` (default 30); not part of CI.
//!
//! Three emulated Ollama nodes (this process) are the coordinator's static `coordinator.nodes`;
//! eight clients send non-streaming and streaming chats and embeddings without pause. A request
//! counts as lost when it gets anything but a complete answer: the gateway fails over before the
//! client sees a byte, so a node dying must not lose requests that had not started streaming.
//! Prints the samples, every failed request, and a closing line with the targets: RSS growth under
//! 10% (from the first sample after warm-up), open files flat, no request lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sollol_ollama_emulator::{Emulator, EmulatorConfig, Fault};

const CLIENTS: usize = 8;
const WARM_UP: Duration = Duration::from_secs(30);
const FAULT_EVERY: Duration = Duration::from_secs(180);
const FAULT_LASTS: Duration = Duration::from_secs(45);
const SAMPLE_EVERY: Duration = Duration::from_secs(60);

/// What `/proc` says of the coordinator.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at_s: u64,
    rss_mib: f64,
    open_files: usize,
    threads: u64,
}

fn sample(pid: u32, started: Instant) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Sample {
        at_s: started.elapsed().as_secs(),
        rss_mib: field("VmRSS:") as f64 / 1024.0,
        open_files: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count),
        threads: field("Threads:"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let minutes: u64 = std::env::args()
        .nth(1)
        .and_then(|text| text.parse().ok())
        .unwrap_or(30);
    let duration = Duration::from_secs(minutes * 60);
    let binary = std::env::var("SOLLOL_BIN").expect("SOLLOL_BIN: the release sollol binary");
    let mut nodes = Vec::new();
    for (index, speed) in [400.0, 300.0, 200.0].into_iter().enumerate() {
        nodes.push(
            Emulator::start(EmulatorConfig {
                name: format!("soak-{index}"),
                decode_tokens_per_second: speed,
                prompt_tokens_per_second: speed * 10.0,
                parallel: 8,
                ..EmulatorConfig::default()
            })
            .await
            .expect("emulator"),
        );
    }
    let urls: Vec<String> = nodes.iter().map(Emulator::url).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut coordinator = std::process::Command::new(&binary)
        .arg("coordinator")
        .env("SOLLOL_DATA_DIR", dir.path())
        .env("SOLLOL_GATEWAY_BIND", format!("127.0.0.1:{port}"))
        .env("SOLLOL_CLUSTER_BIND", "127.0.0.1:0")
        .env("SOLLOL_NODES", urls.join(","))
        .env("SOLLOL_PROBE_INTERVAL", "1s")
        .env("SOLLOL_MDNS", "false")
        .env("SOLLOL_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {binary}: {error}"));
    let pid = coordinator.id();
    let gateway = format!("http://127.0.0.1:{port}");
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    // Ready once every node is routable.
    let ready = Instant::now();
    loop {
        let request = hyper::Request::get(format!("{gateway}/api/tags"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        if let Ok(response) = client.request(request).await
            && let Ok(body) = response.into_body().collect().await
            && String::from_utf8_lossy(&body.to_bytes()).contains("smollm2")
        {
            break;
        }
        assert!(
            ready.elapsed() < Duration::from_secs(30),
            "the coordinator never got ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "soak: {minutes} min, {CLIENTS} clients, 3 emulated nodes, faults every {} s lasting {} s, coordinator pid {pid}",
        FAULT_EVERY.as_secs(),
        FAULT_LASTS.as_secs()
    );

    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let deadline = started + duration;
    let workers: Vec<_> = (0..CLIENTS)
        .map(|worker| {
            let (client, gateway, done, lost) =
                (client.clone(), gateway.clone(), Arc::clone(&done), Arc::clone(&lost));
            tokio::spawn(async move {
                let mut turn = 0u64;
                while Instant::now() < deadline {
                    turn += 1;
                    let (path, body) = match (worker as u64 + turn) % 3 {
                        0 => ("/api/chat", serde_json::json!({"model": "smollm2:135m", "stream": false,
                            "messages": [{"role": "user", "content": format!("hello {turn}")}], "options": {"num_predict": 8}})),
                        1 => ("/api/chat", serde_json::json!({"model": "smollm2:135m", "stream": true,
                            "messages": [{"role": "user", "content": format!("stream {turn}")}], "options": {"num_predict": 8}})),
                        _ => ("/api/embed", serde_json::json!({"model": "nomic-embed-text", "input": [format!("text {turn}"), "more"]})),
                    };
                    let request = hyper::Request::post(format!("{gateway}{path}"))
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body.to_string())))
                        .expect("request");
                    let outcome = match tokio::time::timeout(Duration::from_secs(60), client.request(request)).await {
                        Ok(Ok(response)) => {
                            let status = response.status();
                            match response.into_body().collect().await {
                                Ok(bytes) => {
                                    let text = String::from_utf8_lossy(&bytes.to_bytes()).into_owned();
                                    if status.is_success() && !text.contains("\"error\"") {
                                        Ok(())
                                    } else {
                                        Err(format!("HTTP {status}: {}", text.chars().take(200).collect::<String>()))
                                    }
                                }
                                Err(error) => Err(format!("body: {error}")),
                            }
                        }
                        Ok(Err(error)) => Err(format!("request: {error}")),
                        Err(_) => Err("no answer within 60 s".to_owned()),
                    };
                    match outcome {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(reason) => lost.lock().expect("lock").push(format!(
                            "{:>5} s {path}: {reason}",
                            Instant::now().saturating_duration_since(started).as_secs()
                        )),
                    }
                }
            })
        })
        .collect();

    let mut samples = Vec::new();
    let mut next_sample = started + WARM_UP;
    let mut next_fault = started + FAULT_EVERY;
    let mut faults = 0usize;
    while Instant::now() < deadline {
        let now = Instant::now();
        if now >= next_sample {
            let taken = sample(pid, started);
            println!(
                "sample {:>5} s: RSS {:.1} MiB, {} open files, {} threads, {} requests answered",
                taken.at_s,
                taken.rss_mib,
                taken.open_files,
                taken.threads,
                done.load(Ordering::Relaxed)
            );
            samples.push(taken);
            next_sample = now + SAMPLE_EVERY;
        }
        if now >= next_fault && now + FAULT_LASTS < deadline {
            let node = &nodes[faults % nodes.len()];
            if faults.is_multiple_of(2) {
                println!(
                    "fault {:>5} s: {} killed for {} s",
                    started.elapsed().as_secs(),
                    node.name(),
                    FAULT_LASTS.as_secs()
                );
                node.kill();
                tokio::time::sleep(FAULT_LASTS).await;
                node.restart().await.expect("restart the node");
            } else {
                println!(
                    "fault {:>5} s: {} answers HTTP 500 for {} s",
                    started.elapsed().as_secs(),
                    node.name(),
                    FAULT_LASTS.as_secs()
                );
                node.set_fault(Fault::InternalError);
                tokio::time::sleep(FAULT_LASTS).await;
                node.set_fault(Fault::None);
            }
            faults += 1;
            next_fault = Instant::now() + FAULT_EVERY;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for worker in workers {
        let _ = worker.await;
    }
    let last = sample(pid, started);
    println!(
        "sample {:>5} s: RSS {:.1} MiB, {} open files, {} threads (end)",
        last.at_s, last.rss_mib, last.open_files, last.threads
    );
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    let lost = lost.lock().expect("lock").clone();
    for failure in &lost {
        println!("lost: {failure}");
    }
    let first = samples.first().copied().unwrap_or(last);
    let growth = (last.rss_mib - first.rss_mib) / first.rss_mib * 100.0;
    let files = last.open_files as i64 - first.open_files as i64;
    println!(
        "soak result: {} requests answered, {} lost (target 0); RSS {:.1} -> {:.1} MiB ({growth:+.1}%, target < 10%); open files {} -> {} ({files:+}, target flat); threads {} -> {}; {faults} faults",
        done.load(Ordering::Relaxed),
        lost.len(),
        first.rss_mib,
        last.rss_mib,
        first.open_files,
        last.open_files,
        first.threads,
        last.threads
    );
}
