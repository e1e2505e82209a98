//! Distributed inference benchmark, our side (`scripts/bench/distributed` runs it): the test model in one
//! process, then split over 2 and 3 stages, over loopback and over emulated links, all in this process
//! and its one thread pool (no more threads than `RAYON_NUM_THREADS` in total).
//!
//! Every connection to a stage goes through a userspace relay that counts bytes and, for the emulated
//! links, delays each chunk and limits the rate (kernel netem is not available on the machines we
//! measure on). Prints one JSON object per configuration.
//!
//! Usage: distributed_bench MODEL.gguf [TOKENS]
//!        distributed_bench relay TARGET DELAY_US RATE_BYTES_PER_S
//!            (a relay alone, for llama.cpp RPC's side: prints its address, relays until stdin closes,
//!            then prints the bytes it carried)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use sollol::cluster::identity::ClusterToken;
use sollol::distributed::pipeline::{Answer, Candidate, Pipeline, Sequence, Timeouts};
use sollol::distributed::stage::{StageSettings, serve};
use sollol_engine::model::Model;
use sollol_engine::sampling::greedy;
use sollol_shared::layers::Sampling;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A link between two machines: one-way delay and rate.
#[derive(Clone, Copy, Debug)]
struct Link {
    name: &'static str,
    delay: Duration,
    /// Bytes per second; 0 for unlimited.
    rate: u64,
}

const LINKS: [Link; 3] = [
    Link {
        name: "loopback",
        delay: Duration::ZERO,
        rate: 0,
    },
    Link {
        name: "1 Gbit/s, 0.5 ms",
        delay: Duration::from_micros(500),
        rate: 125_000_000,
    },
    Link {
        name: "100 Mbit/s, 5 ms (Wi-Fi-like)",
        delay: Duration::from_millis(5),
        rate: 12_500_000,
    },
];

/// Relays connections from a local port to `target`, counting bytes both ways into `bytes`. Plain
/// threads and blocking sockets: `std::thread::sleep` keeps sub-millisecond delays (tokio's timer
/// rounds every wait up to the next millisecond, which would add ~1 ms to each transfer).
fn relay(target: String, link: Link, bytes: Arc<AtomicU64>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("relay port");
    let address = listener.local_addr().expect("address").to_string();
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { continue };
            let Ok(outbound) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            inbound.set_nodelay(true).ok();
            outbound.set_nodelay(true).ok();
            let (Ok(inbound_copy), Ok(outbound_copy)) = (inbound.try_clone(), outbound.try_clone())
            else {
                continue;
            };
            let (up, down) = (Arc::clone(&bytes), Arc::clone(&bytes));
            std::thread::spawn(move || pump(inbound, outbound_copy, link, up));
            std::thread::spawn(move || pump(outbound, inbound_copy, link, down));
        }
    });
    address
}

