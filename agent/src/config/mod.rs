//! Configuration in two stages: raw string values layered from defaults < file < env < CLI, then validated into typed [`Config`].
//!
//! Every key lives in [`KEYS`], which names its environment variable, default
//! and meaning; `docs/configuration.md` is checked against that table by a
//! test. This module reads files only when told where; it never reads the
//! process environment itself (callers pass the environment in), so tests
//! build configurations from maps.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One configuration key.
#[derive(Debug)]
pub struct KeySpec {
    /// Dotted name, as written in the TOML file (`section.key`).
    pub key: &'static str,
    pub env: &'static str,
    /// The default as text; `None` means unset unless derived (see `doc`).
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

/// Every key sollol accepts.
pub const KEYS: &[KeySpec] = &[
    KeySpec {
        key: "data_dir",
        env: "SOLLOL_DATA_DIR",
        default: None,
        doc: "Directory for the cluster token, the node id and the coordinator's SQLite history. Default: the platform data directory plus `sollol` (`~/.local/share/sollol` on Linux).",
    },
    KeySpec {
        key: "log_level",
        env: "SOLLOL_LOG",
        default: Some("info"),
        doc: "Log filter in `tracing` syntax, e.g. `info` or `sollol=debug,info`. Logs go to standard error.",
    },
    KeySpec {
        key: "shutdown_grace",
        env: "SOLLOL_SHUTDOWN_GRACE",
        default: Some("5s"),
        doc: "How long a shutdown waits for connections and the history writer to finish before it is forced.",
    },
    KeySpec {
        key: "model_sharding_enabled",
        env: "SOLLOL_MODEL_SHARDING_ENABLED",
        default: Some("false"),
        doc: "Distributed inference (experimental): when true, the coordinator serves the models in `distributed.models` through a pipeline of agents' stages, each holding a contiguous range of the model's layers. The name is SOLLOL's.",
    },
    KeySpec {
        key: "coordinator_url",
        env: "SOLLOL_COORDINATOR_URL",
        default: None,
        doc: "Where `sollol status` and `sollol nodes` find the coordinator's HTTP API. Default: `http://` plus `coordinator.gateway_bind`, with an unspecified address replaced by 127.0.0.1.",
    },
    KeySpec {
        key: "coordinator.gateway_bind",
        env: "SOLLOL_GATEWAY_BIND",
        default: Some("127.0.0.1:11435"),
        doc: "Address of the HTTP gateway (Ollama-compatible API, sollol API, health). Loopback by default: exposing it is an explicit choice.",
    },
    KeySpec {
        key: "coordinator.cluster_bind",
        env: "SOLLOL_CLUSTER_BIND",
        default: Some("0.0.0.0:11436"),
        doc: "Address agents join on. Every connection must prove it holds the cluster token before it is accepted.",
    },
    KeySpec {
        key: "coordinator.down_after_missed",
        env: "SOLLOL_DOWN_AFTER_MISSED",
        default: Some("3"),
        doc: "A node is `down` after this many heartbeat intervals without a report (it is `suspect` after one and a half).",
    },
    KeySpec {
        key: "coordinator.handshake_timeout",
        env: "SOLLOL_HANDSHAKE_TIMEOUT",
        default: Some("5s"),
        doc: "A connection on the cluster port that has not finished the handshake by then is refused and closed.",
    },
    KeySpec {
        key: "coordinator.max_cluster_connections",
        env: "SOLLOL_MAX_CLUSTER_CONNECTIONS",
        default: Some("1024"),
        doc: "Connections on the cluster port beyond this many are closed at once.",
    },
    KeySpec {
        key: "coordinator.event_retention",
        env: "SOLLOL_EVENT_RETENTION",
        default: Some("10000"),
        doc: "How many node events (joined, up, suspect, down, left) the SQLite history keeps; older ones are deleted.",
    },
    KeySpec {
        key: "coordinator.nodes",
        env: "SOLLOL_NODES",
        default: None,
        doc: "Plain Ollama servers without an agent, comma-separated (or a TOML list) `http://HOST:PORT` URLs. The coordinator probes each (`/api/version`, `/api/tags`, `/api/ps`) every `coordinator.probe_interval` and routes to it like any node. Default: none.",
    },
    KeySpec {
        key: "coordinator.probe_interval",
        env: "SOLLOL_PROBE_INTERVAL",
        default: Some("2s"),
        doc: "How often the coordinator probes the static `coordinator.nodes`; they are `down` after `down_after_missed` failed probes.",
    },
    KeySpec {
        key: "coordinator.strategy",
        env: "SOLLOL_STRATEGY",
        default: Some("intelligent"),
        doc: "Default routing strategy: `intelligent`, `round_robin`, `least_loaded`, `latency_first`, `fairness` or `random`. A request can pick another with the `X-Sollol-Strategy` header.",
    },
    KeySpec {
        key: "coordinator.node_slots",
        env: "SOLLOL_NODE_SLOTS",
        default: Some("1"),
        doc: "Requests routing assumes each node runs at once (match Ollama's `OLLAMA_NUM_PARALLEL`); more wait in the node's queue.",
    },
    KeySpec {
        key: "coordinator.node_queue_depth",
        env: "SOLLOL_NODE_QUEUE_DEPTH",
        default: Some("2"),
        doc: "Requests the gateway lets wait in a node's own queue beyond its slots. When every node with the model has `node_slots + node_queue_depth` in flight, new requests wait in the gateway's priority queue instead.",
    },
    KeySpec {
        key: "coordinator.queue_capacity",
        env: "SOLLOL_QUEUE_CAPACITY",
        default: Some("256"),
        doc: "Requests that may wait in the gateway's priority queue; beyond it requests get HTTP 429 with `Retry-After`.",
    },
    KeySpec {
        key: "coordinator.queue_timeout",
        env: "SOLLOL_QUEUE_TIMEOUT",
        default: Some("30s"),
        doc: "How long a request may wait in the priority queue before it gets HTTP 503.",
    },
    KeySpec {
        key: "coordinator.queue_aging",
        env: "SOLLOL_QUEUE_AGING",
        default: Some("3s"),
        doc: "Waiting this long raises a queued request's priority by one level (priorities are 1–10 from `X-Sollol-Priority`, default 5), so low priorities never starve.",
    },
    KeySpec {
        key: "coordinator.hedging",
        env: "SOLLOL_HEDGING",
        default: Some("true"),
        doc: "Hedge slow requests: when the chosen node has not answered after three times its learned time to first token (streaming) or twice its predicted time (non-streaming), and the next node has a free slot, send the same request there too; the first answer wins and the other is cancelled.",
    },
    KeySpec {
        key: "coordinator.calibration",
        env: "SOLLOL_CALIBRATION",
        default: Some("true"),
        doc: "Measure idle nodes that were never measured with a model by sending them a short generation of the gateway's own (8 tokens, `/api/generate`), at most once per node and model every 10 minutes, so no client request pays for trying an unknown node. It loads the model on that node.",
    },
    KeySpec {
        key: "coordinator.max_attempts",
        env: "SOLLOL_MAX_ATTEMPTS",
        default: Some("3"),
        doc: "Different nodes a request is tried on at most when nodes fail before answering.",
    },
    KeySpec {
        key: "coordinator.response_timeout",
        env: "SOLLOL_RESPONSE_TIMEOUT",
        default: Some("300s"),
        doc: "How long a node may take to start answering (its response headers, which include a cold model load) before the next node is tried.",
    },
    KeySpec {
        key: "coordinator.header_read_timeout",
        env: "SOLLOL_HEADER_READ_TIMEOUT",
        default: Some("30s"),
        doc: "A client that takes longer than this to send a request's headers (an idle or slowloris connection) is disconnected.",
    },
    KeySpec {
        key: "coordinator.body_read_timeout",
        env: "SOLLOL_BODY_READ_TIMEOUT",
        default: Some("30s"),
        doc: "A request body that stops arriving for this long (a stalled or trickling upload) is abandoned with HTTP 408.",
    },
    KeySpec {
        key: "coordinator.max_request_body",
        env: "SOLLOL_MAX_REQUEST_BODY",
        default: Some("33554432"),
        doc: "Largest request body in bytes (default 32 MiB); larger ones get HTTP 413.",
    },
    KeySpec {
        key: "coordinator.api_keys",
        env: "SOLLOL_API_KEYS",
        default: None,
        doc: "API keys for the gateway, comma-separated (or a TOML list), each `NAME=KEY` or a bare `KEY` (at least 16 characters). When set, every route except `GET /`, `/healthz`, `/readyz` and the dashboard's files needs `Authorization: Bearer KEY` or `X-API-Key: KEY`; the key's name attributes requests to an application. Default: none (open).",
    },
    KeySpec {
        key: "agent.join",
        env: "SOLLOL_JOIN",
        default: None,
        doc: "The coordinator's cluster address, `HOST:PORT`. Without it `sollol agent` joins the coordinator it finds over mDNS (`discovery.mdns`) or through `discovery.seeds` that proves it holds the same token; `sollol up` joins its own coordinator.",
    },
    KeySpec {
        key: "agent.token",
        env: "SOLLOL_TOKEN",
        default: None,
        doc: "The cluster token printed by `sollol up` and `sollol token`. Required by `sollol agent` to join; without it (and with `discovery.mdns` on) the agent only announces itself and waits, listed by the coordinator as discovered, not joined. Never printed by `print-config`.",
    },
    KeySpec {
        key: "agent.name",
        env: "SOLLOL_NODE_NAME",
        default: None,
        doc: "Name shown for this node. Default: the host name.",
    },
    KeySpec {
        key: "agent.heartbeat_interval",
        env: "SOLLOL_HEARTBEAT_INTERVAL",
        default: Some("2s"),
        doc: "How often the agent samples its hardware and Ollama state and reports to the coordinator (100ms to 10m).",
    },
    KeySpec {
        key: "agent.ollama_url",
        env: "SOLLOL_OLLAMA_URL",
        default: None,
        doc: "The node's Ollama server (`http://HOST:PORT`). Default: http://127.0.0.1:11434, reported only when it answers.",
    },
    KeySpec {
        key: "agent.models_dir",
        env: "SOLLOL_MODELS_DIR",
        default: None,
        doc: "Directory for GGUF models; its file system's free space is reported. Default: `models` inside `data_dir`.",
    },
    KeySpec {
        key: "agent.reconnect_initial_backoff",
        env: "SOLLOL_RECONNECT_INITIAL_BACKOFF",
        default: Some("500ms"),
        doc: "First delay before the agent reconnects to a lost coordinator; it doubles on every failure.",
    },
    KeySpec {
        key: "agent.reconnect_max_backoff",
        env: "SOLLOL_RECONNECT_MAX_BACKOFF",
        default: Some("30s"),
        doc: "Cap of the reconnect delay. Each delay is drawn between half the current step and the step (jitter).",
    },
    KeySpec {
        key: "engine.mode",
        env: "SOLLOL_ENGINE",
        default: Some("auto"),
        doc: "The built-in engine: `auto` serves the GGUF models found when no Ollama answers at `agent.ollama_url`; `on` always serves them (instead of Ollama); `off` never.",
    },
    KeySpec {
        key: "engine.bind",
        env: "SOLLOL_ENGINE_BIND",
        default: Some("127.0.0.1:0"),
        doc: "Address of the engine's Ollama-compatible API (port 0: any free port). Use e.g. `0.0.0.0:11437` when the coordinator runs on another machine.",
    },
    KeySpec {
        key: "engine.parallel",
        env: "SOLLOL_ENGINE_PARALLEL",
        default: Some("1"),
        doc: "Sequences the engine generates at once; more requests wait (Ollama's `OLLAMA_NUM_PARALLEL`).",
    },
    KeySpec {
        key: "engine.keep_alive",
        env: "SOLLOL_ENGINE_KEEP_ALIVE",
        default: Some("5m"),
        doc: "How long a model stays loaded after its last request, unless the request's `keep_alive` says otherwise.",
    },
    KeySpec {
        key: "engine.ollama_models",
        env: "SOLLOL_OLLAMA_MODELS",
        default: None,
        doc: "Ollama's model store, whose downloaded GGUF models the engine can serve too. Default: `~/.ollama/models` when it exists.",
    },
    KeySpec {
        key: "engine.stage_bind",
        env: "SOLLOL_STAGE_BIND",
        default: Some("127.0.0.1:0"),
        doc: "Address of the agent's stage port, where the coordinator and other stages reach it for distributed inference (layer protocol, cluster token required; port 0: any free port). Use e.g. `0.0.0.0:7703` when other machines take part.",
    },
    KeySpec {
        key: "engine.max_memory",
        env: "SOLLOL_ENGINE_MAX_MEMORY",
        default: None,
        doc: "Most memory the agent offers to models (bytes, or with a unit: `512MiB`, `6GiB`, `8GB`): the engine does not load a model larger than this whole, a stage plans its layers within it, and the coordinator counts only this much of the node when deciding whether a model fits on one node. Default: whatever the node has available.",
    },
    KeySpec {
        key: "distributed.models",
        env: "SOLLOL_DISTRIBUTED_MODELS",
        default: None,
        doc: "Models (`name:tag`, comma-separated or a TOML list) the coordinator serves split across agents when `model_sharding_enabled` is true. At least one agent needs a copy of the GGUF; the others fetch just their part's tensors from it (every copy must be the same file). Default: none.",
    },
    KeySpec {
        key: "distributed.auto",
        env: "SOLLOL_DISTRIBUTED_AUTO",
        default: Some("true"),
        doc: "With `model_sharding_enabled`: also distribute, automatically, every model an agent holds that no single up node has the memory for (its file size plus 10%, against the node's available memory or `engine.max_memory`), as long as the agents with stage ports have enough between them. Such a model is served only through its stages.",
    },
    KeySpec {
        key: "distributed.max_stages",
        env: "SOLLOL_DISTRIBUTED_MAX_STAGES",
        default: Some("2"),
        doc: "Most agents one distributed model is split over (those with the most free memory that hold the model).",
    },
    KeySpec {
        key: "discovery.scan",
        env: "SOLLOL_DISCOVERY_SCAN",
        default: None,
        doc: "IPv4 ranges (CIDR, comma-separated or a TOML list, each /16 or smaller) the coordinator scans for plain Ollama servers: every address on `discovery.scan_port`, 64 at a time, 0.4 s to connect; what answers `/api/version` as Ollama joins the routing like `coordinator.nodes`, the rest is listed by `sollol discover`. Off by default: scan only networks you run.",
    },
    KeySpec {
        key: "discovery.scan_port",
        env: "SOLLOL_DISCOVERY_SCAN_PORT",
        default: Some("11434"),
        doc: "The port `discovery.scan` tries on every address.",
    },
    KeySpec {
        key: "discovery.scan_interval",
        env: "SOLLOL_DISCOVERY_SCAN_INTERVAL",
        default: Some("5m"),
        doc: "How often `discovery.scan` scans its ranges again (servers found are probed every `coordinator.probe_interval` in between).",
    },
    KeySpec {
        key: "discovery.mdns",
        env: "SOLLOL_MDNS",
        default: Some("true"),
        doc: "Announce this process over multicast DNS as a DNS-SD service `_sollol._tcp` (TXT: node id, name, role and roles, version) on every IPv4 interface but loopback, and browse for the others: the coordinator lists the agents it sees (`sollol discover`), and an agent without `agent.join` joins the coordinator it finds, if the coordinator proves it holds the same token. Turn off on networks where announcing is unwelcome.",
    },
    KeySpec {
        key: "discovery.seeds",
        env: "SOLLOL_SEEDS",
        default: None,
        doc: "Coordinator cluster addresses (`HOST:PORT`, comma-separated or a TOML list; names are resolved again at every attempt) that an agent without `agent.join` tries besides what mDNS finds: for routed networks, VPNs and VLANs where multicast does not pass.",
    },
];

/// Where a raw value came from, for error messages and `print-config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(&'static str),
    Cli,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(name) => write!(f, "env {name}"),
            Self::Cli => f.write_str("command line"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", .path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {} is not valid TOML: {message}", .path.display())]
    ParseFile { path: PathBuf, message: String },
    #[error("unknown key `{key}` in config file {}", .path.display())]
    UnknownKey { key: String, path: PathBuf },
    #[error("invalid value {value:?} for `{key}` (from {origin}): {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        origin: Source,
        reason: String,
    },
    #[error("`{key}` is required: {hint}")]
    Missing {
        key: &'static str,
        hint: &'static str,
    },
}

