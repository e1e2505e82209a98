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

mod peers;
mod progress;
mod replicas;
mod targets;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use hyper::body::Bytes;
use serde_json::Value;
use sollol_shared::api::{ReplicaList, ReplicaRequest};
use sollol_shared::digest::Sha256Digest;
use sollol_shared::model_name;

use super::{ApiError, GatewayState};
use crate::cluster::{Backend, ClusterView};
use progress::Progress;
use targets::Wanted;

use targets::NODE_HEADER;
use upstream::{Answer, Call, aggregate, node_names, settle};

pub use replicas::{Replicas, keep as keep_replicas};
pub use upstream::ModelApi;

/// A blob upload may take this long in all (hours of a slow link for a large model); its idle limit is
/// `coordinator.body_read_timeout`.
const UPLOAD_DEADLINE: Duration = Duration::from_secs(24 * 3600);

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
) -> Result<Response, ApiError> {
    progress_route(&state, ProgressRoute::Pull, &headers, body).await
}

pub async fn create(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    progress_route(&state, ProgressRoute::Create, &headers, body).await
}

pub async fn push(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    progress_route(&state, ProgressRoute::Push, &headers, body).await
}

/// `DELETE /api/delete`: from the named nodes, else from every node that has the model.
pub async fn delete(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    plain_route(
        &state,
        Method::DELETE,
        "/api/delete",
        &headers,
        body,
        &["model", "name"],
    )
    .await
}

/// `POST /api/copy`: on the named nodes, else on every node that has the source.
pub async fn copy(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    plain_route(
        &state,
        Method::POST,
        "/api/copy",
        &headers,
        body,
        &["source"],
    )
    .await
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
    let learned = state.proxy.learner().snapshot();
    let mut nodes = targets::resolve(&wanted, &view, &learned, &model)?;
    if nodes.is_empty() {
        nodes = match route {
            ProgressRoute::Pull => targets::placed(&view, &learned, &model, 1),
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
    let plan = (route == ProgressRoute::Pull).then(|| peers::plan(&view, &model, nodes.clone()));
    let copies = plan.as_ref().is_some_and(peers::Plan::copies);
    if let [node] = nodes.as_slice()
        && !copies
    {
        return Ok(call.pass_through(node).await);
    }
    let names = node_names(&nodes);
    let events = match plan {
        Some(plan) if copies => {
            peers::run(plan, &call, &state.models.token, &state.observer, &model)
        }
        _ => call.fan_out(&nodes),
    };
    let progress = Progress::new(nodes.iter().map(|node| node.name.clone()).collect());
    if stream {
        let response = Body::from_stream(aggregate(progress, events));
        let content_type = HeaderValue::from_static("application/x-ndjson");
        return Ok((
            [("content-type", content_type), (NODE_HEADER, names)],
            response,
        )
            .into_response());
    }
    let last = settle(progress, events).await;
    let status = if last.get("error").is_some() {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::OK
    };
    Ok((status, [(NODE_HEADER, names)], axum::Json(last)).into_response())
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
        let learned = state.proxy.learner().snapshot();
        return Ok(targets::placed(view, &learned, &model, 1));
    };
    let digests = blob_digests(files)?;
    let mut nodes: Vec<Arc<Backend>> = view.backends.clone();
    for digest in &digests {
        nodes = state.models.with_blob(nodes, digest).await;
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
    let learned = state.proxy.learner().snapshot();
    let mut nodes = targets::resolve(&wanted, &view, &learned, &model)?;
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

/// `HEAD /api/blobs/:digest`: 200 when the named node (or any node, when none is named) has the blob.
pub async fn blob_exists(
    State(state): State<Arc<GatewayState>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let digest = checked_digest(&digest)?;
    let wanted = Wanted::of(&headers)?;
    let view = state.view.load_full();
    let learned = state.proxy.learner().snapshot();
    let mut nodes = targets::resolve(&wanted, &view, &learned, "")?;
    if nodes.is_empty() {
        nodes = view.backends.clone();
    }
    let holders = state.models.with_blob(nodes, &digest).await;
    if holders.is_empty() {
        return Ok(StatusCode::NOT_FOUND.into_response());
    }
    Ok((StatusCode::OK, [(NODE_HEADER, node_names(&holders))]).into_response())
}

/// `POST /api/blobs/:digest`: the upload streamed to one node, the named one or the roomiest.
pub async fn blob_upload(
    State(state): State<Arc<GatewayState>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let digest = checked_digest(&digest)?;
    let wanted = Wanted::of(&headers)?;
    let view = state.view.load_full();
    let learned = state.proxy.learner().snapshot();
    let mut nodes = targets::resolve(&wanted, &view, &learned, "")?;
    if nodes.is_empty() {
        nodes = targets::placed(&view, &learned, "", 1);
    }
    let [node] = nodes.as_slice() else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a blob is uploaded to one node at a time: name it with X-Sollol-Node (or none, for the roomiest)",
        ));
    };
    let body = super::body_timeout::with_timeouts(body, state.body_read_timeout, UPLOAD_DEADLINE);
    let answer = state
        .models
        .upload(node, &digest, headers.get(header::CONTENT_LENGTH), body)
        .await
        .map_err(|error| {
            ApiError::new(StatusCode::BAD_GATEWAY, format!("{}: {error}", node.name))
        })?;
    Ok(answer.into_response(&node.name))
}

fn checked_digest(digest: &str) -> Result<Sha256Digest, ApiError> {
    Sha256Digest::parse(digest).map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, why))
}

/// `GET /api/sollol/v1/replicas`: the models the coordinator keeps copies of, with their holders.
pub async fn replicas(State(state): State<Arc<GatewayState>>) -> axum::Json<ReplicaList> {
    axum::Json(state.replicas.list(&state))
}

/// `PUT /api/sollol/v1/replicas/MODEL` (`{"replicas": 2}` or `{"replicas": "all"}`): keep that many
/// copies from now on (until the coordinator restarts: `models.replicas` is the lasting setting).
pub async fn set_replicas(
    State(state): State<Arc<GatewayState>>,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<ReplicaList>, ApiError> {
    let model = checked_name(&model)?;
    alone_in_group(&state)?;
    let body =
        body.map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))?;
    let request: ReplicaRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body must be {{\"replicas\": N}} or {{\"replicas\": \"all\"}}: {error}"),
        )
    })?;
    state.replicas.set(&model, Some(request.replicas));
    Ok(axum::Json(state.replicas.list(&state)))
}

/// Run-time replica counts are this coordinator's alone: with other coordinators alive they would
/// differ between coordinators, so a change is refused, naming what to do instead.
fn alone_in_group(state: &GatewayState) -> Result<(), ApiError> {
    let others = state.group.others();
    let alive: Vec<String> = others
        .borrow()
        .alive()
        .map(|peer| format!("{} ({})", peer.name, peer.cluster_address))
        .collect();
    if alive.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        format!(
            "this cluster has several coordinators (also {}): a replica count set here would hold on this coordinator only; set models.replicas in every coordinator's configuration instead",
            alive.join(", ")
        ),
    ))
}

/// `DELETE /api/sollol/v1/replicas/MODEL`: stop keeping copies (none is removed).
pub async fn forget_replicas(
    State(state): State<Arc<GatewayState>>,
    Path(model): Path<String>,
) -> Result<axum::Json<ReplicaList>, ApiError> {
    let model = checked_name(&model)?;
    alone_in_group(&state)?;
    if !state.replicas.set(&model, None) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no replica count is set for {model}"),
        ));
    }
    Ok(axum::Json(state.replicas.list(&state)))
}
