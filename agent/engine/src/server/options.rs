//! Request options: Ollama's `keep_alive` and `options`, and OpenAI's sampling parameters, as
//! generation options.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{Refusal, refuse};
use crate::engine::{FOREVER, GenerateOptions};
use crate::sampling::SamplingOptions;
use crate::structured::Format;

/// Ollama's `keep_alive`: a duration ("5m", "30s"), seconds as a number or a numeric string, 0 to
/// unload, negative for ever. Anything longer than [`FOREVER`] (Ollama's own "for ever", about 292
/// years) is for ever; values that are not a time (`"inf"`, `"nan"`, `true`) are refused.
pub(super) fn keep_alive(request: &Value) -> Result<Option<Duration>, Refusal> {
    match request.get("keep_alive") {
        None | Some(Value::Null) => Ok(None),
        Some(value) => parse_keep_alive(value).map(Some).ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                "keep_alive must be a duration such as \"5m\", a number of seconds, or negative for ever",
            )
        }),
    }
}

fn parse_keep_alive(value: &Value) -> Option<Duration> {
    let seconds = |seconds: f64| {
        if !seconds.is_finite() {
            None
        } else if seconds < 0.0 {
            Some(FOREVER)
        } else {
            Some(Duration::try_from_secs_f64(seconds).map_or(FOREVER, |keep| keep.min(FOREVER)))
        }
    };
    match value {
        Value::Number(number) => seconds(number.as_f64()?),
        Value::String(text) => {
            let text = text.trim();
            if let Ok(number) = text.parse::<f64>() {
                return seconds(number);
            }
            match text.strip_prefix('-') {
                Some(rest) => humantime::parse_duration(rest.trim()).ok().map(|_| FOREVER),
                None => humantime::parse_duration(text)
                    .ok()
                    .map(|keep| keep.min(FOREVER)),
            }
        }
        _ => None,
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
    let num_ctx = match number("num_ctx") {
        None => None,
        Some(tokens) if tokens >= 1.0 && tokens.is_finite() => Some(tokens as usize),
        Some(_) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "options.num_ctx must be a positive number of tokens",
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
        format: Format::from_ollama(request.get("format"))
            .map_err(|reason| refuse(StatusCode::BAD_REQUEST, reason))?,
        num_ctx,
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
    let mut options = options(&json!({ "options": translated }))?;
    options.format = Format::from_openai(request.get("response_format"))
        .map_err(|reason| refuse(StatusCode::BAD_REQUEST, reason))?;
    Ok(options)
}

#[cfg(test)]
mod keep_alive_tests {
    use super::*;

    #[test]
    fn every_keep_alive_ollama_accepts_is_a_bounded_duration() {
        fn check(value: Value, expected: Option<Duration>) {
            assert_eq!(parse_keep_alive(&value), expected, "{value}");
        }
        let seconds = Duration::from_secs;
        check(json!(-1), Some(FOREVER));
        check(json!(-0.5), Some(FOREVER));
        check(json!("-1"), Some(FOREVER));
        check(json!("-1m"), Some(FOREVER));
        check(json!(0), Some(Duration::ZERO));
        check(json!("0"), Some(Duration::ZERO));
        check(json!(300), Some(seconds(300)));
        check(json!(1.5), Some(Duration::from_millis(1500)));
        check(json!("5m"), Some(seconds(300)));
        check(json!(" 30s "), Some(seconds(30)));
        check(json!("1h30m"), Some(seconds(5400)));
        check(json!(1e20), Some(FOREVER));
        check(json!(u64::MAX), Some(FOREVER));
        check(json!("100000000000y"), Some(FOREVER));
        check(json!("inf"), None);
        check(json!("-inf"), None);
        check(json!("NaN"), None);
        check(json!("soon"), None);
        check(json!(true), None);
        check(json!([5]), None);
    }
}