/// What to layer, in order of increasing precedence after the defaults.
#[derive(Debug, Default)]
pub struct ConfigSources {
    /// The config file; `explicit` makes a missing file an error.
    pub file: Option<PathBuf>,
    pub file_is_explicit: bool,
    /// The process environment (only `SOLLOL_*` variables matter).
    pub env: BTreeMap<String, String>,
    /// Values given on the command line, by key.
    pub cli: Vec<(&'static str, String)>,
}

/// Stage one: every key's text and where it came from.
#[derive(Clone, Debug)]
pub struct RawConfig {
    values: BTreeMap<&'static str, (String, Source)>,
}

impl RawConfig {
    pub fn load(sources: &ConfigSources) -> Result<Self, ConfigError> {
        let mut values = BTreeMap::new();
        for spec in KEYS {
            if let Some(default) = spec.default {
                values.insert(spec.key, (default.to_owned(), Source::Default));
            }
        }
        if let Some(path) = &sources.file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for (key, value) in parse_file(path, &text)? {
                        values.insert(key, (value, Source::File(path.clone())));
                    }
                }
                Err(error)
                    if error.kind() == std::io::ErrorKind::NotFound
                        && !sources.file_is_explicit => {}
                Err(source) => {
                    return Err(ConfigError::ReadFile {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        for spec in KEYS {
            if let Some(value) = sources.env.get(spec.env) {
                values.insert(spec.key, (value.clone(), Source::Env(spec.env)));
            }
        }
        for (key, value) in &sources.cli {
            let spec = spec_of(key);
            values.insert(spec.key, (value.clone(), Source::Cli));
        }
        Ok(Self { values })
    }

    pub fn get(&self, key: &str) -> Option<(&str, &Source)> {
        self.values
            .get(key)
            .map(|(value, source)| (value.as_str(), source))
    }

    /// The effective configuration as TOML, with each value's source; the token is masked.
    /// Keys left unset show the value derived for them in `config`, as comments.
    pub fn to_toml(&self, config: &Config) -> String {
        let mut out = String::from("# Effective sollol configuration (value  # source)\n");
        let mut section = "";
        for spec in KEYS {
            let (table, name) = spec.key.split_once('.').unwrap_or(("", spec.key));
            if table != section {
                out.push_str(&format!("\n[{table}]\n"));
                section = table;
            }
            match self.values.get(spec.key) {
                Some((value, source)) => {
                    let shown = if spec.key == "agent.token" || spec.key == "coordinator.api_keys" {
                        "<set, hidden>".to_owned()
                    } else {
                        value.clone()
                    };
                    out.push_str(&format!("{name} = {}  # {source}\n", toml_literal(&shown)));
                }
                None => match derived_value(config, spec.key) {
                    Some(value) => {
                        out.push_str(&format!("# {name} = {}  # derived\n", toml_literal(&value)))
                    }
                    None => out.push_str(&format!("# {name} is unset\n")),
                },
            }
        }
        out
    }
}

/// Stage two: validated, typed configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub log_level: String,
    pub shutdown_grace: Duration,
    pub model_sharding_enabled: bool,
    pub coordinator_url: String,
    pub coordinator: CoordinatorConfig,
    pub agent: AgentConfig,
    pub engine: EngineConfig,
    pub distributed: DistributedConfig,
    pub discovery: DiscoveryConfig,
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
    pub api_keys: Vec<ApiKey>,
    pub hedging: bool,
    pub calibration: bool,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    /// Static Ollama URLs, normalised to `http://HOST:PORT`.
    pub nodes: Vec<String>,
    pub probe_interval: Duration,
}

/// One gateway API key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub key: String,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}, <hidden>)", self.name)
    }
}

