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
use super::{LATEST, engine_error, error, model_name, parse, rfc3339};
use crate::engine::{Engine, FOREVER, ModelDetails};

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
            let left = expires.map_or(FOREVER, |at| at.saturating_duration_since(now));
            let expires_at = SystemTime::now().checked_add(left);
            json!({
                "name": model.file.name,
                "model": model.file.name,
                "size": model.file.size_bytes,
                "digest": model.file.digest.trim_start_matches("sha256:"),
                "details": details(Some(&model.details)),
                "expires_at": expires_at.map_or_else(|| rfc3339(SystemTime::UNIX_EPOCH + LATEST), rfc3339),
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
    // Described from the file's header when it has one: showing a model does not load it (as in
    // Ollama), so `/api/show` cannot be used to fill memory. A model computed elsewhere is described
    // once prepared.
    let described = match engine.file(name) {
        Some(file) if file.details.is_some() => file.details.clone().map(|details| (file, details)),
        Some(_) => match engine.get(name, None).await {
            Ok((model, _)) => Some((model.file.clone(), model.details.clone())),
            Err(failure) => return engine_error(failure),
        },
        None => None,
    };
    let Some((file, details)) = described else {
        return engine_error(crate::engine::EngineError::NotFound(name.to_owned()));
    };
    axum::Json(json!({
        // The model's name, never where it lies on disk.
        "modelfile": format!("FROM {}", file.name),
        "parameters": "",
        "template": details.chat_template.clone().unwrap_or_default(),
        "details": self::details(Some(&details)),
        "model_info": {
            "general.architecture": details.family,
            "general.parameter_count": details.parameter_size,
            "llama.context_length": details.context_length,
        },
        "modified_at": rfc3339(file.modified),
    }))
    .into_response()
}

/// `POST /api/pull`: the engine downloads nothing, so a pull of a model it has is already done (Ollama's
/// `success`), and of one it lacks is a 404 saying where models come from.
pub(super) async fn pull(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    let request = match parse(&body) {
        Ok(request) => request,
        Err(refusal) => return refusal.into_response(),
    };
    let Some(name) = model_name(&request) else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    if engine.file(name).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "model {name:?} not found: the built-in engine downloads nothing; pull it through the sollol gateway (it copies the model from a node that has it) or put its GGUF file in the models directory"
            ),
        );
    }
    axum::Json(json!({"status": "success"})).into_response()
}

/// `DELETE /api/delete`: the model's file removed from the models dir.
pub(super) async fn delete(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    let request = match parse(&body) {
        Ok(request) => request,
        Err(refusal) => return refusal.into_response(),
    };
    let Some(name) = model_name(&request) else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    if let Err(why) = sollol_shared::model_name::validate(name) {
        return error(StatusCode::BAD_REQUEST, why);
    }
    match engine.delete(name) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(failure) => engine_error(failure),
    }
}

/// `POST /api/copy`: `destination` made a second name of `source` in the models dir.
pub(super) async fn copy(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    let request = match parse(&body) {
        Ok(request) => request,
        Err(refusal) => return refusal.into_response(),
    };
    let field = |name: &str| {
        request
            .get(name)
            .and_then(Value::as_str)
            .filter(|text| !text.is_empty())
    };
    let (Some(source), Some(destination)) = (field("source"), field("destination")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "source and destination are required",
        );
    };
    for name in [source, destination] {
        if let Err(why) = sollol_shared::model_name::validate(name) {
            return error(StatusCode::BAD_REQUEST, why);
        }
    }
    match engine.copy(source, destination) {
        Ok(()) => StatusCode::OK.into_response(),
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
