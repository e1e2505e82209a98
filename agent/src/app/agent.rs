//! The agent role: its join loop, its stage port for distributed inference and its built-in engine.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Shutdown, StartError, announce, bind, local_address};
use crate::cluster::identity::{self, ClusterToken, NodeId};
use crate::cluster::join::{self, JoinError, JoinParams};
use crate::cluster::mdns::{Mdns, Role};
use crate::config::Config;
use crate::distributed::stage::{self, StageSettings};
use crate::telemetry::Sampler;

/// A running agent: the join loop, and the stage and engine servers on a task tracker.
#[derive(Debug)]
pub struct AgentHandle {
    pub node_id: NodeId,
    shutdown: CancellationToken,
    /// The stage and engine servers.
    servers: TaskTracker,
    join: JoinHandle<Result<(), JoinError>>,
}

impl AgentHandle {
    /// Says goodbye to the coordinator, stops the servers and waits up to `grace` for all of it.
    pub async fn stop(self, grace: Duration) -> Result<Shutdown, JoinError> {
        let deadline = tokio::time::Instant::now() + grace;
        self.shutdown.cancel();
        self.servers.close();
        let mut join = self.join;
        let joined = match tokio::time::timeout_at(deadline, &mut join).await {
            Ok(Ok(result)) => result.map(|()| Shutdown::Graceful),
            Ok(Err(_)) => Ok(Shutdown::Forced),
            Err(_) => {
                join.abort();
                Ok(Shutdown::Forced)
            }
        };
        // The servers stop on the same signal; wait for them whatever the join loop ended with.
        let servers = tokio::time::timeout_at(deadline, self.servers.wait()).await;
        joined.map(|shutdown| {
            if servers.is_ok() {
                shutdown
            } else {
                Shutdown::Forced
            }
        })
    }

    /// Stops at once without a goodbye, as a crash would: the coordinator sees the connection drop,
    /// and the stage and engine ports close.
    pub fn abort(self) {
        self.join.abort();
        self.shutdown.cancel();
    }

    /// Waits until the agent ends by itself (a refusal it cannot recover from) or is stopped.
    pub async fn finished(&mut self) -> Result<(), JoinError> {
        match (&mut self.join).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }
}

/// The coordinators an agent joins (each of them), or none: the agent finds one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JoinAddresses(pub Vec<String>);

impl From<String> for JoinAddresses {
    fn from(address: String) -> Self {
        Self(vec![address])
    }
}

impl From<Option<String>> for JoinAddresses {
    fn from(address: Option<String>) -> Self {
        Self(address.into_iter().collect())
    }
}

impl From<Vec<String>> for JoinAddresses {
    fn from(addresses: Vec<String>) -> Self {
        Self(addresses)
    }
}

