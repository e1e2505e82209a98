//! Embeddings for `/api/embed`, `/api/embeddings` and `/v1/embeddings`: reading the input, computing
//! the vectors and answering in each API's shape.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

use super::{Refusal, engine_error, error, nanos, refuse, request_head, slot_and_model};
use crate::engine::{Embedding, Engine, EngineError};

/// Which API asked for embeddings: they differ in field names, normalisation and answer shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EmbedApi {
    /// `/api/embed`: `input` (text or texts), normalised vectors in `embeddings`.
    Ollama,
    /// `/api/embeddings`: `prompt`, one vector as computed in `embedding`.
    OllamaLegacy,
    /// `/v1/embeddings`: `input` (texts or token ids), normalised, as floats or base64.
    OpenAi,
}

/// One thing to embed.
#[derive(Clone, Debug)]
enum EmbedInput {
    Text(String),
    Ids(Vec<u32>),
}

/// `input` as a list: a string, a list of strings, and for OpenAI a list of token ids or of id lists.
fn embed_inputs(input: Option<&Value>, api: EmbedApi) -> Result<Vec<EmbedInput>, Refusal> {
    let ids = |value: &Value| -> Option<Vec<u32>> {
        value
            .as_array()?
            .iter()
            .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect()
    };
    let bad = || {
        let accepted = if api == EmbedApi::OpenAi {
            "a string, a list of strings, a list of token ids or a list of such lists"
        } else {
            "a string or a list of strings"
        };
        refuse(StatusCode::BAD_REQUEST, format!("input must be {accepted}"))
    };
    match input {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(vec![EmbedInput::Text(text.clone())]),
        Some(Value::Array(items)) => {
            if api == EmbedApi::OpenAi && !items.is_empty() && items.iter().all(Value::is_number) {
                return ids(input.unwrap_or(&Value::Null))
                    .map(|ids| vec![EmbedInput::Ids(ids)])
                    .ok_or_else(bad);
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(text) => Ok(EmbedInput::Text(text.clone())),
                    Value::Array(_) if api == EmbedApi::OpenAi => {
                        ids(item).map(EmbedInput::Ids).ok_or_else(bad)
                    }
                    _ => Err(bad()),
                })
                .collect()
        }
        Some(_) => Err(bad()),
    }
}

pub(super) async fn embed_with(engine: Arc<Engine>, body: Bytes, api: EmbedApi) -> Response {
    let started = Instant::now();
    let (request, name, keep) = match request_head(&body) {
        Ok(head) => head,
        Err(refusal) => return refusal.into_response(),
    };
    let field = if api == EmbedApi::OllamaLegacy {
        "prompt"
    } else {
        "input"
    };
    let inputs = match embed_inputs(request.get(field), api) {
        Ok(inputs) => inputs,
        Err(refusal) => return refusal.into_response(),
    };
    if api == EmbedApi::OpenAi && inputs.is_empty() {
        return error(StatusCode::BAD_REQUEST, "input is required");
    }
    let base64 = match request.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(format) if format == "float" => false,
        Some(format) if format == "base64" => true,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "encoding_format must be \"float\" or \"base64\"",
            );
        }
    };
    if request
        .get("dimensions")
        .is_some_and(|value| !value.is_null())
    {
        return error(
            StatusCode::BAD_REQUEST,
            "dimensions is not supported: the built-in engine returns the model's own width",
        );
    }
    let truncate = request
        .get("truncate")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let (permit, model, load) = match slot_and_model(&engine, &name, keep).await {
        Ok(taken) => taken,
        Err(refusal) => return refusal.into_response(),
    };
    if keep == Some(Duration::ZERO) {
        engine.unload(&model.file.name);
    }
    let name = model.file.name.clone();
    let computed = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        inputs
            .iter()
            .map(|input| {
                let ids = match input {
                    EmbedInput::Text(text) if text.is_empty() && api == EmbedApi::OllamaLegacy => {
                        // Ollama answers an empty prompt with an empty embedding.
                        return Ok(Embedding {
                            values: Vec::new(),
                            tokens: 0,
                        });
                    }
                    EmbedInput::Text(text) => model.codec.encode(text)?,
                    EmbedInput::Ids(ids) => ids.clone(),
                };
                let embedding = model.embed(&ids, truncate)?;
                Ok(if api == EmbedApi::OllamaLegacy {
                    embedding
                } else {
                    embedding.normalized()
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()
    })
    .await;
    let embeddings = match computed {
        Ok(Ok(embeddings)) => embeddings,
        Ok(Err(failure)) => return engine_error(failure),
        Err(failure) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("embedding failed: {failure}"),
            );
        }
    };
    let tokens: usize = embeddings.iter().map(|embedding| embedding.tokens).sum();
    let answer = match api {
        EmbedApi::Ollama => json!({
            "model": name,
            "embeddings": embeddings.iter().map(|embedding| &embedding.values).collect::<Vec<_>>(),
            "total_duration": nanos(started.elapsed()),
            "load_duration": nanos(load),
            "prompt_eval_count": tokens,
        }),
        EmbedApi::OllamaLegacy => json!({
            "embedding": embeddings.first().map(|embedding| embedding.values.clone()).unwrap_or_default(),
        }),
        EmbedApi::OpenAi => {
            let data: Vec<Value> = embeddings
                .iter()
                .enumerate()
                .map(|(index, embedding)| {
                    let vector = if base64 {
                        let bytes: Vec<u8> = embedding
                            .values
                            .iter()
                            .flat_map(|value| value.to_le_bytes())
                            .collect();
                        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                    } else {
                        json!(embedding.values)
                    };
                    json!({"object": "embedding", "index": index, "embedding": vector})
                })
                .collect();
            json!({
                "object": "list",
                "data": data,
                "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            })
        }
    };
    axum::Json(answer).into_response()
}
