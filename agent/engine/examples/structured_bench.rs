//! What structured outputs cost: the same chat generated greedily without a format, with `"json"`
//! and with a JSON schema, on the test model (2 threads); per-token generation time of each, and the
//! time llguidance takes per token (computing the mask and advancing the grammar). Target: the
//! format's cost <= 10 % of generation. Run with `scripts/bench/structured`.
//!
//! Usage: structured_bench MODEL.gguf [RUNS]

use std::time::{Duration, SystemTime};

use serde_json::json;
use sollol_engine::catalogue::ModelFile;
use sollol_engine::engine::{GenerateOptions, LoadedModel};
use sollol_engine::sampling::SamplingOptions;
use sollol_engine::structured::Format;
use sollol_engine::tokenizer::ChatMessage;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(
        args.next()
            .expect("usage: structured_bench MODEL.gguf [RUNS]"),
    );
    let runs: usize = args.next().and_then(|text| text.parse().ok()).unwrap_or(3);
    let size_bytes = std::fs::metadata(&path).expect("model file").len();
    let model = LoadedModel::load(&ModelFile {
        name: "bench".to_owned(),
        path,
        size_bytes,
        modified: SystemTime::now(),
        digest: "bench".to_owned(),
        details: None,
    })
    .expect("load");
    let prompt = model
        .codec
        .render_chat(&[ChatMessage {
            role: "user".to_owned(),
            content: "Describe three cats: for each its name, its age in years, whether it is friendly, and its colour.".to_owned(),
            ..Default::default()
        }])
        .expect("prompt");
    let ids = model.codec.encode(&prompt).expect("tokens");
    let cat = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "friendly": {"type": "boolean"},
            "colour": {"enum": ["black", "white", "ginger", "grey"]}
        },
        "required": ["name", "age", "friendly", "colour"],
        "additionalProperties": false
    });
    let schema = json!({
        "type": "object",
        "properties": {"cats": {"type": "array", "items": cat, "minItems": 3, "maxItems": 3}},
        "required": ["cats"],
        "additionalProperties": false
    });
    // The first request with a format builds the vocabulary's view: measured apart.
    let started = std::time::Instant::now();
    model.constrain(&Format::Json).expect("grammars");
    let setup = started.elapsed();
    println!(
        "structured outputs: SmolLM2-135M-Instruct Q4_1, greedy, best of {runs}; llguidance set-up for the vocabulary (once per loaded model): {:.1} ms",
        setup.as_secs_f64() * 1000.0
    );
    println!("| format | tokens | generation ms/token | of which format ms/token | format share |");
    println!("|---|---|---|---|---|");
    let mut plain_per_token = None;
    for (label, format) in [
        ("none", None),
        ("\"json\"", Some(Format::Json)),
        ("schema (3 cats)", Some(Format::Schema(schema))),
    ] {
        let options = GenerateOptions {
            sampling: SamplingOptions {
                temperature: 0.0,
                ..SamplingOptions::default()
            },
            num_predict: Some(128),
            stop: Vec::new(),
            format,
            num_ctx: None,
        };
        let mut best: Option<(Duration, Duration, usize)> = None;
        for _ in 0..runs {
            let generated = model
                .generate(&ids, &options, |_| true)
                .expect("generation");
            let per_token = generated.generation_duration / generated.output_tokens.max(1) as u32;
            if best.is_none_or(|(best_per_token, _, _)| per_token < best_per_token) {
                best = Some((
                    per_token,
                    generated.format_duration / generated.output_tokens.max(1) as u32,
                    generated.output_tokens,
                ));
            }
        }
        let (per_token, format_per_token, tokens) = best.expect("runs");
        let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
        plain_per_token.get_or_insert(per_token);
        println!(
            "| {label} | {tokens} | {:.2} | {:.3} | {:.1} % |",
            ms(per_token),
            ms(format_per_token),
            100.0 * format_per_token.as_secs_f64() / per_token.as_secs_f64()
        );
    }
    if let Some(plain) = plain_per_token {
        println!(
            "generation without a format: {:.2} ms/token (target: a format's share <= 10 %)",
            plain.as_secs_f64() * 1000.0
        );
    }
}