/// The entries of a comma-separated list (a TOML list arrives joined with commas), trimmed, empty ones
/// skipped.
fn list_items(text: &str) -> impl Iterator<Item = &str> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.trim()
        .parse::<u16>()
        .ok()
        .filter(|port| *port > 0)
        .ok_or_else(|| "must be a port number, 1 to 65535".to_owned())
}

/// A coordinator's cluster address as `HOST:PORT`; the host is resolved when it is used.
fn parse_seed(seed: &str) -> Result<String, String> {
    match seed.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && parse_port(port).is_ok() => Ok(seed.to_owned()),
        _ => Err(format!(
            "{seed:?} is not HOST:PORT (the coordinator's cluster address, e.g. coordinator.lan:11436)"
        )),
    }
}

fn parse_api_keys(text: &str) -> Result<Vec<ApiKey>, String> {
    list_items(text)
        .enumerate()
        .map(|(index, entry)| {
            let (name, key) = match entry.split_once('=') {
                Some((name, key)) => (name.trim().to_owned(), key.trim().to_owned()),
                None => (format!("key-{}", index + 1), entry.to_owned()),
            };
            if key.len() < 16 || !key.chars().all(|c| c.is_ascii_graphic()) {
                return Err(format!(
                    "key {} must be at least 16 printable characters without spaces",
                    index + 1
                ));
            }
            if name.is_empty() || name.len() > 64 {
                return Err(format!(
                    "key {} needs a name of 1 to 64 characters",
                    index + 1
                ));
            }
            Ok(ApiKey { name, key })
        })
        .collect()
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `HOST:PORT` of the coordinator's cluster port.
    pub join: Option<String>,
    pub token: Option<String>,
    pub name: String,
    pub heartbeat_interval: Duration,
    /// `None`: probe the default address and report Ollama only when it answers.
    pub ollama_url: Option<String>,
    pub models_dir: PathBuf,
    pub reconnect_initial_backoff: Duration,
    pub reconnect_max_backoff: Duration,
}

