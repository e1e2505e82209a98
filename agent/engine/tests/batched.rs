//! Batched decoding: four greedy answers generated at once, on the two test models, are the answers
//! generated one at a time, token for token, and their steps did run together.

use std::time::SystemTime;

use sollol_engine::catalogue::ModelFile;
use sollol_engine::engine::{GenerateOptions, LoadedModel};
use sollol_engine::sampling::SamplingOptions;

mod support;

fn load(path: std::path::PathBuf) -> LoadedModel {
    let size_bytes = std::fs::metadata(&path).expect("model file").len();
    LoadedModel::load(&ModelFile {
        name: "test:latest".to_owned(),
        path,
        size_bytes,
        modified: SystemTime::now(),
        digest: "test".to_owned(),
        details: None,
    })
    .expect("the model loads")
}

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n",
    "Three reasons to learn Rust:\n1.",
];

fn greedy() -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingOptions {
            temperature: 0.0,
            ..SamplingOptions::default()
        },
        num_predict: Some(24),
        stop: Vec::new(),
        format: None,
        num_ctx: None,
    }
}

fn answer(model: &LoadedModel, prompt: &str) -> Vec<u32> {
    let ids = model.codec.encode(prompt).expect("tokens");
    model
        .generate(&ids, &greedy(), |_| true)
        .expect("generation")
        .tokens
}

fn check(model: &LoadedModel) {
    let alone: Vec<Vec<u32>> = PROMPTS.iter().map(|prompt| answer(model, prompt)).collect();
    assert_eq!(
        model.batched_steps(),
        0,
        "one at a time, nothing is batched"
    );
    let together: Vec<Vec<u32>> = std::thread::scope(|scope| {
        let running: Vec<_> = PROMPTS
            .iter()
            .map(|prompt| scope.spawn(move || answer(model, prompt)))
            .collect();
        running
            .into_iter()
            .map(|thread| thread.join().expect("thread"))
            .collect()
    });
    for ((prompt, alone), together) in PROMPTS.iter().zip(&alone).zip(&together) {
        assert_eq!(alone, together, "{prompt:?}: batched tokens differ");
        assert_eq!(alone.len(), 24, "{prompt:?}: ran to the length limit");
    }
    let shared = model.batched_steps();
    assert!(
        shared >= 40,
        "the four answers' steps ran together ({shared} of 92 steps batched)"
    );
}

#[test]
fn four_answers_at_once_are_the_answers_one_at_a_time_smollm2() {
    check(&load(support::model_path()));
}

#[test]
fn four_answers_at_once_are_the_answers_one_at_a_time_gemma3() {
    check(&load(support::gemma_path()));
}
