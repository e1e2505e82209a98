//! The coordinator role: history, cluster port, discovery, the HTTP gateway and the distributed front.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sollol_policy::admission::QueueSettings;
use sollol_policy::breaker::BreakerSettings;
use sollol_policy::routing::Priors;
use sollol_policy::warmup::WarmupSettings;
use sollol_shared::api::DiscoveryScan;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Shutdown, StartError, announce, bind, http_guard, local_address};
use crate::cluster::group::{Group, GroupSettings};
use crate::cluster::identity::{self, ClusterToken, NodeId};
use crate::cluster::mdns::{Mdns, Role};
use crate::cluster::membership::{self, Membership};
use crate::cluster::{
    ClusterEvent, ClusterTask, ClusterView, EVENTS_PER_NODE, SharedView, discovery, scan,
};
use crate::config::Config;
use crate::distributed::front::Front;
use crate::gateway::learning::{Learned, Learner, Peers};
use crate::gateway::proxy::{CacheSettings, Proxy, ProxySettings, WarmupConfig};
use crate::gateway::{self, GatewayState};
use crate::history::{History, HistoryReader, Remembered};
use crate::observability::{self, Observer};
use crate::telemetry::unix_ms;

/// The coordinator's history database, inside the data directory.
pub const HISTORY_FILE: &str = "coordinator.db";

/// A running coordinator.
#[derive(Debug)]
pub struct CoordinatorHandle {
    pub gateway_address: SocketAddr,
    pub cluster_address: SocketAddr,
    pub token: ClusterToken,
    pub data_dir: PathBuf,
    view: SharedView,
    gateway: Arc<GatewayState>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    history: History,
}

impl CoordinatorHandle {
    /// The current cluster snapshot.
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.load_full()
    }

    /// Requests waiting in the gateway's priority queue.
    pub fn queued(&self) -> usize {
        self.gateway.proxy.queued()
    }

    /// What routing has learned so far.
    pub fn learned(&self) -> Arc<Learned> {
        self.gateway.proxy.learner().snapshot()
    }

    /// Stops accepting work, closes agent connections, drains the history writer.
    pub async fn shutdown(self, grace: Duration) -> Shutdown {
        self.shutdown.cancel();
        self.tasks.close();
        let outcome = match tokio::time::timeout(grace, self.tasks.wait()).await {
            Ok(()) => Shutdown::Graceful,
            Err(_) => Shutdown::Forced,
        };
        // The cluster task has stopped (or been abandoned), so the history gets no more records: drain it.
        if tokio::time::timeout(grace, self.history.close())
            .await
            .is_err()
        {
            return Shutdown::Forced;
        }
        outcome
    }
}

/// What every part of a starting coordinator shares: its configuration, stop signal and task tracker.
struct Start<'a> {
    config: &'a Config,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Starts a coordinator: history, cluster task, cluster port and HTTP gateway.
