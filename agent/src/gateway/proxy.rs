//! The Ollama- and OpenAI-compatible routes: pick a node, forward, stream back, fail over, learn.
//!
//! Each request is parsed once for what routing needs (model, stream flag,
//! size), ranked by `routing::choose` over the cluster snapshot, and sent to
//! the best node. A node that fails before its first byte (connect error,
//! reset, 5xx) is skipped for the next one, never the same node twice. A
//! non-streaming answer is buffered (it is small) so a node dying mid-answer
//! is failed over too; a streaming answer passes through chunk by chunk with
//! backpressure, and a failure after it began ends the stream with an error
//! object. Outcomes go to the learner with `try_send`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::cluster::SharedView;
use crate::cluster::{Backend, ClusterView, normalize_model};
use crate::gateway::admission::Admission;
use crate::gateway::batch;
use crate::gateway::learning::{Learner, OllamaTimings, Outcome};
use crate::gateway::{ApiError, GatewayState};
use crate::http_client::error_chain;
use crate::observability::Observer;
use sollol_policy::admission::{self, QueueSettings, Rejected};
use sollol_policy::breaker::{Breaker, BreakerSettings};
use sollol_policy::routing::{self, Candidate, Priors, RequestShape, Strategy};
use sollol_shared::api::{CandidateCost, RoutingDecision};

/// Header that picks a strategy for one request.
pub const STRATEGY_HEADER: &str = "x-sollol-strategy";
/// Response header naming the node that answered (request header for `/api/pull`: the node to pull on).
pub const NODE_HEADER: &str = "x-sollol-node";
/// Response header with the routing decision's short reason.
pub const DECISION_HEADER: &str = "x-sollol-decision";
/// Response header with every candidate's predicted time, best first, as JSON.
pub const CANDIDATES_HEADER: &str = "x-sollol-candidates";
/// Request header with the priority, 1 (lowest) to 10.
pub const PRIORITY_HEADER: &str = "x-sollol-priority";

/// Output tokens assumed when a request sets no limit.
const DEFAULT_OUTPUT_TOKENS: u32 = 128;
/// Candidates listed in `X-Sollol-Candidates` and the history, best first.
const EXPLAINED_CANDIDATES: usize = 8;
/// Conversations remembered for prefix affinity, and how much of a prompt identifies one.
const AFFINITY_ENTRIES: usize = 10_000;
const AFFINITY_PROMPT_CHARS: usize = 256;
/// A (node, model) pair is calibrated at most this often, with this many generated tokens.
const CALIBRATE_EVERY: Duration = Duration::from_secs(600);
const CALIBRATION_TOKENS: u32 = 8;
/// Added to a hedge's delay so ordinary jitter does not trigger it.
const HEDGE_MARGIN: Duration = Duration::from_millis(100);
/// How often open breakers are checked for a due probe, and how long a probe may take.
const PROBE_EVERY: Duration = Duration::from_millis(250);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `/api/ps` waits for each node.
const PS_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes of a streamed answer kept to read its final timing object.
const TAIL_BYTES: usize = 64 * 1024;

/// Gateway-side state of routing: the upstream client, live loads, what was learned.
#[derive(Debug)]
pub struct Proxy {
    client: Client<HttpConnector, Full<Bytes>>,
    learner: Arc<Learner>,
    loads: PerNode<AtomicU32>,
    breakers: PerNode<Mutex<Breaker>>,
    round_robin: AtomicU64,
    admission: Arc<Admission>,
    /// When each (node, model) was last calibrated, so each is measured at most once per `CALIBRATE_EVERY`.
    calibrated: Mutex<HashMap<(String, String), Instant>>,
    /// Calibrations running per node.
    calibrating: PerNode<AtomicU32>,
    affinity: Affinity,
    observer: Arc<Observer>,
    pub settings: ProxySettings,
}

/// Routing settings from the configuration.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub default_strategy: Strategy,
    pub priors: Priors,
    /// Different nodes tried per request at most.
    pub max_attempts: usize,
    /// Parallel requests assumed per node (Ollama's `OLLAMA_NUM_PARALLEL`).
    pub node_slots: u32,
    /// How long a node may take to send its response headers.
    pub response_timeout: Duration,
    /// Requests allowed in a node's own queue beyond its slots before the gateway queues instead.
    pub node_queue_depth: u32,
    pub queue: QueueSettings,
    pub breaker: BreakerSettings,
    /// Whether slow first answers are hedged on the next node.
    pub hedging: bool,
    /// Whether idle, never-measured nodes are measured with a short request of the gateway's own.
    pub calibration: bool,
    /// The node id of the coordinator's distributed inference front: the only node that serves the
    /// models it lists (they are distributed because the nodes that hold them should not serve them
    /// whole).
    pub distributed_front: Option<String>,
}

