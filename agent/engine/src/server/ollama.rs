//! Ollama's own routes: `/api/version`, `/api/tags`, `/api/ps`, `/api/show`, `/api/chat`,
//! `/api/generate`, `/api/embed` and `/api/embeddings`.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::complete::{Api, complete};
use super::embed::{EmbedApi, embed_with};
use super::{engine_error, error, model_name, parse, rfc3339};
use crate::engine::{Engine, ModelDetails};

pub(super) async fn version() -> axum::Json<Value> {
    axum::Json(json!({"version": sollol_shared::BUILD_VERSION}))
}

fn details(details: Option<&ModelDetails>) -> Value {
    match details {
        Some(details) => json!({
            "parent_model": "",
            "format": "gguf",
            "family": details.family,
            "families": [details.family],
            "parameter_size": details.parameter_size,
            "quantization_level": details.quantization_level,
        }),
        None => json!({"format": "gguf"}),
    }
}

pub(super) async fn tags(State(engine): State<Arc<Engine>>) -> axum::Json<Value> {
    let models: Vec<Value> = engine
        .files()
        .iter()
        .map(|file| {
            json!({
                "name": file.name,
                "model": file.name,
                "modified_at": rfc3339(file.modified),
                "size": file.size_bytes,
                "digest": file.digest.trim_start_matches("sha256:"),
                "details": details(file.details.as_ref()),
            })
        })
        .collect();
    axum::Json(json!({ "models": models }))
}

pub(super) async fn ps(State(engine): State<Arc<Engine>>) -> axum::Json<Value> {
    let now = Instant::now();
    let models: Vec<Value> = engine
        .loaded()
        .iter()
        .map(|(model, expires)| {
            let expires_at = SystemTime::now() + expires.saturating_duration_since(now);
            json!({
                "name": model.file.name,
                "model": model.file.name,
                "size": model.file.size_bytes,
                "digest": model.file.digest.trim_start_matches("sha256:"),
                "details": details(Some(&model.details)),
                "expires_at": rfc3339(expires_at),
                "size_vram": 0,
            })
        })
        .collect();
    axum::Json(json!({ "models": models }))
}

pub(super) async fn show(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    let request = match parse(&body) {
        Ok(request) => request,
        Err(refusal) => return refusal.into_response(),
    };
    let Some(name) = model_name(&request) else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    match engine.get(name, None).await {
        Ok((model, _)) => axum::Json(json!({
            "modelfile": format!("FROM {}", model.file.path.display()),
            "parameters": "",
            "template": model.details.chat_template.clone().unwrap_or_default(),
            "details": details(Some(&model.details)),
            "model_info": {
                "general.architecture": model.details.family,
                "general.parameter_count": model.details.parameter_size,
                "llama.context_length": model.details.context_length,
            },
            "modified_at": rfc3339(model.file.modified),
        }))
        .into_response(),
        Err(failure) => engine_error(failure),
    }
}

pub(super) async fn embed(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    embed_with(engine, body, EmbedApi::Ollama).await
}

pub(super) async fn embeddings(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    embed_with(engine, body, EmbedApi::OllamaLegacy).await
}

pub(super) async fn chat(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    complete(engine, body, Api::Chat).await
}

pub(super) async fn generate(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    complete(engine, body, Api::Generate).await
}
