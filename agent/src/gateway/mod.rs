//! The coordinator's HTTP surface: Ollama's root probe, health, the sollol API and the dashboard.
//!
//! Handlers read the cluster snapshot and never wait on the history or the
//! cluster task. Every error is Ollama's shape, `{"error": "..."}`.

mod access;
pub mod admission;
pub mod body_timeout;
pub mod group;
pub mod learning;
pub(crate) mod manage;
pub mod proxy;
pub mod quota;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use sollol_shared::BUILD_VERSION;
use sollol_shared::api::{
    API_PREFIX, ClusterSummary, ErrorBody, LiveEvent, Node, NodeDetail, NodeList, NodeLoad,
    NodeStatus, Readiness, RequestEntry, RequestList, RequestStatus, Stats, StatsWindow,
};
use sollol_shared::protocol::PROTOCOL_VERSION;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::SharedView;
use crate::config::KeyScope;
use crate::dashboard_assets;
use crate::history::{HistoryReader, RequestFilter};
use crate::observability::{self, Gauges, Observer};
use access::{SESSION_PATH, authenticate, session_status, sign_in, sign_out};
use proxy::Proxy;
use std::collections::HashMap;
use tokio::sync::broadcast;

/// What the handlers read.
#[derive(Debug)]
pub struct GatewayState {
    pub view: SharedView,
    pub ready: AtomicBool,
    pub started_at: Instant,
    pub started_at_ms: u64,
    pub gateway_address: SocketAddr,
    pub cluster_address: SocketAddr,
    pub cluster_connections: Arc<AtomicU64>,
    pub history_dropped: Arc<AtomicU64>,
    /// What the operator should know (`sollol status` prints it), e.g. a corrupt history moved aside.
    pub notices: Vec<String>,
    pub proxy: Proxy,
    /// The client of the model management routes.
    pub models: manage::ModelApi,
    /// The copies of models the coordinator keeps (`models.replicas`, or set at run time).
    pub replicas: manage::Replicas,
    pub max_request_body: usize,
    /// SHA-256 of each API key, with its name; empty means the gateway is open.
    pub api_keys: Vec<([u8; 32], String, KeyScope)>,
    /// Dashboards signed in with a key.
    pub sessions: session::Sessions,
    /// Which pages and host names may call the gateway, and how many connections it holds.
    pub http: (Arc<sollol_policy::browser::Boundary>, sollol_http::Limits),
    /// A request body that stops arriving for this long is abandoned with 408.
    pub body_read_timeout: Duration,
    /// A request body still arriving after this long is abandoned with 408, however it trickles.
    pub body_deadline: Duration,
    /// The memory budget of bodies in flight, in KiB: the semaphore and its size.
    pub body_memory: (Arc<tokio::sync::Semaphore>, u64),
    pub observer: Arc<Observer>,
    /// Reads requests back from SQLite; `None` when the second connection could not be opened.
    pub history: Option<Arc<HistoryReader>>,
    /// Ends the live event streams when the coordinator stops.
    pub shutdown: CancellationToken,
    /// Models served split across agents (empty unless `model_sharding_enabled`).
    pub distributed: Option<Arc<crate::distributed::front::Front>>,
    /// The last range scan for Ollama servers (`None`: `discovery.scan` is off).
    pub scan: Option<Arc<std::sync::Mutex<sollol_shared::api::DiscoveryScan>>>,
    /// The coordinator's mDNS announcement and browser: `None` when `discovery.mdns` is off, the
    /// reason when it could not start.
    pub mdns: Option<Result<Arc<crate::cluster::mdns::Mdns>, String>>,
    /// The other coordinators of the cluster.
    pub group: Arc<crate::cluster::group::Group>,
}