impl Proxy {
    pub fn new(learner: Arc<Learner>, observer: Arc<Observer>, settings: ProxySettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(connector),
            learner,
            loads: PerNode::new(),
            breakers: PerNode::new(),
            round_robin: AtomicU64::new(0),
            admission: Arc::new(Admission::new(settings.queue)),
            calibrated: Mutex::new(HashMap::new()),
            calibrating: PerNode::new(),
            affinity: Affinity::default(),
            observer,
            settings,
        }
    }

    pub fn learner(&self) -> &Learner {
        &self.learner
    }

    /// Requests waiting in the priority queue now.
    pub fn queued(&self) -> usize {
        self.admission.waiting()
    }

    pub(crate) fn client(&self) -> &Client<HttpConnector, Full<Bytes>> {
        &self.client
    }

    pub(crate) fn admission(&self) -> Arc<Admission> {
        Arc::clone(&self.admission)
    }

    /// The in-flight counter of a node.
    pub(crate) fn load_of(&self, node_id: &str) -> Arc<AtomicU32> {
        self.loads.get(node_id)
    }

    /// The circuit breaker of a node.
    pub(crate) fn breaker_of(&self, node_id: &str) -> Arc<Mutex<Breaker>> {
        self.breakers.get(node_id)
    }

    /// Requests in flight per node now.
    pub fn in_flight(&self) -> BTreeMap<String, u32> {
        self.loads
            .snapshot()
            .iter()
            .map(|(node, counter)| (node.clone(), counter.load(Ordering::Relaxed)))
            .collect()
    }

    /// Measures a never-measured (node, model) pair in the background with a short generation of the
    /// gateway's own, so no client request pays for exploring an unknown node. At most once per pair per
    /// `CALIBRATE_EVERY`; the node counts as busy meanwhile.
    fn calibrate(&self, backend: &Backend, model: &str) {
        let key = (backend.node_id.clone(), model.to_owned());
        {
            let mut calibrated = lock(&self.calibrated);
            if calibrated
                .get(&key)
                .is_some_and(|at| at.elapsed() < CALIBRATE_EVERY)
            {
                return;
            }
            calibrated.insert(key, Instant::now());
        }
        let body = json!({
            "model": model,
            "prompt": "Say hello.",
            "stream": false,
            "options": {"num_predict": CALIBRATION_TOKENS},
        });
        let Ok(request) = hyper::Request::post(format!("{}/api/generate", backend.base_url))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
        else {
            return;
        };
        let load = self.load_of(&backend.node_id);
        let concurrent = load.load(Ordering::Relaxed);
        let in_flight = InFlight::new(load, Arc::clone(&self.admission));
        let calibrating = InFlight::new(
            self.calibrating.get(&backend.node_id),
            Arc::clone(&self.admission),
        );
        let client = self.client.clone();
        let learner = Arc::clone(&self.learner);
        let timeout = self.settings.response_timeout;
        let mut outcome = Outcome {
            node_id: backend.node_id.clone(),
            model: model.to_owned(),
            path: "/api/generate".to_owned(),
            app: "sollol-calibration".to_owned(),
            ok: false,
            time_to_first_byte: Duration::ZERO,
            total: Duration::ZERO,
            timings: None,
            strategy: "calibration",
            reason: "measuring a node never measured with this model".to_owned(),
            candidates: "[]".to_owned(),
            concurrent,
        };
        tracing::debug!(node = %backend.name, %model, "calibrating");
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let _calibrating = calibrating;
            let started = Instant::now();
            let answer = tokio::time::timeout(timeout, async {
                let response = client.request(request).await.ok()?;
                if !response.status().is_success() {
                    return None;
                }
                response
                    .into_body()
                    .collect()
                    .await
                    .ok()
                    .map(|collected| collected.to_bytes())
            })
            .await;
            outcome.total = started.elapsed();
            outcome.time_to_first_byte = outcome.total;
            if let Ok(Some(bytes)) = answer {
                outcome.ok = true;
                outcome.timings = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|value| OllamaTimings::from_json(&value));
            }
            learner.record(outcome);
        });
    }

    /// Records how a request (or probe) on a node went, for its breaker.
    pub(crate) fn node_result(&self, backend: &Backend, ok: bool) {
        let breaker = self.breaker_of(&backend.node_id);
        let mut breaker = lock(&breaker);
        if ok {
            if !breaker.is_closed() {
                tracing::info!(node = %backend.name, "circuit closed: the node answers again");
            }
            breaker.on_success();
        } else if breaker.on_failure(Instant::now(), &self.settings.breaker) {
            tracing::warn!(
                node = %backend.name,
                failures = self.settings.breaker.failures_to_open,
                "circuit opened: no requests to this node until a trial succeeds"
            );
        }
    }

    /// Probes nodes whose open period is over; a failed probe counts as a failed trial. Runs until `shutdown`.
    pub async fn probe_open_breakers(&self, view: SharedView, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(PROBE_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
            let now = Instant::now();
            let view = view.load_full();
            let due: Vec<&Arc<Backend>> = view
                .backends
                .iter()
                .filter(|backend| lock(&self.breaker_of(&backend.node_id)).trial_due(now))
                .collect();
            for backend in due {
                let request = hyper::Request::get(format!("{}/api/version", backend.base_url))
                    .body(Full::new(Bytes::new()));
                let Ok(request) = request else { continue };
                let answered = matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, self.client.request(request)).await,
                    Ok(Ok(response)) if response.status().is_success()
                );
                if !answered {
                    self.node_result(backend, false);
                }
            }
        }
    }
}

