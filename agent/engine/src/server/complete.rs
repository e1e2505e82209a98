//! Chat and text completions for both APIs: the prompt, the generation on a blocking thread, and the
//! answer streamed (NDJSON for Ollama, Server-Sent Events for OpenAI) or whole.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::options::{openai_options, options};
use super::{Refusal, error, nanos, refuse, request_head, rfc3339, slot_and_model};
use crate::engine::{Engine, Generated, LoadedModel};
use crate::structured::Format;
use crate::tokenizer::ChatMessage;
use crate::tools::{self, ToolCall};

/// Chunks of a streamed answer waiting to be written; the generation waits when the client reads slowly.
const STREAM_BUFFER: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Api {
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
                    content: content_text(&message["content"]),
                    tool_calls: calls_for_template(&message["tool_calls"]),
                    name: message
                        .get("tool_name")
                        .or_else(|| message.get("name"))
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                })
                .collect();
            model
                .codec
                .render_chat_with_tools(&messages, tools_of(request))
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
                    ..ChatMessage::default()
                });
            }
            messages.push(ChatMessage {
                role: "user".to_owned(),
                content: prompt,
                ..ChatMessage::default()
            });
            model
                .codec
                .render_chat(&messages)
                .map(Some)
                .map_err(|failure| refuse(StatusCode::BAD_REQUEST, failure.to_string()))
        }
    }
}

