//! Engine benchmark, our side: prompt processing of 64 tokens (pp64) and generation of 64 tokens (tg64)
//! on a GGUF model, best of a few runs, and the process's peak RSS. `scripts/bench/engine` runs it beside
//! llama.cpp on the same file and prints the ratios.
//!
//! Usage: engine_bench MODEL.gguf [RUNS]   (prints one JSON line)

use std::time::Instant;

use sollol_engine::gguf::Gguf;
use sollol_engine::model::{Model, Part, Shape};
use sollol_engine::sampling::greedy;

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: engine_bench MODEL.gguf [RUNS]");
    let runs: usize = args.next().and_then(|text| text.parse().ok()).unwrap_or(3);
    let file = std::fs::File::open(&path).expect("open the model");
    let length = file.metadata().expect("metadata").len();
    let gguf = Gguf::read(std::io::BufReader::new(file), length).expect("a valid GGUF");
    let layers = Shape::read(&gguf).expect("shape").layers;
    let loading = Instant::now();
    let model = Model::load(std::path::Path::new(&path), &gguf, Part::whole(layers)).expect("load");
    let load_seconds = loading.elapsed().as_secs_f64();
    // A fixed prompt of 64 ordinary tokens.
    let prompt: Vec<u32> = (0..64).map(|index| 1000 + index * 37).collect();
    let mut best_prompt = f64::INFINITY;
    let mut best_generation = f64::INFINITY;
    for _ in 0..runs {
        let mut cache = model.new_cache();
        let started = Instant::now();
        let hidden = model
            .layers(model.embed(&prompt).expect("embed"), &mut cache)
            .expect("layers");
        cache.length += prompt.len();
        let mut logits = model.head(&hidden).expect("head");
        best_prompt = best_prompt.min(started.elapsed().as_secs_f64());
        let started = Instant::now();
        for _ in 0..64 {
            let token = greedy(&logits);
            let hidden = model
                .layers(model.embed(&[token]).expect("embed"), &mut cache)
                .expect("layers");
            cache.length += 1;
            logits = model.head(&hidden).expect("head");
        }
        best_generation = best_generation.min(started.elapsed().as_secs_f64());
    }
    println!(
        "{{\"engine\": \"sollol\", \"kernels\": \"{}\", \"load_s\": {load_seconds:.3}, \"pp64_tokens_per_s\": {:.1}, \"tg64_tokens_per_s\": {:.1}, \"peak_rss_mib\": {:.1}}}",
        sollol_kernels::Kernels::chosen().name(),
        64.0 / best_prompt,
        64.0 / best_generation,
        peak_rss_bytes() as f64 / (1024.0 * 1024.0)
    );
}