/// A value per node, created on first use; reads take no lock.
#[derive(Debug)]
struct PerNode<T> {
    map: ArcSwap<HashMap<String, Arc<T>>>,
}

impl<T: Default> PerNode<T> {
    fn new() -> Self {
        Self {
            map: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    fn get(&self, node_id: &str) -> Arc<T> {
        if let Some(value) = self.map.load().get(node_id) {
            return Arc::clone(value);
        }
        let mut created = None;
        self.map.rcu(|map| {
            let mut map = HashMap::clone(map);
            let value = map
                .entry(node_id.to_owned())
                .or_insert_with(|| Arc::new(T::default()));
            created = Some(Arc::clone(value));
            map
        });
        created.unwrap_or_else(|| Arc::new(T::default()))
    }

    fn snapshot(&self) -> Arc<HashMap<String, Arc<T>>> {
        self.map.load_full()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts a request in flight on a node until dropped; then lets the next queued request try.
pub(crate) struct InFlight {
    counter: Arc<AtomicU32>,
    admission: Arc<Admission>,
}

impl InFlight {
    pub(crate) fn new(counter: Arc<AtomicU32>, admission: Arc<Admission>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self { counter, admission }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
        self.admission.release();
    }
}

/// How each forwarded route behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RouteKind {
    /// Ollama's routes stream unless told not to; OpenAI's do not unless told to.
    stream_by_default: bool,
    /// The answer ends with Ollama's timing fields.
    learns: bool,
    /// Server-sent events rather than NDJSON.
    sse: bool,
    /// Any node may serve it, not only those that have the model (`/api/pull`).
    any_node: bool,
}

fn route_kind(path: &str) -> Option<RouteKind> {
    let kind = |stream_by_default, learns, sse, any_node| RouteKind {
        stream_by_default,
        learns,
        sse,
        any_node,
    };
    Some(match path {
        "/api/chat" | "/api/generate" => kind(true, true, false, false),
        "/api/embed" | "/api/embeddings" | "/api/show" => kind(false, false, false, false),
        "/api/pull" => kind(true, false, false, true),
        "/v1/chat/completions" | "/v1/completions" => kind(false, false, true, false),
        "/v1/embeddings" => kind(false, false, false, false),
        _ => return None,
    })
}

/// `POST` on any forwarded route.
pub async fn forward(
    State(state): State<Arc<GatewayState>>,
    uri: Uri,
    headers: HeaderMap,
    key: Option<axum::Extension<ApiKeyName>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let app = application(&headers, key.as_ref().map(|key| key.0.0.as_str()));
    match forward_inner(&state, uri.path(), &headers, &app, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn forward_inner(
    state: &GatewayState,
    path: &str,
    headers: &HeaderMap,
    app: &str,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let proxy = &state.proxy;
    let kind = route_kind(path)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")))?;
    let body = body.map_err(|rejection| {
        if crate::gateway::body_timeout::is_stalled(&rejection) {
            ApiError::new(StatusCode::REQUEST_TIMEOUT, rejection.body_text())
        } else {
            ApiError::new(rejection.status(), rejection.body_text())
        }
    })?;
    let request: Value = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON: {error}"))
    })?;
    if !request.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the request body must be a JSON object",
        ));
    }
    let requested_name = request
        .get("model")
        .or_else(|| request.get("name"))
        .and_then(Value::as_str)
        .filter(|name| !name.trim().is_empty())
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "model is required"))?;
    let model = normalize_model(requested_name.trim());
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(kind.stream_by_default);
    let strategy = match headers.get(STRATEGY_HEADER) {
        None => proxy.settings.default_strategy,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(Strategy::parse)
            .ok_or_else(|| {
                let names: Vec<&str> = Strategy::ALL
                    .iter()
                    .map(|strategy| strategy.as_str())
                    .collect();
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown routing strategy in {STRATEGY_HEADER}; use one of {}",
                        names.join(", ")
                    ),
                )
            })?,
    };

    let priority = match headers.get(PRIORITY_HEADER) {
        None => admission::DEFAULT_PRIORITY,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(admission::parse_priority)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("{PRIORITY_HEADER} must be a whole number from 1 to 10"),
                )
            })?,
    };
    let wanted_node = headers
        .get(NODE_HEADER)
        .and_then(|value| value.to_str().ok());
    let conversation = conversation_key(&model, &request);
    let selection = Selection {
        model: &model,
        requested_name,
        any_node: kind.any_node,
        wanted_node,
        affine_node: conversation.and_then(|key| proxy.affinity.get(key)),
    };
    // Wait in the priority queue while every candidate is saturated.
    let queued_since = Instant::now();
    let (view, candidates) =
        loop {
            let view = state.view.load_full();
            let candidates = selection.candidates(proxy, &view)?;
            let depth = proxy.settings.node_queue_depth;
            if candidates
                .iter()
                .any(|(_, candidate)| candidate.in_flight < candidate.slots + depth)
            {
                break (view, candidates);
            }
            proxy.admission.wait(priority, queued_since).await.map_err(
                |rejected| match rejected {
                    Rejected::QueueFull(_) => {
                        ApiError::new(StatusCode::TOO_MANY_REQUESTS, rejected.to_string())
                            .retry_after(1)
                    }
                    Rejected::TimedOut(_) => {
                        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, rejected.to_string())
                    }
                },
            )?;
        };
    let (backends, candidates): (Vec<&Arc<Backend>>, Vec<Candidate>) = candidates
        .into_iter()
        .map(|(index, candidate)| (&view.backends[index], candidate))
        .unzip();
    if let Some(flavour) = batch_flavour(path)
        && batch::inputs(&request).is_some_and(|inputs| inputs.len() > 1)
        && backends.len() > 1
    {
        let answer = batch::run(proxy, &backends, path, &request, flavour)
            .await
            .map_err(|failure| ApiError::new(StatusCode::BAD_GATEWAY, failure))?;
        let inputs = batch::inputs(&request).map_or(0, Vec::len);
        let mut response = axum::Json(answer.body).into_response();
        let headers = response.headers_mut();
        headers.insert(NODE_HEADER, header_text(&answer.nodes.join(",")));
        headers.insert(
            DECISION_HEADER,
            header_text(&format!(
                "batch of {inputs} inputs in {} chunks over {} nodes, work stealing",
                answer.chunks,
                answer.nodes.len()
            )),
        );
        return Ok(response);
    }
    let shape = request_shape(&request);
    let decision = routing::choose(
        &candidates,
        &shape,
        strategy,
        &proxy.settings.priors,
        rand::rng().random::<f64>(),
        proxy.round_robin.fetch_add(1, Ordering::Relaxed),
    );
    if kind.learns && proxy.settings.calibration {
        let chosen = decision.first();
        for (index, candidate) in candidates.iter().enumerate() {
            let unmeasured = candidate.stats.is_none() && candidate.node_stats.is_none();
            if unmeasured && candidate.in_flight == 0 && Some(index) != chosen {
                proxy.calibrate(backends[index], &model);
            }
        }
    }
    // The best few candidates explain a decision; all of them would cost time and history space on big clusters.
    let explained: Vec<CandidateCost> = decision
        .ranking
        .iter()
        .take(EXPLAINED_CANDIDATES)
        .map(|index| CandidateCost {
            node: candidates[*index].name.clone(),
            predicted_ms: decision.predicted[*index].as_millis() as u64,
        })
        .collect();
    let candidates_json = serde_json::to_string(&explained).unwrap_or_else(|_| "[]".to_owned());

    if proxy.observer.wanted()
        && let Some(first) = decision.first()
    {
        proxy.observer.routed(
            &model,
            path,
            app,
            &candidates[first].name,
            RoutingDecision {
                strategy: strategy.as_str().to_owned(),
                reason: decision.reason.clone(),
                candidates: explained,
            },
        );
    }
    let order: Vec<usize> = decision
        .ranking
        .iter()
        .copied()
        .take(proxy.settings.max_attempts.max(1))
        .collect();
    let make_attempt = |position: usize, reason: String| {
        let backend = backends[order[position]];
        Attempt {
            proxy,
            backend,
            path,
            body: body.clone(),
            stream,
            kind,
            outcome: Outcome {
                node_id: backend.node_id.clone(),
                model: model.clone(),
                path: path.to_owned(),
                app: app.to_owned(),
                ok: false,
                time_to_first_byte: Duration::ZERO,
                total: Duration::ZERO,
                timings: None,
                strategy: strategy.as_str(),
                reason,
                candidates: candidates_json.clone(),
                concurrent: 0,
            },
        }
        .run()
        .map(move |result| (position, result))
    };
    // When the first node is slower to answer than it should be and the next one has a free slot,
    // the same request also goes there: the first answer wins and the other is dropped.
    let hedge_after = proxy.settings.hedging.then(|| {
        let first = order[0];
        let learned_first_token = candidates[first]
            .stats
            .map(|stats| stats.time_to_first_token);
        match (stream, learned_first_token) {
            (true, Some(first_token)) => first_token * 3 + HEDGE_MARGIN,
            _ => decision.predicted[first] * 2 + HEDGE_MARGIN,
        }
    });
    let mut failures: Vec<String> = Vec::new();
    let mut running = futures_util::stream::FuturesUnordered::new();
    running.push(make_attempt(0, decision.reason.clone()));
    let mut next = 1;
    let mut hedged = false;
    loop {
        let can_hedge = !hedged && running.len() == 1 && next < order.len();
        let hedge_timer = async {
            match hedge_after.filter(|_| can_hedge) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            finished = running.next() => {
                let Some((position, result)) = finished else { break };
                match result {
                    // Dropping `running` cancels any other attempt still waiting for its node.
                    Ok(response) => {
                        if let Some(key) = conversation {
                            proxy.affinity.remember(key, &backends[order[position]].node_id);
                        }
                        return Ok(response);
                    }
                    Err(failure) => {
                        let backend = backends[order[position]];
                        tracing::warn!(node = %backend.name, %model, %failure, "node failed; trying the next one");
                        failures.push(format!("{}: {failure}", backend.name));
                        if running.is_empty() && next < order.len() {
                            let reason = format!("failover #{next} after: {}", failures.join("; "));
                            running.push(make_attempt(next, reason));
                            next += 1;
                        }
                    }
                }
            }
            () = hedge_timer => {
                hedged = true;
                let backup = &candidates[order[next]];
                if backup.in_flight < backup.slots {
                    let reason = format!(
                        "hedged: {} had not answered after {} ms",
                        candidates[order[0]].name,
                        hedge_after.unwrap_or_default().as_millis()
                    );
                    running.push(make_attempt(next, reason));
                    next += 1;
                }
            }
        }
        if running.is_empty() {
            break;
        }
    }
    Err(ApiError::new(
        StatusCode::BAD_GATEWAY,
        format!("every node tried failed: {}", failures.join("; ")),
    ))
}

