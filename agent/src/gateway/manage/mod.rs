//! Ollama's model management through the gateway: `pull`, `create`, `push` (progress streams),
//! `delete`, `copy` (plain answers) and `HEAD`/`POST /api/blobs/:digest`, each sent to the nodes the
//! client names (`targets`) or, when it names none, to the nodes the change concerns: a pull or a new
//! model to the roomiest node that lacks it (`sollol_policy::placement`), a delete or copy to every
//! node (the gateway lists the union of the nodes' models, so a model deleted through it must leave
//! every node; those without it answer 404), a push from one holder, a create where its base model or its
//! uploaded blobs are. Several nodes' progress streams are folded into one (`progress`).
//!
//! Names and digests are checked before anything is sent: a name with path or control characters is
//! a 400 here, never a path on a node.

mod progress;
mod targets;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::future::join_all;
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sollol_shared::digest::Sha256Digest;
use sollol_shared::model_name;
use tokio::sync::mpsc;

use super::{ApiError, GatewayState};
use crate::cluster::{Backend, ClusterView};
use crate::http_client::error_chain;
use progress::Progress;
use targets::Wanted;

use targets::NODE_HEADER;

/// The most of a node's plain answer (delete, copy, a failed request) read.
const PLAIN_ANSWER_LIMIT: usize = 1 << 20;
/// How long a node may take to answer a plain request or start a progress stream.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// A blob upload may take this long in all (hours of a slow link for a large model); its idle limit is
/// `coordinator.body_read_timeout`.
const UPLOAD_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// The HTTP client model changes go through: bodies stream (a blob can be gigabytes), answers are
/// waited for without the inference routes' limits (a pull takes minutes).
#[derive(Debug)]
pub struct ModelApi {
    client: Client<HttpConnector, Body>,
}

impl Default for ModelApi {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(20))
                .build(connector),
        }
    }
}

/// The routes that report progress as they go.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ProgressRoute {
    Pull,
    Create,
    Push,
}

impl ProgressRoute {
    fn path(self) -> &'static str {
        match self {
            Self::Pull => "/api/pull",
            Self::Create => "/api/create",
            Self::Push => "/api/push",
        }
    }
}

pub async fn pull(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    progress_route(&state, ProgressRoute::Pull, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn create(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    progress_route(&state, ProgressRoute::Create, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn push(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    progress_route(&state, ProgressRoute::Push, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `DELETE /api/delete`: from the named nodes, else from every node that has the model.
pub async fn delete(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    plain_route(
        &state,
        Method::DELETE,
        "/api/delete",
        &headers,
        body,
        &["model", "name"],
    )
    .await
    .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /api/copy`: on the named nodes, else on every node that has the source.
pub async fn copy(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    plain_route(
        &state,
        Method::POST,
        "/api/copy",
        &headers,
        body,
        &["source"],
    )
    .await
    .unwrap_or_else(IntoResponse::into_response)
}

/// `HEAD /api/blobs/:digest`: 200 when the named node (or any node, when none is named) has the blob.
pub async fn blob_exists(
    State(state): State<Arc<GatewayState>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Response {
    blob_exists_inner(&state, &digest, &headers)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /api/blobs/:digest`: the upload streamed to one node, the named one or the roomiest.
pub async fn blob_upload(
    State(state): State<Arc<GatewayState>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    blob_upload_inner(&state, &digest, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// A management request's JSON body; 400 for anything else.
fn json_body(body: Result<Bytes, BytesRejection>) -> Result<(Bytes, Value), ApiError> {
    let body =
        body.map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))?;
    let value: Value = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {error}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    }
    Ok((body, value))
}

/// The model named by the first of `fields` present, checked and normalized; 400 when absent or not a
/// model name.
fn model_field(value: &Value, fields: &[&str]) -> Result<String, ApiError> {
    let name = fields
        .iter()
        .find_map(|field| value.get(*field))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{} is required", fields[0]),
            )
        })?
        .as_str()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{} must be a string", fields[0]),
            )
        })?;
    checked_name(name)
}

fn checked_name(name: &str) -> Result<String, ApiError> {
    model_name::validate(name).map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    Ok(model_name::normalize(name))
}

fn not_found(model: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("model '{model}' not found"))
}

/// Every name a body carries besides the model is checked too (`copy`'s destination, `create`'s
/// base), so nothing the nodes receive names a path.
fn check_other_names(value: &Value) -> Result<(), ApiError> {
    for field in ["destination", "from"] {
        if let Some(name) = value.get(field) {
            let name = name.as_str().ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, format!("{field} must be a string"))
            })?;
            checked_name(name)?;
        }
    }
    if let Some(files) = value.get("files") {
        blob_digests(files)?;
    }
    Ok(())
}

