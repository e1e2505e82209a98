//! Request parsing: what a forwarded request's route, body and headers say routing needs, checked once
//! before anything waits or is sent.

use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use hyper::body::Bytes;
use sollol_policy::admission;
use sollol_policy::routing::{RequestShape, Strategy};

use super::affinity::conversation_key;
use super::fields::{self, Fields};
use super::{NODE_HEADER, PRIORITY_HEADER, STRATEGY_HEADER};
use crate::cluster::normalize_model;
use crate::gateway::ApiError;

/// Output tokens assumed when a request sets no limit.
const DEFAULT_OUTPUT_TOKENS: u32 = 128;

/// Header naming the application a request comes from.
pub const APP_HEADER: &str = "x-sollol-app";

/// The name of the API key a request authenticated with (set by the gateway's key check).
#[derive(Clone, Debug)]
pub struct ApiKeyName(pub String);

/// Who sent a request: `X-Sollol-App`, else the API key's name, else the User-Agent's product.
pub(super) fn application(headers: &HeaderMap, key_name: Option<&str>) -> String {
    let header_text = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
            .filter(|text| !text.is_empty())
    };
    let name = header_text(APP_HEADER)
        .or(key_name)
        .or_else(|| header_text("user-agent").and_then(|agent| agent.split_whitespace().next()))
        .unwrap_or("unknown");
    name.chars().take(64).collect()
}

/// How each forwarded route behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RouteKind {
    /// Ollama's routes stream unless told not to; OpenAI's do not unless told to.
    pub(super) stream_by_default: bool,
    /// The answer ends with Ollama's timing fields.
    pub(super) learns: bool,
    /// Server-sent events rather than NDJSON.
    pub(super) sse: bool,
}

pub(super) fn route_kind(path: &str) -> Option<RouteKind> {
    let kind = |stream_by_default, learns, sse| RouteKind {
        stream_by_default,
        learns,
        sse,
    };
    Some(match path {
        "/api/chat" | "/api/generate" => kind(true, true, false),
        "/api/embed" | "/api/embeddings" | "/api/show" => kind(false, false, false),
        "/v1/chat/completions" | "/v1/completions" => kind(false, false, true),
        "/v1/embeddings" => kind(false, false, false),
        _ => return None,
    })
}

/// A forwarded request, parsed: the body as it goes upstream, and what routing reads from it.
#[derive(Debug)]
pub(super) struct ParsedRequest {
    pub(super) kind: RouteKind,
    /// The body exactly as the client sent it; every attempt forwards these bytes.
    pub(super) body: Bytes,
    /// The prompt's and the answer's size as routing estimates them.
    pub(super) shape: RequestShape,
    /// How many inputs an embedding request lists, when `input` is a list.
    pub(super) inputs: Option<usize>,
    /// The model as the client named it, for error messages.
    pub(super) requested_name: String,
    /// The model's normalized name, as nodes list it.
    pub(super) model: String,
    pub(super) stream: bool,
    pub(super) strategy: Strategy,
    pub(super) priority: u8,
    /// The node the client asked for with `X-Sollol-Node`, by name or id.
    pub(super) wanted_node: Option<String>,
    /// The conversation the request continues, for prefix affinity.
    pub(super) conversation: Option<u64>,
    /// The browser page that sent it (already allowed by the gateway), forwarded as it came.
    pub(super) origin: Option<axum::http::HeaderValue>,
    /// `keep_alive` is zero: the client wants the model unloaded after this answer.
    pub(super) unloads: bool,
    /// Ollama's unload: a load-only request (`/api/generate` without a prompt, `/api/chat` without
    /// messages) with `unloads`; it goes wherever the model is loaded.
    pub(super) only_unloads: bool,
}