/// Header naming the application a request comes from.
pub const APP_HEADER: &str = "x-sollol-app";

/// The name of the API key a request authenticated with (set by the gateway's key check).
#[derive(Clone, Debug)]
pub struct ApiKeyName(pub String);

/// Who sent a request: `X-Sollol-App`, else the API key's name, else the User-Agent's product.
fn application(headers: &HeaderMap, key_name: Option<&str>) -> String {
    let header_text = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
            .filter(|text| !text.is_empty())
    };
    let name = header_text(APP_HEADER)
        .or(key_name)
        .or_else(|| header_text("user-agent").and_then(|agent| agent.split_whitespace().next()))
        .unwrap_or("unknown");
    name.chars().take(64).collect()
}

/// The batch flavour of an embedding route.
fn batch_flavour(path: &str) -> Option<batch::Flavour> {
    match path {
        "/api/embed" => Some(batch::Flavour::Ollama),
        "/v1/embeddings" => Some(batch::Flavour::OpenAi),
        _ => None,
    }
}

/// Which nodes may serve a request.
struct Selection<'a> {
    model: &'a str,
    requested_name: &'a str,
    any_node: bool,
    wanted_node: Option<&'a str>,
    /// The node that last served this conversation, if any.
    affine_node: Option<String>,
}

