//! Stage two's types: the validated, typed configuration, one struct per section, and the loopback
//! helper that turns its bind addresses into addresses to connect to.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

/// Stage two: validated, typed configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub log_level: String,
    pub shutdown_grace: Duration,
    pub model_sharding_enabled: bool,
    pub coordinator_url: String,
    /// The key the client commands send, if any.
    pub api_key: Option<String>,
    pub coordinator: CoordinatorConfig,
    pub agent: AgentConfig,
    pub engine: EngineConfig,
    pub distributed: DistributedConfig,
    pub discovery: DiscoveryConfig,
    pub http: HttpConfig,
    pub cache: CacheConfig,
    pub models: ModelsConfig,
}

/// What the coordinator keeps on the cluster.
#[derive(Clone, Debug, Default)]
pub struct ModelsConfig {
    /// Models and how many copies of each, in the order given.
    pub replicas: Vec<(String, sollol_shared::api::ReplicaCount)>,
}

/// The gateway's response cache (off unless `cache.enabled`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Memory the cached answers may hold, their bookkeeping included.
    pub max_bytes: u64,
    /// How long an answer is served after it was stored.
    pub ttl: Duration,
}

/// What every HTTP server (the gateway, the engine's port) accepts: which pages and host names, how
/// many connections.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub allowed_origins: Vec<String>,
    pub allowed_hosts: Vec<String>,
    pub max_connections: NonZeroU32,
    pub max_connections_per_address: NonZeroU32,
}

/// How the coordinator finds plain Ollama servers by itself.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// Ranges to scan; empty: no scan.
    pub scan: Vec<crate::cluster::scan::Cidr>,
    pub scan_port: u16,
    pub scan_interval: Duration,
    /// Announce and browse over mDNS.
    pub mdns: bool,
    /// Coordinator addresses an agent without `agent.join` tries.
    pub seeds: Vec<String>,
}

/// Which models the coordinator serves split across agents.
#[derive(Clone, Debug)]
pub struct DistributedConfig {
    /// Empty unless `model_sharding_enabled`.
    pub models: Vec<String>,
    /// Distribute models no single node can hold (only with `model_sharding_enabled`).
    pub auto: bool,
    pub max_stages: NonZeroU32,
}

/// Whether the agent serves its GGUF models with the built-in engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineMode {
    Auto,
    On,
    Off,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub mode: EngineMode,
    pub bind: SocketAddr,
    pub parallel: NonZeroU32,
    pub keep_alive: Duration,
    pub ollama_models: Option<PathBuf>,
    pub stage_bind: SocketAddr,
    /// Memory offered to models; `None`: what the node has available.
    pub max_memory: Option<u64>,
    /// Most bytes the model files in the models dir may take (`engine.max_disk`).
    pub max_disk: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub gateway_bind: SocketAddr,
    pub cluster_bind: SocketAddr,
    pub down_after_missed: NonZeroU32,
    pub handshake_timeout: Duration,
    pub max_cluster_connections: NonZeroU32,
    pub event_retention: NonZeroU32,
    pub strategy: sollol_policy::routing::Strategy,
    pub node_slots: NonZeroU32,
    pub node_queue_depth: u32,
    pub queue_capacity: NonZeroU32,
    pub queue_timeout: Duration,
    pub queue_aging: Duration,
    pub max_attempts: NonZeroU32,
    pub response_timeout: Duration,
    pub max_request_body: NonZeroU32,
    pub max_response_body: u64,
    /// Inference keys, then admin keys.
    pub api_keys: Vec<ApiKey>,
    /// Per key and per application; 0: no limit.
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
    pub hedging: bool,
    pub calibration: bool,
    /// Warm-up from history (`coordinator.warmup*`).
    pub warmup: bool,
    pub warmup_window: Duration,
    pub warmup_models: NonZeroU32,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub body_deadline: Duration,
    pub body_memory: u64,
    /// Static Ollama URLs, normalised to `http://HOST:PORT`.
    pub nodes: Vec<String>,
    pub probe_interval: Duration,
    /// Other coordinators' cluster addresses (`HOST:PORT`).
    pub peers: Vec<String>,
    /// The cluster address the other coordinators reach this one at; `None`: derived.
    pub advertise: Option<SocketAddr>,
}

/// One gateway API key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub key: String,
    pub scope: KeyScope,
}

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyScope {
    /// Generate and embed, read the cluster's state (`coordinator.api_keys`).
    Inference,
    /// Also change the cluster: pull, delete, copy, create, push models, plan distributed models
    /// (`coordinator.admin_keys`).
    Admin,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}, <hidden>)", self.name)
    }
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `HOST:PORT` of each coordinator's cluster port; empty: find them.
    pub join: Vec<String>,
    pub token: Option<String>,
    pub name: String,
    pub heartbeat_interval: Duration,
    /// `None`: probe the default address and report Ollama only when it answers.
    pub ollama_url: Option<String>,
    pub models_dir: PathBuf,
    pub reconnect_initial_backoff: Duration,
    pub reconnect_max_backoff: Duration,
}

/// 127.0.0.1 (or ::1) in place of an unspecified bind address, for connecting to a local listener.
pub fn loopback_if_unspecified(address: SocketAddr) -> SocketAddr {
    let mut address = address;
    if address.ip().is_unspecified() {
        address.set_ip(match address {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    address
}

impl Config {
    /// The configuration every coordinator of one cluster must share, as (section, canonical text):
    /// coordinators compare these (as keyed digests) before they form a group, and refuse each other
    /// naming the sections that differ.
    pub fn shared_sections(&self) -> Vec<(&'static str, String)> {
        let sorted = |mut items: Vec<String>| {
            items.sort();
            items.dedup();
            items.join("\n")
        };
        let keys = self
            .coordinator
            .api_keys
            .iter()
            .map(|key| format!("{:?} {} {}", key.scope, key.name, key.key))
            .collect();
        let replicas = self
            .models
            .replicas
            .iter()
            .map(|(model, count)| format!("{model} {count:?}"))
            .collect();
        let distributed = format!(
            "{} {:?} {} {}",
            self.model_sharding_enabled,
            self.distributed.models,
            self.distributed.auto,
            self.distributed.max_stages
        );
        vec![
            ("coordinator.api_keys", sorted(keys)),
            ("coordinator.nodes", sorted(self.coordinator.nodes.clone())),
            (
                "discovery.scan",
                sorted(
                    self.discovery
                        .scan
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                ),
            ),
            ("models.replicas", sorted(replicas)),
            ("distributed", distributed),
        ]
    }
}
