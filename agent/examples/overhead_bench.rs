//! Gateway overhead: the same requests sent straight to an instant emulated Ollama node, through the
//! gateway and (with `NGINX_BIN` set) through nginx, side by side in one run; prints the latency each adds
//! and the request rates.
//! Run it with `scripts/bench/overhead`.
//!
//! Non-streaming `/api/chat` (full answer) and streaming `/api/chat` (time to first byte), at 1 and 64
//! clients. The node answers at once (no emulated generation time), so what is measured is HTTP plus
//! routing. The client and the node run in this process; the release `sollol coordinator` (`SOLLOL_BIN`)
//! and nginx (`NGINX_BIN`) each run in a process of their own, all sharing this machine's cores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
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

/// A proxy in a process of its own in front of the node: sollol's coordinator or nginx.
struct ProxyProcess {
    child: std::process::Child,
    url: String,
    /// nginx's workers outlive a killed master; it is stopped with `nginx -s stop` instead.
    stop: Option<std::process::Command>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

impl ProxyProcess {
    fn wait_listening(mut self, port: u16) -> Self {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the proxy exited before listening: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the proxy never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self
    }

    /// The release `sollol coordinator` with the node as a static `coordinator.nodes` entry.
    fn sollol(binary: &str, node: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let child = std::process::Command::new(binary)
            .arg("coordinator")
            .env("SOLLOL_DATA_DIR", dir.path())
            .env("SOLLOL_GATEWAY_BIND", format!("127.0.0.1:{port}"))
            .env("SOLLOL_CLUSTER_BIND", "127.0.0.1:0")
            .env("SOLLOL_NODES", node)
            .env("SOLLOL_PROBE_INTERVAL", "1s")
            .env("SOLLOL_NODE_SLOTS", "1024")
            .env("SOLLOL_CALIBRATION", "false")
            .env("SOLLOL_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {binary}: {error}"));
        ProxyProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
            stop: None,
            _dir: dir,
        }
        .wait_listening(port)
    }

    /// nginx as a keep-alive reverse proxy, one worker per core.
    fn nginx(binary: &str, node: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let upstream = node.trim_start_matches("http://");
        let prefix = dir.path().display();
        let config = format!(
            "daemon off;\nworker_processes auto;\npid {prefix}/nginx.pid;\nerror_log stderr error;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n\
               fastcgi_temp_path {prefix}/fastcgi;\n  uwsgi_temp_path {prefix}/uwsgi;\n  scgi_temp_path {prefix}/scgi;\n\
               upstream node {{ server {upstream}; keepalive 256; }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://node;\n\
                     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, config).expect("write nginx.conf");
        let command = |extra: &[&str]| {
            let mut command = std::process::Command::new(binary);
            command
                .arg("-p")
                .arg(dir.path())
                .args(["-e", "stderr", "-c"])
                .arg(&path)
                .args(extra)
                .stdout(std::process::Stdio::null());
            command
        };
        let child = command(&[])
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {binary}: {error}"));
        let stop = Some(command(&["-s", "stop"]));
        ProxyProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
            stop,
            _dir: dir,
        }
        .wait_listening(port)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        match self.stop.as_mut().map(std::process::Command::status) {
            Some(Ok(status)) if status.success() => {}
            _ => {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
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
    let node = emulator.url();
    let binary = |name: &str| std::env::var(name).ok().filter(|path| !path.is_empty());
    let sollol = ProxyProcess::sollol(
        &binary("SOLLOL_BIN").unwrap_or_else(|| "target/release/sollol".to_owned()),
        &node,
    );
    // The coordinator probes its static node before routing to it.
    let probe = format!("{}/api/tags", sollol.url);
    let started = Instant::now();
    loop {
        let answer = get_text(&probe).await;
        if answer.contains("smollm2") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the coordinator never listed the node: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let nginx = binary("NGINX_BIN").map(|path| ProxyProcess::nginx(&path, &node));
    let mut paths = vec![
        ("direct", format!("{node}/api/chat")),
        ("sollol", format!("{}/api/chat", sollol.url)),
    ];
    if let Some(nginx) = &nginx {
        paths.push(("nginx", format!("{}/api/chat", nginx.url)));
    }
    // Warm every path (connections, the model "load").
    for (_, url) in &paths {
        measure(url, 4, Mode::Whole).await;
    }

    println!(
        "gateway overhead: instant emulated node, {} s per cell, client and node in one process, each proxy in its own, on the same 2 cores{}",
        DURATION.as_secs(),
        if nginx.is_some() {
            ""
        } else {
            " (no NGINX_BIN: nginx not measured)"
        }
    );
    println!(
        "| request | clients | path | p50 (ms) | p99 (ms) | added p50 / p99 (ms) | req/s | req/s vs direct |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut versus_nginx = Vec::new();
    for (label, mode) in [
        ("chat, whole answer", Mode::Whole),
        ("chat stream, first byte", Mode::FirstByte),
    ] {
        for clients in [1usize, 64] {
            let mut direct: Option<(f64, f64, f64)> = None;
            let mut rates = std::collections::BTreeMap::new();
            for (name, url) in &paths {
                let measured = measure(url, clients, mode).await;
                let p50 = percentile(&measured.latencies, 0.5);
                let p99 = percentile(&measured.latencies, 0.99);
                let (d50, d99, rate) = *direct.get_or_insert((p50, p99, measured.rate));
                let added = if *name == "direct" {
                    "-".to_owned()
                } else {
                    format!("{:.3} / {:.3}", p50 - d50, p99 - d99)
                };
                println!(
                    "| {label} | {clients} | {name} | {p50:.3} | {p99:.3} | {added} | {:.0} | {:.2} |",
                    measured.rate,
                    measured.rate / rate
                );
                rates.insert(*name, measured.rate);
            }
            if let (Some(ours), Some(theirs)) = (rates.get("sollol"), rates.get("nginx")) {
                versus_nginx.push(format!("{label}, {clients} clients: {:.2}", ours / theirs));
            }
        }
    }
    if !versus_nginx.is_empty() {
        println!(
            "sollol req/s / nginx req/s: {} (target >= 0.80)",
            versus_nginx.join("; ")
        );
    }
    drop(nginx);
    drop(sollol);
}

/// The body of a GET, or the error as text.
async fn get_text(url: &str) -> String {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return format!("bad URL {url}");
    };
    match client.get(uri).await {
        Ok(response) => match response.into_body().collect().await {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            Err(error) => error.to_string(),
        },
        Err(error) => error.to_string(),
    }
}