impl Selection<'_> {
    /// The candidates in `view` with their live load, by index into `view.backends`; an error when there are none.
    fn candidates(
        &self,
        proxy: &Proxy,
        view: &ClusterView,
    ) -> Result<Vec<(usize, Candidate)>, ApiError> {
        let learned = proxy.learner.snapshot();
        let mut candidates: Vec<(usize, Candidate)> = view
            .backends
            .iter()
            .enumerate()
            .filter(|(_, backend)| self.any_node || backend.has_model(self.model))
            .filter(|(_, backend)| {
                self.wanted_node
                    .is_none_or(|wanted| backend.name == wanted || backend.node_id == wanted)
            })
            .map(|(index, backend)| {
                let candidate = Candidate {
                    node_id: backend.node_id.clone(),
                    name: backend.name.clone(),
                    in_flight: proxy.load_of(&backend.node_id).load(Ordering::Relaxed),
                    slots: proxy
                        .settings
                        .node_slots
                        .max(learned.slots(&backend.node_id)),
                    model_loaded: backend.has_loaded(self.model)
                        || learned.served_since(&backend.node_id, self.model, backend.reported_ms),
                    stats: learned.pair(&backend.node_id, self.model),
                    served: learned.served.get(&backend.node_id).copied().unwrap_or(0),
                    has_affinity: self.affine_node.as_deref() == Some(backend.node_id.as_str()),
                    node_stats: learned.node_stats(&backend.node_id, self.model),
                    calibrating: proxy
                        .calibrating
                        .get(&backend.node_id)
                        .load(Ordering::Relaxed)
                        > 0,
                };
                (index, candidate)
            })
            .collect();
        if let Some(front) = proxy.settings.distributed_front.as_deref()
            && !self.any_node
            && candidates
                .iter()
                .any(|(_, candidate)| candidate.node_id == front)
        {
            candidates.retain(|(_, candidate)| candidate.node_id == front);
        }
        // Nodes whose breaker is open are left out, unless that leaves nobody.
        let now = Instant::now();
        let usable: Vec<(usize, Candidate)> = candidates
            .iter()
            .filter(|(_, candidate)| {
                let breaker = proxy.breaker_of(&candidate.node_id);
                let breaker = lock(&breaker);
                breaker.is_closed() || breaker.trial_due(now)
            })
            .cloned()
            .collect();
        if !usable.is_empty() {
            return Ok(usable);
        }
        if !candidates.is_empty() {
            return Ok(candidates);
        }
        let requested_name = self.requested_name;
        Err(if view.backends.is_empty() {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no Ollama node is available: {} known node(s), none up with a reachable Ollama",
                    view.nodes.len()
                ),
            )
        } else if let Some(wanted) = self.wanted_node {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("node {wanted:?} is not up or does not have model \"{requested_name}\""),
            )
        } else {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("model \"{requested_name}\" not found, try pulling it first"),
            )
        })
    }
}

