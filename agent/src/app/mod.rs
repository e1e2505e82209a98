//! Wiring: starts the coordinator's and the agent's long-lived tasks, and stops them along one shutdown path.
//!
//! Every task gets the same cancellation token and runs on one task tracker,
//! so a shutdown cancels them all, waits up to the grace period, then reports
//! whether it was graceful. This module owns no protocol or policy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::discovery;
use crate::cluster::identity::{self, ClusterToken, IdentityError, NodeId};
use crate::cluster::join::{self, JoinError, JoinParams};
use crate::cluster::membership::{self, Membership};
use crate::cluster::{ClusterTask, ClusterView, EVENTS_PER_NODE, SharedView};
use crate::config::Config;
use crate::distributed::front::Front;
use crate::gateway::learning::Learner;
use crate::gateway::proxy::{Proxy, ProxySettings};
use crate::gateway::{self, GatewayState};
use crate::history::{History, HistoryError, HistoryReader};
use crate::observability::{self, Observer};
use crate::telemetry::{Sampler, unix_ms};
use sollol_policy::admission::QueueSettings;
use sollol_policy::breaker::BreakerSettings;
use sollol_policy::routing::Priors;

/// The coordinator's history database, inside the data directory.
pub const HISTORY_FILE: &str = "coordinator.db";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("cannot listen on {address} ({what}): {source}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

/// How a shutdown ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    Graceful,
    /// The grace period ran out with tasks still running.
    Forced,
}

