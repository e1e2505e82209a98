//! Batched decoding benchmark: aggregate generation speed of 4 sequences generating at once on one
//! model against one sequence alone (64 greedy tokens each after a short prompt, best of RUNS).
//! `scripts/bench/batch` runs it.
//!
//! Usage: batch_bench MODEL.gguf [RUNS]   (prints one JSON line)

use std::time::{Instant, SystemTime};

use sollol_engine::catalogue::ModelFile;
use sollol_engine::engine::{GenerateOptions, LoadedModel};
use sollol_engine::sampling::SamplingOptions;

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "The three laws of thermodynamics are",
    "Three reasons to learn Rust:\n1.",
];
const TOKENS: usize = 64;

/// Generation tokens per second of `prompts` generating at once (prompt processing excluded: each
/// sequence's generation time is from its first token).
fn run(model: &LoadedModel, prompts: &[&str]) -> f64 {
    let options = GenerateOptions {
        sampling: SamplingOptions {
            temperature: 0.0,
            ..SamplingOptions::default()
        },
        num_predict: Some(TOKENS),
        stop: Vec::new(),
        format: None,
        num_ctx: None,
    };
    let started = Instant::now();
    let generated: Vec<(usize, f64)> = std::thread::scope(|scope| {
        let threads: Vec<_> = prompts
            .iter()
            .map(|prompt| {
                let options = &options;
                scope.spawn(move || {
                    let ids = model.codec.encode(prompt).expect("tokens");
                    let generated = model.generate(&ids, options, |_| true).expect("generation");
                    (
                        generated.output_tokens,
                        generated.prompt_duration.as_secs_f64(),
                    )
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().expect("thread"))
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    // The prompts run before decoding starts; the longest one's time is not generation.
    let prompt = generated
        .iter()
        .map(|(_, seconds)| *seconds)
        .fold(0.0, f64::max);
    let tokens: usize = generated.iter().map(|(tokens, _)| tokens).sum();
    tokens as f64 / (wall - prompt)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().expect("usage: batch_bench MODEL.gguf [RUNS]"));
    let runs: usize = args.next().and_then(|text| text.parse().ok()).unwrap_or(3);
    let size_bytes = std::fs::metadata(&path).expect("model").len();
    let model = LoadedModel::load(&ModelFile {
        name: "bench:latest".to_owned(),
        path,
        size_bytes,
        modified: SystemTime::now(),
        digest: "bench".to_owned(),
        details: None,
    })
    .expect("load");
    let (mut one, mut four) = (0f64, 0f64);
    for _ in 0..runs {
        one = one.max(run(&model, &PROMPTS[..1]));
        four = four.max(run(&model, &PROMPTS));
    }
    println!(
        "{{\"one_tokens_per_s\": {one:.1}, \"four_tokens_per_s\": {four:.1}, \"ratio\": {:.2}, \"batched_steps\": {}}}",
        four / one,
        model.batched_steps()
    );
}