/// Identifies a conversation: the model, the system prompt and the first user turn (chat), or the system
/// prompt and the start of the prompt (generate). Later turns of one conversation share it, so they can go
/// where the earlier turns' KV cache is.
fn conversation_key(model: &str, request: &Value) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    model.hash(&mut hasher);
    if let Some(messages) = request.get("messages").and_then(Value::as_array) {
        let system = messages
            .iter()
            .find(|message| message.get("role").and_then(Value::as_str) == Some("system"))
            .and_then(|message| message.get("content").and_then(Value::as_str));
        let first_user = messages
            .iter()
            .find(|message| message.get("role").and_then(Value::as_str) == Some("user"))
            .and_then(|message| message.get("content").and_then(Value::as_str))?;
        system.hash(&mut hasher);
        first_user.hash(&mut hasher);
    } else {
        let prompt = request.get("prompt").and_then(Value::as_str)?;
        request
            .get("system")
            .and_then(Value::as_str)
            .hash(&mut hasher);
        prompt
            .chars()
            .take(AFFINITY_PROMPT_CHARS)
            .collect::<String>()
            .hash(&mut hasher);
    }
    Some(hasher.finish())
}

/// Which node last served each conversation; bounded, oldest forgotten first.
#[derive(Debug, Default)]
struct Affinity {
    inner: Mutex<(HashMap<u64, String>, std::collections::VecDeque<u64>)>,
}

impl Affinity {
    fn get(&self, key: u64) -> Option<String> {
        lock(&self.inner).0.get(&key).cloned()
    }

    fn remember(&self, key: u64, node_id: &str) {
        let mut inner = lock(&self.inner);
        let (map, order) = &mut *inner;
        if map.insert(key, node_id.to_owned()).is_none() {
            order.push_back(key);
            if order.len() > AFFINITY_ENTRIES
                && let Some(oldest) = order.pop_front()
            {
                map.remove(&oldest);
            }
        }
    }
}

/// Prompt and output size as routing estimates them: about four characters per token.
fn request_shape(request: &Value) -> RequestShape {
    let mut characters = 0usize;
    if let Some(messages) = request.get("messages").and_then(Value::as_array) {
        characters += messages
            .iter()
            .filter_map(|message| message.get("content").and_then(Value::as_str))
            .map(str::len)
            .sum::<usize>();
    }
    for field in ["prompt", "system", "suffix"] {
        characters += request
            .get(field)
            .and_then(Value::as_str)
            .map_or(0, str::len);
    }
    match request.get("input") {
        Some(Value::String(text)) => characters += text.len(),
        Some(Value::Array(items)) => {
            characters += items
                .iter()
                .filter_map(Value::as_str)
                .map(str::len)
                .sum::<usize>()
        }
        _ => {}
    }
    let limit = request
        .get("options")
        .and_then(|options| options.get("num_predict"))
        .or_else(|| request.get("max_tokens"))
        .or_else(|| request.get("max_completion_tokens"))
        .and_then(Value::as_i64)
        .filter(|limit| *limit >= 0);
    RequestShape {
        prompt_tokens: u32::try_from(characters / 4).unwrap_or(u32::MAX).max(1),
        output_tokens: limit.map_or(DEFAULT_OUTPUT_TOKENS, |limit| {
            u32::try_from(limit).unwrap_or(u32::MAX)
        }),
    }
}

/// One try on one node.
struct Attempt<'a> {
    proxy: &'a Proxy,
    backend: &'a Backend,
    path: &'a str,
    body: Bytes,
    stream: bool,
    kind: RouteKind,
    outcome: Outcome,
}