impl Shutdown {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Graceful => "graceful",
            Self::Forced => "forced",
        }
    }
}

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
    pub fn learned(&self) -> Arc<crate::gateway::learning::Learned> {
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

/// Starts a coordinator: history, cluster task, cluster port and HTTP gateway.
pub async fn start_coordinator(config: &Config) -> Result<CoordinatorHandle, StartError> {
    let data_dir = config.data_dir.clone();
    identity::ensure_private_dir(&data_dir)?;
    let token = ClusterToken::load_or_create(&data_dir)?;
    let settings = &config.coordinator;
    let history_path = data_dir.join(HISTORY_FILE);
    let retention = settings.event_retention.get();
    let writer_path = history_path.clone();
    let (history, mut remembered) = tokio::task::spawn_blocking(move || {
        History::open(&writer_path, retention, EVENTS_PER_NODE)
    })
    .await
    .map_err(|error| StartError::Usage(format!("history start-up panicked: {error}")))??;
    if !remembered.nodes.is_empty() {
        tracing::info!(
            nodes = remembered.nodes.len(),
            "remembered nodes from the history; down until they reconnect"
        );
    }

    let cluster_listener = bind(settings.cluster_bind, "cluster port").await?;
    let gateway_listener = bind(settings.gateway_bind, "gateway").await?;
    let cluster_address = local_address(&cluster_listener, settings.cluster_bind);
    let gateway_address = local_address(&gateway_listener, settings.gateway_bind);

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let remembered_pairs = std::mem::take(&mut remembered.pairs);
    let cluster_task = ClusterTask::new(
        remembered,
        history.sender(),
        settings.down_after_missed.get(),
    );
    let view = cluster_task.view();
    let (events_sender, events) = mpsc::channel(1024);
    tasks.spawn(cluster_task.run(events, shutdown.clone()));

    if !settings.nodes.is_empty() {
        tracing::info!(nodes = settings.nodes.len(), "probing static Ollama nodes");
        tasks.spawn(discovery::probe_static_nodes(
            settings
                .nodes
                .iter()
                .map(|url| (url.clone(), None))
                .collect(),
            settings.probe_interval,
            events_sender.clone(),
            shutdown.clone(),
        ));
    }
    let scan = if config.discovery.scan.is_empty() {
        None
    } else {
        let discovery = &config.discovery;
        let last = Arc::new(std::sync::Mutex::new(sollol_shared::api::DiscoveryScan {
            ranges: discovery.scan.iter().map(ToString::to_string).collect(),
            port: discovery.scan_port,
            ..Default::default()
        }));
        tracing::info!(ranges = ?discovery.scan.iter().map(ToString::to_string).collect::<Vec<_>>(), port = discovery.scan_port, "scanning address ranges for Ollama servers");
        tasks.spawn(crate::cluster::scan::run(
            discovery.scan.clone(),
            discovery.scan_port,
            discovery.scan_interval,
            settings.probe_interval,
            events_sender.clone(),
            Arc::clone(&last),
            shutdown.clone(),
        ));
        Some(last)
    };
    let mdns = config
        .discovery
        .mdns
        .then(|| announce_coordinator(config, cluster_address, &shutdown));
    let distributed = if config.model_sharding_enabled {
        Some(
            start_distributed_front(
                config,
                &token,
                Arc::clone(&view),
                events_sender.clone(),
                &shutdown,
                &tasks,
            )
            .await?,
        )
    } else {
        None
    };
    let membership = Arc::new(Membership::new(
        token.clone(),
        events_sender,
        settings.handshake_timeout,
        settings.down_after_missed.get(),
        u64::from(settings.max_cluster_connections.get()),
        shutdown.clone(),
    ));
    let observer = Arc::new(Observer::new(Arc::clone(&view)));
    let learner = Learner::start(
        remembered_pairs,
        history.sender(),
        Arc::clone(&observer),
        shutdown.clone(),
        &tasks,
    );
    let history_reader = match tokio::task::spawn_blocking(move || {
        HistoryReader::open(&history_path)
    })
    .await
    {
        Ok(Ok(reader)) => Some(Arc::new(reader)),
        Ok(Err(error)) => {
            tracing::error!(%error, "cannot open a reader on the history; the request API will answer 503");
            None
        }
        Err(error) => {
            tracing::error!(%error, "opening a reader on the history panicked");
            None
        }
    };
    let proxy = Proxy::new(
        learner,
        Arc::clone(&observer),
        ProxySettings {
            default_strategy: settings.strategy,
            priors: Priors::default(),
            max_attempts: settings.max_attempts.get() as usize,
            node_slots: settings.node_slots.get(),
            response_timeout: settings.response_timeout,
            node_queue_depth: settings.node_queue_depth,
            queue: QueueSettings {
                capacity: settings.queue_capacity.get() as usize,
                timeout: settings.queue_timeout,
                aging: settings.queue_aging,
            },
            breaker: BreakerSettings::default(),
            hedging: settings.hedging,
            calibration: settings.calibration,
            distributed_front: distributed.as_ref().map(|(_, node_id)| node_id.clone()),
        },
    );
    let gateway_state = Arc::new(GatewayState {
        view: Arc::clone(&view),
        ready: AtomicBool::new(false),
        started_at: Instant::now(),
        started_at_ms: unix_ms(SystemTime::now()),
        gateway_address,
        cluster_address,
        cluster_connections: Arc::clone(&membership.connections),
        history_dropped: history.dropped(),
        proxy,
        max_request_body: settings.max_request_body.get() as usize,
        api_keys: GatewayState::digest_keys(&settings.api_keys),
        header_read_timeout: settings.header_read_timeout,
        body_read_timeout: settings.body_read_timeout,
        observer: Arc::clone(&observer),
        history: history_reader,
        shutdown: shutdown.clone(),
        distributed: distributed.map(|(front, _)| front),
        scan,
        mdns,
    });
    {
        let gateway_state = Arc::clone(&gateway_state);
        tasks.spawn(observability::watch_nodes(
            observer,
            move || gateway_state.proxy.in_flight(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(membership::serve(
        cluster_listener,
        membership,
        tasks.clone(),
    ));
    {
        let gateway_state = Arc::clone(&gateway_state);
        let view = Arc::clone(&view);
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            gateway_state
                .proxy
                .probe_open_breakers(view, shutdown)
                .await
        });
    }
    tasks.spawn(gateway::serve(
        gateway_listener,
        Arc::clone(&gateway_state),
        shutdown.clone(),
    ));
    gateway_state.ready.store(true, Ordering::Release);
    tracing::info!(address = %gateway_address, "gateway listening");
    tracing::info!(address = %cluster_address, "cluster port listening");
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
        shutdown,
        tasks,
        history,
    })
}

/// Announces this process over mDNS as `role`, with the port peers reach it on, until `shutdown`.
fn announce(
    config: &Config,
    role: crate::cluster::mdns::Role,
    node_id: &NodeId,
    port: u16,
    has_token: bool,
    serves: Vec<&'static str>,
    shutdown: &CancellationToken,
) -> Result<Arc<crate::cluster::mdns::Mdns>, String> {
    crate::cluster::mdns::Mdns::start(
        &crate::cluster::mdns::Announce {
            role,
            node_id: node_id.to_string(),
            name: config.agent.name.clone(),
            port,
            has_token,
            serves,
        },
        shutdown.clone(),
    )
}

/// Announces the coordinator's cluster port over mDNS, so agents started without `agent.join` find it.
fn announce_coordinator(
    config: &Config,
    cluster_address: SocketAddr,
    shutdown: &CancellationToken,
) -> Result<Arc<crate::cluster::mdns::Mdns>, String> {
    if cluster_address.ip().is_loopback() {
        return Err(format!(
            "not announced: the cluster port ({cluster_address}) is reachable from this machine only"
        ));
    }
    let node_id = NodeId::load_or_create(&config.data_dir).map_err(|error| error.to_string())?;
    announce(
        config,
        crate::cluster::mdns::Role::Coordinator,
        &node_id,
        cluster_address.port(),
        true,
        if config.model_sharding_enabled {
            vec!["gateway", "distributed"]
        } else {
            vec!["gateway"]
        },
        shutdown,
    )
    .inspect_err(|error| tracing::warn!(%error, "no mDNS discovery"))
}

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    pub node_id: NodeId,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), JoinError>>,
}