pub fn router(state: Arc<GatewayState>) -> Router {
    let forwarded = [
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/api/show",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    ];
    let mut router = Router::new();
    for path in forwarded {
        router = router.route(path, post(proxy::forward));
    }
    router
        .route("/api/tags", get(proxy::tags))
        .route("/api/ps", get(proxy::ps))
        .route("/api/version", get(proxy::version))
        .route("/v1/models", get(proxy::openai_models))
        .route("/api/pull", post(manage::pull))
        .route("/api/create", post(manage::create))
        .route("/api/push", post(manage::push))
        .route("/api/copy", post(manage::copy))
        .route("/api/delete", delete(manage::delete))
        .layer(DefaultBodyLimit::max(state.max_request_body))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            limit_body_stalls,
        ))
        // A blob streams through to one node, however large: no body limit, no memory reserved, only
        // the idle limit (`manage`).
        .route(
            "/api/blobs/{digest}",
            post(manage::blob_upload).head(manage::blob_exists),
        )
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(&format!("{API_PREFIX}/cluster"), get(cluster))
        .route(&format!("{API_PREFIX}/nodes"), get(nodes))
        .route(&format!("{API_PREFIX}/nodes/{{id}}"), get(node))
        .route(&format!("{API_PREFIX}/requests"), get(requests))
        .route(&format!("{API_PREFIX}/stats"), get(stats))
        .route(&format!("{API_PREFIX}/events"), get(events))
        .route(&format!("{API_PREFIX}/distributed"), get(distributed))
        .route(&format!("{API_PREFIX}/discovery"), get(discovery))
        .route(&format!("{API_PREFIX}/transfers"), get(transfers))
        .route(
            &format!("{API_PREFIX}/coordinators"),
            get(group::coordinators),
        )
        .route(&format!("{API_PREFIX}/learned"), get(group::learned))
        .route(&format!("{API_PREFIX}/replicas"), get(manage::replicas))
        .route(
            &format!("{API_PREFIX}/replicas/{{model}}"),
            axum::routing::put(manage::set_replicas).delete(manage::forget_replicas),
        )
        .route(
            SESSION_PATH,
            get(session_status).post(sign_in).delete(sign_out),
        )
        .route(
            &format!("{API_PREFIX}/distributed/{{model}}/plan"),
            post(plan_distributed),
        )
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard_redirect))
        .route("/dashboard/", get(dashboard_index))
        .route("/dashboard/{*path}", get(dashboard_file))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate,
        ))
        // A foreign page is refused before anything else looks at its request.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.http.0),
            sollol_http::guard,
        ))
        // Outermost: errors on the OpenAI routes in OpenAI's shape, whoever answered them.
        .layer(middleware::from_fn(sollol_http::openai::errors_under_v1))
        .with_state(state)
}

/// What a body costs in memory while a request is read, parsed and routed, per byte received, at
/// worst: the bytes themselves and the raw slices routing reads (`gateway::proxy::fields`) — a list of
/// one-digit numbers takes a 16-byte slice per element of 2 bytes of text, and its vector may hold
/// twice that while it grows.
const BODY_MEMORY_PER_BYTE: u64 = 17;

/// Forwarded requests read their body within an idle timeout and a total deadline (408 otherwise),
/// and only once the memory budget of bodies in flight (`coordinator.body_memory`) has room for it:
/// many large bodies at once wait their turn instead of exhausting the coordinator's memory.
async fn limit_body_stalls(
    State(state): State<Arc<GatewayState>>,
    request: Request,
    next: Next,
) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(state.max_request_body as u64)
        .min(state.max_request_body as u64);
    let budget = state.body_memory.1;
    let cost_kib = (announced.saturating_mul(BODY_MEMORY_PER_BYTE) / 1024)
        .clamp(1, budget)
        .try_into()
        .unwrap_or(u32::MAX);
    let reserved = tokio::time::timeout(
        state.body_read_timeout,
        Arc::clone(&state.body_memory.0).acquire_many_owned(cost_kib),
    )
    .await;
    let Ok(Ok(_reserved)) = reserved else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is busy receiving other large requests (coordinator.body_memory): try again",
        )
        .retry_after(1)
        .into_response();
    };
    let (parts, body) = request.into_parts();
    let body = body_timeout::with_timeouts(body, state.body_read_timeout, state.body_deadline);
    next.run(Request::from_parts(parts, body)).await
}

/// Serves until `shutdown`, then finishes in-flight requests.
pub async fn serve(listener: TcpListener, state: Arc<GatewayState>, shutdown: CancellationToken) {
    let limits = state.http.1;
    sollol_http::serve(listener, router(state), limits, shutdown).await;
}

/// An error answered in Ollama's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after_seconds: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after_seconds: None,
        }
    }

    /// Adds a `Retry-After` header.
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after_seconds = Some(seconds);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: self.message,
        });
        let mut response = (self.status, body).into_response();
        if let Some(seconds) = self.retry_after_seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

async fn root() -> &'static str {
    "Ollama is running"
}

async fn healthz() -> Json<Readiness> {
    Json(Readiness {
        ready: true,
        detail: "alive".to_owned(),
    })
}