pub async fn start_coordinator(config: &Config) -> Result<CoordinatorHandle, StartError> {
    let data_dir = config.data_dir.clone();
    identity::ensure_private_dir(&data_dir)?;
    let token = coordinator_token(config)?;
    let settings = &config.coordinator;
    let history_path = data_dir.join(HISTORY_FILE);
    let (history, mut remembered) = open_history(&history_path, config).await?;

    let cluster_listener = bind(settings.cluster_bind, "cluster port").await?;
    let gateway_listener = bind(settings.gateway_bind, "gateway").await?;
    let cluster_address = local_address(&cluster_listener, settings.cluster_bind);
    let gateway_address = local_address(&gateway_listener, settings.gateway_bind);

    let start = Start {
        config,
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
    };
    let remembered_pairs = std::mem::take(&mut remembered.pairs);
    let moved_aside = remembered.moved_aside.take();
    let loaded_counts: Vec<(String, usize)> = remembered
        .nodes
        .iter()
        .filter_map(|(node, _)| Some((node.id.clone(), node.ollama.as_ref()?.loaded.len())))
        .collect();
    let cluster_task = ClusterTask::new(
        remembered,
        history.sender(),
        settings.down_after_missed.get(),
    );
    let view = cluster_task.view();
    let (events_sender, events) = mpsc::channel(1024);
    start
        .tasks
        .spawn(cluster_task.run(events, start.shutdown.clone()));
    let scan = start.discovery(&events_sender);
    let mdns = config
        .discovery
        .mdns
        .then(|| start.announce(cluster_address));
    let distributed = if config.model_sharding_enabled {
        Some(
            start
                .distributed_front(&token, Arc::clone(&view), events_sender.clone())
                .await?,
        )
    } else {
        None
    };
    let group = start
        .group(&token, cluster_address, gateway_address)
        .await?;
    let membership = Arc::new(
        Membership::new(
            token.clone(),
            events_sender,
            settings.handshake_timeout,
            settings.down_after_missed.get(),
            u64::from(settings.max_cluster_connections.get()),
            start.shutdown.clone(),
        )
        .with_group(&group),
    );
    let observer = Arc::new(Observer::new(Arc::clone(&view)));
    let learner = Learner::start(
        remembered_pairs,
        Some(Peers {
            own_id: group.id().to_owned(),
            others: group.others(),
        }),
        history.sender(),
        Arc::clone(&observer),
        start.shutdown.clone(),
        &start.tasks,
    );
    let proxy = Proxy::new(
        learner,
        Arc::clone(&observer),
        proxy_settings(config, distributed.as_ref().map(|(_, id)| id.clone())),
    );
    proxy.remember_loaded_counts(loaded_counts);
    let gateway_state = Arc::new(GatewayState {
        view: Arc::clone(&view),
        ready: AtomicBool::new(false),
        started_at: Instant::now(),
        started_at_ms: unix_ms(SystemTime::now()),
        gateway_address,
        cluster_address,
        cluster_connections: Arc::clone(&membership.connections),
        history_dropped: history.dropped(),
        notices: moved_aside
            .iter()
            .map(|aside| {
                format!(
                    "the history database was corrupt at start-up: moved to {} and replaced by an empty one",
                    aside.display()
                )
            })
            .collect(),
        proxy,
        models: crate::gateway::manage::ModelApi::new(token.clone()),
        replicas: crate::gateway::manage::Replicas::from_config(&config.models.replicas),
        max_request_body: settings.max_request_body.get() as usize,
        api_keys: GatewayState::digest_keys(&settings.api_keys),
        sessions: Default::default(),
        http: http_guard(config, gateway_address),
        body_read_timeout: settings.body_read_timeout,
        body_deadline: settings.body_deadline,
        body_memory: {
            let kib = (settings.body_memory / 1024).clamp(1, u64::from(u32::MAX) / 2);
            (
                Arc::new(tokio::sync::Semaphore::new(kib as usize)),
                kib,
            )
        },
        observer: Arc::clone(&observer),
        history: open_history_reader(history_path).await,
        shutdown: start.shutdown.clone(),
        distributed: distributed.map(|(front, _)| front),
        scan,
        mdns,
        group,
    });
    start.serve(
        cluster_listener,
        membership,
        gateway_listener,
        &gateway_state,
        observer,
    );
    if !gateway_address.ip().is_loopback() && settings.api_keys.is_empty() {
        tracing::warn!(address = %gateway_address, "the gateway is reachable from other machines and has no API key: anyone on the network can use every node; set coordinator.api_keys");
    }
    Ok(CoordinatorHandle {
        gateway_address,
        cluster_address,
        token,
        data_dir,
        view,
        gateway: gateway_state,
        shutdown: start.shutdown,
        tasks: start.tasks,
        history,
    })
}