impl ParsedRequest {
    /// Reads a `POST` on `path` (`default_strategy` unless a header picks another); the errors are the client's (404 for an unknown route, 408 for a stalled
    /// body, 400 for a bad one or a bad header), in the order they are checked.
    pub(super) fn parse(
        default_strategy: Strategy,
        path: &str,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<Self, ApiError> {
        let kind = route_kind(path).ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"))
        })?;
        let body = body.map_err(|rejection| {
            if crate::gateway::body_timeout::is_too_slow(&rejection) {
                ApiError::new(StatusCode::REQUEST_TIMEOUT, rejection.body_text())
            } else {
                ApiError::new(rejection.status(), rejection.body_text())
            }
        })?;
        let fields = Fields::parse(&body)
            .map_err(|message| ApiError::new(StatusCode::BAD_REQUEST, message))?;
        let requested_name = fields
            .text("model")
            .or_else(|| fields.text("name"))
            .filter(|name| !name.trim().is_empty())
            .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "model is required"))?
            .into_owned();
        let model = normalize_model(requested_name.trim());
        let stream = fields
            .get::<bool>("stream")
            .unwrap_or(kind.stream_by_default);
        let strategy = strategy(headers, default_strategy)?;
        let priority = priority(headers)?;
        let wanted_node = headers
            .get(NODE_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let conversation = conversation_key(&model, &fields);
        let shape = request_shape(&fields);
        let unloads = fields.raw("keep_alive").is_some_and(is_zero_keep_alive);
        // Read only for an unload: routing every other request need not look at the messages again.
        let only_unloads = unloads && is_load_only(path, &fields);
        let mut counted = 0;
        let inputs = fields
            .each_item("input", |_| counted += 1)
            .then_some(counted);
        drop(fields);
        Ok(Self {
            kind,
            body,
            shape,
            inputs,
            requested_name,
            model,
            stream,
            strategy,
            priority,
            wanted_node,
            conversation,
            origin: headers.get(axum::http::header::ORIGIN).cloned(),
            unloads,
            only_unloads,
        })
    }
}

/// Whether the request only loads (or, with `keep_alive: 0`, unloads) its model, as Ollama reads it: a
/// generate without a prompt or images, a chat without messages.
fn is_load_only(path: &str, fields: &Fields<'_>) -> bool {
    match path {
        "/api/generate" => {
            fields.text("prompt").is_none_or(|prompt| prompt.is_empty())
                && fields
                    .raw("images")
                    .is_none_or(|images| images.get() == "null")
        }
        "/api/chat" => {
            let mut messages = 0;
            fields::each_message(fields, |_| messages += 1);
            messages == 0
        }
        _ => false,
    }
}

/// Whether a `keep_alive` says "unload now": `0`, `0.0`, `"0"`, `"0s"`, `"0m"`…
fn is_zero_keep_alive(raw: &serde_json::value::RawValue) -> bool {
    let text = super::fields::text(raw);
    let text = text.as_deref().unwrap_or(raw.get()).trim();
    if let Ok(number) = text.parse::<f64>() {
        return number == 0.0;
    }
    humantime::parse_duration(text).is_ok_and(|duration| duration.is_zero())
}

/// The strategy `X-Sollol-Strategy` asks for, else the configured default.
fn strategy(headers: &HeaderMap, default: Strategy) -> Result<Strategy, ApiError> {
    let Some(value) = headers.get(STRATEGY_HEADER) else {
        return Ok(default);
    };
    value
        .to_str()
        .ok()
        .and_then(Strategy::parse)
        .ok_or_else(|| {
            let names: Vec<&str> = Strategy::ALL
                .iter()
                .map(|strategy| strategy.as_str())
                .collect();
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown routing strategy in {STRATEGY_HEADER}; use one of {}",
                    names.join(", ")
                ),
            )
        })
}

/// The priority `X-Sollol-Priority` asks for, else the default.
fn priority(headers: &HeaderMap) -> Result<u8, ApiError> {
    let Some(value) = headers.get(PRIORITY_HEADER) else {
        return Ok(admission::DEFAULT_PRIORITY);
    };
    value
        .to_str()
        .ok()
        .and_then(admission::parse_priority)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{PRIORITY_HEADER} must be a whole number from 1 to 10"),
            )
        })
}

/// Prompt and output size as routing estimates them: about four characters per token.
pub(super) fn request_shape(request: &Fields<'_>) -> RequestShape {
    let mut characters = 0usize;
    fields::each_message(request, |message| {
        characters += message.content.map_or(0, |content| content.len());
    });
    for field in ["prompt", "system", "suffix"] {
        characters += request.text(field).map_or(0, |text| text.len());
    }
    if let Some(input) = request.text("input") {
        characters += input.len();
    } else {
        request.each_item("input", |item| {
            characters += fields::text(item).map_or(0, |text| text.len());
        });
    }
    let limit = request
        .get::<OutputLimit>("options")
        .and_then(|options| options.num_predict)
        .and_then(|raw| serde_json::from_str::<i64>(raw.get()).ok())
        .or_else(|| request.get::<i64>("max_tokens"))
        .or_else(|| request.get::<i64>("max_completion_tokens"))
        .filter(|limit| *limit >= 0);
    RequestShape {
        prompt_tokens: u32::try_from(characters / 4).unwrap_or(u32::MAX).max(1),
        output_tokens: limit.map_or(DEFAULT_OUTPUT_TOKENS, |limit| {
            u32::try_from(limit).unwrap_or(u32::MAX)
        }),
    }
}