impl TryFrom<&RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: &RawConfig) -> Result<Self, ConfigError> {
        let reader = Reader { raw };
        let data_dir = match reader.text("data_dir") {
            Some(text) => PathBuf::from(reader.non_empty("data_dir", text)?),
            None => dirs::data_dir()
                .or_else(|| dirs::home_dir().map(|home| home.join(".local/share")))
                .unwrap_or_else(|| PathBuf::from("."))
                .join("sollol"),
        };
        let gateway_bind = reader.parse("coordinator.gateway_bind", parse_socket_addr)?;
        let coordinator_url = match reader.text("coordinator_url") {
            Some(text) => reader.parse_text("coordinator_url", text, parse_http_url)?,
            None => format!("http://{}", loopback_if_unspecified(gateway_bind)),
        };
        let coordinator = CoordinatorConfig {
            gateway_bind,
            cluster_bind: reader.parse("coordinator.cluster_bind", parse_socket_addr)?,
            down_after_missed: reader.parse("coordinator.down_after_missed", parse_non_zero)?,
            handshake_timeout: reader.parse("coordinator.handshake_timeout", parse_duration)?,
            max_cluster_connections: reader
                .parse("coordinator.max_cluster_connections", parse_non_zero)?,
            event_retention: reader.parse("coordinator.event_retention", parse_non_zero)?,
            strategy: reader.parse("coordinator.strategy", |text| {
                sollol_policy::routing::Strategy::parse(text).ok_or_else(|| {
                    "expected intelligent, round_robin, least_loaded, latency_first, fairness or random".to_owned()
                })
            })?,
            node_slots: reader.parse("coordinator.node_slots", parse_non_zero)?,
            node_queue_depth: reader.parse("coordinator.node_queue_depth", |text| {
                text.parse::<u32>().map_err(|_| "expected a whole number".to_owned())
            })?,
            queue_capacity: reader.parse("coordinator.queue_capacity", parse_non_zero)?,
            queue_timeout: reader.parse("coordinator.queue_timeout", parse_positive_duration)?,
            queue_aging: reader.parse("coordinator.queue_aging", parse_positive_duration)?,
            max_attempts: reader.parse("coordinator.max_attempts", parse_non_zero)?,
            response_timeout: reader.parse("coordinator.response_timeout", parse_positive_duration)?,
            max_request_body: reader.parse("coordinator.max_request_body", parse_non_zero)?,
            api_keys: reader
                .optional("coordinator.api_keys", parse_api_keys)?
                .unwrap_or_default(),
            hedging: reader.parse("coordinator.hedging", parse_bool)?,
            calibration: reader.parse("coordinator.calibration", parse_bool)?,
            header_read_timeout: reader.parse("coordinator.header_read_timeout", parse_positive_duration)?,
            body_read_timeout: reader.parse("coordinator.body_read_timeout", parse_positive_duration)?,
            nodes: reader
                .optional("coordinator.nodes", |text| {
                    list_items(text).map(parse_http_url).collect()
                })?
                .unwrap_or_default(),
            probe_interval: reader.parse("coordinator.probe_interval", |text| {
                let interval = parse_duration(text)?;
                if interval < Duration::from_millis(100) {
                    return Err("must be at least 100ms".to_owned());
                }
                Ok(interval)
            })?,
        };
        let heartbeat_interval = reader.parse("agent.heartbeat_interval", |text| {
            let interval = parse_duration(text)?;
            if interval < Duration::from_millis(100) || interval > Duration::from_secs(600) {
                return Err("must be between 100ms and 10m".to_owned());
            }
            Ok(interval)
        })?;
        let reconnect_initial_backoff =
            reader.parse("agent.reconnect_initial_backoff", parse_positive_duration)?;
        let reconnect_max_backoff =
            reader.parse("agent.reconnect_max_backoff", parse_positive_duration)?;
        if reconnect_max_backoff < reconnect_initial_backoff {
            let (value, origin) = raw
                .get("agent.reconnect_max_backoff")
                .map(|(value, source)| (value.to_owned(), source.clone()))
                .unwrap_or((String::new(), Source::Default));
            return Err(ConfigError::Invalid {
                key: "agent.reconnect_max_backoff",
                value,
                origin,
                reason: "must not be smaller than agent.reconnect_initial_backoff".to_owned(),
            });
        }
        let agent = AgentConfig {
            join: reader.optional("agent.join", |text| {
                parse_host_port(text).map(|()| text.to_owned())
            })?,
            token: reader.optional("agent.token", |text| {
                crate::cluster::identity::ClusterToken::parse(text)
                    .map(|token| token.expose().to_owned())
                    .map_err(|error| error.to_string())
            })?,
            name: match reader.text("agent.name") {
                Some(text) => reader.parse_text("agent.name", text, parse_node_name)?,
                None => crate::cluster::identity::host_name(),
            },
            heartbeat_interval,
            ollama_url: reader.optional("agent.ollama_url", parse_http_url)?,
            models_dir: match reader.text("agent.models_dir") {
                Some(text) => PathBuf::from(reader.non_empty("agent.models_dir", text)?),
                None => data_dir.join("models"),
            },
            reconnect_initial_backoff,
            reconnect_max_backoff,
        };
        let engine = EngineConfig {
            mode: reader.parse("engine.mode", |text| match text.trim() {
                "auto" => Ok(EngineMode::Auto),
                "on" => Ok(EngineMode::On),
                "off" => Ok(EngineMode::Off),
                _ => Err("must be auto, on or off".to_owned()),
            })?,
            bind: reader.parse("engine.bind", parse_socket_addr)?,
            parallel: reader.parse("engine.parallel", parse_non_zero)?,
            keep_alive: reader.parse("engine.keep_alive", parse_duration)?,
            ollama_models: match reader.text("engine.ollama_models") {
                Some(text) => Some(PathBuf::from(
                    reader.non_empty("engine.ollama_models", text)?,
                )),
                None => dirs::home_dir()
                    .map(|home| home.join(".ollama/models"))
                    .filter(|store| store.is_dir()),
            },
            stage_bind: reader.parse("engine.stage_bind", parse_socket_addr)?,
            max_memory: reader.optional("engine.max_memory", parse_bytes)?,
        };
        let model_sharding_enabled = reader.parse("model_sharding_enabled", parse_bool)?;
        let distributed = DistributedConfig {
            models: reader
                .optional("distributed.models", |text| {
                    Ok(list_items(text)
                        .map(sollol_shared::model_name::normalize)
                        .collect::<Vec<_>>())
                })?
                .unwrap_or_default()
                .into_iter()
                .filter(|_| model_sharding_enabled)
                .collect(),
            auto: model_sharding_enabled && reader.parse("distributed.auto", parse_bool)?,
            max_stages: reader.parse("distributed.max_stages", parse_non_zero)?,
        };
        let discovery = DiscoveryConfig {
            scan: reader
                .optional("discovery.scan", |text| {
                    list_items(text).map(str::parse).collect()
                })?
                .unwrap_or_default(),
            scan_port: reader.parse("discovery.scan_port", parse_port)?,
            scan_interval: reader.parse("discovery.scan_interval", parse_positive_duration)?,
            mdns: reader.parse("discovery.mdns", parse_bool)?,
            seeds: reader
                .optional("discovery.seeds", |text| {
                    list_items(text).map(parse_seed).collect()
                })?
                .unwrap_or_default(),
        };
        Ok(Self {
            shutdown_grace: reader.parse("shutdown_grace", parse_duration)?,
            log_level: reader.parse("log_level", |text| {
                if text.trim().is_empty() {
                    Err("must not be empty".to_owned())
                } else {
                    Ok(text.to_owned())
                }
            })?,
            model_sharding_enabled,
            coordinator_url,
            data_dir,
            coordinator,
            agent,
            engine,
            distributed,
            discovery,
        })
    }
}

