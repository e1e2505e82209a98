//! The coordinator's HTTP surface: Ollama's root probe, health, the sollol API and the dashboard.
//!
//! Handlers read the cluster snapshot and never wait on the history or the
//! cluster task. Every error is Ollama's shape, `{"error": "..."}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sollol_shared::BUILD_VERSION;
use sollol_shared::api::{
    API_PREFIX, ClusterSummary, ErrorBody, Node, NodeDetail, NodeList, NodeStatus, Readiness,
};
use sollol_shared::protocol::PROTOCOL_VERSION;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body_timeout;
use crate::cluster::SharedView;
use crate::config::ApiKey;
use crate::dashboard_assets;
use crate::proxy::{self, ApiKeyName, Proxy};

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
    pub proxy: Proxy,
    pub max_request_body: usize,
    /// SHA-256 of each API key, with its name; empty means the gateway is open.
    pub api_keys: Vec<([u8; 32], String)>,
    /// A client that takes longer to send its request headers is disconnected (slowloris).
    pub header_read_timeout: Duration,
    /// A request body that stops arriving for this long is abandoned with 408.
    pub body_read_timeout: Duration,
}

impl GatewayState {
    /// Digests of the configured API keys, as `api_keys` holds them.
    pub fn digest_keys(api_keys: &[ApiKey]) -> Vec<([u8; 32], String)> {
        api_keys
            .iter()
            .map(|key| (key_digest(&key.key), key.name.clone()))
            .collect()
    }
}

pub fn router(state: Arc<GatewayState>) -> Router {
    let forwarded = [
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/api/show",
        "/api/pull",
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
        .layer(DefaultBodyLimit::max(state.max_request_body))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            limit_body_stalls,
        ))
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(&format!("{API_PREFIX}/cluster"), get(cluster))
        .route(&format!("{API_PREFIX}/nodes"), get(nodes))
        .route(&format!("{API_PREFIX}/nodes/{{id}}"), get(node))
        .route("/dashboard", get(dashboard_redirect))
        .route("/dashboard/", get(dashboard_index))
        .route("/dashboard/{*path}", get(dashboard_file))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate,
        ))
        .with_state(state)
}

/// Routes anyone may call, keys or not: liveness and the dashboard's static files (they hold no data).
fn is_public(path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/readyz" | "/dashboard") || path.starts_with("/dashboard/")
}

fn key_digest(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// With API keys configured, every non-public route needs `Authorization: Bearer KEY` or `X-API-Key: KEY`.
async fn authenticate(
    State(state): State<Arc<GatewayState>>,
    mut request: Request,
    next: Next,
) -> Response {
    if state.api_keys.is_empty() || is_public(request.uri().path()) {
        return next.run(request).await;
    }
    let headers = request.headers();
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|value| value.to_str().ok())
        })
        .map(str::trim);
    // Comparing digests keeps the comparison's timing independent of how much of a key matched.
    let name = presented.and_then(|key| {
        let digest = key_digest(key);
        state
            .api_keys
            .iter()
            .find(|(known, _)| *known == digest)
            .map(|(_, name)| name.clone())
    });
    match name {
        Some(name) => {
            request.extensions_mut().insert(ApiKeyName(name));
            next.run(request).await
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or invalid API key: send Authorization: Bearer KEY or X-API-Key: KEY",
        )
        .into_response(),
    }
}

/// Forwarded requests read their body through an idle timeout (a stalled upload ends with 408).
async fn limit_body_stalls(
    State(state): State<Arc<GatewayState>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = body_timeout::with_idle_timeout(body, state.body_read_timeout);
    next.run(Request::from_parts(parts, body)).await
}

/// Serves until `shutdown`, then finishes in-flight requests.
pub async fn serve(listener: TcpListener, state: Arc<GatewayState>, shutdown: CancellationToken) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    let state_header_timeout = state.header_read_timeout;
    let app = router(state);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that takes longer than this to send its request headers (slowloris) is disconnected.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state_header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Small writes (streamed tokens) must not wait for delayed ACKs.
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    // In-flight requests finish; idle keep-alive connections close.
    graceful.shutdown().await;
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

async fn readyz(State(state): State<Arc<GatewayState>>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        Json(Readiness {
            ready: true,
            detail: "ready".to_owned(),
        })
        .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Readiness {
                ready: false,
                detail: "starting".to_owned(),
            }),
        )
            .into_response()
    }
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
    })
}

async fn nodes(State(state): State<Arc<GatewayState>>) -> Json<NodeList> {
    let view = state.view.load();
    Json(NodeList {
        nodes: view.nodes.iter().map(|node| Node::clone(node)).collect(),
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
    Ok(Json(NodeDetail {
        node: Node::clone(node),
        events,
    }))
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