impl AgentHandle {
    /// Says goodbye to the coordinator and stops.
    pub async fn stop(self, grace: Duration) -> Result<Shutdown, JoinError> {
        self.shutdown.cancel();
        let mut task = self.task;
        match tokio::time::timeout(grace, &mut task).await {
            Ok(Ok(result)) => result.map(|()| Shutdown::Graceful),
            Ok(Err(_)) => Ok(Shutdown::Forced),
            Err(_) => {
                task.abort();
                Ok(Shutdown::Forced)
            }
        }
    }

    /// Stops at once without a goodbye, as a crash would.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Waits until the agent ends by itself (a refusal it cannot recover from) or is stopped.
    pub async fn finished(&mut self) -> Result<(), JoinError> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }
}

/// Starts an agent that joins `join` with `token`, or without an address the coordinator it finds
/// (`discovery.seeds`, mDNS). It announces itself over mDNS when `discovery.mdns` is on.
pub async fn start_agent(
    config: &Config,
    join: impl Into<Option<String>>,
    token: ClusterToken,
) -> Result<AgentHandle, StartError> {
    let join = join.into();
    if join.is_none() && !config.discovery.mdns && config.discovery.seeds.is_empty() {
        return Err(StartError::Usage(
            "no coordinator to join: pass --join HOST:PORT (printed by `sollol up`), set discovery.seeds, or turn discovery.mdns on".to_owned(),
        ));
    }
    identity::ensure_private_dir(&config.data_dir)?;
    let node_id = NodeId::load_or_create(&config.data_dir)?;
    let agent = &config.agent;
    let shutdown = CancellationToken::new();
    let engine_url = start_engine(config, &shutdown).await?;
    let engine_running = engine_url.is_some();
    let models_dir = agent.models_dir.clone();
    let ollama_url = engine_url.or_else(|| agent.ollama_url.clone());
    let mut sampler =
        tokio::task::spawn_blocking(move || Sampler::detect(models_dir, ollama_url.as_deref()))
            .await
            .map_err(|error| StartError::Usage(format!("hardware detection panicked: {error}")))?;
    let stage_listener = bind(config.engine.stage_bind, "stage port").await?;
    let stage_address = local_address(&stage_listener, config.engine.stage_bind);
    sampler.stage_address = Some(stage_address.to_string());
    sampler.memory_limit = config.engine.max_memory;
    tokio::spawn(crate::distributed::stage::serve(
        stage_listener,
        crate::distributed::stage::StageSettings {
            node_id: node_id.to_string(),
            node_name: agent.name.clone(),
            models_dir: agent.models_dir.clone(),
            ollama_store: config.engine.ollama_models.clone(),
            token: token.clone(),
            handshake_timeout: Duration::from_secs(5),
            memory_limit: config.engine.max_memory,
        },
        shutdown.clone(),
    ));
    tracing::info!(%stage_address, "stage port open for distributed inference");
    tracing::debug!(?sampler, "hardware probes");
    let mdns = if config.discovery.mdns {
        announce(
            config,
            crate::cluster::mdns::Role::Agent,
            &node_id,
            stage_address.port(),
            true,
            if engine_running {
                vec!["stage", "engine"]
            } else {
                vec!["stage"]
            },
            &shutdown,
        )
        .inspect_err(|error| tracing::warn!(%error, "no mDNS discovery"))
        .ok()
    } else {
        None
    };
    let coordinator = match join {
        Some(address) => join::Coordinator::Fixed(address),
        None => join::Coordinator::Discover {
            seeds: config.discovery.seeds.clone(),
            mdns,
        },
    };
    let params = JoinParams {
        coordinator,
        token,
        node_id: node_id.clone(),
        node_name: agent.name.clone(),
        heartbeat_interval: agent.heartbeat_interval,
        initial_backoff: agent.reconnect_initial_backoff,
        max_backoff: agent.reconnect_max_backoff,
    };
    let task = tokio::spawn(join::run(params, sampler, shutdown.clone()));
    Ok(AgentHandle {
        node_id,
        shutdown,
        task,
    })
}

