//! Runs emulated Ollama nodes as a process of their own, for benchmarks: `ollama-emulator [COUNT]`.
//!
//! Starts COUNT nodes (default 1) on free loopback ports, prints one `http://127.0.0.1:PORT` line per
//! node once all listen, and serves until killed. Every node answers at once (no emulated generation
//! time) and has `smollm2:135m` and `nomic-embed-text:latest`.

use std::io::Write;

use sollol_ollama_emulator::{Emulator, EmulatorConfig};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let count: usize = match std::env::args().nth(1).map(|text| text.parse()) {
        None => 1,
        Some(Ok(count)) if count > 0 => count,
        Some(_) => {
            eprintln!("usage: ollama-emulator [COUNT]   (COUNT: how many nodes, at least 1)");
            std::process::exit(64);
        }
    };
    let mut emulators = Vec::with_capacity(count);
    for index in 0..count {
        let config = EmulatorConfig {
            name: format!("emulated-{index}"),
            parallel: 64,
            ..EmulatorConfig::default()
        };
        match Emulator::start(config).await {
            Ok(emulator) => emulators.push(emulator),
            Err(error) => {
                eprintln!("error: cannot start node {index}: {error}");
                std::process::exit(1);
            }
        }
    }
    let mut stdout = std::io::stdout().lock();
    for emulator in &emulators {
        let _ = writeln!(stdout, "{}", emulator.url());
    }
    let _ = stdout.flush();
    drop(stdout);
    std::future::pending::<()>().await;
}