impl Config {
    /// Builds a configuration from key/value pairs over the defaults, as tests and embedders do.
    pub fn from_pairs(pairs: &[(&'static str, &str)]) -> Result<Self, ConfigError> {
        let sources = ConfigSources {
            cli: pairs
                .iter()
                .map(|(key, value)| (*key, (*value).to_owned()))
                .collect(),
            ..ConfigSources::default()
        };
        Self::try_from(&RawConfig::load(&sources)?)
    }
}

/// The default config file: `config.toml` in the platform config directory.
pub fn default_config_file() -> Option<PathBuf> {
    dirs::config_dir().map(|dir| dir.join("sollol").join("config.toml"))
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

/// What an unset key resolves to, for `print-config`.
fn derived_value(config: &Config, key: &str) -> Option<String> {
    match key {
        "data_dir" => Some(config.data_dir.display().to_string()),
        "coordinator_url" => Some(config.coordinator_url.clone()),
        "agent.name" => Some(config.agent.name.clone()),
        "agent.models_dir" => Some(config.agent.models_dir.display().to_string()),
        "agent.ollama_url" => Some(crate::telemetry::ollama::DEFAULT_OLLAMA_URL.to_owned()),
        _ => None,
    }
}

fn spec_of(key: &str) -> &'static KeySpec {
    KEYS.iter()
        .find(|spec| spec.key == key)
        .unwrap_or_else(|| panic!("configuration key `{key}` is not in KEYS"))
}

struct Reader<'a> {
    raw: &'a RawConfig,
}

impl Reader<'_> {
    fn text(&self, key: &'static str) -> Option<&str> {
        self.raw.get(key).map(|(value, _)| value)
    }

