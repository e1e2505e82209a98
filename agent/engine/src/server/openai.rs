//! OpenAI's routes: `/v1/chat/completions`, `/v1/completions` (SSE when streaming),
//! `/v1/embeddings` and `/v1/models`.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use serde_json::{Value, json};

use super::complete::{Api, complete};
use super::embed::{EmbedApi, embed_with};
use crate::engine::Engine;

pub(super) async fn chat(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    complete(engine, body, Api::OpenAiChat).await
}

pub(super) async fn completion(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    complete(engine, body, Api::OpenAiCompletion).await
}

pub(super) async fn models(State(engine): State<Arc<Engine>>) -> axum::Json<Value> {
    let data: Vec<Value> = engine
        .files()
        .iter()
        .map(|file| {
            let created = file
                .modified
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |age| age.as_secs());
            json!({"id": file.name, "object": "model", "created": created, "owned_by": "sollol"})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data}))
}

pub(super) async fn embeddings(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    embed_with(engine, body, EmbedApi::OpenAi).await
}
