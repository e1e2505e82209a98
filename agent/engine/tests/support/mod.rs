//! What the engine's integration tests share: where the repository and the test model are.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The test model, fetched by `scripts/fetch-model` (run by `scripts/test`); `SOLLOL_TEST_MODEL` overrides.
#[allow(dead_code)] // Not every test binary uses it.
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
#[allow(dead_code)] // Not every test binary uses it.
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