    fn error(&self, key: &'static str, reason: String) -> ConfigError {
        let (value, source) = self
            .raw
            .get(key)
            .map(|(value, source)| (value.to_owned(), source.clone()))
            .unwrap_or((String::new(), Source::Default));
        ConfigError::Invalid {
            key,
            value,
            origin: source,
            reason,
        }
    }

    fn parse_text<T>(
        &self,
        key: &'static str,
        text: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        parse(text.trim()).map_err(|reason| self.error(key, reason))
    }

    fn parse<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let text = self.text(key).unwrap_or_default();
        self.parse_text(key, text, parse)
    }

    fn optional<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.text(key) {
            None => Ok(None),
            Some(text) if text.trim().is_empty() => Ok(None),
            Some(text) => self.parse_text(key, text, parse).map(Some),
        }
    }

    fn non_empty<'t>(&self, key: &'static str, text: &'t str) -> Result<&'t str, ConfigError> {
        if text.trim().is_empty() {
            Err(self.error(key, "must not be empty".to_owned()))
        } else {
            Ok(text)
        }
    }
}

fn parse_file(path: &Path, text: &str) -> Result<Vec<(&'static str, String)>, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|error| ConfigError::ParseFile {
        path: path.to_owned(),
        message: error.to_string(),
    })?;
    let mut pairs = Vec::new();
    let mut push = |key: String, value: &toml::Value| -> Result<(), ConfigError> {
        let spec =
            KEYS.iter()
                .find(|spec| spec.key == key)
                .ok_or_else(|| ConfigError::UnknownKey {
                    key: key.clone(),
                    path: path.to_owned(),
                })?;
        let text = match value {
            toml::Value::String(text) => text.clone(),
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Float(number) => number.to_string(),
            toml::Value::Boolean(flag) => flag.to_string(),
            toml::Value::Array(items) if items.iter().all(toml::Value::is_str) => items
                .iter()
                .filter_map(toml::Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            other => {
                return Err(ConfigError::Invalid {
                    key: spec.key,
                    value: other.to_string(),
                    origin: Source::File(path.to_owned()),
                    reason: "expected a string, number, boolean or list of strings".to_owned(),
                });
            }
        };
        pairs.push((spec.key, text));
        Ok(())
    };
    for (name, value) in &table {
        match value {
            toml::Value::Table(section) => {
                for (inner, value) in section {
                    push(format!("{name}.{inner}"), value)?;
                }
            }
            value => push(name.clone(), value)?,
        }
    }
    Ok(pairs)
}