/// Ready means "can route": started, and at least one node up with a reachable Ollama whose breaker
/// lets requests through. A virtual IP's health check (keepalived) or a load balancer reads this.
async fn readyz(State(state): State<Arc<GatewayState>>) -> Response {
    let (ready, detail) = if !state.ready.load(Ordering::Acquire) {
        (false, "starting".to_owned())
    } else {
        let view = state.view.load();
        let usable = view
            .backends
            .iter()
            .filter(|backend| state.proxy.lets_through(&backend.node_id))
            .count();
        if view.backends.is_empty() {
            (
                false,
                format!(
                    "cannot route: no node is up with a reachable Ollama ({} known)",
                    view.nodes.len()
                ),
            )
        } else if usable == 0 {
            (
                false,
                format!(
                    "cannot route: the circuit breaker of every node ({}) is open",
                    view.backends.len()
                ),
            )
        } else {
            (true, format!("ready: {usable} node(s) can serve"))
        }
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { ready, detail })).into_response()
}

async fn cluster(State(state): State<Arc<GatewayState>>) -> Json<ClusterSummary> {
    let view = state.view.load();
    Json(ClusterSummary {
        build_version: BUILD_VERSION.to_owned(),
        protocol_version: PROTOCOL_VERSION,
        started_at_ms: state.started_at_ms,
        uptime_ms: u64::try_from(state.started_at.elapsed().as_millis()).unwrap_or(u64::MAX),
        gateway_address: state.gateway_address.to_string(),
        cluster_address: state.cluster_address.to_string(),
        nodes_total: u32::try_from(view.nodes.len()).unwrap_or(u32::MAX),
        nodes_up: view.count(NodeStatus::Up),
        nodes_suspect: view.count(NodeStatus::Suspect),
        nodes_down: view.count(NodeStatus::Down),
        nodes_left: view.count(NodeStatus::Left),
        cluster_connections: state.cluster_connections.load(Ordering::Relaxed),
        history_dropped: state.history_dropped.load(Ordering::Relaxed),
        in_flight: state
            .proxy
            .in_flight()
            .values()
            .map(|count| u64::from(*count))
            .sum(),
        queued: state.proxy.queued() as u64,
        notices: state.notices.clone(),
    })
}

async fn nodes(State(state): State<Arc<GatewayState>>) -> Json<NodeList> {
    let view = state.view.load();
    Json(NodeList {
        nodes: view.nodes.iter().map(|node| Node::clone(node)).collect(),
        load: state
            .proxy
            .in_flight()
            .into_iter()
            .filter(|(_, in_flight)| *in_flight > 0)
            .map(|(node, in_flight)| (node, NodeLoad { in_flight }))
            .collect(),
    })
}

async fn node(
    State(state): State<Arc<GatewayState>>,
    Path(id): Path<String>,
) -> Result<Json<NodeDetail>, ApiError> {
    let view = state.view.load();
    let node = view
        .node(&id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("node {id:?} not found")))?;
    let events = view
        .events
        .get(&id)
        .map(|events| events.as_ref().clone())
        .unwrap_or_default();
    let filter = RequestFilter {
        node_id: Some(id.clone()),
        ..RequestFilter::default()
    };
    let requests = read_requests(&state, filter, NODE_DETAIL_REQUESTS)
        .await
        .unwrap_or_default();
    Ok(Json(NodeDetail {
        node: Node::clone(node),
        events,
        load: NodeLoad {
            in_flight: state.proxy.in_flight().get(&id).copied().unwrap_or(0),
        },
        samples: state.observer.samples(&id),
        requests,
    }))
}

/// Requests shown on a node's page.
const NODE_DETAIL_REQUESTS: usize = 50;
/// Most requests one `GET /requests` returns.
const MAX_REQUESTS: usize = 1000;
/// Most rows one statistics window reads (the history keeps 50,000).
const MAX_STATS_ROWS: usize = 100_000;

/// Reads requests from SQLite on a blocking thread and names their nodes.
async fn read_requests(
    state: &Arc<GatewayState>,
    filter: RequestFilter,
    limit: usize,
) -> Result<Vec<RequestEntry>, ApiError> {
    let reader = state.history.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the request history cannot be read (see the coordinator's log)",
        )
    })?;
    let mut entries = tokio::task::spawn_blocking(move || reader.requests(&filter, limit))
        .await
        .map_err(|error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
        .map_err(|error| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the request history failed: {error}"),
            )
        })?;
    let view = state.view.load();
    for entry in &mut entries {
        if let Some(node) = view.node(&entry.node_id) {
            entry.node.clone_from(&node.name);
        }
    }
    Ok(entries)
}

