//! The engine as an Ollama node: `/api/chat`, `/api/generate` (streaming NDJSON by default), `/api/embed`,
//! `/api/embeddings`, `/api/tags`, `/api/ps`, `/api/show`, `/api/version`, `GET /`, with Ollama's JSON
//! fields and real timings; and OpenAI's `/v1/chat/completions`, `/v1/completions` (SSE when streaming),
//! `/v1/embeddings` and `/v1/models`.
//!
//! This module owns the router, `serve`, the error answers and what every request starts with;
//! `ollama` and `openai` hold the handlers, `options` reads request options, `embed` computes
//! embeddings and `complete` runs chat and text completions, streamed or whole.

mod complete;
mod embed;
mod ollama;
mod openai;
mod options;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use sollol_http::Limits;
use sollol_policy::browser::Boundary;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, EngineError, LoadedModel};
use crate::model::ModelError;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

/// A request turned down, answered as Ollama's `{"error": ...}`.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal(status, message.into())
}

fn engine_error(failure: EngineError) -> Response {
    engine_refusal(failure).into_response()
}

fn engine_refusal(failure: EngineError) -> Refusal {
    let status = match failure {
        EngineError::NotFound(_) => StatusCode::NOT_FOUND,
        EngineError::PromptTooLong { .. }
        | EngineError::EmptyInput
        | EngineError::Model(ModelError::Token(_)) => StatusCode::BAD_REQUEST,
        EngineError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
        EngineError::Distributed(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    refuse(status, failure.to_string())
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z), after the Unix epoch.
const LATEST: Duration = Duration::from_secs(253_402_300_799);

/// RFC 3339 time, clamped to what the format can write (humantime panics outside 1970..=9999).
fn rfc3339(time: SystemTime) -> String {
    let time = time.clamp(SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH + LATEST);
    humantime::format_rfc3339_nanos(time).to_string()
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/", get(|| async { "Ollama is running" }))
        .route("/api/version", get(ollama::version))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/pull", post(ollama::pull))
        .route("/api/copy", post(ollama::copy))
        .route("/api/delete", axum::routing::delete(ollama::delete))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completion))
        .route("/v1/models", get(openai::models))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::embeddings))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
        .with_state(engine)
}

/// Serves the engine on `listener` until `shutdown`, behind the browser boundary and within `limits`.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    boundary: Arc<Boundary>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let app = router(engine)
        .layer(axum::middleware::from_fn_with_state(
            boundary,
            sollol_http::guard,
        ))
        .layer(axum::middleware::from_fn(
            sollol_http::openai::errors_under_v1,
        ));
    sollol_http::serve(listener, app, limits, shutdown).await;
}

fn model_name(request: &Value) -> Option<&str> {
    request
        .get("model")
        .or_else(|| request.get("name"))
        .and_then(Value::as_str)
        .filter(|name| !name.trim().is_empty())
}

fn parse(body: &Bytes) -> Result<Value, Refusal> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|failure| refuse(StatusCode::BAD_REQUEST, format!("invalid JSON: {failure}")))?;
    if !value.is_object() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// What every generation and embedding request starts with: the JSON body, the model's name and the
/// request's `keep_alive`.
fn request_head(body: &Bytes) -> Result<(Value, String, Option<Duration>), Refusal> {
    let request = parse(body)?;
    let Some(name) = model_name(&request).map(str::to_owned) else {
        return Err(refuse(StatusCode::BAD_REQUEST, "model is required"));
    };
    let keep = options::keep_alive(&request)?;
    Ok((request, name, keep))
}

/// A free sequence slot (waiting for one, as Ollama queues), then the model, loaded if needed.
async fn slot_and_model(
    engine: &Arc<Engine>,
    name: &str,
    keep: Option<Duration>,
) -> Result<
    (
        tokio::sync::OwnedSemaphorePermit,
        Arc<LoadedModel>,
        Duration,
    ),
    Refusal,
> {
    let Ok(permit) = Arc::clone(&engine.slots).acquire_owned().await else {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine is shutting down",
        ));
    };
    let (model, load) = engine.get(name, keep).await.map_err(engine_refusal)?;
    Ok((permit, model, load))
}
