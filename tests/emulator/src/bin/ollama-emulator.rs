//! Runs emulated Ollama nodes as a process of their own, for benchmarks and multi-host tests:
//! `ollama-emulator [--tokens-per-second N] [COUNT | --bind IP:PORT]`.
//!
//! Starts COUNT nodes (default 1) on free loopback ports (or one on the given address), prints one `http://127.0.0.1:PORT` line per
//! node once all listen, and serves until killed. Every node has `smollm2:135m` and
//! `nomic-embed-text:latest` and answers at once, or generates N tokens a second when given.

use std::io::Write;

use sollol_ollama_emulator::{Emulator, EmulatorConfig};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let usage = || -> ! {
        eprintln!(
            "usage: ollama-emulator [--tokens-per-second N] [COUNT | --bind IP:PORT]   (COUNT: how many nodes on loopback, at least 1)"
        );
        std::process::exit(64);
    };
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut decode_tokens_per_second = f64::INFINITY;
    if args
        .first()
        .is_some_and(|flag| flag == "--tokens-per-second")
    {
        decode_tokens_per_second = match args.get(1).map(|rate| rate.parse::<f64>()) {
            Some(Ok(rate)) if rate > 0.0 => rate,
            _ => usage(),
        };
        args.drain(..2);
    }
    let addresses: Vec<std::net::SocketAddr> = match args.as_slice() {
        [] => vec!["127.0.0.1:0".parse().expect("literal address")],
        [flag, address] if flag == "--bind" => match address.parse() {
            Ok(address) => vec![address],
            Err(_) => usage(),
        },
        [count] => match count.parse::<usize>() {
            Ok(count) if count > 0 => vec!["127.0.0.1:0".parse().expect("literal address"); count],
            _ => usage(),
        },
        _ => usage(),
    };
    let mut emulators = Vec::with_capacity(addresses.len());
    for (index, address) in addresses.into_iter().enumerate() {
        let config = EmulatorConfig {
            name: format!("emulated-{index}"),
            parallel: 64,
            decode_tokens_per_second,
            ..EmulatorConfig::default()
        };
        match Emulator::start_on(config, address).await {
            Ok(emulator) => emulators.push(emulator),
            Err(error) => {
                eprintln!("error: cannot start node {index} on {address}: {error}");
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
