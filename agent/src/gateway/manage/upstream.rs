//! Sending model changes to the nodes: one node's answer read whole or passed on as it streams,
//! several nodes' progress streams followed at once and folded into one (`progress`), blobs checked
//! and uploaded.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::future::join_all;
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use sollol_shared::digest::Sha256Digest;
use tokio::sync::mpsc;

use super::NODE_HEADER;
use super::progress::{Event, Progress};
use crate::cluster::Backend;
use crate::cluster::identity::ClusterToken;
use crate::gateway::ApiError;
use crate::gateway::proxy::{header_text, node_client};
use crate::http_client::error_chain;

/// The most of a node's plain answer (delete, copy, a failed request) read.
const PLAIN_ANSWER_LIMIT: usize = 1 << 20;
/// How long a node may take to answer a plain request or start a progress stream.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The HTTP client model changes go through: bodies stream (a blob can be gigabytes), answers are
/// waited for without the inference routes' limits (a pull takes minutes).
#[derive(Debug)]
pub struct ModelApi {
    client: Client<HttpConnector, Body>,
    /// Proves the coordinator to the agents it asks to copy a model (their stage ports).
    pub(super) token: ClusterToken,
}

impl ModelApi {
    pub fn new(token: ClusterToken) -> Self {
        Self {
            client: node_client(),
            token,
        }
    }

    /// Which of `nodes` have the blob (`HEAD /api/blobs/:digest` answered 200), asked at once.
    pub(super) async fn with_blob(
        &self,
        nodes: Vec<Arc<Backend>>,
        digest: &Sha256Digest,
    ) -> Vec<Arc<Backend>> {
        let has = join_all(nodes.iter().map(|node| async move {
            let Ok(request) = hyper::Request::head(format!("{}/api/blobs/{digest}", node.base_url))
                .body(Body::empty())
            else {
                return false;
            };
            matches!(
                exchange(&self.client, request).await,
                Ok(answer) if answer.status() == StatusCode::OK
            )
        }))
        .await;
        nodes
            .into_iter()
            .zip(has)
            .filter_map(|(node, has)| has.then_some(node))
            .collect()
    }

    /// Streams a blob upload (`length`: the client's `Content-Length`, if it sent one) to `node`.
    pub(super) async fn upload(
        &self,
        node: &Backend,
        digest: &Sha256Digest,
        length: Option<&HeaderValue>,
        body: Body,
    ) -> Result<Answer, String> {
        let mut request = hyper::Request::post(format!("{}/api/blobs/{digest}", node.base_url));
        if let Some(length) = length {
            request = request.header(header::CONTENT_LENGTH, length);
        }
        let request = request.body(body).map_err(|error| error.to_string())?;
        // No timeout on the upload itself: the body's own idle limit ends a stalled one.
        let answer = self
            .client
            .request(request)
            .await
            .map_err(|error| error_chain(&error))?;
        Answer::read(answer).await
    }
}

/// Sends `request` and waits for the node's response headers, within [`ANSWER_TIMEOUT`].
async fn exchange(
    client: &Client<HttpConnector, Body>,
    request: hyper::Request<Body>,
) -> Result<hyper::Response<Incoming>, String> {
    match tokio::time::timeout(ANSWER_TIMEOUT, client.request(request)).await {
        Err(_) => Err(format!("no answer within {} s", ANSWER_TIMEOUT.as_secs())),
        Ok(Err(error)) => Err(error_chain(&error)),
        Ok(Ok(answer)) => Ok(answer),
    }
}

/// A node's answer read whole.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

impl Answer {
    pub(super) async fn read(
        answer: hyper::Response<hyper::body::Incoming>,
    ) -> Result<Self, String> {
        let status = answer.status();
        let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
        let body = http_body_util::Limited::new(answer.into_body(), PLAIN_ANSWER_LIMIT)
            .collect()
            .await
            .map_err(|error| format!("answer cut off: {}", error_chain(&*error)))?
            .to_bytes();
        Ok(Self {
            status,
            content_type,
            body,
        })
    }

    /// The node's error message, or its status when it gave none.
    pub(super) fn message(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|value| value.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| {
                format!(
                    "HTTP {}: {}",
                    self.status.as_u16(),
                    String::from_utf8_lossy(&self.body).trim()
                )
            })
    }

    pub(super) fn into_response(self, nodes: &str) -> Response {
        let mut response = (self.status, self.body).into_response();
        let headers = response.headers_mut();
        if let Some(content_type) = self.content_type {
            headers.insert(header::CONTENT_TYPE, content_type);
        }
        headers.insert(NODE_HEADER, header_text(nodes));
        response
    }
}

/// The names of `nodes`, for a response header.
pub(super) fn node_names(nodes: &[Arc<Backend>]) -> HeaderValue {
    let names: Vec<&str> = nodes.iter().map(|node| node.name.as_str()).collect();
    header_text(&names.join(","))
}

/// One request as it goes to each node.
pub(super) struct Call<'a> {
    pub(super) api: &'a ModelApi,
    pub(super) method: Method,
    pub(super) path: &'static str,
    pub(super) body: Bytes,
    pub(super) origin: Option<HeaderValue>,
}

