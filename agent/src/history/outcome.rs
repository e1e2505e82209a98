//! The record of one finished attempt on one node, as the gateway observed it: what the learner folds in
//! and what becomes a row of the `requests` table.
//!
//! It lives in the history, not in the gateway, so that the history depends on nothing above it: the
//! gateway builds outcomes and the history stores them.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sollol_policy::routing::Choice;
use sollol_shared::api::CandidateCost;

/// Ollama's timing fields of a finished response.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OllamaTimings {
    /// Ollama's `total_duration`: everything from the request's arrival, waiting included.
    pub total: Duration,
    pub load: Duration,
    pub prompt_tokens: u64,
    pub prompt: Duration,
    pub eval_tokens: u64,
    pub eval: Duration,
    /// Whether the answer had `load_duration`. Without it (some servers and proxies leave it out),
    /// `load` is zero and the load can only be told from the wall clock.
    pub load_reported: bool,
}

impl OllamaTimings {
    /// Reads the timing fields from a final Ollama response object; `None` when it has none.
    pub fn from_json(value: &Value) -> Option<Self> {
        let nanos = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_u64)
                .map(Duration::from_nanos)
        };
        let count = |name: &str| value.get(name).and_then(Value::as_u64);
        if nanos("total_duration").is_none() && count("eval_count").is_none() {
            return None;
        }
        Some(Self {
            total: nanos("total_duration").unwrap_or_default(),
            load: nanos("load_duration").unwrap_or_default(),
            prompt_tokens: count("prompt_eval_count").unwrap_or(0),
            prompt: nanos("prompt_eval_duration").unwrap_or_default(),
            eval_tokens: count("eval_count").unwrap_or(0),
            eval: nanos("eval_duration").unwrap_or_default(),
            load_reported: nanos("load_duration").is_some(),
        })
    }
}

/// One routed request, as the gateway observed it.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub node_id: String,
    pub model: String,
    pub path: String,
    /// Who sent it: `X-Sollol-App`, else the API key's name, else the User-Agent.
    pub app: String,
    pub ok: bool,
    pub time_to_first_byte: Duration,
    pub total: Duration,
    pub timings: Option<OllamaTimings>,
    /// How the node was chosen: the strategy and the kind of decision.
    pub choice: Choice,
    /// The decision in words, for people; nothing reads meaning out of it.
    pub reason: String,
    /// The best candidates with their predicted cost, best first; shared by every attempt of a request.
    pub candidates: Arc<[CandidateCost]>,
    /// Other requests this gateway had in flight on the node when this one started.
    pub concurrent: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ollama_timing_fields() {
        let value = serde_json::json!({"done": true, "total_duration": 5_000_000_000u64, "load_duration": 2_000_000_000u64,
            "prompt_eval_count": 26, "prompt_eval_duration": 130_000_000u64, "eval_count": 290, "eval_duration": 4_700_000_000u64});
        let timings = OllamaTimings::from_json(&value).expect("timings");
        assert_eq!(timings.eval_tokens, 290);
        assert_eq!(timings.load, Duration::from_secs(2));
        assert_eq!(
            OllamaTimings::from_json(&serde_json::json!({"done": false})),
            None
        );
    }
}
