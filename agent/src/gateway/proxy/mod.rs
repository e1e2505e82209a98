//! The Ollama- and OpenAI-compatible routes: pick a node, forward, stream back, fail over, learn.
//!
//! Each request is parsed once for what routing needs (model, stream flag,
//! size: `request`), waits while every candidate is saturated (`selection`),
//! is ranked by `routing::choose` over the cluster snapshot and sent to the
//! best node (`forward`). A node that fails before its first byte (connect
//! error, reset, 5xx) is skipped for the next one, never the same node twice
//! (`attempt`). A non-streaming answer is buffered (it is small) so a node
//! dying mid-answer is failed over too; a streaming answer passes through
//! chunk by chunk with backpressure, and a failure after it began ends the
//! stream with an error object (`relay`). Outcomes go to the learner with
//! `try_send`. A request that only unloads a model goes to every node that has it loaded
//! (`unload`). Later turns of a conversation prefer the node that served it
//! (`affinity`), embedding batches are spread over nodes (`batch`), idle
//! unmeasured nodes are measured (`calibration`), the model lists are
//! answered by the gateway itself (`models`), and, when `cache.enabled`,
//! repeated embeddings and deterministic generations are answered from
//! memory without a node (`cache`).
//!
//! This module owns the shared state ([`Proxy`]); its children are the steps,
//! and they use this module and each other only one way (forward → request
//! → affinity, forward → attempt → relay, forward → cache → request), never
//! in a circle.

mod affinity;
mod attempt;
mod batch;
mod cache;
mod calibration;
mod fields;
mod forward;
mod models;
mod relay;
mod request;
mod selection;
mod unload;
mod warmup;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sollol_policy::group::{Figures, PeerLoad};
use tokio_util::sync::CancellationToken;

use crate::cluster::{Backend, SharedView};
use crate::gateway::admission::Admission;
use crate::gateway::learning::Learner;
use crate::gateway::quota::Quotas;
use crate::history::Outcome;
use crate::observability::{CacheFigures, Observer};
use affinity::Affinity;
use cache::ResponseCache;
use sollol_policy::admission::QueueSettings;
use sollol_policy::breaker::{Breaker, BreakerSettings};
use sollol_policy::routing::{Priors, Strategy};

pub(crate) use attempt::header_text;
pub use cache::CacheSettings;
pub use forward::forward;
pub use models::{openai_models, ps, tags, version};
pub use request::ApiKeyName;
pub use warmup::WarmupConfig;

/// Header that picks a strategy for one request.
pub const STRATEGY_HEADER: &str = "x-sollol-strategy";
/// Response header naming the node that answered; as a request header, the node to send the request to.
pub const NODE_HEADER: &str = "x-sollol-node";
/// Response header with the routing decision's short reason.
pub const DECISION_HEADER: &str = "x-sollol-decision";
/// Response header with every candidate's predicted time, best first, as JSON.
pub const CANDIDATES_HEADER: &str = "x-sollol-candidates";
/// Request header with the priority, 1 (lowest) to 10.
pub const PRIORITY_HEADER: &str = "x-sollol-priority";

/// How often open breakers are checked for a due probe, and how long a probe may take.
const PROBE_EVERY: Duration = Duration::from_millis(250);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Gateway-side state of routing: the upstream client, live loads, what was learned.
#[derive(Debug)]
pub struct Proxy {
    client: Client<HttpConnector, Full<Bytes>>,
    learner: Arc<Learner>,
    loads: PerNode<AtomicU32>,
    breakers: PerNode<Mutex<Breaker>>,
    round_robin: AtomicU64,
    admission: Arc<Admission>,
    /// When each (model, node) was last calibrated, so each is measured at most once per
    /// `CALIBRATE_EVERY` (nested so that checking a pair allocates nothing).
    calibrated: Mutex<HashMap<String, HashMap<String, Instant>>>,
    /// Calibrations running per node.
    calibrating: PerNode<AtomicU32>,
    /// Each model's nodes ranked for big clusters.
    rankings: selection::Rankings,
    affinity: Affinity,
    /// Loads running and tried, and the nodes' limits of loaded models.
    warmups: Arc<warmup::Warmups>,
    /// The response cache; `None` when `cache.enabled` is false.
    cache: Option<ResponseCache>,
    /// The other coordinators' load on the nodes (in flight, open breakers, loads), as last gossiped.
    peer_load: ArcSwap<PeerLoad>,
    observer: Arc<Observer>,
    /// Requests and generated tokens per key and per application.
    pub quotas: Arc<Quotas>,
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
    /// The largest answer read whole from a node (`coordinator.max_response_body`).
    pub max_response_body: usize,
    /// Per key and per application; 0: no limit.
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
    /// Requests allowed in a node's own queue beyond its slots before the gateway queues instead.
    pub node_queue_depth: u32,
    pub queue: QueueSettings,
    pub breaker: BreakerSettings,
    /// Whether slow first answers are hedged on the next node.
    pub hedging: bool,
    /// Whether idle, never-measured nodes are measured with a short request of the gateway's own.
    pub calibration: bool,
    /// Warm-up from history and for spare capacity; `None`: off.
    pub warmup: Option<WarmupConfig>,
    /// The node id of the coordinator's distributed inference front: the only node that serves the
    /// models it lists (they are distributed because the nodes that hold them should not serve them
    /// whole).
    pub distributed_front: Option<String>,
    /// The response cache's budget and time to live; `None`: no cache.
    pub cache: Option<CacheSettings>,
}