/// The digests of `create`'s `files` (`{"name.gguf": "sha256:…"}`), each checked.
fn blob_digests(files: &Value) -> Result<Vec<Sha256Digest>, ApiError> {
    let files = files.as_object().ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "files must map file names to sha256: digests",
        )
    })?;
    files
        .values()
        .map(|digest| {
            digest
                .as_str()
                .ok_or_else(|| "a digest must be a string".to_owned())
                .and_then(Sha256Digest::parse)
                .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))
        })
        .collect()
}

/// The base model of a `create`: `from`, or the legacy Modelfile's `FROM` line when it names a model
/// (not a file on the node).
fn create_base(value: &Value) -> Option<String> {
    if let Some(from) = value.get("from").and_then(Value::as_str) {
        return Some(model_name::normalize(from));
    }
    let modelfile = value.get("modelfile").and_then(Value::as_str)?;
    modelfile.lines().find_map(|line| {
        let (keyword, rest) = line.trim().split_once(char::is_whitespace)?;
        let base = rest.trim();
        (keyword.eq_ignore_ascii_case("from") && model_name::validate(base).is_ok())
            .then(|| model_name::normalize(base))
    })
}

async fn progress_route(
    state: &GatewayState,
    route: ProgressRoute,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (body, value) = json_body(body)?;
    let model = model_field(&value, &["model", "name"])?;
    check_other_names(&value)?;
    let wanted = Wanted::of(headers)?;
    let view = state.view.load_full();
    let mut nodes = targets::resolve(&wanted, &view, &model)?;
    if nodes.is_empty() {
        nodes = match route {
            ProgressRoute::Pull => targets::placed(&view, &model, 1),
            ProgressRoute::Push => targets::holders(&view, &model)
                .into_iter()
                .take(1)
                .collect(),
            ProgressRoute::Create => create_targets(state, &view, &value).await?,
        };
    }
    if nodes.is_empty() {
        return Err(not_found(&model));
    }
    let stream = value.get("stream").and_then(Value::as_bool).unwrap_or(true);
    let origin = headers.get(header::ORIGIN).cloned();
    let call = Call {
        api: &state.models,
        method: Method::POST,
        path: route.path(),
        body,
        origin,
    };
    if let [node] = nodes.as_slice() {
        return Ok(call.pass_through(node).await);
    }
    let names = node_names(&nodes);
    let events = call.fan_out(&nodes);
    if stream {
        let mut response = Body::from_stream(aggregate(nodes, events)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        response.headers_mut().insert(NODE_HEADER, names);
        return Ok(response);
    }
    let lines: Vec<Result<Bytes, std::io::Error>> = aggregate(nodes, events).collect().await;
    let last: Value = lines
        .last()
        .and_then(|line| line.as_ref().ok())
        .and_then(|line| serde_json::from_slice(line).ok())
        .unwrap_or_else(|| json!({"error": "no node answered"}));
    let status = if last.get("error").is_some() {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::OK
    };
    let mut response = (status, axum::Json(last)).into_response();
    response.headers_mut().insert(NODE_HEADER, names);
    Ok(response)
}

/// Where a `create` without named nodes goes: the nodes that hold its base model; else the nodes that
/// have every blob its `files` name (404 naming the first blob no node has); else the roomiest node.
async fn create_targets(
    state: &GatewayState,
    view: &ClusterView,
    value: &Value,
) -> Result<Vec<Arc<Backend>>, ApiError> {
    if let Some(base) = create_base(value) {
        let holders = targets::holders(view, &base);
        if !holders.is_empty() {
            return Ok(holders);
        }
    }
    let Some(files) = value.get("files") else {
        let model = model_field(value, &["model", "name"])?;
        return Ok(targets::placed(view, &model, 1));
    };
    let digests = blob_digests(files)?;
    let mut nodes: Vec<Arc<Backend>> = view.backends.clone();
    for digest in &digests {
        let has = join_all(nodes.iter().map(|node| state.models.has_blob(node, digest))).await;
        nodes = nodes
            .into_iter()
            .zip(has)
            .filter_map(|(node, has)| has.then_some(node))
            .collect();
        if nodes.is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "no node has blob {digest} (or no node has all of this model's blobs): upload it first with POST /api/blobs/{digest}"
                ),
            ));
        }
    }
    Ok(nodes)
}