/// `GET /api/sollol/v1/requests?node=&model=&app=&status=ok|failed&limit=N`, newest first.
async fn requests(
    State(state): State<Arc<GatewayState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<RequestList>, ApiError> {
    let known = ["node", "model", "app", "status", "limit"];
    if let Some(unknown) = query.keys().find(|key| !known.contains(&key.as_str())) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown query parameter {unknown:?}; use {}",
                known.join(", ")
            ),
        ));
    }
    let limit = match query.get("limit") {
        None => 100,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=MAX_REQUESTS).contains(limit))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("limit must be a whole number from 1 to {MAX_REQUESTS}"),
                )
            })?,
    };
    let status = match query.get("status") {
        None => None,
        Some(text) => Some(RequestStatus::parse(text).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, "status must be ok or failed")
        })?),
    };
    // A node is named by its id or its name.
    let node_id = query.get("node").map(|wanted| {
        let view = state.view.load();
        view.nodes
            .iter()
            .find(|node| node.id == *wanted || node.name == *wanted)
            .map_or_else(|| wanted.clone(), |node| node.id.clone())
    });
    let filter = RequestFilter {
        node_id,
        model: query
            .get("model")
            .map(|model| sollol_shared::model_name::normalize(model)),
        app: query.get("app").cloned(),
        status,
        since_ms: None,
        figures_only: false,
    };
    Ok(Json(RequestList {
        requests: read_requests(&state, filter, limit).await?,
    }))
}

/// `GET /api/sollol/v1/stats?window=5m|1h|24h`
async fn stats(
    State(state): State<Arc<GatewayState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Stats>, ApiError> {
    let window = match query.get("window") {
        None => StatsWindow::FiveMinutes,
        Some(text) => StatsWindow::parse(text).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, "window must be 5m, 1h or 24h")
        })?,
    };
    let until_ms = crate::telemetry::unix_ms(std::time::SystemTime::now());
    let filter = RequestFilter {
        since_ms: Some(until_ms.saturating_sub(window.millis())),
        figures_only: true,
        ..RequestFilter::default()
    };
    let entries = read_requests(&state, filter, MAX_STATS_ROWS).await?;
    let view = state.view.load_full();
    Ok(Json(observability::aggregate(
        &entries,
        window,
        until_ms,
        |node_id| {
            view.node(node_id)
                .map_or_else(|| node_id.to_owned(), |node| node.name.clone())
        },
    )))
}