impl Proxy {
    pub fn new(learner: Arc<Learner>, observer: Arc<Observer>, settings: ProxySettings) -> Self {
        Self {
            client: node_client(),
            learner,
            loads: PerNode::new(),
            breakers: PerNode::new(),
            round_robin: AtomicU64::new(0),
            admission: Arc::new(Admission::new(settings.queue)),
            calibrated: Mutex::new(HashMap::new()),
            calibrating: PerNode::new(),
            rankings: selection::Rankings::default(),
            affinity: Affinity::default(),
            warmups: Arc::default(),
            cache: settings.cache.map(ResponseCache::new),
            peer_load: ArcSwap::default(),
            observer,
            quotas: Arc::new(Quotas::new(
                settings.requests_per_minute,
                settings.tokens_per_minute,
            )),
            settings,
        }
    }

    /// Remembers how many models each node held in its last report before a restart, so warm-up
    /// knows the nodes' limits before they load anything.
    pub fn remember_loaded_counts(&self, counts: impl IntoIterator<Item = (String, usize)>) {
        self.warmups.remember_capacity(counts);
    }

    pub fn learner(&self) -> &Learner {
        &self.learner
    }

    /// The response cache's counters and size; zeros when it is off.
    pub fn cache_figures(&self) -> CacheFigures {
        self.cache
            .as_ref()
            .map(ResponseCache::figures)
            .unwrap_or_default()
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

    /// Whether the node's breaker lets a request through now (closed, or its trial is due).
    pub fn lets_through(&self, node_id: &str) -> bool {
        let breaker = self.breaker_of(node_id);
        let breaker = lock(&breaker);
        breaker.is_closed() || breaker.trial_due(Instant::now())
    }

    /// Takes the other coordinators' load, summed, for routing.
    pub fn set_peer_load(&self, load: PeerLoad) {
        self.peer_load.store(Arc::new(load));
    }

    pub(crate) fn peer_load(&self) -> arc_swap::Guard<Arc<PeerLoad>> {
        self.peer_load.load()
    }

    /// What this coordinator tells the other coordinators: its own measurements, its requests in
    /// flight, the breakers it holds open, the loads it runs.
    pub fn figures(&self) -> Figures {
        let learned = self.learner.snapshot();
        let open_breakers = self
            .breakers
            .snapshot()
            .iter()
            .filter(|(_, breaker)| !lock(breaker).is_closed())
            .map(|(node, _)| node.clone())
            .collect();
        Figures {
            pairs: (*learned.own).clone(),
            slots: learned
                .slots
                .iter()
                .map(|(node, slots)| (node.clone(), *slots))
                .collect(),
            in_flight: self
                .in_flight()
                .into_iter()
                .filter(|(_, count)| *count > 0)
                .collect(),
            open_breakers,
            warming: self.warmups.running(),
        }
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

/// A JSON `POST` to a node. The browser's `Origin`, when the client sent one, goes along, so the node's
/// own checks (Ollama refuses foreign pages) see the page and not an origin-less request.
/// The client that talks to the nodes' Ollama APIs, with body type `B`.
pub(crate) fn node_client<B>() -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(3)));
    Client::builder(TokioExecutor::new())
        // Shorter than the engine's idle limit (`coordinator.header_read_timeout`, 30 s by default): a
        // pooled connection is dropped here before the node closes it, so a request never races a
        // node's close.
        .pool_idle_timeout(Duration::from_secs(20))
        .build(connector)
}

fn post_json(
    url: String,
    body: Bytes,
    origin: Option<&hyper::header::HeaderValue>,
) -> Result<hyper::Request<Full<Bytes>>, String> {
    let mut request =
        hyper::Request::post(url).header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(origin) = origin {
        request = request.header(hyper::header::ORIGIN, origin);
    }
    request
        .body(Full::new(body))
        .map_err(|error| error.to_string())
}

/// Who an answer's generated tokens are charged to (`key:NAME`, `app:NAME`).
#[derive(Clone, Debug)]
pub(super) struct Charge {
    quotas: Arc<Quotas>,
    who: Arc<[String]>,
}

impl Charge {
    /// Charges the tokens a finished answer generated, as its timings report them.
    fn tokens(&self, outcome: &Outcome) {
        if let Some(timings) = &outcome.timings {
            self.quotas.charge_tokens(&self.who, timings.eval_tokens);
        }
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
