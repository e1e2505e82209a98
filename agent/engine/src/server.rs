//! The engine as an Ollama node: `/api/chat`, `/api/generate` (streaming NDJSON by default), `/api/embed`,
//! `/api/embeddings`, `/api/tags`, `/api/ps`, `/api/show`, `/api/version`, `GET /`, with Ollama's JSON
//! fields and real timings; and OpenAI's `/v1/chat/completions`, `/v1/completions` (SSE when streaming),
//! `/v1/embeddings` and `/v1/models`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::engine::{
    Embedding, Engine, EngineError, GenerateOptions, Generated, LoadedModel, ModelDetails,
};
use crate::model::ModelError;
use crate::sampling::SamplingOptions;
use crate::tokenizer::ChatMessage;

/// Chunks of a streamed answer waiting to be written; the generation waits when the client reads slowly.
const STREAM_BUFFER: usize = 16;

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

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_nanos(time).to_string()
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/", get(|| async { "Ollama is running" }))
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/completions", post(openai_completion))
        .route("/v1/models", get(openai_models))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/api/embed", post(embed))
        .route("/api/embeddings", post(embeddings))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
        .with_state(engine)
}

/// Serves the engine on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>, shutdown: CancellationToken) {
    let app = router(engine);
    if let Err(failure) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %failure, "the engine's server stopped");
    }
}