/// The cluster token: `agent.token` (or `agent.token_file`) when set, so several coordinators share
/// one; otherwise the data directory's, created on first start.
fn coordinator_token(config: &Config) -> Result<ClusterToken, StartError> {
    let Some(given) = config.agent.token.as_deref() else {
        return Ok(ClusterToken::load_or_create(&config.data_dir)?);
    };
    let given = ClusterToken::parse(given)
        .map_err(|error| StartError::Usage(format!("`agent.token`: {error}")))?;
    if let Some(stored) = ClusterToken::load(&config.data_dir)?
        && stored.expose() != given.expose()
    {
        tracing::warn!(
            "the data directory holds another cluster token than agent.token: using agent.token (agents that joined with the other one will be refused)"
        );
    }
    Ok(given)
}

/// The cluster address the other coordinators can reach: the bound one, or for an unspecified bind
/// address the address this machine uses towards `peer` (loopback without one).
async fn advertised_address(bound: SocketAddr, peer: Option<&String>) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let mut address = crate::config::loopback_if_unspecified(bound);
    let Some(peer) = peer else {
        return address;
    };
    let towards = tokio::net::lookup_host(peer.as_str())
        .await
        .ok()
        .and_then(|mut found| found.next());
    if let Some(towards) = towards
        && let Ok(socket) = tokio::net::UdpSocket::bind((bound.ip(), 0)).await
        && socket.connect(towards).await.is_ok()
        && let Ok(local) = socket.local_addr()
    {
        address.set_ip(local.ip());
    }
    address
}

/// Opens the history (its writer thread included) and reads what it remembers of nodes and routing.
async fn open_history(path: &Path, config: &Config) -> Result<(History, Remembered), StartError> {
    let retention = config.coordinator.event_retention.get();
    let path = path.to_owned();
    let (history, remembered) =
        tokio::task::spawn_blocking(move || History::open(&path, retention, EVENTS_PER_NODE))
            .await
            .map_err(|error| StartError::Usage(format!("history start-up panicked: {error}")))??;
    if !remembered.nodes.is_empty() {
        tracing::info!(
            nodes = remembered.nodes.len(),
            "remembered nodes from the history; down until they reconnect"
        );
    }
    Ok((history, remembered))
}

/// A read-only connection for the request API; without one that API answers 503, the rest works.
async fn open_history_reader(path: PathBuf) -> Option<Arc<HistoryReader>> {
    match tokio::task::spawn_blocking(move || HistoryReader::open(&path)).await {
        Ok(Ok(reader)) => Some(Arc::new(reader)),
        Ok(Err(error)) => {
            tracing::error!(%error, "cannot open a reader on the history; the request API will answer 503");
            None
        }
        Err(error) => {
            tracing::error!(%error, "opening a reader on the history panicked");
            None
        }
    }
}

fn proxy_settings(config: &Config, distributed_front: Option<String>) -> ProxySettings {
    let settings = &config.coordinator;
    ProxySettings {
        default_strategy: settings.strategy,
        priors: Priors::default(),
        max_attempts: settings.max_attempts.get() as usize,
        node_slots: settings.node_slots.get(),
        response_timeout: settings.response_timeout,
        max_response_body: usize::try_from(settings.max_response_body).unwrap_or(usize::MAX),
        requests_per_minute: settings.requests_per_minute,
        tokens_per_minute: settings.tokens_per_minute,
        node_queue_depth: settings.node_queue_depth,
        queue: QueueSettings {
            capacity: settings.queue_capacity.get() as usize,
            timeout: settings.queue_timeout,
            aging: settings.queue_aging,
        },
        breaker: BreakerSettings::default(),
        hedging: settings.hedging,
        calibration: settings.calibration,
        warmup: settings.warmup.then_some(WarmupConfig {
            window: settings.warmup_window,
            plan: WarmupSettings {
                max_models: settings.warmup_models.get() as usize,
                ..WarmupSettings::default()
            },
        }),
        distributed_front,
        cache: config.cache.enabled.then_some(CacheSettings {
            max_bytes: config.cache.max_bytes,
            ttl: config.cache.ttl,
        }),
    }
}