fn toml_literal(text: &str) -> String {
    if text == "true" || text == "false" || (!text.is_empty() && text.parse::<i64>().is_ok()) {
        text.to_owned()
    } else {
        toml::Value::String(text.to_owned()).to_string()
    }
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| "expected IP:PORT, e.g. 127.0.0.1:11435 or [::1]:11435".to_owned())
}

/// Accepts `HOST:PORT` where HOST is a name or an IP address.
fn parse_host_port(text: &str) -> Result<(), String> {
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT, e.g. 192.168.1.10:11436".to_owned())?;
    port.parse::<u16>()
        .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    let valid_host = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if valid_host {
        Ok(())
    } else {
        Err(format!("host {host:?} is not a host name or IP address"))
    }
}

fn parse_http_url(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("http://")
        .ok_or_else(|| "expected an http:// URL (https is not supported yet)".to_owned())?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err("expected http://HOST:PORT with no path".to_owned());
    }
    Ok(format!("http://{authority}"))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|error| format!("expected a duration like 2s, 500ms or 1m ({error})"))
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        Err("must be greater than zero".to_owned())
    } else {
        Ok(duration)
    }
}

fn parse_non_zero(text: &str) -> Result<NonZeroU32, String> {
    text.parse()
        .map_err(|_| "expected a whole number from 1 to 4294967295".to_owned())
}

/// `1048576`, `512MiB`, `6GiB`, `8GB`, `300 MB` (binary and decimal units, case-insensitive).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| "must be a size such as 512MiB, 6GiB or 1048576".to_owned())?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        "tb" => 1_000_000_000_000,
        "tib" | "t" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ));
        }
    };
    let bytes = number * scale as f64;
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err("must be at least one byte".to_owned());
    }
    Ok(bytes as u64)
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".to_owned()),
    }
}