impl Attempt<'_> {
    /// The response to send, or why this node failed before the client saw anything.
    async fn run(self) -> Result<Response, String> {
        let Self {
            proxy,
            backend,
            path,
            body,
            stream,
            kind,
            mut outcome,
        } = self;
        let allowed = lock(&proxy.breaker_of(&backend.node_id)).allow(Instant::now());
        if !allowed {
            return Err("circuit open (another request is the trial)".to_owned());
        }
        let load = proxy.load_of(&backend.node_id);
        outcome.concurrent = load.load(Ordering::Relaxed);
        let in_flight = InFlight::new(load, Arc::clone(&proxy.admission));
        let started = Instant::now();
        let fail = |outcome: &mut Outcome, message: String| {
            outcome.total = started.elapsed();
            proxy.learner.record(outcome.clone());
            proxy.node_result(backend, false);
            message
        };
        let request = hyper::Request::post(format!("{}{}", backend.base_url, path))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|error| error.to_string())?;
        let response = match tokio::time::timeout(
            proxy.settings.response_timeout,
            proxy.client.request(request),
        )
        .await
        {
            Err(_) => {
                let timeout = proxy.settings.response_timeout;
                return Err(fail(
                    &mut outcome,
                    format!("no response within {} s", timeout.as_secs()),
                ));
            }
            Ok(Err(error)) => return Err(fail(&mut outcome, error_chain(&error))),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        if status.is_server_error() {
            let body = read_limited(response.into_body(), 4096)
                .await
                .unwrap_or_default();
            let message = format!(
                "HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&body).trim()
            );
            return Err(fail(&mut outcome, message));
        }
        if !stream || !status.is_success() {
            // Small answers are buffered, so a node that dies mid-answer is failed over, not passed on.
            let bytes = match response.into_body().collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    return Err(fail(
                        &mut outcome,
                        format!("answer cut off: {}", error_chain(&error)),
                    ));
                }
            };
            outcome.time_to_first_byte = started.elapsed();
            outcome.total = outcome.time_to_first_byte;
            // A 4xx is the client's problem: the node answered, so it counts as healthy.
            proxy.node_result(backend, true);
            if status.is_success() {
                outcome.ok = true;
                if kind.learns {
                    outcome.timings = serde_json::from_slice::<Value>(&bytes)
                        .ok()
                        .and_then(|value| OllamaTimings::from_json(&value));
                }
                proxy.learner.record(outcome.clone());
            }
            drop(in_flight);
            return Ok(respond(
                status,
                content_type,
                Body::from(bytes),
                backend,
                &outcome,
            ));
        }
        // Streaming: wait for the first chunk, so a node that fails before answering is still failed over.
        let mut upstream = response.into_body();
        let first = match next_data(&mut upstream).await {
            Ok(Some(first)) => first,
            Ok(None) => return Err(fail(&mut outcome, "empty answer".to_owned())),
            Err(error) => {
                return Err(fail(
                    &mut outcome,
                    format!("stream failed before its first chunk: {error}"),
                ));
            }
        };
        outcome.time_to_first_byte = started.elapsed();
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
            _in_flight: in_flight,
            done: false,
        };
        let decided = relay.outcome.clone();
        let body = Body::from_stream(futures_util::stream::unfold(relay, Relay::next));
        Ok(respond(status, content_type, body, backend, &decided))
    }
}

/// Passes a streamed answer through, watching its tail for Ollama's final timing object.
struct Relay {
    breaker: Arc<Mutex<Breaker>>,
    breaker_settings: BreakerSettings,
    upstream: Incoming,
    first: Option<Bytes>,
    tail: Vec<u8>,
    node: String,
    sse: bool,
    learns: bool,
    started: Instant,
    outcome: Outcome,
    learner: Arc<Learner>,
    _in_flight: InFlight,
    done: bool,
}

impl Relay {
    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
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
                    self.outcome.timings = last_json_line(&self.tail)
                        .and_then(|value| OllamaTimings::from_json(&value));
                }
                self.learner.record(self.outcome.clone());
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

/// The last complete JSON line of an NDJSON tail.
fn last_json_line(tail: &[u8]) -> Option<Value> {
    tail.split(|byte| *byte == b'\n')
        .rev()
        .find(|line| !line.iter().all(u8::is_ascii_whitespace))
        .and_then(|line| serde_json::from_slice(line).ok())
}