/// One direction of a relay: each chunk leaves `delay` after it arrived, and no faster than `rate`.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    link: Link,
    bytes: Arc<AtomicU64>,
) {
    use std::io::{Read, Write};
    let (sender, receiver) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        let mut free_at = Instant::now();
        for (due, chunk) in receiver {
            let serialised = if link.rate == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(chunk.len() as f64 / link.rate as f64)
            };
            free_at = free_at.max(due) + serialised;
            let now = Instant::now();
            if free_at > now {
                std::thread::sleep(free_at - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(read) = from.read(&mut buffer) {
        if read == 0 {
            break;
        }
        bytes.fetch_add(read as u64, Ordering::Relaxed);
        if sender
            .send((Instant::now() + link.delay, buffer[..read].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(sender);
    let _ = writer.join();
}

fn greedy_sampling() -> Sampling {
    Sampling {
        temperature: 0.0,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed: 1,
    }
}

fn prompt() -> Vec<u32> {
    (0..64).map(|index| 1000 + index * 37).collect()
}

/// A sequence through `pipeline` with the prompt processed: the sequence, its first token and the time
/// to it.
async fn prefill(pipeline: &Pipeline) -> (Sequence<'_>, u32, Duration) {
    let prompt = prompt();
    let mut sequence = pipeline
        .open(greedy_sampling(), &prompt)
        .await
        .expect("open");
    let started = Instant::now();
    let Answer::Token(token) = sequence.feed(&prompt, false).await.expect("prompt") else {
        panic!("a token");
    };
    (sequence, token, started.elapsed())
}

/// Generates from `token` until there are `tokens`.
async fn generate(mut sequence: Sequence<'_>, mut token: u32, tokens: usize) -> Vec<u32> {
    let mut out = vec![token];
    for _ in 1..tokens {
        let Answer::Token(next) = sequence.feed(&[token], false).await.expect("step") else {
            panic!("a token");
        };
        token = next;
        out.push(token);
    }
    out
}

/// Time to first token, generation tokens/s and the tokens, for one sequence through `pipeline`.
async fn one_sequence(pipeline: &Pipeline, tokens: usize) -> (Duration, f64, Vec<u32>) {
    let (sequence, token, first) = prefill(pipeline).await;
    let generating = Instant::now();
    let out = generate(sequence, token, tokens).await;
    let rate = (tokens - 1) as f64 / generating.elapsed().as_secs_f64();
    (first, rate, out)
}

/// Four sequences through `pipeline` at once: their prompts together, then their generation together.
/// Returns the aggregate generation tokens/s and each sequence's tokens.
async fn four_sequences(pipeline: &Pipeline, tokens: usize) -> (f64, Vec<Vec<u32>>) {
    let prefilled = futures_util::future::join_all((0..4).map(|_| prefill(pipeline))).await;
    let started = Instant::now();
    let outs = futures_util::future::join_all(
        prefilled
            .into_iter()
            .map(|(sequence, token, _)| generate(sequence, token, tokens)),
    )
    .await;
    let generated: usize = outs.iter().map(|out| out.len() - 1).sum();
    (generated as f64 / started.elapsed().as_secs_f64(), outs)
}

/// The whole model in this process: time to first token, generation tokens/s, tokens. With `ready`, waits
/// there between the prompt and the generation (so that several sequences generate together).
fn local_sequence(
    model: &Model,
    tokens: usize,
    ready: Option<&Barrier>,
) -> (Duration, f64, Vec<u32>) {
    let prompt = prompt();
    let mut cache = model.new_cache();
    let started = Instant::now();
    let hidden = model
        .layers(model.embed(&prompt).expect("embed"), &mut cache)
        .expect("layers");
    cache.length += prompt.len();
    let mut token = greedy(&model.head(&hidden).expect("head"));
    let first = started.elapsed();
    if let Some(ready) = ready {
        ready.wait();
    }
    let mut out = vec![token];
    let generating = Instant::now();
    for _ in 1..tokens {
        let hidden = model
            .layers(model.embed(&[token]).expect("embed"), &mut cache)
            .expect("layers");
        cache.length += 1;
        token = greedy(&model.head(&hidden).expect("head"));
        out.push(token);
    }
    let rate = (tokens - 1) as f64 / generating.elapsed().as_secs_f64();
    (first, rate, out)
}

/// `relay TARGET DELAY_US RATE`: one relay as a process of its own.
async fn relay_only(mut args: impl Iterator<Item = String>) {
    let target = args.next().expect("relay TARGET DELAY_US RATE");
    let delay: u64 = args.next().and_then(|text| text.parse().ok()).unwrap_or(0);
    let rate: u64 = args.next().and_then(|text| text.parse().ok()).unwrap_or(0);
    let bytes = Arc::new(AtomicU64::new(0));
    let link = Link {
        name: "relay",
        delay: Duration::from_micros(delay),
        rate,
    };
    let address = relay(target, link, Arc::clone(&bytes));
    println!("{address}");
    // Until the parent closes stdin.
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while matches!(stdin.read(&mut sink).await, Ok(read) if read > 0) {}
    println!("{}", bytes.load(Ordering::Relaxed));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("relay") {
        args.next();
        return relay_only(args).await;
    }
    let path = std::path::PathBuf::from(
        args.next()
            .expect("usage: distributed_bench MODEL.gguf [TOKENS]"),
    );
    let tokens: usize = args.next().and_then(|text| text.parse().ok()).unwrap_or(64);
    let models_dir = tempfile::tempdir().expect("tempdir");
    let absolute = std::fs::canonicalize(&path).expect("the model file");
    std::os::unix::fs::symlink(absolute, models_dir.path().join("bench:latest.gguf"))
        .expect("link");

    // Our single process, one sequence and four at once (each its own KV cache, sharing the pool):
    // the aggregate generation tokens/s once every prompt is processed.
    let model = Arc::new(Model::load_whole(&path).expect("load the model"));
    let (first, rate, reference) = local_sequence(&model, tokens, None);
    let concurrent = {
        let ready = Arc::new(Barrier::new(5));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (model, ready) = (Arc::clone(&model), Arc::clone(&ready));
                std::thread::spawn(move || local_sequence(&model, tokens, Some(&ready)).2)
            })
            .collect();
        ready.wait();
        let started = Instant::now();
        let generated: usize = handles
            .into_iter()
            .map(|handle| handle.join().expect("thread").len() - 1)
            .sum();
        generated as f64 / started.elapsed().as_secs_f64()
    };
    println!(
        "{}",
        serde_json::json!({"setup": "single process", "link": "-", "ttft_ms": first.as_secs_f64() * 1e3,
            "tg_tokens_per_s": rate, "bytes_per_token": 0, "aggregate_4_sequences_tokens_per_s": concurrent})
    );
    drop(model);

    let token = ClusterToken::generate();
    let shutdown = CancellationToken::new();
    let mut stages = Vec::new();
    for index in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("stage port");
        let address = listener.local_addr().expect("address").to_string();
        tokio::spawn(serve(
            listener,
            StageSettings {
                node_id: format!("{index:032x}"),
                node_name: format!("stage-{index}"),
                models_dir: models_dir.path().to_owned(),
                ollama_store: None,
                ollama_url: None,
                max_disk: None,
                token: token.clone(),
                handshake_timeout: Duration::from_secs(5),
                memory_limit: None,
            },
            shutdown.clone(),
        ));
        stages.push(address);
    }
    for count in [2usize, 3] {
        for link in LINKS {
            let bytes = Arc::new(AtomicU64::new(0));
            let mut candidates = Vec::new();
            for (index, address) in stages.iter().take(count).enumerate() {
                candidates.push(Candidate {
                    node_id: format!("{index:032x}"),
                    name: format!("stage-{index}"),
                    address: relay(address.clone(), link, Arc::clone(&bytes)),
                });
            }
            let pipeline =
                Pipeline::start("bench", &candidates, count, &token, Timeouts::default())
                    .await
                    .expect("plan");
            let (first, rate, out) = one_sequence(&pipeline, tokens).await;
            assert_eq!(
                out, reference,
                "the pipeline's greedy tokens differ from the single process's"
            );
            // Bytes of a generation step alone: measured over a run of steps after the prompt.
            let prompt = prompt();
            let mut sequence = pipeline
                .open(greedy_sampling(), &prompt)
                .await
                .expect("open");
            let Answer::Token(mut next) = sequence.feed(&prompt, false).await.expect("prompt")
            else {
                panic!("a token");
            };
            let before = bytes.load(Ordering::Relaxed);
            for _ in 0..16 {
                let Answer::Token(token) = sequence.feed(&[next], false).await.expect("step")
                else {
                    panic!("a token");
                };
                next = token;
            }
            let per_token = (bytes.load(Ordering::Relaxed) - before) / 16;
            drop(sequence);
            // Step costs of the single-sequence runs only, before four sequences share the stages.
            let stats = pipeline.stats();
            let (concurrent, outs) = four_sequences(&pipeline, tokens).await;
            assert!(
                outs.iter().all(|out| *out == reference),
                "four sequences at once gave other tokens than one alone"
            );
            let largest_batch = pipeline.stats().largest_batch;
            let per_step = |seconds: f64| seconds * 1e3 / stats.steps.max(1) as f64;
            println!(
                "{}",
                serde_json::json!({"setup": format!("{count} stages"), "link": link.name,
                    "step_ms": per_step(stats.step_seconds),
                    "stage_compute_ms": stats.stage_compute_seconds.iter().map(|seconds| per_step(*seconds)).collect::<Vec<_>>(),
                    "hop_ms": stats.hop_seconds() * 1e3,
                    "ttft_ms": first.as_secs_f64() * 1e3, "tg_tokens_per_s": rate,
                    "bytes_per_token": per_token, "aggregate_4_sequences_tokens_per_s": concurrent,
                    "largest_batch": largest_batch,
                    "layers": pipeline.plan.stages.iter().map(|stage| format!("{}..{}", stage.layers.start, stage.layers.end)).collect::<Vec<_>>()})
            );
        }
    }
    shutdown.cancel();
}
