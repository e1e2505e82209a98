//! The built-in engine behind a real agent, reached through the gateway by the official `ollama`
//! Python package, and the gateway's errors for bad embedding requests.
//!
//! The model is fetched by `scripts/fetch-model` (run by `scripts/test`); `SOLLOL_TEST_MODEL` overrides its path.

use serde_json::json;

mod support;

use support::test_model as model_path;

/// The engine behind a real agent, reached through the gateway by the official `ollama` Python package.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_client_through_the_gateway_to_the_engine() {
    let models = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(model_path(), models.path().join("smollm2:135m.gguf"))
        .expect("link the model");
    // The same model with a chat template that renders tools, in a file beside it.
    std::os::unix::fs::symlink(model_path(), models.path().join("smollm2-tools:135m.gguf"))
        .expect("link the model");
    std::fs::copy(
        support::root().join("tests/fixtures/tools-template.jinja"),
        models.path().join("smollm2-tools:135m.jinja"),
    )
    .expect("the tools template");
    let coordinator_dir = tempfile::tempdir().expect("tempdir");
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let coordinator_data = coordinator_dir.path().display().to_string();
    let coordinator = sollol::app::start_coordinator(
        &sollol::config::Config::from_pairs(&[
            ("data_dir", &coordinator_data),
            ("coordinator.gateway_bind", "127.0.0.1:0"),
            ("coordinator.cluster_bind", "127.0.0.1:0"),
            ("coordinator.hedging", "false"),
        ])
        .expect("config"),
    )
    .await
    .expect("coordinator");
    let agent_data = agent_dir.path().display().to_string();
    let models_dir = models.path().display().to_string();
    let agent = sollol::app::start_agent(
        &sollol::config::Config::from_pairs(&[
            ("data_dir", &agent_data),
            ("agent.name", "engine-node"),
            ("agent.models_dir", &models_dir),
            ("agent.heartbeat_interval", "200ms"),
            ("engine.mode", "on"),
            ("discovery.mdns", "false"),
        ])
        .expect("agent config"),
        coordinator.cluster_address.to_string(),
        coordinator.token.clone(),
    )
    .await
    .expect("agent");
    let started = std::time::Instant::now();
    while coordinator.view().backends.is_empty() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the engine never became a backend"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let gateway = format!("http://{}", coordinator.gateway_address);
    support::run_client_script(
        "engine_clients.py",
        &[&gateway, "smollm2:135m", "smollm2-tools:135m"],
        "engine clients: 19 passed, 0 failed",
    )
    .await;
    // Bad embedding requests get Ollama-style errors with a 4xx status, through the gateway.
    for (path, body, status, needle) in [
        (
            "/api/embed",
            json!({"model": "smollm2:135m", "input": 5}),
            400,
            "input must be",
        ),
        (
            "/api/embed",
            json!({"model": "smollm2:135m", "input": ""}),
            400,
            "empty",
        ),
        (
            "/api/embed",
            json!({"model": "nothing:here", "input": "x"}),
            404,
            "not found",
        ),
        (
            "/v1/embeddings",
            json!({"model": "smollm2:135m", "input": "x", "encoding_format": "int8"}),
            400,
            "encoding_format",
        ),
        (
            "/v1/embeddings",
            json!({"model": "smollm2:135m", "input": [4_000_000_000u64]}),
            400,
            "not in the vocabulary",
        ),
    ] {
        let answer = support::post(&format!("{gateway}{path}"), body.clone()).await;
        // Ollama's shape on Ollama's routes, OpenAI's on OpenAI's.
        let error = &answer.json()["error"];
        let message = if path.starts_with("/v1/") {
            assert_eq!(error["type"], "invalid_request_error", "{}", answer.text());
            error["message"].as_str()
        } else {
            error.as_str()
        }
        .unwrap_or_default()
        .to_owned();
        assert!(
            answer.status == status && message.contains(needle),
            "{path} {body}: {} {}",
            answer.status,
            answer.text()
        );
    }
    let empty = support::post(
        &format!("{gateway}/api/embed"),
        json!({"model": "smollm2:135m", "input": []}),
    )
    .await;
    assert_eq!(empty.status, 200, "{}", empty.text());
    assert_eq!(empty.json()["embeddings"], json!([]));
    agent
        .stop(std::time::Duration::from_secs(5))
        .await
        .expect("stop agent");
    coordinator
        .shutdown(std::time::Duration::from_secs(5))
        .await;
}