/// `GET /api/sollol/v1/events`: Server-Sent Events, one per [`LiveEvent`], named by its type.
async fn events(
    State(state): State<Arc<GatewayState>>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let receiver = state.observer.subscribe();
    let shutdown = state.shutdown.clone();
    // A new subscriber first gets every node as it is now, then the changes.
    let loads = state.proxy.in_flight();
    let current: Vec<Result<SseEvent, std::convert::Infallible>> = state
        .view
        .load()
        .nodes
        .iter()
        .map(|node| {
            let event = LiveEvent::Node {
                node: Node::clone(node),
                load: NodeLoad {
                    in_flight: loads.get(&node.id).copied().unwrap_or(0),
                },
            };
            Ok(sse_event(&event))
        })
        .collect();
    let changes = futures_util::stream::unfold(
        (receiver, shutdown),
        |(mut receiver, shutdown)| async move {
            let event = tokio::select! {
                received = receiver.recv() => match received {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        Arc::new(LiveEvent::Lagged { skipped })
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                () = shutdown.cancelled() => return None,
            };
            Some((Ok(sse_event(&event)), (receiver, shutdown)))
        },
    );
    let stream = futures_util::StreamExt::chain(futures_util::stream::iter(current), changes);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn sse_event(event: &LiveEvent) -> SseEvent {
    SseEvent::default()
        .event(event.name())
        .json_data(event)
        .unwrap_or_else(|error| SseEvent::default().comment(error.to_string()))
}

/// `GET /api/sollol/v1/discovery`: the last range scan for Ollama servers, if scanning is on, and what
/// mDNS found.
async fn discovery(State(state): State<Arc<GatewayState>>) -> Json<sollol_shared::api::Discovery> {
    let view = state.view.load();
    let is_member = |node_id: &str| {
        view.node(node_id)
            .is_some_and(|node| matches!(node.status, NodeStatus::Up | NodeStatus::Suspect))
    };
    Json(sollol_shared::api::Discovery {
        scan: state.scan.as_ref().map(|scan| {
            scan.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        }),
        mdns: state.mdns.as_ref().map(|mdns| match mdns {
            Ok(mdns) => mdns.status(is_member),
            Err(error) => sollol_shared::api::MdnsDiscovery {
                error: Some(error.clone()),
                ..Default::default()
            },
        }),
    })
}

/// `GET /api/sollol/v1/distributed`: each distributed model's plan and what its steps cost.
/// Models being copied between nodes, then the last ones copied.
async fn transfers(
    State(state): State<Arc<GatewayState>>,
) -> Json<sollol_shared::api::TransferList> {
    Json(state.observer.transfers())
}

async fn distributed(
    State(state): State<Arc<GatewayState>>,
) -> Json<sollol_shared::api::DistributedList> {
    Json(sollol_shared::api::DistributedList {
        models: distributed_status(&state).await,
    })
}

/// Every distributed model's status, by name.
async fn distributed_status(state: &GatewayState) -> Vec<sollol_shared::api::DistributedModel> {
    let mut sources = state
        .distributed
        .as_ref()
        .map(|front| front.models())
        .unwrap_or_default();
    sources.sort_by(|a, b| a.pipeline.model.cmp(&b.pipeline.model));
    let mut models = Vec::with_capacity(sources.len());
    for source in sources {
        models.push(source.pipeline.status().await);
    }
    models
}

/// `POST /api/sollol/v1/distributed/{model}/plan`: plans and loads the model's pipeline now (a no-op when
/// it is planned), and answers its status; 404 for a model that is not distributed, 503 when no plan
/// can be made (the planner's reason in `error`).
async fn plan_distributed(
    State(state): State<Arc<GatewayState>>,
    Path(model): Path<String>,
) -> Response {
    let wanted = sollol_shared::model_name::normalize(&model);
    let sources = state
        .distributed
        .as_ref()
        .map(|front| front.models())
        .unwrap_or_default();
    let Some(source) = sources
        .iter()
        .find(|source| source.pipeline.model == wanted)
    else {
        let listed: Vec<&str> = sources
            .iter()
            .map(|source| source.pipeline.model.as_str())
            .collect();
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "{wanted} is not a distributed model (distributed now: {})",
                if listed.is_empty() {
                    "none; set model_sharding_enabled, and distributed.models or distributed.auto"
                        .to_owned()
                } else {
                    listed.join(", ")
                }
            ),
        )
        .into_response();
    };
    match source.pipeline.pipeline(&source.candidates()).await {
        Ok(_) => Json(source.pipeline.status().await).into_response(),
        Err(failure) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, failure.to_string()).into_response()
        }
    }
}

/// `GET /metrics`: Prometheus text exposition.
async fn metrics(State(state): State<Arc<GatewayState>>) -> Response {
    let gauges = Gauges {
        in_flight: state.proxy.in_flight(),
        queued: state.proxy.queued(),
        history_dropped: state.history_dropped.load(Ordering::Relaxed),
        learning_dropped: state.proxy.learner().dropped(),
        cache: state.proxy.cache_figures(),
    };
    let mut text = state.observer.render(&gauges);
    let models = distributed_status(&state).await;
    if !models.is_empty() {
        text.push_str(&crate::observability::render_distributed(&models));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn dashboard_redirect() -> Response {
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, "/dashboard/")],
    )
        .into_response()
}

async fn dashboard_index() -> Response {
    dashboard_asset("index.html")
}

async fn dashboard_file(Path(path): Path<String>) -> Response {
    dashboard_asset(&path)
}

fn dashboard_asset(path: &str) -> Response {
    if dashboard_assets::ASSETS.is_empty() && path == "index.html" {
        return (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            NOT_BUILT_PAGE,
        )
            .into_response();
    }
    match dashboard_assets::ASSETS
        .iter()
        .find(|(name, _, _)| *name == path)
    {
        Some((_, content_type, bytes)) => {
            ([(header::CONTENT_TYPE, *content_type)], *bytes).into_response()
        }
        None => ApiError::new(StatusCode::NOT_FOUND, format!("no dashboard file {path:?}"))
            .into_response(),
    }
}

const NOT_BUILT_PAGE: &str = "<!doctype html><html><head><meta charset=\"utf-8\"><title>sollol</title></head><body>\
<h1>sollol dashboard not built</h1><p>This binary was compiled before the dashboard. Run <code>scripts/build-dashboard</code> \
(or <code>scripts/up</code>, which builds everything) and rebuild sollol.</p></body></html>";

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", uri.path()),
    )
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed on {}", uri.path()),
    )
}