async fn plain_route(
    state: &GatewayState,
    method: Method,
    path: &'static str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    model_fields: &[&str],
) -> Result<Response, ApiError> {
    let (body, value) = json_body(body)?;
    let model = model_field(&value, model_fields)?;
    check_other_names(&value)?;
    let wanted = Wanted::of(headers)?;
    let view = state.view.load_full();
    let mut nodes = targets::resolve(&wanted, &view, &model)?;
    // Unnamed, the change goes to every node, not only to those whose last report lists the model:
    // a report can be a heartbeat old (a model copied a moment ago), and a node that lacks the model
    // answers 404, which then means "not here".
    let absent_is_fine = nodes.is_empty();
    if absent_is_fine {
        nodes = view.backends.clone();
    }
    let call = Call {
        api: &state.models,
        method,
        path,
        body,
        origin: headers.get(header::ORIGIN).cloned(),
    };
    let answers = join_all(nodes.iter().map(|node| call.answer(node))).await;
    if absent_is_fine {
        let (present, answers): (Vec<_>, Vec<_>) = nodes
            .into_iter()
            .zip(answers)
            .filter(|(_, answer)| {
                !matches!(answer, Ok(answer) if answer.status == StatusCode::NOT_FOUND)
            })
            .unzip();
        if present.is_empty() {
            return Err(not_found(&model));
        }
        return Ok(combine(&present, answers));
    }
    Ok(combine(&nodes, answers))
}

/// One answer per node, as one answer: the node's own when there is one node or all succeeded, else
/// the failures with the nodes they happened on (the status the nodes agree on, else 502).
fn combine(nodes: &[Arc<Backend>], answers: Vec<Result<Answer, String>>) -> Response {
    let mut failures = Vec::new();
    let mut statuses = Vec::new();
    let mut succeeded = Vec::new();
    let mut first_success = None;
    for (node, answer) in nodes.iter().zip(answers) {
        match answer {
            Ok(answer) if answer.status.is_success() => {
                succeeded.push(node.name.as_str());
                first_success.get_or_insert(answer);
            }
            Ok(answer) if nodes.len() == 1 => return answer.into_response(&node.name),
            Ok(answer) => {
                statuses.push(answer.status);
                failures.push(format!("{}: {}", node.name, answer.message()));
            }
            Err(error) => {
                statuses.push(StatusCode::BAD_GATEWAY);
                failures.push(format!("{}: {error}", node.name));
            }
        }
    }
    if failures.is_empty()
        && let Some(answer) = first_success
    {
        return answer.into_response(&succeeded.join(","));
    }
    let status = match statuses.as_slice() {
        [first, rest @ ..] if rest.iter().all(|status| status == first) && succeeded.is_empty() => {
            *first
        }
        _ => StatusCode::BAD_GATEWAY,
    };
    let mut message = format!("failed on {}", failures.join("; "));
    if !succeeded.is_empty() {
        message.push_str(&format!(" (done on {})", succeeded.join(", ")));
    }
    ApiError::new(status, message).into_response()
}

async fn blob_exists_inner(
    state: &GatewayState,
    digest: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let digest =
        Sha256Digest::parse(digest).map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    let wanted = Wanted::of(headers)?;
    let view = state.view.load_full();
    let mut nodes = targets::resolve(&wanted, &view, "")?;
    if nodes.is_empty() {
        nodes = view.backends.clone();
    }
    let has = join_all(
        nodes
            .iter()
            .map(|node| state.models.has_blob(node, &digest)),
    )
    .await;
    let holders: Vec<&str> = nodes
        .iter()
        .zip(has)
        .filter_map(|(node, has)| has.then_some(node.name.as_str()))
        .collect();
    let mut response = if holders.is_empty() {
        StatusCode::NOT_FOUND.into_response()
    } else {
        StatusCode::OK.into_response()
    };
    if !holders.is_empty() {
        response
            .headers_mut()
            .insert(NODE_HEADER, header_list(&holders.join(",")));
    }
    Ok(response)
}

async fn blob_upload_inner(
    state: &GatewayState,
    digest: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let digest =
        Sha256Digest::parse(digest).map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))?;
    let wanted = Wanted::of(headers)?;
    let view = state.view.load_full();
    let mut nodes = targets::resolve(&wanted, &view, "")?;
    if nodes.is_empty() {
        nodes = targets::placed(&view, "", 1);
    }
    let [node] = nodes.as_slice() else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a blob is uploaded to one node at a time: name it with X-Sollol-Node (or none, for the roomiest)",
        ));
    };
    let body = super::body_timeout::with_timeouts(body, state.body_read_timeout, UPLOAD_DEADLINE);
    let mut request = hyper::Request::post(format!("{}/api/blobs/{digest}", node.base_url));
    if let Some(length) = headers.get(header::CONTENT_LENGTH) {
        request = request.header(header::CONTENT_LENGTH, length);
    }
    let request = request
        .body(body)
        .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, error.to_string()))?;
    let answer = state
        .models
        .client
        .request(request)
        .await
        .map_err(|error| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("{}: {}", node.name, error_chain(&error)),
            )
        })?;
    let answer = Answer::read(answer).await.map_err(|error| {
        ApiError::new(StatusCode::BAD_GATEWAY, format!("{}: {error}", node.name))
    })?;
    Ok(answer.into_response(&node.name))
}

