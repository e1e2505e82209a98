//! Finding plain Ollama servers by scanning an address range (`discovery.scan`), on loopback: an
//! emulated Ollama and a web server that is not Ollama listen on the same port at two addresses of
//! 127.0.0.0/29; the coordinator finds the first, routes to it, and lists the second with the reason.

mod support;

use std::time::{Duration, Instant};

use sollol::app;
use sollol::config::Config;
use sollol_ollama_emulator::{Emulator, EmulatorConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SOLLOL: &str = env!("CARGO_BIN_EXE_sollol");

/// Answers every connection with a 404, as a web server without `/api/version` would.
async fn not_ollama(address: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .expect("bind the other service");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found")
                    .await;
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_scan_finds_ollama_and_names_what_is_not() {
    let ollama = Emulator::start_on(
        EmulatorConfig {
            name: "scanned".to_owned(),
            version: "0.5.7".to_owned(),
            ..EmulatorConfig::default()
        },
        "127.0.0.2:0".parse().expect("address"),
    )
    .await
    .expect("emulator");
    let port = ollama.address().port();
    let other = not_ollama(format!("127.0.0.3:{port}").parse().expect("address")).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().display().to_string();
    let port_text = port.to_string();
    let config = Config::from_pairs(&[
        ("data_dir", &data_dir),
        ("coordinator.gateway_bind", "127.0.0.1:0"),
        ("coordinator.cluster_bind", "127.0.0.1:0"),
        ("coordinator.probe_interval", "200ms"),
        ("discovery.scan", "127.0.0.0/29"),
        ("discovery.scan_port", &port_text),
    ])
    .expect("config");
    let coordinator = app::start_coordinator(&config).await.expect("coordinator");
    let gateway = format!("http://{}", coordinator.gateway_address);

    // The emulator becomes a node, named after its address.
    let name = format!("ollama@127.0.0.2:{port}");
    let started = Instant::now();
    loop {
        let nodes: sollol_shared::api::NodeList = serde_json::from_slice(
            &support::get(&format!("{gateway}/api/sollol/v1/nodes"))
                .await
                .body,
        )
        .expect("node list");
        if nodes
            .nodes
            .iter()
            .any(|node| node.name == name && node.status == sollol_shared::api::NodeStatus::Up)
        {
            assert_eq!(nodes.nodes.len(), 1, "only the Ollama server is a node");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the scan never found the emulator"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Requests reach it through the gateway.
    let answer = support::post(
        &format!("{gateway}/api/generate"),
        serde_json::json!({"model": "smollm2:135m", "prompt": "hi", "stream": false}),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.node.as_deref(), Some(name.as_str()));

    // The scan's report: found, and what was not Ollama with why; silent addresses are not listed.
    let discovery: sollol_shared::api::Discovery = serde_json::from_slice(
        &support::get(&format!("{gateway}/api/sollol/v1/discovery"))
            .await
            .body,
    )
    .expect("discovery");
    let scan = discovery.scan.expect("the scan is on");
    assert_eq!(scan.ranges, ["127.0.0.0/29"]);
    assert_eq!(scan.addresses, 6);
    assert_eq!(scan.found.len(), 1);
    assert_eq!(scan.found[0].address, format!("127.0.0.2:{port}"));
    assert_eq!(scan.found[0].version, "0.5.7");
    assert_eq!(scan.rejected.len(), 1, "{:?}", scan.rejected);
    assert_eq!(scan.rejected[0].address, format!("127.0.0.3:{port}"));
    assert_eq!(scan.rejected[0].reason, "answered 404 to /api/version");

    // `sollol discover` says the same.
    let shown = std::process::Command::new(SOLLOL)
        .args(["discover", "--url", &gateway])
        .output()
        .expect("sollol discover");
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{text}");
    assert!(
        text.contains("range scan of 127.0.0.0/29 on port")
            && text.contains(&format!("found       127.0.0.2:{port}  Ollama 0.5.7"))
            && text.contains(&format!(
                "not Ollama  127.0.0.3:{port}  answered 404 to /api/version"
            )),
        "{text}"
    );
    other.abort();
    coordinator.shutdown(Duration::from_secs(5)).await;
}