async fn version() -> axum::Json<Value> {
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

async fn tags(State(engine): State<Arc<Engine>>) -> axum::Json<Value> {
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

async fn ps(State(engine): State<Arc<Engine>>) -> axum::Json<Value> {
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

async fn show(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
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

/// Which API asked for embeddings: they differ in field names, normalisation and answer shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EmbedApi {
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

async fn embed(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    embed_with(engine, body, EmbedApi::Ollama).await
}

async fn embeddings(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    embed_with(engine, body, EmbedApi::OllamaLegacy).await
}

async fn openai_embeddings(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    embed_with(engine, body, EmbedApi::OpenAi).await
}

async fn embed_with(engine: Arc<Engine>, body: Bytes, api: EmbedApi) -> Response {
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

/// Ollama's `keep_alive`: a duration ("5m", "30s"), seconds as a number, 0 to unload, negative for ever.
fn keep_alive(request: &Value) -> Result<Option<Duration>, Refusal> {
    let bad = || {
        refuse(
            StatusCode::BAD_REQUEST,
            "keep_alive must be a duration such as \"5m\" or a number of seconds",
        )
    };
    match request.get("keep_alive") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(number)) => {
            let seconds = number.as_f64().ok_or_else(bad)?;
            Ok(Some(if seconds < 0.0 {
                Duration::from_secs(u64::MAX / 4)
            } else {
                Duration::from_secs_f64(seconds)
            }))
        }
        Some(Value::String(text)) => {
            if text.trim_start().starts_with('-') {
                return Ok(Some(Duration::from_secs(u64::MAX / 4)));
            }
            if let Ok(seconds) = text.trim().parse::<f64>() {
                return Ok(Some(Duration::from_secs_f64(seconds.max(0.0))));
            }
            humantime::parse_duration(text.trim())
                .map(Some)
                .map_err(|_| bad())
        }
        Some(_) => Err(bad()),
    }
}

/// Ollama's `options` object.
fn options(request: &Value) -> Result<GenerateOptions, Refusal> {
    let defaults = SamplingOptions::default();
    let options = request.get("options").cloned().unwrap_or(Value::Null);
    let number = |name: &str| options.get(name).and_then(Value::as_f64);
    let num_predict = match number("num_predict") {
        None => None,
        Some(value) if value < 0.0 => None,
        Some(value) => Some(value as usize),
    };
    let stop = match options.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(stop)) => vec![stop.clone()],
        Some(Value::Array(stops)) => stops
            .iter()
            .filter_map(Value::as_str)
            .filter(|stop| !stop.is_empty())
            .map(str::to_owned)
            .collect(),
        Some(_) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "options.stop must be a string or a list of strings",
            ));
        }
    };
    Ok(GenerateOptions {
        sampling: SamplingOptions {
            temperature: number("temperature").map_or(defaults.temperature, |value| value as f32),
            top_k: number("top_k").map_or(defaults.top_k, |value| value.max(0.0) as usize),
            top_p: number("top_p").map_or(defaults.top_p, |value| value as f32),
            min_p: number("min_p").map_or(defaults.min_p, |value| value as f32),
            repeat_penalty: number("repeat_penalty")
                .map_or(defaults.repeat_penalty, |value| value as f32),
            repeat_last_n: number("repeat_last_n")
                .map_or(defaults.repeat_last_n, |value| value.max(0.0) as usize),
            seed: number("seed")
                .filter(|seed| *seed >= 0.0)
                .map(|seed| seed as u64),
        },
        num_predict,
        stop,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Generate,
    /// OpenAI's `/v1/chat/completions`.
    OpenAiChat,
    /// OpenAI's `/v1/completions`: the prompt as given, no chat template.
    OpenAiCompletion,
}

impl Api {
    fn is_openai(self) -> bool {
        matches!(self, Self::OpenAiChat | Self::OpenAiCompletion)
    }
}

async fn openai_chat(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    complete(engine, body, Api::OpenAiChat).await
}

async fn openai_completion(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    complete(engine, body, Api::OpenAiCompletion).await
}

async fn openai_models(State(engine): State<Arc<Engine>>) -> axum::Json<Value> {
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

/// OpenAI's parameters as generation options (`max_tokens`, `temperature`, `top_p`, `seed`, `stop`).
fn openai_options(request: &Value) -> Result<GenerateOptions, Refusal> {
    let mut translated = json!({});
    for (ours, theirs) in [
        ("num_predict", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("seed", "seed"),
        ("stop", "stop"),
    ] {
        if let Some(value) = request.get(theirs).filter(|value| !value.is_null()) {
            translated[ours] = value.clone();
        }
    }
    if let Some(value) = request
        .get("max_completion_tokens")
        .filter(|value| !value.is_null())
    {
        translated["num_predict"] = value.clone();
    }
    options(&json!({ "options": translated }))
}

async fn chat(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    complete(engine, body, Api::Chat).await
}

async fn generate(State(engine): State<Arc<Engine>>, body: Bytes) -> Response {
    complete(engine, body, Api::Generate).await
}

/// The prompt text of a chat or generate request.
fn prompt_of(model: &LoadedModel, request: &Value, api: Api) -> Result<Option<String>, Refusal> {
    let text_of = |value: &Value| value.as_str().map(str::to_owned);
    match api {
        Api::OpenAiCompletion => Ok(request
            .get("prompt")
            .and_then(text_of)
            .filter(|prompt| !prompt.is_empty())),
        Api::Chat | Api::OpenAiChat => {
            let Some(messages) = request.get("messages").and_then(Value::as_array) else {
                return Ok(None);
            };
            if messages.is_empty() {
                return Ok(None);
            }
            let messages: Vec<ChatMessage> = messages
                .iter()
                .map(|message| ChatMessage {
                    role: message["role"].as_str().unwrap_or("user").to_owned(),
                    content: text_of(&message["content"]).unwrap_or_default(),
                })
                .collect();
            model
                .codec
                .render_chat(&messages)
                .map(Some)
                .map_err(|failure| refuse(StatusCode::BAD_REQUEST, failure.to_string()))
        }
        Api::Generate => {
            let prompt = request.get("prompt").and_then(text_of).unwrap_or_default();
            if prompt.is_empty() {
                return Ok(None);
            }
            if request.get("raw").and_then(Value::as_bool) == Some(true) {
                return Ok(Some(prompt));
            }
            let mut messages = Vec::new();
            if let Some(system) = request.get("system").and_then(text_of) {
                messages.push(ChatMessage {
                    role: "system".to_owned(),
                    content: system,
                });
            }
            messages.push(ChatMessage {
                role: "user".to_owned(),
                content: prompt,
            });
            model
                .codec
                .render_chat(&messages)
                .map(Some)
                .map_err(|failure| refuse(StatusCode::BAD_REQUEST, failure.to_string()))
        }
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |now| now.as_secs())
}

/// One streamed piece of text in the API's own shape.
fn piece(api: Api, model: &str, text: &str) -> Value {
    match api {
        Api::Chat | Api::Generate => {
            let mut chunk = json!({"model": model, "created_at": rfc3339(SystemTime::now())});
            if api == Api::Chat {
                chunk["message"] = json!({"role": "assistant", "content": text});
            } else {
                chunk["response"] = json!(text);
            }
            chunk["done"] = json!(false);
            chunk
        }
        Api::OpenAiChat => json!({
            "id": "chatcmpl-sollol", "object": "chat.completion.chunk", "created": unix_seconds(),
            "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": null}],
        }),
        Api::OpenAiCompletion => json!({
            "id": "cmpl-sollol", "object": "text_completion", "created": unix_seconds(), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": null}],
        }),
    }
}

/// The last object: the whole text when not streaming, and the figures.
fn openai_finish(api: Api, model: &str, text: &str, generated: &Generated, stream: bool) -> Value {
    let reason = if generated.done_reason == "length" {
        "length"
    } else {
        "stop"
    };
    let usage = json!({
        "prompt_tokens": generated.prompt_tokens,
        "completion_tokens": generated.output_tokens,
        "total_tokens": generated.prompt_tokens + generated.output_tokens,
    });
    let mut last = piece(api, model, text);
    if api == Api::OpenAiChat {
        if stream {
            last["choices"][0]["delta"] = json!({});
        } else {
            last["object"] = json!("chat.completion");
            last["choices"][0] =
                json!({"index": 0, "message": {"role": "assistant", "content": text}});
        }
    }
    last["choices"][0]["finish_reason"] = json!(reason);
    last["usage"] = usage;
    last
}

fn finish(
    api: Api,
    stream: bool,
    model: &str,
    text: &str,
    generated: &Generated,
    load: Duration,
    total: Duration,
) -> Value {
    if api.is_openai() {
        return openai_finish(api, model, text, generated, stream);
    }
    let mut last = piece(api, model, text);
    last["done"] = json!(true);
    last["done_reason"] = json!(generated.done_reason);
    last["total_duration"] = json!(nanos(total));
    last["load_duration"] = json!(nanos(load));
    last["prompt_eval_count"] = json!(generated.prompt_tokens);
    last["prompt_eval_duration"] = json!(nanos(generated.prompt_duration));
    last["eval_count"] = json!(generated.output_tokens);
    last["eval_duration"] = json!(nanos(generated.generation_duration));
    last
}

/// One streamed object: an NDJSON line for Ollama, a Server-Sent Event for OpenAI.
fn frame(api: Api, value: &Value) -> Bytes {
    if api.is_openai() {
        let mut event = b"data: ".to_vec();
        event.extend(serde_json::to_vec(value).unwrap_or_default());
        event.extend_from_slice(b"\n\n");
        return Bytes::from(event);
    }
    ndjson(value)
}

/// What every generation and embedding request starts with: the JSON body, the model's name and the
/// request's `keep_alive`.
fn request_head(body: &Bytes) -> Result<(Value, String, Option<Duration>), Refusal> {
    let request = parse(body)?;
    let Some(name) = model_name(&request).map(str::to_owned) else {
        return Err(refuse(StatusCode::BAD_REQUEST, "model is required"));
    };
    let keep = keep_alive(&request)?;
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

fn ndjson(value: &Value) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn complete(engine: Arc<Engine>, body: Bytes, api: Api) -> Response {
    let started = Instant::now();
    let (request, name, keep) = match request_head(&body) {
        Ok(head) => head,
        Err(refusal) => return refusal.into_response(),
    };
    let parsed_options = if api.is_openai() {
        openai_options(&request)
    } else {
        options(&request)
    };
    let generate_options = match parsed_options {
        Ok(options) => options,
        Err(refusal) => return refusal.into_response(),
    };
    // Ollama streams unless told not to; OpenAI only when asked.
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(!api.is_openai());
    let (permit, model, load) = match slot_and_model(&engine, &name, keep).await {
        Ok(taken) => taken,
        Err(refusal) => return refusal.into_response(),
    };
    let prompt = match prompt_of(&model, &request, api) {
        Ok(prompt) => prompt,
        Err(refusal) => return refusal.into_response(),
    };
    if keep == Some(Duration::ZERO) {
        engine.unload(&model.file.name);
    }
    let Some(prompt) = prompt else {
        if api.is_openai() {
            return error(StatusCode::BAD_REQUEST, "messages or prompt is required");
        }
        // No prompt: Ollama loads (or unloads) the model and answers at once.
        let mut answer = piece(api, &model.file.name, "");
        answer["done"] = json!(true);
        answer["done_reason"] = json!(if keep == Some(Duration::ZERO) {
            "unload"
        } else {
            "load"
        });
        return axum::Json(answer).into_response();
    };
    let ids = match model.codec.encode(&prompt) {
        Ok(ids) => ids,
        Err(failure) => return error(StatusCode::BAD_REQUEST, failure.to_string()),
    };
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Bytes>(STREAM_BUFFER);
    let name = model.file.name.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut whole = String::new();
        let result = model.generate(&ids, &generate_options, |text| {
            if stream {
                sender
                    .blocking_send(frame(api, &piece(api, &name, text)))
                    .is_ok()
            } else {
                whole.push_str(text);
                true
            }
        });
        match result {
            Ok(generated) => {
                let text = if stream { "" } else { whole.as_str() };
                let last = finish(
                    api,
                    stream,
                    &name,
                    text,
                    &generated,
                    load,
                    started.elapsed(),
                );
                if stream {
                    let _ = sender.blocking_send(frame(api, &last));
                    if api.is_openai() {
                        let _ = sender.blocking_send(Bytes::from_static(b"data: [DONE]\n\n"));
                    }
                } else {
                    let _ = sender.blocking_send(ndjson(&last));
                }
            }
            Err(failure) => {
                tracing::warn!(model = %name, error = %failure, "generation failed");
                let _ = sender.blocking_send(frame(api, &json!({"error": failure.to_string()})));
            }
        }
    });
    drop(worker);
    if stream {
        let body = Body::from_stream(futures_util::stream::unfold(
            receiver,
            |mut receiver| async move {
                receiver
                    .recv()
                    .await
                    .map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), receiver))
            },
        ));
        let content_type = if api.is_openai() {
            "text/event-stream"
        } else {
            "application/x-ndjson"
        };
        return ([(header::CONTENT_TYPE, content_type)], body).into_response();
    }
    match receiver.recv().await {
        Some(answer) => {
            let status = if answer.starts_with(b"{\"error\"") {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            (
                status,
                [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
                answer,
            )
                .into_response()
        }
        None => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "generation ended without an answer",
        ),
    }
}
