//! What the engine's integration tests share: where the repository and the test models are, and the
//! runs the reference tests compare.
// Each test binary uses some of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;
use sollol_engine::catalogue::ModelFile;
use sollol_engine::gguf::Gguf;
use sollol_engine::model::{Model, Part};
use sollol_engine::sampling::greedy;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A reference file written by llama.cpp, under `tests/reference/`.
pub fn reference_file(name: &str) -> Value {
    let path = root().join("tests/reference").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("reference file")).expect("JSON")
}

/// The test model, fetched by `scripts/fetch-model` (run by `scripts/test`); `SOLLOL_TEST_MODEL` overrides.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("SOLLOL_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model (scripts/test does) or set SOLLOL_TEST_MODEL",
        path.display()
    );
    path
}

/// The second test model, Gemma 3 270M Q4_K_M, fetched by `scripts/fetch-model --gemma` (run by
/// `scripts/test`); `SOLLOL_TEST_GEMMA` overrides.
pub fn gemma_path() -> PathBuf {
    let path = std::env::var_os("SOLLOL_TEST_GEMMA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/gemma/gemma-3-270m-q4_k_m.gguf"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model --gemma (scripts/test does) or set SOLLOL_TEST_GEMMA",
        path.display()
    );
    path
}

/// Token ids of a reference file's list.
pub fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids")
        .iter()
        .map(|id| id.as_u64().expect("id") as u32)
        .collect()
}

/// The GGUF header of the model at `path`.
pub fn open_gguf(path: &Path) -> Gguf {
    let file = std::fs::File::open(path).expect("open model");
    let length = file.metadata().expect("metadata").len();
    Gguf::read(std::io::BufReader::new(file), length).expect("valid GGUF")
}

/// The model at `path` as the engine's catalogue describes it.
pub fn discovered(path: &Path) -> ModelFile {
    sollol_engine::engine::discover(path.parent().expect("model dir"), None)
        .into_iter()
        .find(|file| file.path == path)
        .expect("the model is discovered")
}

/// Greedy continuation of `prompt` for `steps` tokens over `models` (one whole model, or parts in
/// order), with every step's logits.
pub fn greedy_run(models: &[&Model], prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut caches: Vec<_> = models.iter().map(|model| model.new_cache()).collect();
    let mut input = prompt.to_vec();
    let (mut output, mut all_logits) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let mut hidden = models[0].embed(&input).expect("embed");
        for (model, cache) in models.iter().zip(&mut caches) {
            hidden = model.layers(hidden, cache).expect("layers");
            cache.length += input.len();
        }
        let logits = models[models.len() - 1].head(&hidden).expect("head");
        let token = greedy(&logits);
        all_logits.push(logits);
        output.push(token);
        input = vec![token];
    }
    (output, all_logits)
}

/// Two instances of the model at `path`, each holding only its half of the layers, give `whole`'s
/// tokens and logits (within 1e-4) for `steps` greedy steps after `prompt`. Returns the front half.
pub fn assert_halves_match(
    path: &Path,
    gguf: &Gguf,
    whole: &Model,
    prompt: &[u32],
    steps: usize,
) -> Model {
    let layers = whole.shape.layers;
    let split = layers / 2;
    let part = |embed: bool, layers, head: bool| {
        Model::load(
            path,
            gguf,
            Part {
                embed,
                layers,
                head,
            },
        )
    };
    let front = part(true, 0..split, false).expect("front half");
    let back = part(false, split..layers, true).expect("back half");
    let (whole_ids, whole_logits) = greedy_run(&[whole], prompt, steps);
    let (split_ids, split_logits) = greedy_run(&[&front, &back], prompt, steps);
    assert_eq!(whole_ids, split_ids);
    let worst = whole_logits
        .iter()
        .flatten()
        .zip(split_logits.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= 1e-4,
        "layer split changed the logits by up to {worst}"
    );
    front
}