/// Ollama's `options` as routing reads them.
#[derive(serde::Deserialize)]
struct OutputLimit<'a> {
    #[serde(borrow, default)]
    num_predict: Option<&'a serde_json::value::RawValue>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use axum::response::IntoResponse;
    use serde_json::{Value, json};

    #[test]
    fn shapes_estimate_tokens() {
        fn check(request: Value, prompt_tokens: u32, output_tokens: u32) {
            let body = request.to_string();
            assert_eq!(
                request_shape(&Fields::parse(body.as_bytes()).expect("object")),
                RequestShape {
                    prompt_tokens,
                    output_tokens
                },
                "{request}"
            );
        }
        check(
            json!({"messages": [{"role": "user", "content": "x".repeat(400)}]}),
            100,
            128,
        );
        check(
            json!({"prompt": "abcdefgh", "options": {"num_predict": 24}}),
            2,
            24,
        );
        check(json!({"input": ["aaaa", "bbbb"], "max_tokens": 7}), 2, 7);
        check(json!({}), 1, 128);
    }

    #[test]
    fn applications_are_named() {
        fn check(headers: &[(&'static str, &str)], key: Option<&str>, expected: &str) {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.insert(*name, HeaderValue::from_str(value).expect("header"));
            }
            assert_eq!(application(&map, key), expected);
        }
        check(
            &[
                (APP_HEADER, "indexer"),
                ("user-agent", "ollama-python/0.6.3"),
            ],
            Some("webui"),
            "indexer",
        );
        check(
            &[("user-agent", "ollama-python/0.6.3 (x86_64 linux)")],
            Some("webui"),
            "webui",
        );
        check(
            &[("user-agent", "ollama-python/0.6.3 (x86_64 linux)")],
            None,
            "ollama-python/0.6.3",
        );
        check(&[], None, "unknown");
    }

    #[test]
    fn requests_are_parsed_once_with_the_clients_errors() {
        fn check(
            path: &str,
            headers: &[(&'static str, &str)],
            body: &str,
            expected: Result<(&str, bool, Strategy, u8), StatusCode>,
        ) {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.insert(*name, HeaderValue::from_str(value).expect("header"));
            }
            let parsed = ParsedRequest::parse(
                Strategy::Intelligent,
                path,
                &map,
                Ok(Bytes::from(body.to_owned())),
            );
            let seen = parsed
                .map(|request| {
                    (
                        request.model,
                        request.stream,
                        request.strategy,
                        request.priority,
                    )
                })
                .map_err(|error| error.into_response().status());
            let expected = expected.map(|(model, stream, strategy, priority)| {
                (model.to_owned(), stream, strategy, priority)
            });
            assert_eq!(seen, expected, "{path} {headers:?} {body}");
        }
        let chat = r#"{"model": "smollm2:135m", "messages": []}"#;
        check(
            "/api/chat",
            &[],
            chat,
            Ok(("smollm2:135m", true, Strategy::Intelligent, 5)),
        );
        check(
            "/v1/chat/completions",
            &[],
            chat,
            Ok(("smollm2:135m", false, Strategy::Intelligent, 5)),
        );
        check(
            "/api/generate",
            &[(STRATEGY_HEADER, "round-robin"), (PRIORITY_HEADER, "9")],
            r#"{"model": "m:1", "stream": false}"#,
            Ok(("m:1", false, Strategy::RoundRobin, 9)),
        );
        check("/api/nothing", &[], chat, Err(StatusCode::NOT_FOUND));
        check("/api/chat", &[], "{", Err(StatusCode::BAD_REQUEST));
        check("/api/chat", &[], "[1]", Err(StatusCode::BAD_REQUEST));
        check(
            "/api/chat",
            &[],
            r#"{"model": " "}"#,
            Err(StatusCode::BAD_REQUEST),
        );
        check(
            "/api/chat",
            &[(STRATEGY_HEADER, "fastest")],
            chat,
            Err(StatusCode::BAD_REQUEST),
        );
        check(
            "/api/chat",
            &[(PRIORITY_HEADER, "11")],
            chat,
            Err(StatusCode::BAD_REQUEST),
        );
    }
}
