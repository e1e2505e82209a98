//! The streaming relay: a streamed answer passed through chunk by chunk, its tail watched for Ollama's
//! final timing object, and a failure mid-stream ended with an error object the client can read.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use serde_json::json;
use sollol_policy::breaker::{Breaker, BreakerSettings};

use super::{Charge, InFlight, lock};
use crate::gateway::learning::Learner;
use crate::history::{OllamaTimings, Outcome};
use crate::http_client::error_chain;

/// Bytes of a streamed answer kept to read its final timing object.
const TAIL_BYTES: usize = 64 * 1024;

/// Passes a streamed answer through, watching its tail for Ollama's final timing object.
pub(super) struct Relay {
    pub(super) breaker: Arc<Mutex<Breaker>>,
    pub(super) breaker_settings: BreakerSettings,
    pub(super) upstream: Incoming,
    pub(super) first: Option<Bytes>,
    pub(super) tail: Vec<u8>,
    pub(super) node: String,
    pub(super) sse: bool,
    pub(super) learns: bool,
    pub(super) started: Instant,
    pub(super) outcome: Outcome,
    pub(super) learner: Arc<Learner>,
    pub(super) charge: Charge,
    pub(super) _in_flight: InFlight,
    pub(super) done: bool,
}

impl Relay {
    pub(super) async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        if self.done {
            return None;
        }
        let chunk = match self.first.take() {
            Some(first) => Ok(Some(first)),
            None => next_data(&mut self.upstream).await,
        };
        match chunk {
            Ok(Some(bytes)) => {
                self.keep_tail(&bytes);
                Some((Ok(bytes), self))
            }
            Ok(None) => {
                self.done = true;
                self.outcome.ok = true;
                self.outcome.total = self.started.elapsed();
                if self.learns {
                    self.outcome.timings =
                        last_json_line(&self.tail).and_then(OllamaTimings::from_slice);
                }
                self.learner.record(self.outcome.clone());
                self.charge.tokens(&self.outcome);
                None
            }
            Err(error) => {
                // The client already has part of the answer: end it with an error object instead of hanging.
                self.done = true;
                self.outcome.total = self.started.elapsed();
                self.learner.record(self.outcome.clone());
                lock(&self.breaker).on_failure(Instant::now(), &self.breaker_settings);
                let message =
                    json!({ "error": format!("node {} failed mid-stream: {error}", self.node) });
                let bytes = if self.sse {
                    Bytes::from(format!("data: {message}\n\n"))
                } else {
                    Bytes::from(format!("{message}\n"))
                };
                Some((Ok(bytes), self))
            }
        }
    }

    fn keep_tail(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > TAIL_BYTES {
            let cut = self.tail.len() - TAIL_BYTES;
            self.tail.drain(..cut);
        }
    }
}

/// The last line of an NDJSON tail that is not blank.
fn last_json_line(tail: &[u8]) -> Option<&[u8]> {
    tail.split(|byte| *byte == b'\n')
        .rev()
        .find(|line| !line.iter().all(u8::is_ascii_whitespace))
}

pub(super) async fn next_data(body: &mut Incoming) -> Result<Option<Bytes>, String> {
    loop {
        match body.frame().await {
            None => return Ok(None),
            Some(Err(error)) => return Err(error_chain(&error)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    return Ok(Some(data));
                }
            }
        }
    }
}

pub(super) async fn read_limited(body: Incoming, limit: usize) -> Option<Bytes> {
    http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .ok()
        .map(|collected| collected.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_ndjson_line_carries_the_timings() {
        let tail =
            b"{\"done\":false}\n{\"done\":true,\"eval_count\":3,\"eval_duration\":3000000}\n";
        let line = last_json_line(tail).expect("a line");
        let timings = OllamaTimings::from_slice(line).expect("timings");
        assert_eq!(timings.eval_tokens, 3);
        assert_eq!(last_json_line(b"  \n"), None);
    }
}