impl Start<'_> {
    /// Probes the configured Ollama nodes and scans the configured ranges; returns the last scan's
    /// summary when scanning is on.
    fn discovery(&self, events: &mpsc::Sender<ClusterEvent>) -> Option<Arc<Mutex<DiscoveryScan>>> {
        let settings = &self.config.coordinator;
        if !settings.nodes.is_empty() {
            tracing::info!(nodes = settings.nodes.len(), "probing static Ollama nodes");
            self.tasks.spawn(discovery::probe_static_nodes(
                settings
                    .nodes
                    .iter()
                    .map(|url| (url.clone(), None))
                    .collect(),
                settings.probe_interval,
                events.clone(),
                self.shutdown.clone(),
            ));
        }
        let discovery = &self.config.discovery;
        if discovery.scan.is_empty() {
            return None;
        }
        let ranges: Vec<String> = discovery.scan.iter().map(ToString::to_string).collect();
        tracing::info!(
            ?ranges,
            port = discovery.scan_port,
            "scanning address ranges for Ollama servers"
        );
        let last = Arc::new(Mutex::new(DiscoveryScan {
            ranges,
            port: discovery.scan_port,
            ..Default::default()
        }));
        self.tasks.spawn(scan::run(
            discovery.scan.clone(),
            discovery.scan_port,
            discovery.scan_interval,
            settings.probe_interval,
            events.clone(),
            Arc::clone(&last),
            self.shutdown.clone(),
        ));
        Some(last)
    }

    /// Joins the coordinator group: the other coordinators of this cluster, found through
    /// `coordinator.peers` and mDNS.
    async fn group(
        &self,
        token: &ClusterToken,
        cluster_address: SocketAddr,
        gateway_address: SocketAddr,
    ) -> Result<Arc<Group>, StartError> {
        let settings = &self.config.coordinator;
        let id = NodeId::load_or_create(&self.config.data_dir)?.to_string();
        let advertised = match settings.advertise {
            Some(address) => address,
            None => advertised_address(cluster_address, settings.peers.first()).await,
        };
        let mut gateway = gateway_address;
        if gateway.ip().is_unspecified() {
            gateway.set_ip(advertised.ip());
        }
        let group = Group::start(
            GroupSettings {
                id,
                name: self.config.agent.name.clone(),
                cluster_address: advertised,
                gateway_url: format!("http://{gateway}"),
                started_at_ms: unix_ms(SystemTime::now()),
                peers: settings.peers.clone(),
                shared_config: self.config.shared_sections(),
                handshake_timeout: settings.handshake_timeout,
            },
            token,
            self.shutdown.clone(),
            &self.tasks,
        )
        .await
        .map_err(StartError::Usage)?;
        if !settings.peers.is_empty() {
            tracing::info!(address = %advertised, peers = ?settings.peers, "coordinator group: looking for the other coordinators");
        }
        Ok(group)
    }

    /// Announces the cluster port over mDNS, so agents started without `agent.join` find it.
    fn announce(&self, cluster_address: SocketAddr) -> Result<Arc<Mdns>, String> {
        if cluster_address.ip().is_loopback() {
            return Err(format!(
                "not announced: the cluster port ({cluster_address}) is reachable from this machine only"
            ));
        }
        let node_id =
            NodeId::load_or_create(&self.config.data_dir).map_err(|error| error.to_string())?;
        let serves = if self.config.model_sharding_enabled {
            vec!["gateway", "distributed"]
        } else {
            vec!["gateway"]
        };
        announce(
            self.config,
            Role::Coordinator,
            &node_id,
            cluster_address.port(),
            true,
            serves,
            &self.shutdown,
        )
        .inspect_err(|error| tracing::warn!(%error, "no mDNS discovery"))
    }

    /// Serves distributed models through pipelines of agents' stages: an engine whose models compute
    /// on the stages, on a loopback port, probed as a node called `distributed` so the gateway routes
    /// those models' requests to it like to any Ollama node (and only to it). It serves
    /// `distributed.models`, and with `distributed.auto` whatever no node holding it can serve whole
    /// ([`crate::distributed::sharding`]). Returns the front and its node id.
    async fn distributed_front(
        &self,
        token: &ClusterToken,
        view: SharedView,
        events: mpsc::Sender<ClusterEvent>,
    ) -> Result<(Arc<Front>, String), StartError> {
        let config = self.config;
        let max_stages = config.distributed.max_stages.get() as usize;
        let engine = Arc::new(sollol_engine::engine::Engine::new(
            Vec::new(),
            config.engine.parallel.get() as usize,
            config.engine.keep_alive,
        ));
        let front = Arc::new(Front::new(
            Arc::clone(&engine),
            Arc::clone(&view),
            max_stages,
            token.clone(),
        ));
        for model in &config.distributed.models {
            front.add(model, "listed in distributed.models".to_owned());
        }
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let listener = bind(loopback, "distributed inference front").await?;
        let url = format!("http://{}", local_address(&listener, loopback));
        tracing::info!(%url, models = ?config.distributed.models, auto = config.distributed.auto, max_stages, "distributed inference (experimental) serves models through agents' stages");
        let (boundary, limits) = http_guard(config, loopback);
        self.tasks.spawn(sollol_engine::server::serve(
            listener,
            engine,
            boundary,
            limits,
            self.shutdown.clone(),
        ));
        if config.distributed.auto {
            self.tasks.spawn(crate::distributed::sharding::watch(
                Arc::clone(&front),
                view,
                config.distributed.models.clone(),
                config.coordinator.probe_interval,
                self.shutdown.clone(),
            ));
        }
        let node_id = discovery::static_node_id(&url);
        self.tasks.spawn(discovery::probe_static_nodes(
            vec![(url, Some("distributed".to_owned()))],
            config.coordinator.probe_interval,
            events,
            self.shutdown.clone(),
        ));
        Ok((front, node_id))
    }

    /// The serving tasks: node watching for the live feed, the cluster port, breaker probes and the
    /// gateway. The gateway reports ready once they run.
    fn serve(
        &self,
        cluster_listener: tokio::net::TcpListener,
        membership: Arc<Membership>,
        gateway_listener: tokio::net::TcpListener,
        gateway_state: &Arc<GatewayState>,
        observer: Arc<Observer>,
    ) {
        let shutdown = &self.shutdown;
        let in_flight_of = Arc::clone(gateway_state);
        self.tasks.spawn(observability::watch_nodes(
            observer,
            move || in_flight_of.proxy.in_flight(),
            shutdown.clone(),
        ));
        self.tasks.spawn(membership::serve(
            cluster_listener,
            membership,
            self.tasks.clone(),
        ));
        let prober = Arc::clone(gateway_state);
        let view = Arc::clone(&gateway_state.view);
        let probe_shutdown = shutdown.clone();
        self.tasks
            .spawn(async move { prober.proxy.probe_open_breakers(view, probe_shutdown).await });
        let warmer = Arc::clone(gateway_state);
        let (view, history) = (Arc::clone(&warmer.view), warmer.history.clone());
        let warm_shutdown = shutdown.clone();
        self.tasks
            .spawn(async move { warmer.proxy.warm_up(view, history, warm_shutdown).await });
        self.tasks.spawn(gateway::group::share(
            Arc::clone(gateway_state),
            shutdown.clone(),
        ));
        self.tasks.spawn(gateway::manage::keep_replicas(
            Arc::clone(gateway_state),
            shutdown.clone(),
        ));
        self.tasks.spawn(gateway::serve(
            gateway_listener,
            Arc::clone(gateway_state),
            shutdown.clone(),
        ));
        gateway_state.ready.store(true, Ordering::Release);
        tracing::info!(address = %gateway_state.gateway_address, "gateway listening");
        tracing::info!(address = %gateway_state.cluster_address, "cluster port listening");
    }
}