/// The request's tools (chat only), as the template reads them.
fn tools_of(request: &Value) -> &[Value] {
    request
        .get("tools")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The names of the request's tools.
fn tool_names(request: &Value) -> Vec<String> {
    tools_of(request)
        .iter()
        .filter_map(|tool| tool.pointer("/function/name").and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

/// An assistant message's earlier calls in the shape templates read: arguments as an object (OpenAI
/// sends them as a JSON string).
fn calls_for_template(calls: &Value) -> Option<Value> {
    let calls = calls.as_array().filter(|calls| !calls.is_empty())?;
    Some(Value::Array(
        calls
            .iter()
            .map(|call| {
                let function = &call["function"];
                let arguments = match &function["arguments"] {
                    Value::String(text) => serde_json::from_str(text).unwrap_or(json!({})),
                    Value::Null => json!({}),
                    other => other.clone(),
                };
                json!({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
            })
            .collect(),
    ))
}

/// OpenAI's `tool_choice` as a format: `"required"` (a call of one of the tools) or one named
/// function; `None` for `"auto"`, `"none"` or absent (the model decides, its text parsed afterwards).
fn forced_call(request: &Value) -> Option<Format> {
    let tools = tools_of(request);
    let call = |tool: &Value| {
        let function = &tool["function"];
        json!({
            "type": "object",
            "properties": {
                "name": {"const": function["name"]},
                "arguments": function.get("parameters").cloned().filter(Value::is_object).unwrap_or(json!({"type": "object"})),
            },
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    };
    match request.get("tool_choice") {
        Some(Value::String(choice)) if choice == "required" && !tools.is_empty() => Some(
            Format::Schema(json!({"anyOf": tools.iter().map(call).collect::<Vec<_>>()})),
        ),
        Some(choice @ Value::Object(_)) => {
            let name = choice.pointer("/function/name")?;
            let tool = tools
                .iter()
                .find(|tool| tool.pointer("/function/name") == Some(name))?;
            Some(Format::Schema(call(tool)))
        }
        _ => None,
    }
}

/// A message's text: a string, or OpenAI's list of parts (the text parts joined; image parts are
/// refused before this, see [`unsupported`]).
fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter(|part| part["type"] == "text")
            .filter_map(|part| part["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// What the request asks that this model (or this engine) cannot do, answered as Ollama does: 400
/// naming the capability, never silently ignored.
fn unsupported(model: &LoadedModel, request: &Value, api: Api) -> Option<String> {
    let name = &model.file.name;
    let listed = |value: Option<&Value>| {
        value
            .and_then(Value::as_array)
            .is_some_and(|items| !items.is_empty())
    };
    let thinking = match request.get("think") {
        Some(Value::Bool(on)) => *on,
        Some(Value::String(level)) => !level.is_empty() && level != "false",
        _ => false,
    } || request
        .get("reasoning_effort")
        .and_then(Value::as_str)
        .is_some_and(|effort| effort != "none");
    if thinking {
        return Some(format!("{name:?} does not support thinking"));
    }
    let messages = request.get("messages").and_then(Value::as_array);
    let images = listed(request.get("images"))
        || messages.is_some_and(|messages| {
            messages.iter().any(|message| {
                listed(message.get("images"))
                    || message["content"].as_array().is_some_and(|parts| {
                        parts
                            .iter()
                            .any(|part| part["type"] != "text" && !part["type"].is_null())
                    })
            })
        });
    if images {
        return Some(format!("{name:?} does not support vision"));
    }
    if listed(request.get("tools")) && !model.codec.template_takes_tools() {
        return Some(format!("{name:?} does not support tools"));
    }
    if api == Api::Generate
        && request
            .get("suffix")
            .and_then(Value::as_str)
            .is_some_and(|suffix| !suffix.is_empty())
    {
        return Some(format!("{name:?} does not support insert"));
    }
    None
}

/// Ollama's `context` of `/api/generate`: token ids of an earlier exchange, put before the prompt.
fn earlier_context(model: &LoadedModel, request: &Value, api: Api) -> Result<Vec<u32>, Refusal> {
    let Some(context) = request.get("context").filter(|context| !context.is_null()) else {
        return Ok(Vec::new());
    };
    if api != Api::Generate {
        return Ok(Vec::new());
    }
    let vocabulary = model.codec.vocabulary_size() as u64;
    context
        .as_array()
        .and_then(|ids| {
            ids.iter()
                .map(|id| {
                    id.as_u64()
                        .filter(|id| *id < vocabulary)
                        .map(|id| id as u32)
                })
                .collect::<Option<Vec<u32>>>()
        })
        .ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                format!("context must be a list of token ids below {vocabulary}"),
            )
        })
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

/// `value` (a streamed piece or the whole answer) carrying `calls` instead of text: Ollama's
/// `message.tool_calls` (arguments as objects), OpenAI's `tool_calls` (arguments as JSON text, with
/// ids; in a streamed delta with indexes).
fn with_calls(api: Api, mut value: Value, calls: &[ToolCall], streamed: bool) -> Value {
    match api {
        Api::Chat => {
            value["message"]["content"] = json!("");
            value["message"]["tool_calls"] = calls
                .iter()
                .map(|call| json!({"function": {"name": call.name, "arguments": call.arguments}}))
                .collect();
        }
        Api::OpenAiChat => {
            let openai: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(index, call)| {
                    let mut entry = json!({
                        "id": format!("call_{index}"),
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments.to_string()},
                    });
                    if streamed {
                        entry["index"] = json!(index);
                    }
                    entry
                })
                .collect();
            if streamed {
                value["choices"][0]["delta"] = json!({"role": "assistant", "tool_calls": openai});
            } else {
                value["choices"][0]["message"]["content"] = Value::Null;
                value["choices"][0]["message"]["tool_calls"] = json!(openai);
            }
        }
        Api::Generate | Api::OpenAiCompletion => {}
    }
    value
}

/// The last object of an answer that called tools: OpenAI's `finish_reason` says so.
fn finished_with_calls(api: Api, mut last: Value) -> Value {
    if api == Api::OpenAiChat {
        last["choices"][0]["finish_reason"] = json!("tool_calls");
    }
    last
}

/// Ollama's `context` of a finished `/api/generate`: the prompt's tokens and the answer's, to send
/// back with the next prompt.
fn with_context(mut last: Value, prompt: &[u32], generated: &Generated) -> Value {
    let mut context = prompt.to_vec();
    context.extend_from_slice(&generated.tokens);
    last["context"] = json!(context);
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

fn ndjson(value: &Value) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

pub(super) async fn complete(engine: Arc<Engine>, body: Bytes, api: Api) -> Response {
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
    // What cannot be served is refused before anything streams: a capability the model lacks, a
    // format it cannot follow, a context beyond its own, a prompt that does not fit.
    if let Some(reason) = unsupported(&model, &request, api) {
        return error(StatusCode::BAD_REQUEST, reason);
    }
    // A call the client requires (OpenAI's tool_choice) is made a format: the model can only answer
    // with a call of those tools, which the answer's parsing then reads.
    let mut generate_options = generate_options;
    if let Some(call) = forced_call(&request) {
        if generate_options.format.is_some() {
            return error(
                StatusCode::BAD_REQUEST,
                "tool_choice and a response format cannot be asked together",
            );
        }
        generate_options.format = Some(call);
    }
    if let Some(format) = &generate_options.format
        && let Err(reason) = model.constrain(format)
    {
        return error(StatusCode::BAD_REQUEST, reason);
    }
    if let Some(asked) = generate_options.num_ctx
        && asked > model.context
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "num_ctx {asked} is larger than the model's context length ({} tokens)",
                model.context
            ),
        );
    }
    let mut ids = match earlier_context(&model, &request, api) {
        Ok(ids) => ids,
        Err(refusal) => return refusal.into_response(),
    };
    match model.codec.encode(&prompt) {
        // The earlier exchange already began with BOS: the new prompt's own is left out.
        Ok(prompt_ids) => ids.extend(
            prompt_ids
                .into_iter()
                .skip(usize::from(!ids.is_empty() && model.codec.adds_bos())),
        ),
        Err(failure) => return error(StatusCode::BAD_REQUEST, failure.to_string()),
    }
    let context = model.context_for(&generate_options);
    if ids.len() >= context {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "the prompt has {} tokens; the context holds {context} (options.num_ctx, at most the model's {})",
                ids.len(),
                model.context
            ),
        );
    }
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Bytes>(STREAM_BUFFER);
    let name = model.file.name.clone();
    // With tools, the answer is read whole before it is sent: it is either calls or text (OpenAI's
    // tool_choice "none": text only).
    let tools = if matches!(api, Api::Chat | Api::OpenAiChat)
        && request.get("tool_choice").and_then(Value::as_str) != Some("none")
    {
        tool_names(&request)
    } else {
        Vec::new()
    };
    let calling = !tools.is_empty();
    let worker = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut whole = String::new();
        let streaming_text = stream && !calling;
        let result = model.generate(&ids, &generate_options, |text| {
            if streaming_text {
                sender
                    .blocking_send(frame(api, &piece(api, &name, text)))
                    .is_ok()
            } else {
                whole.push_str(text);
                // The client left (its handler, holding the receiver, was dropped): stop generating.
                !sender.is_closed()
            }
        });
        match result {
            Ok(generated) => {
                let names: Vec<&str> = tools.iter().map(String::as_str).collect();
                let calls = if calling {
                    tools::parse(&whole, &names)
                } else {
                    None
                };
                if stream && calling {
                    // The whole answer as one piece: the calls, or the text.
                    let mut chunk = piece(api, &name, if calls.is_some() { "" } else { &whole });
                    if let Some(calls) = &calls {
                        chunk = with_calls(api, chunk, calls, true);
                    }
                    let _ = sender.blocking_send(frame(api, &chunk));
                }
                let text = if stream { "" } else { whole.as_str() };
                let mut last = finish(
                    api,
                    stream,
                    &name,
                    text,
                    &generated,
                    load,
                    started.elapsed(),
                );
                if api == Api::Generate {
                    last = with_context(last, &ids, &generated);
                }
                if let Some(calls) = &calls {
                    last = if stream {
                        finished_with_calls(api, last)
                    } else {
                        finished_with_calls(api, with_calls(api, last, calls, false))
                    };
                }
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
