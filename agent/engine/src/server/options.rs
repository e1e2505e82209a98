//! Request options: Ollama's `keep_alive` and `options`, and OpenAI's sampling parameters, as
//! generation options.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{Refusal, refuse};
use crate::engine::GenerateOptions;
use crate::sampling::SamplingOptions;

/// Ollama's `keep_alive`: a duration ("5m", "30s"), seconds as a number, 0 to unload, negative for ever.
pub(super) fn keep_alive(request: &Value) -> Result<Option<Duration>, Refusal> {
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
pub(super) fn options(request: &Value) -> Result<GenerateOptions, Refusal> {
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

/// OpenAI's parameters as generation options (`max_tokens`, `temperature`, `top_p`, `seed`, `stop`).
pub(super) fn openai_options(request: &Value) -> Result<GenerateOptions, Refusal> {
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
