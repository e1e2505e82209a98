//! Helpers shared by the integration tests.

// Each test crate uses some of these.
#![allow(dead_code)]

pub mod cluster;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

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

/// The second test model, Gemma 3 270M Q4_K_M, fetched by `scripts/fetch-model --gemma` (run by
/// `scripts/test`); `SOLLOL_TEST_GEMMA` overrides.
#[allow(dead_code)] // Not every test binary uses it.
pub fn gemma_model() -> PathBuf {
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

/// An HTTP answer: status, sollol's routing headers and the body.
pub struct Answer {
    pub status: u16,
    pub node: Option<String>,
    pub decision: Option<String>,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request on a fresh connection; panics when no answer comes within 20 s.
pub async fn send(method: &str, url: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> Answer {
    send_within(method, url, body, headers, Duration::from_secs(20)).await
}

/// [`send`], waiting up to `limit` for the answer's head.
pub async fn send_within(
    method: &str,
    url: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
    limit: Duration,
) -> Answer {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = hyper::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body))).expect("request");
    let response = tokio::time::timeout(limit, client.request(request))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let (node, decision) = (header("x-sollol-node"), header("x-sollol-decision"));
    let headers = response.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(20), response.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes()
        .to_vec();
    Answer {
        status,
        node,
        decision,
        headers,
        body,
    }
}

pub async fn post(url: &str, body: Value) -> Answer {
    send("POST", url, serde_json::to_vec(&body).expect("json"), &[]).await
}

pub async fn get(url: &str) -> Answer {
    send("GET", url, Vec::new(), &[]).await
}