impl ModelApi {
    /// Whether `node` has the blob (`HEAD /api/blobs/:digest` answered 200).
    async fn has_blob(&self, node: &Backend, digest: &Sha256Digest) -> bool {
        let Ok(request) = hyper::Request::head(format!("{}/api/blobs/{digest}", node.base_url))
            .body(Body::empty())
        else {
            return false;
        };
        matches!(
            tokio::time::timeout(ANSWER_TIMEOUT, self.client.request(request)).await,
            Ok(Ok(answer)) if answer.status() == StatusCode::OK
        )
    }
}

/// A node's answer read whole.
struct Answer {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

impl Answer {
    async fn read(answer: hyper::Response<hyper::body::Incoming>) -> Result<Self, String> {
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
    fn message(&self) -> String {
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

    fn into_response(self, nodes: &str) -> Response {
        let mut response = (self.status, self.body).into_response();
        let headers = response.headers_mut();
        if let Some(content_type) = self.content_type {
            headers.insert(header::CONTENT_TYPE, content_type);
        }
        headers.insert(NODE_HEADER, header_list(nodes));
        response
    }
}

/// Node names for a response header (names are the operator's; anything not visible ASCII becomes `?`).
fn header_list(names: &str) -> HeaderValue {
    let cleaned: String = names
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    HeaderValue::from_str(&cleaned).unwrap_or_else(|_| HeaderValue::from_static("?"))
}

fn node_names(nodes: &[Arc<Backend>]) -> HeaderValue {
    let names: Vec<&str> = nodes.iter().map(|node| node.name.as_str()).collect();
    header_list(&names.join(","))
}

/// One request as it goes to each node.
struct Call<'a> {
    api: &'a ModelApi,
    method: Method,
    path: &'static str,
    body: Bytes,
    origin: Option<HeaderValue>,
}

/// What a node's progress stream did: a line, or its end.
enum Event {
    Line(usize, Bytes),
    End(usize, Result<(), String>),
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
    async fn send(&self, node: &Backend) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let request = self.request(node)?;
        match tokio::time::timeout(ANSWER_TIMEOUT, self.api.client.request(request)).await {
            Err(_) => Err(format!("no answer within {} s", ANSWER_TIMEOUT.as_secs())),
            Ok(Err(error)) => Err(error_chain(&error)),
            Ok(Ok(answer)) => Ok(answer),
        }
    }

    /// The node's answer read whole.
    async fn answer(&self, node: &Arc<Backend>) -> Result<Answer, String> {
        Answer::read(self.send(node).await?).await
    }

    /// One node's answer passed on as it comes (a progress stream stays a stream); a stream the node
    /// breaks off ends with an `error` line instead of just stopping.
    async fn pass_through(&self, node: &Arc<Backend>) -> Response {
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
        headers.insert(NODE_HEADER, header_list(&node.name));
        response
    }

    /// The request sent to every node at once; their lines and endings as they come.
    fn fan_out(&self, nodes: &[Arc<Backend>]) -> mpsc::Receiver<Event> {
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
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, client.request(request?))
        .await
        .map_err(|_| format!("no answer within {} s", ANSWER_TIMEOUT.as_secs()))?
        .map_err(|error| error_chain(&error))?;
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
fn aggregate(
    nodes: Vec<Arc<Backend>>,
    events: mpsc::Receiver<Event>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let progress = Progress::new(nodes.iter().map(|node| node.name.clone()).collect());
    let state = (progress, events, nodes.len(), false);
    futures_util::stream::unfold(
        state,
        |(mut progress, mut events, mut running, done)| async move {
            if done {
                return None;
            }
            loop {
                if running == 0 {
                    let line = ndjson(&progress.last());
                    return Some((Ok(line), (progress, events, 0, true)));
                }
                let line = match events.recv().await {
                    Some(Event::Line(index, line)) => progress.line(index, &line),
                    Some(Event::End(index, ended)) => {
                        running -= 1;
                        // A stream that ended cleanly without `success` counts as failed.
                        progress.finished(
                            index,
                            ended.and(Err("its stream ended without success".to_owned())),
                        )
                    }
                    None => {
                        running = 0;
                        None
                    }
                };
                if let Some(line) = line {
                    return Some((Ok(ndjson(&line)), (progress, events, running, false)));
                }
            }
        },
    )
}

fn ndjson(value: &Value) -> Bytes {
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}
