//! The record of one finished attempt on one node, as the gateway observed it: what the learner folds in
//! and what becomes a row of the `requests` table.
//!
//! It lives in the history, not in the gateway, so that the history depends on nothing above it: the
//! gateway builds outcomes and the history stores them.

use std::sync::Arc;
use std::time::Duration;

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
    /// Reads the timing fields from a final Ollama response object; `None` when it has none or is not
    /// a JSON object. Only these fields are decoded: the answer's text is skipped, not copied.
    pub fn from_slice(json: &[u8]) -> Option<Self> {
        let reported: Reported = serde_json::from_slice(json).ok()?;
        let nanos = |field: Option<Count>| field.and_then(Count::get).map(Duration::from_nanos);
        let total = nanos(reported.total_duration);
        let load = nanos(reported.load_duration);
        let eval_tokens = reported.eval_count.and_then(Count::get);
        if total.is_none() && eval_tokens.is_none() {
            return None;
        }
        Some(Self {
            total: total.unwrap_or_default(),
            load: load.unwrap_or_default(),
            prompt_tokens: reported.prompt_eval_count.and_then(Count::get).unwrap_or(0),
            prompt: nanos(reported.prompt_eval_duration).unwrap_or_default(),
            eval_tokens: eval_tokens.unwrap_or(0),
            eval: nanos(reported.eval_duration).unwrap_or_default(),
            load_reported: load.is_some(),
        })
    }
}

/// The timing fields of an answer, as sent; every other field is skipped.
#[derive(serde::Deserialize)]
struct Reported {
    total_duration: Option<Count>,
    load_duration: Option<Count>,
    prompt_eval_count: Option<Count>,
    prompt_eval_duration: Option<Count>,
    eval_count: Option<Count>,
    eval_duration: Option<Count>,
}

/// A count or nanoseconds; a field of another type (a server that sends floats or strings) reads as
/// missing instead of discarding the other fields.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Count {
    Whole(u64),
    Other(serde::de::IgnoredAny),
}

impl Count {
    fn get(self) -> Option<u64> {
        match self {
            Self::Whole(value) => Some(value),
            Self::Other(_) => None,
        }
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
        let answer =
            br#"{"message": {"role": "assistant", "content": "a \"quoted\" answer"}, "done": true,
            "total_duration": 5000000000, "load_duration": 2000000000, "prompt_eval_count": 26,
            "prompt_eval_duration": 130000000, "eval_count": 290, "eval_duration": 4700000000}"#;
        let timings = OllamaTimings::from_slice(answer).expect("timings");
        assert_eq!(timings.eval_tokens, 290);
        assert_eq!(timings.prompt_tokens, 26);
        assert_eq!(timings.load, Duration::from_secs(2));
        assert!(timings.load_reported);
        assert_eq!(OllamaTimings::from_slice(br#"{"done": false}"#), None);
        assert_eq!(OllamaTimings::from_slice(b"[1, 2]"), None);
        assert_eq!(OllamaTimings::from_slice(b"not json"), None);
    }

    #[test]
    fn a_field_of_another_type_reads_as_missing() {
        let timings = OllamaTimings::from_slice(
            br#"{"total_duration": 1.5, "load_duration": "2s", "eval_count": 7, "eval_duration": -3}"#,
        )
        .expect("timings");
        assert_eq!(timings.eval_tokens, 7);
        assert_eq!(timings.total, Duration::ZERO);
        assert!(!timings.load_reported);
        assert_eq!(timings.eval, Duration::ZERO);
    }
}