/// Serves distributed models through pipelines of agents' stages: an engine whose models compute on the
/// stages, on a loopback port, probed as a node called `distributed` so the gateway routes those
/// models' requests to it like to any Ollama node (and only to it). It serves `distributed.models`, and
/// with `distributed.auto` whatever no node holding it can serve whole ([`crate::distributed::sharding`]).
/// Returns the front and its node id.
async fn start_distributed_front(
    config: &Config,
    token: &ClusterToken,
    view: crate::cluster::SharedView,
    events: mpsc::Sender<crate::cluster::ClusterEvent>,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<(Arc<Front>, String), StartError> {
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
    let listener = bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        "distributed inference front",
    )
    .await?;
    let url = format!(
        "http://{}",
        local_address(&listener, SocketAddr::from(([127, 0, 0, 1], 0)))
    );
    tracing::info!(%url, models = ?config.distributed.models, auto = config.distributed.auto, max_stages, "distributed inference (experimental) serves models through agents' stages");
    tasks.spawn(sollol_engine::server::serve(
        listener,
        engine,
        shutdown.clone(),
    ));
    if config.distributed.auto {
        tasks.spawn(crate::distributed::sharding::watch(
            Arc::clone(&front),
            view,
            config.distributed.models.clone(),
            config.coordinator.probe_interval,
            shutdown.clone(),
        ));
    }
    let node_id = discovery::static_node_id(&url);
    tasks.spawn(discovery::probe_static_nodes(
        vec![(url, Some("distributed".to_owned()))],
        config.coordinator.probe_interval,
        events,
        shutdown.clone(),
    ));
    Ok((front, node_id))
}

