//! One attempt: the request sent to one node, the failure that lets the next node take over (before
//! the client saw anything), and the answer handed back buffered or as a stream.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};

use super::relay::{Relay, next_data, read_limited};
use super::request::RouteKind;
use super::{
    CANDIDATES_HEADER, Charge, DECISION_HEADER, InFlight, NODE_HEADER, Proxy, lock, post_json,
};
use crate::cluster::Backend;
use crate::gateway::ApiError;
use crate::history::{OllamaTimings, Outcome, candidates_json};
use crate::http_client::error_chain;

/// One try on one node.
pub(super) struct Attempt<'a> {
    pub(super) proxy: &'a Proxy,
    pub(super) backend: &'a Backend,
    pub(super) path: &'a str,
    pub(super) body: Bytes,
    /// The browser page that sent the request, if one did.
    pub(super) origin: Option<&'a HeaderValue>,
    /// Who the answer's generated tokens are charged to.
    pub(super) charge: Charge,
    pub(super) stream: bool,
    pub(super) kind: RouteKind,
    pub(super) outcome: Outcome,
}

impl Attempt<'_> {
    /// The response to send, or why this node failed before the client saw anything.
    pub(super) async fn run(mut self) -> Result<Response, String> {
        let allowed = lock(&self.proxy.breaker_of(&self.backend.node_id)).allow(Instant::now());
        if !allowed {
            return Err("circuit open (another request is the trial)".to_owned());
        }
        let load = self.proxy.load_of(&self.backend.node_id);
        self.outcome.concurrent = load.load(Ordering::Relaxed);
        let in_flight = InFlight::new(load, self.proxy.admission());
        let started = Instant::now();
        let request = post_json(
            format!("{}{}", self.backend.base_url, self.path),
            self.body.clone(),
            self.origin,
        )?;
        let response = match tokio::time::timeout(
            self.proxy.settings.response_timeout,
            self.proxy.client().request(request),
        )
        .await
        {
            Err(_) => {
                let timeout = self.proxy.settings.response_timeout;
                return Err(self.fail(
                    started,
                    format!("no response within {} s", timeout.as_secs()),
                ));
            }
            Ok(Err(error)) => return Err(self.fail(started, error_chain(&error))),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_server_error() {
            let body = read_limited(response.into_body(), 4096)
                .await
                .unwrap_or_default();
            let message = format!(
                "HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&body).trim()
            );
            return Err(self.fail(started, message));
        }
        if !self.stream || !status.is_success() {
            self.buffered(response, started, in_flight).await
        } else {
            self.streamed(response, started, in_flight).await
        }
    }

    /// Records the failure for the learner and the node's breaker, and returns its message.
    fn fail(&mut self, started: Instant, message: String) -> String {
        self.outcome.total = started.elapsed();
        self.proxy.learner().record(self.outcome.clone());
        self.proxy.node_result(self.backend, false);
        message
    }

    /// A small answer read whole, so a node that dies mid-answer is failed over, not passed on.
    async fn buffered(
        mut self,
        response: hyper::Response<Incoming>,
        started: Instant,
        in_flight: InFlight,
    ) -> Result<Response, String> {
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let limit = self.proxy.settings.max_response_body;
        let bytes = match http_body_util::Limited::new(response.into_body(), limit)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                // The node answered; another node's answer would be as large: no failover.
                self.proxy.node_result(self.backend, true);
                return Ok(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "{}'s answer is larger than coordinator.max_response_body ({limit} bytes)",
                        self.backend.name
                    ),
                )
                .into_response());
            }
            Err(error) => {
                return Err(self.fail(started, format!("answer cut off: {}", error_chain(&*error))));
            }
        };
        let outcome = &mut self.outcome;
        outcome.time_to_first_byte = started.elapsed();
        outcome.total = outcome.time_to_first_byte;
        // A 4xx is the client's problem: the node answered, so it counts as healthy.
        self.proxy.node_result(self.backend, true);
        if status.is_success() {
            outcome.ok = true;
            if self.kind.learns {
                outcome.timings = OllamaTimings::from_slice(&bytes);
            }
            self.proxy.learner().record(outcome.clone());
            self.charge.tokens(outcome);
        }
        drop(in_flight);
        Ok(respond(
            status,
            content_type,
            Body::from(bytes),
            self.backend,
            &self.outcome,
        ))
    }

    /// A streamed answer: its first chunk is awaited here, so a node that fails before answering is
    /// still failed over; the rest goes through the [`Relay`].
    async fn streamed(
        mut self,
        response: hyper::Response<Incoming>,
        started: Instant,
        in_flight: InFlight,
    ) -> Result<Response, String> {
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let mut upstream = response.into_body();
        let first = match next_data(&mut upstream).await {
            Ok(Some(first)) => first,
            Ok(None) => return Err(self.fail(started, "empty answer".to_owned())),
            Err(error) => {
                return Err(self.fail(
                    started,
                    format!("stream failed before its first chunk: {error}"),
                ));
            }
        };
        self.outcome.time_to_first_byte = started.elapsed();
        let Self {
            proxy,
            backend,
            kind,
            outcome,
            charge,
            ..
        } = self;
        proxy.node_result(backend, true);
        let relay = Relay {
            breaker: proxy.breaker_of(&backend.node_id),
            breaker_settings: proxy.settings.breaker,
            upstream,
            first: Some(first),
            tail: Vec::new(),
            node: backend.name.clone(),
            sse: kind.sse,
            learns: kind.learns,
            started,
            outcome,
            learner: Arc::clone(&proxy.learner),
            charge,
            _in_flight: in_flight,
            done: false,
        };
        let decided = relay.outcome.clone();
        let body = Body::from_stream(futures_util::stream::unfold(relay, Relay::next));
        Ok(respond(status, content_type, body, backend, &decided))
    }
}

fn respond(
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Body,
    backend: &Backend,
    outcome: &Outcome,
) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json; charset=utf-8")),
    );
    headers.insert(NODE_HEADER, header_text(&backend.name));
    headers.insert(DECISION_HEADER, header_text(&outcome.reason));
    headers.insert(
        CANDIDATES_HEADER,
        header_text(&candidates_json(&outcome.candidates)),
    );
    response
}

/// Header values must be visible ASCII; anything else becomes `?`.
pub(crate) fn header_text(text: &str) -> HeaderValue {
    let cleaned: String = text
        .chars()
        .take(1000)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&cleaned).unwrap_or_else(|_| HeaderValue::from_static("?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_sanitised() {
        assert_eq!(
            header_text("node é\n1"),
            HeaderValue::from_static("node ??1")
        );
    }
}
