//! A small HTTP/1.1 client for JSON GETs (and body-less POSTs): the agent's Ollama probe and the
//! operator commands.
//!
//! Plain `http://` only; every call has a timeout and a cap on the body size.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::DeserializeOwned;

const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("no answer from {url} within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("cannot reach {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url} sent a body that is not the expected JSON: {reason}")]
    Body { url: String, reason: String },
}

/// A reusable client with keep-alive connections.
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// Sent as `Authorization: Bearer KEY` with every request, when set.
    key: Option<String>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::with_idle_connections(2, Duration::from_secs(20))
    }
}

impl HttpClient {
    /// A client keeping at most `idle` connections per host open for `idle_timeout` between calls (a
    /// short timeout for servers polled among many: kept connections cost memory).
    pub fn with_idle_connections(idle: usize, idle_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(idle_timeout)
                .pool_max_idle_per_host(idle)
                .build(connector),
            key: None,
        }
    }

    /// The same client, sending `key` as a bearer token (the operator commands, when the coordinator
    /// has API keys).
    pub fn with_key(mut self, key: Option<&str>) -> Self {
        self.key = key.map(str::to_owned);
        self
    }

    /// GETs `url` and decodes its JSON body as `T`.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<T, HttpError> {
        let bytes = self.get(url, timeout).await?;
        serde_json::from_slice(&bytes).map_err(|error| HttpError::Body {
            url: url.to_owned(),
            reason: error.to_string(),
        })
    }

    /// POSTs to `url` with no body and decodes the JSON answer as `T`.
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<T, HttpError> {
        let bytes = self.send(hyper::Method::POST, url, timeout).await?;
        serde_json::from_slice(&bytes).map_err(|error| HttpError::Body {
            url: url.to_owned(),
            reason: error.to_string(),
        })
    }

    /// GETs `url` and returns the body of a 2xx answer.
    pub async fn get(&self, url: &str, timeout: Duration) -> Result<Bytes, HttpError> {
        self.send(hyper::Method::GET, url, timeout).await
    }

    async fn send(
        &self,
        method: hyper::Method,
        url: &str,
        timeout: Duration,
    ) -> Result<Bytes, HttpError> {
        let uri: hyper::Uri =
            url.parse().map_err(
                |error: hyper::http::uri::InvalidUri| HttpError::InvalidUrl {
                    url: url.to_owned(),
                    reason: error.to_string(),
                },
            )?;
        if uri.scheme_str() != Some("http") {
            return Err(HttpError::InvalidUrl {
                url: url.to_owned(),
                reason: "only http:// is supported".to_owned(),
            });
        }
        let exchange = async {
            let mut request = hyper::Request::builder().method(method).uri(uri);
            if let Some(key) = &self.key {
                request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
            }
            let request = request
                .body(Empty::new())
                .map_err(|error| HttpError::InvalidUrl {
                    url: url.to_owned(),
                    reason: error.to_string(),
                })?;
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|error| HttpError::Connect {
                        url: url.to_owned(),
                        reason: error_chain(&error),
                    })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|error| HttpError::Body {
                    url: url.to_owned(),
                    reason: error.to_string(),
                })?
                .to_bytes();
            if !status.is_success() {
                return Err(HttpError::Status {
                    url: url.to_owned(),
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(&body).chars().take(300).collect(),
                });
            }
            Ok(body)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout {
                url: url.to_owned(),
                timeout,
            })?
    }
}

/// An error and its causes, joined with `: `.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
