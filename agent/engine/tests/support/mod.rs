//! What the engine's integration tests share: where the repository and the test model are.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
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