impl Call<'_> {
    fn request(&self, node: &Backend) -> Result<hyper::Request<Body>, String> {
        let mut request = hyper::Request::builder()
            .method(self.method.clone())
            .uri(format!("{}{}", node.base_url, self.path))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(origin) = &self.origin {
            request = request.header(header::ORIGIN, origin);
        }
        request
            .body(Body::from(self.body.clone()))
            .map_err(|error| error.to_string())
    }

    /// Sends the request and waits for the node's response headers.
    async fn send(&self, node: &Backend) -> Result<hyper::Response<Incoming>, String> {
        exchange(&self.api.client, self.request(node)?).await
    }

    /// The node's answer read whole.
    pub(super) async fn answer(&self, node: &Arc<Backend>) -> Result<Answer, String> {
        Answer::read(self.send(node).await?).await
    }

    /// One node's answer passed on as it comes (a progress stream stays a stream); a stream the node
    /// breaks off ends with an `error` line instead of just stopping.
    pub(super) async fn pass_through(&self, node: &Arc<Backend>) -> Response {
        let answer = match self.send(node).await {
            Ok(answer) => answer,
            Err(error) => {
                return ApiError::new(StatusCode::BAD_GATEWAY, format!("{}: {error}", node.name))
                    .into_response();
            }
        };
        let status = answer.status();
        let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
        let name = node.name.clone();
        let upstream = answer.into_body().into_data_stream();
        let body = upstream.map(move |chunk| {
            Ok::<Bytes, std::io::Error>(chunk.unwrap_or_else(|error| {
                let line = json!({"error": format!("{name}: the stream broke off: {}", error_chain(&error))});
                Bytes::from(format!("\n{line}\n"))
            }))
        });
        let mut response = Body::from_stream(body).into_response();
        *response.status_mut() = status;
        let headers = response.headers_mut();
        if let Some(content_type) = content_type {
            headers.insert(header::CONTENT_TYPE, content_type);
        }
        headers.insert(NODE_HEADER, header_text(&node.name));
        response
    }

    /// The request sent to `node`; its lines into `sender` as node `index`'s. Resolves to how the stream
    /// ended.
    pub(super) fn follow_one(
        &self,
        node: &Backend,
        index: usize,
        sender: mpsc::Sender<Event>,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let request = self.request(node);
        let client = self.api.client.clone();
        async move { follow(client, request, index, &sender).await }
    }

    /// The request sent to every node at once; their lines and endings as they come.
    pub(super) fn fan_out(&self, nodes: &[Arc<Backend>]) -> mpsc::Receiver<Event> {
        let (sender, receiver) = mpsc::channel(64);
        for (index, node) in nodes.iter().enumerate() {
            let request = self.request(node);
            let client = self.api.client.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                let ended = follow(client, request, index, &sender).await;
                let _ = sender.send(Event::End(index, ended)).await;
            });
        }
        receiver
    }
}

/// Reads one node's progress stream line by line into `sender`; how it ended.
async fn follow(
    client: Client<HttpConnector, Body>,
    request: Result<hyper::Request<Body>, String>,
    index: usize,
    sender: &mpsc::Sender<Event>,
) -> Result<(), String> {
    let answer = exchange(&client, request?).await?;
    if !answer.status().is_success() {
        let answer = Answer::read(answer).await?;
        return Err(answer.message());
    }
    let mut upstream = answer.into_body().into_data_stream();
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = upstream.next().await {
        let chunk =
            chunk.map_err(|error| format!("the stream broke off: {}", error_chain(&error)))?;
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if sender
                .send(Event::Line(index, Bytes::from(line)))
                .await
                .is_err()
            {
                return Err("the client went away".to_owned());
            }
        }
    }
    if !pending.is_empty() {
        let _ = sender.send(Event::Line(index, Bytes::from(pending))).await;
    }
    // A stream that ends without `success` (or an error line) is reported as such by `Progress`.
    Ok(())
}

/// The nodes' events folded into one NDJSON stream, ending with `success` or an `error` line.
pub(super) fn aggregate(
    progress: Progress,
    events: mpsc::Receiver<Event>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(
        (progress, events, false),
        |(mut progress, mut events, ended)| async move {
            if ended {
                return None;
            }
            while !progress.done() {
                let Some(event) = events.recv().await else {
                    break;
                };
                if let Some(line) = progress.apply(event) {
                    return Some((Ok(ndjson(&line)), (progress, events, false)));
                }
            }
            Some((Ok(ndjson(&progress.last())), (progress, events, true)))
        },
    )
}

/// The nodes' events folded to the end; the last line (`success` or an `error`).
pub(super) async fn settle(mut progress: Progress, mut events: mpsc::Receiver<Event>) -> Value {
    while !progress.done() {
        let Some(event) = events.recv().await else {
            break;
        };
        progress.apply(event);
    }
    progress.last()
}

pub(super) fn ndjson(value: &Value) -> Bytes {
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}