async fn next_data(body: &mut Incoming) -> Result<Option<Bytes>, String> {
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

async fn read_limited(body: Incoming, limit: usize) -> Option<Bytes> {
    http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .ok()
        .map(|collected| collected.to_bytes())
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
    headers.insert(CANDIDATES_HEADER, header_text(&outcome.candidates));
    response
}

/// Header values must be visible ASCII; anything else becomes `?`.
fn header_text(text: &str) -> HeaderValue {
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

/// `GET /api/tags`: every model on an up node, once.
pub async fn tags(State(state): State<Arc<GatewayState>>) -> Response {
    let view = state.view.load();
    let mut models: BTreeMap<String, Value> = BTreeMap::new();
    for node in &view.nodes {
        let Some(ollama) = node.ollama.as_ref().filter(|ollama| ollama.reachable) else {
            continue;
        };
        if !view
            .backends
            .iter()
            .any(|backend| backend.node_id == node.id)
        {
            continue;
        }
        for model in &ollama.models {
            models.entry(model.name.clone()).or_insert_with(|| {
                json!({
                    "name": model.name,
                    "model": model.name,
                    "size": model.size_bytes,
                    "digest": model.digest,
                    "details": {
                        "format": "gguf",
                        "family": model.family,
                        "parameter_size": model.parameter_size,
                        "quantization_level": model.quantization_level,
                    },
                })
            });
        }
    }
    axum::Json(json!({ "models": models.into_values().collect::<Vec<_>>() })).into_response()
}

/// `GET /api/ps`: loaded models on every up node, asked live (the heartbeat's copy can be a beat old);
/// each entry names its node. A node that does not answer in time contributes its last reported state.
pub async fn ps(State(state): State<Arc<GatewayState>>) -> Response {
    let view = state.view.load_full();
    let client = &state.proxy.client;
    let asks = view.backends.iter().map(|backend| async move {
        let request = hyper::Request::get(format!("{}/api/ps", backend.base_url))
            .body(Full::new(Bytes::new()))
            .ok()?;
        let response = tokio::time::timeout(PS_TIMEOUT, client.request(request))
            .await
            .ok()?
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body =
            tokio::time::timeout(PS_TIMEOUT, read_limited(response.into_body(), 1024 * 1024))
                .await
                .ok()??;
        let value: Value = serde_json::from_slice(&body).ok()?;
        value.get("models").and_then(Value::as_array).cloned()
    });
    let answers = futures_util::future::join_all(asks).await;
    let mut models = Vec::new();
    for (backend, answer) in view.backends.iter().zip(answers) {
        let entries = match answer {
            Some(entries) => entries,
            None => view
                .node(&backend.node_id)
                .and_then(|node| node.ollama.as_ref())
                .map(|ollama| {
                    ollama
                        .loaded
                        .iter()
                        .map(|loaded| {
                            json!({
                                "name": loaded.name,
                                "model": loaded.name,
                                "size": loaded.size_bytes,
                                "size_vram": loaded.vram_bytes,
                                "expires_at": loaded.expires_at,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        for mut entry in entries {
            if let Some(fields) = entry.as_object_mut() {
                fields.insert("sollol_node".into(), json!(backend.name));
                fields.insert("sollol_node_id".into(), json!(backend.node_id));
            }
            models.push(entry);
        }
    }
    axum::Json(json!({ "models": models })).into_response()
}

/// `GET /api/version`: the oldest Ollama version among up nodes, so clients never assume a feature some node lacks.
pub async fn version(State(state): State<Arc<GatewayState>>) -> Response {
    let view = state.view.load();
    let oldest = view
        .nodes
        .iter()
        .filter(|node| {
            view.backends
                .iter()
                .any(|backend| backend.node_id == node.id)
        })
        .filter_map(|node| {
            node.ollama
                .as_ref()
                .and_then(|ollama| ollama.version.clone())
        })
        .min_by(|a, b| version_key(a).cmp(&version_key(b)));
    axum::Json(json!({ "version": oldest.unwrap_or_else(|| "0.0.0".to_owned()) })).into_response()
}

fn version_key(version: &str) -> Vec<u64> {
    version
        .split(['.', '-'])
        .map(|part| part.parse().unwrap_or(0))
        .collect()
}

/// `GET /v1/models`: every model on an up node, once, in OpenAI's shape.
pub async fn openai_models(State(state): State<Arc<GatewayState>>) -> Response {
    let view = state.view.load();
    let mut names: Vec<&str> = view
        .backends
        .iter()
        .flat_map(|backend| backend.models.iter().map(String::as_str))
        .collect();
    names.sort_unstable();
    names.dedup();
    let data: Vec<Value> = names
        .into_iter()
        .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": "library"}))
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_estimate_tokens() {
        fn check(request: Value, prompt_tokens: u32, output_tokens: u32) {
            assert_eq!(
                request_shape(&request),
                RequestShape {
                    prompt_tokens,
                    output_tokens
                },
                "{request}"
            );
        }
        check(
            json!({"messages": [{"role": "user", "content": "x".repeat(400)}]}),
            100,
            128,
        );
        check(
            json!({"prompt": "abcdefgh", "options": {"num_predict": 24}}),
            2,
            24,
        );
        check(json!({"input": ["aaaa", "bbbb"], "max_tokens": 7}), 2, 7);
        check(json!({}), 1, 128);
    }

    #[test]
    fn the_last_ndjson_line_carries_the_timings() {
        let tail =
            b"{\"done\":false}\n{\"done\":true,\"eval_count\":3,\"eval_duration\":3000000}\n";
        let value = last_json_line(tail).expect("json");
        assert_eq!(value["eval_count"], 3);
        assert_eq!(last_json_line(b"  \n"), None);
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_key("0.9.6") < version_key("0.12.3"));
        assert!(version_key("0.12.3") < version_key("0.12.10"));
    }

    #[test]
    fn conversations_share_a_key_across_turns() {
        let first = json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]});
        let next = json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]});
        let other = json!({"messages": [{"role": "user", "content": "something else"}]});
        let key = |request: &Value| conversation_key("m:1", request);
        assert_eq!(key(&first), key(&next));
        assert_ne!(key(&first), key(&other));
        assert_ne!(conversation_key("m:2", &first), key(&first));
        assert_eq!(key(&json!({"messages": []})), None);
        assert!(key(&json!({"prompt": "abc"})).is_some());
        let affinity = Affinity::default();
        affinity.remember(1, "node-a");
        assert_eq!(affinity.get(1).as_deref(), Some("node-a"));
        assert_eq!(affinity.get(2), None);
    }

    #[test]
    fn applications_are_named() {
        fn check(headers: &[(&'static str, &str)], key: Option<&str>, expected: &str) {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.insert(*name, HeaderValue::from_str(value).expect("header"));
            }
            assert_eq!(application(&map, key), expected);
        }
        check(
            &[
                (APP_HEADER, "indexer"),
                ("user-agent", "ollama-python/0.6.3"),
            ],
            Some("webui"),
            "indexer",
        );
        check(
            &[("user-agent", "ollama-python/0.6.3 (x86_64 linux)")],
            Some("webui"),
            "webui",
        );
        check(
            &[("user-agent", "ollama-python/0.6.3 (x86_64 linux)")],
            None,
            "ollama-python/0.6.3",
        );
        check(&[], None, "unknown");
    }

    #[test]
    fn header_values_are_sanitised() {
        assert_eq!(
            header_text("node é\n1"),
            HeaderValue::from_static("node ??1")
        );
    }
}