/// Starts the built-in engine when the configuration asks for it (or, in `auto`, when there are GGUF
/// models and no Ollama answers); returns the URL of its Ollama-compatible API.
async fn start_engine(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<String>, StartError> {
    use crate::config::EngineMode;
    use sollol_engine::engine::{self, Engine};
    let settings = &config.engine;
    if settings.mode == EngineMode::Off {
        return Ok(None);
    }
    let models_dir = config.agent.models_dir.clone();
    let store = settings.ollama_models.clone();
    let files =
        tokio::task::spawn_blocking(move || engine::discover(&models_dir, store.as_deref()))
            .await
            .map_err(|error| StartError::Usage(format!("model discovery panicked: {error}")))?;
    if settings.mode == EngineMode::Auto {
        let ollama = config
            .agent
            .ollama_url
            .clone()
            .unwrap_or_else(|| crate::telemetry::ollama::DEFAULT_OLLAMA_URL.to_owned());
        let probe = crate::http_client::HttpClient::default()
            .get_json::<serde_json::Value>(&format!("{ollama}/api/version"), Duration::from_secs(1))
            .await;
        if probe.is_ok() {
            tracing::info!(%ollama, "an Ollama answers; the built-in engine stays off (engine.mode = on serves its models anyway)");
            return Ok(None);
        }
        if files.is_empty() {
            tracing::warn!(
                %ollama,
                models_dir = %config.agent.models_dir.display(),
                "no Ollama answers and there is no GGUF model, so this node has nothing to serve: put a .gguf file in the models directory (scripts/fetch-model fetches the test model) or start Ollama"
            );
            return Ok(None);
        }
    }
    if files.is_empty() {
        tracing::warn!(dir = %config.agent.models_dir.display(), "the built-in engine has no models: put GGUF files in the models directory (scripts/fetch-model fetches the test model)");
    }
    let listener = bind(settings.bind, "engine").await?;
    let address = crate::config::loopback_if_unspecified(local_address(&listener, settings.bind));
    let names: Vec<&str> = files.iter().map(|file| file.name.as_str()).collect();
    tracing::info!(%address, models = ?names, "built-in engine serving");
    let engine = std::sync::Arc::new(
        Engine::new(files, settings.parallel.get() as usize, settings.keep_alive)
            .with_max_memory(settings.max_memory),
    );
    tokio::spawn(sollol_engine::server::serve(
        listener,
        engine,
        shutdown.clone(),
    ));
    Ok(Some(format!("http://{address}")))
}

/// An agent without a cluster token cannot join anything; with mDNS on it announces itself (TXT
/// `token=0`), so the coordinators on its LAN list it as discovered, not joined, until it is restarted
/// with the token. Runs until `shutdown`.
pub fn announce_without_token(
    config: &Config,
    shutdown: CancellationToken,
) -> Result<Arc<crate::cluster::mdns::Mdns>, StartError> {
    identity::ensure_private_dir(&config.data_dir)?;
    let node_id = NodeId::load_or_create(&config.data_dir)?;
    announce(
        config,
        crate::cluster::mdns::Role::Agent,
        &node_id,
        config.engine.stage_bind.port(),
        false,
        Vec::new(),
        &shutdown,
    )
    .map_err(StartError::Usage)
}

/// The agent settings `sollol agent` needs: where to join (`None`: find the coordinator) and with which
/// token.
pub fn join_target(config: &Config) -> Result<(Option<String>, ClusterToken), StartError> {
    let address = config.agent.join.clone();
    let token = config.agent.token.as_deref().ok_or_else(|| {
        StartError::Usage("`agent.token` is required: pass --token TOKEN (printed by `sollol up` and `sollol token`)".to_owned())
    })?;
    let token = ClusterToken::parse(token)
        .map_err(|error| StartError::Usage(format!("`agent.token`: {error}")))?;
    Ok((address, token))
}

async fn bind(address: SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind {
            what,
            address,
            source,
        })
}

fn local_address(listener: &TcpListener, requested: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(requested)
}