/// Starts an agent that joins `join` with `token`, or without an address the coordinator it finds
/// (`discovery.seeds`, mDNS). It announces itself over mDNS when `discovery.mdns` is on.
pub async fn start_agent(
    config: &Config,
    join: impl Into<JoinAddresses>,
    token: ClusterToken,
) -> Result<AgentHandle, StartError> {
    let JoinAddresses(join) = join.into();
    if join.is_empty() && !config.discovery.mdns && config.discovery.seeds.is_empty() {
        return Err(StartError::Usage(
            "no coordinator to join: pass --join HOST:PORT (printed by `sollol up`), set discovery.seeds, or turn discovery.mdns on".to_owned(),
        ));
    }
    identity::ensure_private_dir(&config.data_dir)?;
    let node_id = NodeId::load_or_create(&config.data_dir)?;
    let shutdown = CancellationToken::new();
    let servers = TaskTracker::new();
    let engine_url = super::engine::start(config, &shutdown, &servers).await?;
    let engine_running = engine_url.is_some();
    let models_dir = config.agent.models_dir.clone();
    let ollama_url = engine_url.or_else(|| config.agent.ollama_url.clone());
    let mut sampler =
        tokio::task::spawn_blocking(move || Sampler::detect(models_dir, ollama_url.as_deref()))
            .await
            .map_err(|error| StartError::Usage(format!("hardware detection panicked: {error}")))?;
    // Models copied to this node go into its models dir when the engine serves it, else to its Ollama.
    let install_to = (!engine_running)
        .then(|| config.agent.ollama_url.clone())
        .flatten();
    let stage_port = start_stage(config, install_to, &node_id, &token, &shutdown, &servers).await?;
    sampler.stage_address = Some(stage_port.to_string());
    sampler.memory_limit = config.engine.max_memory;
    tracing::debug!(?sampler, "hardware probes");
    let mdns = config
        .discovery
        .mdns
        .then(|| {
            let serves = if engine_running {
                vec!["stage", "engine"]
            } else {
                vec!["stage"]
            };
            announce(
                config,
                Role::Agent,
                &node_id,
                stage_port.port(),
                true,
                serves,
                &shutdown,
            )
            .inspect_err(|error| tracing::warn!(%error, "no mDNS discovery"))
            .ok()
        })
        .flatten();
    let coordinator = if join.is_empty() {
        join::Coordinator::Discover {
            seeds: config.discovery.seeds.clone(),
            mdns,
        }
    } else {
        join::Coordinator::Fixed(join)
    };
    let params = JoinParams {
        coordinator,
        token,
        node_id: node_id.clone(),
        node_name: config.agent.name.clone(),
        heartbeat_interval: config.agent.heartbeat_interval,
        initial_backoff: config.agent.reconnect_initial_backoff,
        max_backoff: config.agent.reconnect_max_backoff,
    };
    let join = tokio::spawn(join::run(params, sampler, shutdown.clone()));
    Ok(AgentHandle {
        node_id,
        shutdown,
        servers,
        join,
    })
}

/// Opens the stage port, where pipelines of distributed models reach this agent; returns its address.
async fn start_stage(
    config: &Config,
    ollama_url: Option<String>,
    node_id: &NodeId,
    token: &ClusterToken,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<std::net::SocketAddr, StartError> {
    let listener = bind(config.engine.stage_bind, "stage port").await?;
    let address = local_address(&listener, config.engine.stage_bind);
    let settings = StageSettings {
        node_id: node_id.to_string(),
        node_name: config.agent.name.clone(),
        models_dir: config.agent.models_dir.clone(),
        ollama_store: config.engine.ollama_models.clone(),
        ollama_url,
        max_disk: config.engine.max_disk,
        token: token.clone(),
        handshake_timeout: Duration::from_secs(5),
        memory_limit: config.engine.max_memory,
    };
    tasks.spawn(stage::serve(listener, settings, shutdown.clone()));
    tracing::info!(stage_address = %address, "stage port open for distributed inference");
    Ok(address)
}

/// An agent without a cluster token cannot join anything; with mDNS on it announces itself (TXT
/// `token=0`), so the coordinators on its LAN list it as discovered, not joined, until it is restarted
/// with the token. Runs until `shutdown`.
pub fn announce_without_token(
    config: &Config,
    shutdown: CancellationToken,
) -> Result<Arc<Mdns>, StartError> {
    identity::ensure_private_dir(&config.data_dir)?;
    let node_id = NodeId::load_or_create(&config.data_dir)?;
    announce(
        config,
        Role::Agent,
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
pub fn join_target(config: &Config) -> Result<(Vec<String>, ClusterToken), StartError> {
    let address = config.agent.join.clone();
    let token = config.agent.token.as_deref().ok_or_else(|| {
        StartError::Usage("`agent.token` is required: pass --token TOKEN (printed by `sollol up` and `sollol token`)".to_owned())
    })?;
    let token = ClusterToken::parse(token)
        .map_err(|error| StartError::Usage(format!("`agent.token`: {error}")))?;
    Ok((address, token))
}
