//! Helpers shared by the integration tests.

// Each test crate uses some of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The test venv's Python (with the ollama, openai and prometheus_client packages).
pub fn test_python() -> PathBuf {
    let python = std::env::var_os("SOLLOL_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run scripts/test (it creates the venv with the test packages) or set SOLLOL_TEST_PYTHON",
        python.display()
    );
    python
}

/// The test model, fetched by `scripts/fetch-model` (run by `scripts/test`); `SOLLOL_TEST_MODEL` overrides.
pub fn test_model() -> PathBuf {
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

/// Runs `tests/clients/SCRIPT` with the test venv's Python and `args`; panics with its output unless it
/// succeeds and prints `summary` (its closing "N passed, N failed" line).
pub async fn run_client_script(script: &str, args: &[&str], summary: &str) {
    let output = tokio::process::Command::new(test_python())
        .arg(root().join("tests/clients").join(script))
        .args(args)
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains(summary),
        "{script} failed:\n{stdout}\n{stderr}"
    );
}