fn parse_node_name(text: &str) -> Result<String, String> {
    crate::cluster::identity::validate_node_name(text).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("8GB"), Ok(8_000_000_000));
        assert!(parse_bytes("0").is_err());
        assert!(
            parse_bytes("12 parsecs")
                .expect_err("an unknown unit")
                .contains("unknown unit")
        );
        assert!(parse_bytes("lots").is_err());
    }

    fn sources(
        file: Option<&str>,
        env: &[(&str, &str)],
        cli: &[(&'static str, &str)],
    ) -> ConfigSources {
        let file = file.map(|text| {
            let dir = tempfile::tempdir().expect("tempdir").keep();
            let path = dir.join("config.toml");
            std::fs::write(&path, text).expect("write config");
            path
        });
        ConfigSources {
            file_is_explicit: file.is_some(),
            file,
            env: env
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            cli: cli
                .iter()
                .map(|(key, value)| (*key, (*value).to_owned()))
                .collect(),
        }
    }

    /// Precedence: default < file < env < CLI, one row per combination.
    #[test]
    fn precedence_table() {
        fn check(
            file: Option<&str>,
            env: &[(&str, &str)],
            cli: &[(&'static str, &str)],
            expected_ms: u64,
            expected_source: &str,
        ) {
            let raw = RawConfig::load(&sources(file, env, cli)).expect("load");
            let config = Config::try_from(&raw).expect("valid");
            assert_eq!(
                config.agent.heartbeat_interval,
                Duration::from_millis(expected_ms)
            );
            let (_, source) = raw.get("agent.heartbeat_interval").expect("set");
            assert!(
                source.to_string().starts_with(expected_source),
                "source {source} for {file:?} {env:?} {cli:?}"
            );
        }
        let file = Some("[agent]\nheartbeat_interval = \"3s\"\n");
        let env = &[("SOLLOL_HEARTBEAT_INTERVAL", "4s")][..];
        let cli = &[("agent.heartbeat_interval", "5s")][..];
        check(None, &[], &[], 2000, "default");
        check(file, &[], &[], 3000, "file");
        check(None, env, &[], 4000, "env SOLLOL_HEARTBEAT_INTERVAL");
        check(file, env, &[], 4000, "env");
        check(None, &[], cli, 5000, "command line");
        check(file, &[], cli, 5000, "command line");
        check(file, env, cli, 5000, "command line");
    }

    #[test]
    fn invalid_values_name_their_key_and_source() {
        fn check(env: &[(&str, &str)], key: &str, source: &str) {
            let raw = RawConfig::load(&sources(None, env, &[])).expect("load");
            let message = Config::try_from(&raw).expect_err("invalid").to_string();
            assert!(message.contains(&format!("`{key}`")), "{message}");
            assert!(message.contains(source), "{message}");
        }
        check(
            &[("SOLLOL_HEARTBEAT_INTERVAL", "banana")],
            "agent.heartbeat_interval",
            "SOLLOL_HEARTBEAT_INTERVAL",
        );
        check(
            &[("SOLLOL_HEARTBEAT_INTERVAL", "1ms")],
            "agent.heartbeat_interval",
            "SOLLOL_HEARTBEAT_INTERVAL",
        );
        check(
            &[("SOLLOL_GATEWAY_BIND", "localhost")],
            "coordinator.gateway_bind",
            "SOLLOL_GATEWAY_BIND",
        );
        check(
            &[("SOLLOL_DOWN_AFTER_MISSED", "0")],
            "coordinator.down_after_missed",
            "SOLLOL_DOWN_AFTER_MISSED",
        );
        check(&[("SOLLOL_JOIN", "no-port")], "agent.join", "SOLLOL_JOIN");
        check(
            &[("SOLLOL_OLLAMA_URL", "https://x:1")],
            "agent.ollama_url",
            "SOLLOL_OLLAMA_URL",
        );
        check(
            &[("SOLLOL_MODEL_SHARDING_ENABLED", "maybe")],
            "model_sharding_enabled",
            "SOLLOL_MODEL_SHARDING_ENABLED",
        );
        check(
            &[("SOLLOL_TOKEN", "has space")],
            "agent.token",
            "SOLLOL_TOKEN",
        );
        check(
            &[
                ("SOLLOL_RECONNECT_INITIAL_BACKOFF", "10s"),
                ("SOLLOL_RECONNECT_MAX_BACKOFF", "1s"),
            ],
            "agent.reconnect_max_backoff",
            "SOLLOL_RECONNECT_MAX_BACKOFF",
        );
    }

    #[test]
    fn file_errors_are_clear() {
        let unknown = RawConfig::load(&sources(Some("[agent]\nheartbeat = \"2s\"\n"), &[], &[]))
            .expect_err("unknown key");
        assert!(
            unknown
                .to_string()
                .contains("unknown key `agent.heartbeat`"),
            "{unknown}"
        );
        let broken = RawConfig::load(&sources(Some("[agent\n"), &[], &[])).expect_err("bad toml");
        assert!(broken.to_string().contains("not valid TOML"), "{broken}");
        let missing = RawConfig::load(&ConfigSources {
            file: Some(PathBuf::from("/nonexistent/sollol.toml")),
            file_is_explicit: true,
            ..ConfigSources::default()
        })
        .expect_err("missing explicit file");
        assert!(
            missing.to_string().contains("/nonexistent/sollol.toml"),
            "{missing}"
        );
        let optional = RawConfig::load(&ConfigSources {
            file: Some(PathBuf::from("/nonexistent/sollol.toml")),
            file_is_explicit: false,
            ..ConfigSources::default()
        });
        assert!(optional.is_ok());
    }

    #[test]
    fn api_keys_parse_from_env_and_file_lists() {
        let config = Config::from_pairs(&[(
            "coordinator.api_keys",
            "webui=0123456789abcdef0123, fedcba9876543210fedc",
        )])
        .expect("valid");
        let names: Vec<&str> = config
            .coordinator
            .api_keys
            .iter()
            .map(|key| key.name.as_str())
            .collect();
        assert_eq!(names, vec!["webui", "key-2"]);
        assert!(!format!("{:?}", config.coordinator.api_keys).contains("0123456789abcdef"));
        let raw = RawConfig::load(&sources(Some("[coordinator]\napi_keys = [\"a=0123456789abcdef0123\", \"b=0123456789abcdef0124\"]\n"), &[], &[])).expect("load");
        assert_eq!(
            Config::try_from(&raw)
                .expect("valid")
                .coordinator
                .api_keys
                .len(),
            2
        );
        assert!(Config::from_pairs(&[("coordinator.api_keys", "short")]).is_err());
    }

    #[test]
    fn derived_defaults() {
        let config = Config::from_pairs(&[
            ("data_dir", "/srv/sollol"),
            ("coordinator.gateway_bind", "0.0.0.0:9000"),
            ("model_sharding_enabled", "true"),
        ])
        .expect("valid");
        assert_eq!(config.agent.models_dir, PathBuf::from("/srv/sollol/models"));
        assert_eq!(config.coordinator_url, "http://127.0.0.1:9000");
        assert!(config.model_sharding_enabled);
        assert_eq!(config.coordinator.down_after_missed.get(), 3);
        assert!(!config.agent.name.is_empty());
    }

    #[test]
    fn print_config_hides_the_token_and_names_sources() {
        let raw = RawConfig::load(&sources(
            None,
            &[("SOLLOL_TOKEN", "0123456789abcdef0123456789abcdef")],
            &[("agent.name", "board-1")],
        ))
        .expect("load");
        let config = Config::try_from(&raw).expect("valid");
        let text = raw.to_toml(&config);
        assert!(!text.contains("0123456789abcdef"), "{text}");
        assert!(
            text.contains("token = \"<set, hidden>\"  # env SOLLOL_TOKEN"),
            "{text}"
        );
        assert!(
            text.contains("name = \"board-1\"  # command line"),
            "{text}"
        );
        assert!(text.contains("[coordinator]"), "{text}");
        assert!(text.contains("# models_dir = \""), "{text}");
        // The printed file parses back as TOML.
        toml::from_str::<toml::Table>(&text).expect("print-config output is TOML");
    }

    #[test]
    fn every_key_is_documented() {
        let docs = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/configuration.md"
        ))
        .expect("docs/configuration.md");
        for spec in KEYS {
            assert!(
                docs.contains(&format!("`{}`", spec.key)),
                "docs/configuration.md lacks `{}`",
                spec.key
            );
            assert!(
                docs.contains(spec.env),
                "docs/configuration.md lacks {}",
                spec.env
            );
        }
    }
}
