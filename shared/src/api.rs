//! JSON types of sollol's own HTTP API under [`API_PREFIX`].

use serde::{Deserialize, Serialize};

use crate::hardware::{HardwareReport, OllamaState};

/// Every sollol-specific HTTP path starts with this.
pub const API_PREFIX: &str = "/api/sollol/v1";

/// Ollama's error shape, used for every error the coordinator answers over HTTP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Health of a node as the coordinator judges it from heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Reporting on time.
    Up,
    /// Missed a heartbeat or lost its connection; not yet down.
    Suspect,
    /// Missed `down_after_missed` heartbeats in a row, or never reconnected after a coordinator restart.
    Down,
    /// Said goodbye: stopped on purpose.
    Left,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Suspect => "suspect",
            Self::Down => "down",
            Self::Left => "left",
        }
    }
}

/// `GET /api/sollol/v1/nodes`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<Node>,
    /// The gateway's live load on each node, by node id (nodes without load are absent).
    #[serde(default)]
    pub load: std::collections::BTreeMap<String, NodeLoad>,
}

/// A node the coordinator knows, whether connected now or only remembered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub name: String,
    pub status: NodeStatus,
    /// Addresses the coordinator has seen the node connect from, newest first.
    pub addresses: Vec<String>,
    pub build_version: String,
    pub protocol_version: u32,
    pub first_seen_ms: u64,
    /// Time of the last frame received from the node (coordinator clock).
    pub last_seen_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub connected: bool,
    /// The last hardware sample; `None` until the first report arrives.
    pub hardware: Option<HardwareReport>,
    pub ollama: Option<OllamaState>,
    /// The agent's stage port for distributed inference, reachable from the coordinator.
    #[serde(default)]
    pub stage_address: Option<String>,
    /// The most memory the agent offers to models (`engine.max_memory`), when it is capped.
    #[serde(default)]
    pub memory_limit_bytes: Option<u64>,
}

/// `GET /api/sollol/v1/nodes/{id}`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeDetail {
    pub node: Node,
    /// Most recent first.
    pub events: Vec<NodeEvent>,
    #[serde(default)]
    pub load: NodeLoad,
    /// Hardware samples since the coordinator started (bounded), oldest first.
    #[serde(default)]
    pub samples: Vec<HardwareSample>,
    /// The node's most recent requests, newest first.
    #[serde(default)]
    pub requests: Vec<RequestEntry>,
}

/// The figures of one hardware report, for a node's history chart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HardwareSample {
    pub at_ms: u64,
    pub cpu_percent: Option<f32>,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub vram_used_bytes: u64,
    pub vram_total_bytes: u64,
    /// The hottest sensor.
    pub temperature_celsius: Option<f32>,
}

impl HardwareSample {
    pub fn of(at_ms: u64, hardware: &HardwareReport) -> Self {
        Self {
            at_ms,
            cpu_percent: hardware.cpu.utilisation_percent,
            memory_used_bytes: hardware
                .memory
                .total_bytes
                .saturating_sub(hardware.memory.available_bytes),
            memory_total_bytes: hardware.memory.total_bytes,
            vram_used_bytes: hardware.gpus.iter().map(|gpu| gpu.vram_used_bytes).sum(),
            vram_total_bytes: hardware.gpus.iter().map(|gpu| gpu.vram_total_bytes).sum(),
            temperature_celsius: hardware
                .temperatures
                .iter()
                .map(|reading| reading.celsius)
                .reduce(f32::max),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEvent {
    pub at_ms: u64,
    pub kind: NodeEventKind,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeEventKind {
    Joined,
    Up,
    Suspect,
    Down,
    Left,
}

impl NodeEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Joined => "joined",
            Self::Up => "up",
            Self::Suspect => "suspect",
            Self::Down => "down",
            Self::Left => "left",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Joined,
            Self::Up,
            Self::Suspect,
            Self::Down,
            Self::Left,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == text)
    }
}

/// `GET /api/sollol/v1/cluster`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSummary {
    pub build_version: String,
    pub protocol_version: u32,
    pub started_at_ms: u64,
    pub uptime_ms: u64,
    pub gateway_address: String,
    pub cluster_address: String,
    pub nodes_total: u32,
    pub nodes_up: u32,
    pub nodes_suspect: u32,
    pub nodes_down: u32,
    pub nodes_left: u32,
    /// Open TCP connections on the cluster port, handshaking or joined.
    pub cluster_connections: u64,
    /// History records dropped because the writer fell behind.
    pub history_dropped: u64,
    /// Requests the gateway has running on nodes now.
    #[serde(default)]
    pub in_flight: u64,
    /// Requests waiting in the gateway's priority queue now.
    #[serde(default)]
    pub queued: u64,
    /// What the operator should know about this coordinator, e.g. a corrupt history moved aside.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<String>,
}

/// `GET /readyz` and `GET /healthz`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub detail: String,
}

/// Live load the coordinator's gateway puts on one node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Requests this gateway has running on the node now.
    pub in_flight: u32,
}

/// Whether a routed request was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    Ok,
    Failed,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "ok" => Some(Self::Ok),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// One candidate of a routing decision with what it was predicted to cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateCost {
    pub node: String,
    pub predicted_ms: u64,
}

/// Why a request went where it went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingDecision {
    pub strategy: String,
    pub reason: String,
    /// The best few candidates, best first.
    pub candidates: Vec<CandidateCost>,
}

/// One attempt of a routed request on one node (`GET /api/sollol/v1/requests`, and the live feed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestEntry {
    /// Increasing per coordinator database; the live feed uses 0 before the row is written.
    pub id: u64,
    pub at_ms: u64,
    pub node_id: String,
    /// The node's name when the coordinator knows it, else its id.
    pub node: String,
    pub model: String,
    pub path: String,
    pub app: String,
    pub status: RequestStatus,
    pub prompt_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// From the request's arrival at the node to the first byte of its answer.
    pub time_to_first_byte_ms: u64,
    /// Time before generation started (cold load, queueing, prompt), what a streaming client waits for a first token.
    pub time_to_first_token_ms: Option<u64>,
    pub total_ms: u64,
    pub load_ms: Option<u64>,
    /// Generated tokens per second of this request, from Ollama's own timings.
    pub tokens_per_second: Option<f64>,
    pub decision: RoutingDecision,
}

/// `GET /api/sollol/v1/requests`, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestList {
    pub requests: Vec<RequestEntry>,
}

/// A statistics window: `5m`, `1h` or `24h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StatsWindow {
    #[serde(rename = "5m")]
    FiveMinutes,
    #[serde(rename = "1h")]
    OneHour,
    #[serde(rename = "24h")]
    Day,
}

impl StatsWindow {
    pub const ALL: [Self; 3] = [Self::FiveMinutes, Self::OneHour, Self::Day];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::FiveMinutes => "5m",
            Self::OneHour => "1h",
            Self::Day => "24h",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|window| window.as_str() == text)
    }

    pub fn millis(self) -> u64 {
        match self {
            Self::FiveMinutes => 5 * 60_000,
            Self::OneHour => 60 * 60_000,
            Self::Day => 24 * 60 * 60_000,
        }
    }

    /// Width of one point of the time series: 60 points per window.
    pub fn bucket_millis(self) -> u64 {
        self.millis() / 60
    }
}

/// p50 / p95 / p99 of a set of measurements, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
}

/// Requests of one node, model or application in a window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// The node's name, the model or the application.
    pub key: String,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    /// `None` when no request succeeded.
    pub latency_ms: Option<Percentiles>,
    pub time_to_first_token_ms: Option<Percentiles>,
    pub output_tokens: u64,
    /// Generated tokens over generation time, summed over the requests.
    pub tokens_per_second: Option<f64>,
    pub last_at_ms: u64,
}

/// One point of the time series: the requests that finished in `[at_ms, at_ms + bucket_ms)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    pub at_ms: u64,
    pub requests: u64,
    pub errors: u64,
    pub latency_ms: Option<Percentiles>,
    pub time_to_first_token_ms: Option<Percentiles>,
    /// Tokens generated per second of wall time in the bucket (cluster throughput).
    pub tokens_per_second: f64,
}

/// `GET /api/sollol/v1/stats?window=5m|1h|24h`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub window: StatsWindow,
    pub since_ms: u64,
    pub until_ms: u64,
    pub bucket_ms: u64,
    pub total: Aggregate,
    pub by_node: Vec<Aggregate>,
    pub by_model: Vec<Aggregate>,
    /// Who uses the cluster: `X-Sollol-App`, else the API key's name, else the User-Agent.
    pub by_app: Vec<Aggregate>,
    /// Oldest first, `window / bucket_ms` points.
    pub series: Vec<SeriesPoint>,
}

/// What `GET /api/sollol/v1/events` (Server-Sent Events) pushes; the SSE event name is `type`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveEvent {
    /// A node changed: status, hardware sample, Ollama state or load.
    Node { node: Node, load: NodeLoad },
    /// A request was routed: where it goes and why.
    Routed {
        at_ms: u64,
        model: String,
        path: String,
        app: String,
        node: String,
        decision: RoutingDecision,
    },
    /// An attempt finished (failed attempts too, before failover).
    Finished { request: RequestEntry },
    /// A model copied between nodes made progress, finished or failed.
    Transfer { transfer: Transfer },
    /// The stream fell behind and skipped this many events: reload the snapshot.
    Lagged { skipped: u64 },
}

impl LiveEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Node { .. } => "node",
            Self::Routed { .. } => "routed",
            Self::Finished { .. } => "finished",
            Self::Transfer { .. } => "transfer",
            Self::Lagged { .. } => "lagged",
        }
    }
}

/// A model copied from one node to another (a pull served node to node).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    /// When it started (Unix milliseconds).
    pub started_ms: u64,
    pub model: String,
    /// `sha256:…` of the file; empty until the source offered it.
    pub digest: String,
    /// The node it is copied from (the last source tried), by name; empty before the first report.
    pub source: String,
    pub target: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub state: TransferState,
    /// Time since it started, or how long it took.
    pub duration_ms: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferState {
    Copying,
    Done,
    Failed,
}

/// `GET /api/sollol/v1/transfers`: copies under way, then the most recent finished ones, newest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TransferList {
    pub transfers: Vec<Transfer>,
}

/// How many copies of a model the coordinator keeps: a number of nodes, or every node. In JSON a number
/// or `"all"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaCount {
    Nodes(u32),
    All,
}

impl ReplicaCount {
    /// `all` or a count of at least 1.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        match text.parse::<u32>() {
            Ok(0) => Err("0 copies is none: give 1 or more, or `all`".to_owned()),
            Ok(count) => Ok(Self::Nodes(count)),
            Err(_) => Err(format!("{text:?} is not a number of copies or `all`")),
        }
    }

    /// How many copies that is on a cluster of `nodes` nodes.
    pub fn on(self, nodes: usize) -> usize {
        match self {
            Self::Nodes(count) => (count as usize).min(nodes),
            Self::All => nodes,
        }
    }
}

impl std::fmt::Display for ReplicaCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nodes(count) => write!(f, "{count}"),
            Self::All => f.write_str("all"),
        }
    }
}

impl Serialize for ReplicaCount {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Nodes(count) => serializer.serialize_u32(*count),
            Self::All => serializer.serialize_str("all"),
        }
    }
}

impl<'de> Deserialize<'de> for ReplicaCount {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Number(u64),
            Text(String),
        }
        let text = match Text::deserialize(deserializer)? {
            Text::Number(count) => count.to_string(),
            Text::Text(text) => text,
        };
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// One model the coordinator keeps copies of.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub model: String,
    pub wanted: ReplicaCount,
    /// The up nodes that hold it now, by name.
    pub holders: Vec<String>,
    /// `config` (`models.replicas`) or `api` (set at run time).
    pub origin: String,
    /// Why the last attempt to add a copy failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `GET /api/sollol/v1/replicas`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaList {
    pub replicas: Vec<ReplicaStatus>,
}

/// `PUT /api/sollol/v1/replicas/MODEL`'s body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRequest {
    pub replicas: ReplicaCount,
}

/// `GET /api/sollol/v1/discovery`: how the coordinator finds nodes besides agents that join it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Discovery {
    /// The range scan for Ollama servers (`discovery.scan`); `None` when it is off.
    pub scan: Option<DiscoveryScan>,
    /// DNS-SD over multicast DNS (`_sollol._tcp`, `discovery.mdns`); `None` when it is off.
    #[serde(default)]
    pub mdns: Option<MdnsDiscovery>,
}

/// What the coordinator announces over mDNS and what answered it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MdnsDiscovery {
    /// The DNS-SD instance this coordinator announces, e.g. `lab-3f2a9c1e._sollol._tcp.local.`;
    /// `None` when announcing failed (see `error`).
    pub announced_as: Option<String>,
    /// Why mDNS does not work here, when it does not.
    pub error: Option<String>,
    /// The IPv4 interfaces mDNS runs on, and how many peers answered on each.
    pub interfaces: Vec<MdnsInterface>,
    /// Every other sollol process that announced itself.
    pub peers: Vec<MdnsPeer>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MdnsInterface {
    pub name: String,
    /// `ADDRESS/PREFIX`.
    pub address: String,
    /// Peers with an address on this interface's network.
    pub answers: u32,
}

/// A sollol process found over mDNS.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MdnsPeer {
    pub instance: String,
    pub node_id: String,
    pub name: String,
    /// `agent` or `coordinator`.
    pub role: String,
    /// The role and what else the peer runs: `stage`, `engine` (agents), `gateway`, `distributed`
    /// (coordinators).
    #[serde(default)]
    pub roles: Vec<String>,
    pub version: String,
    pub addresses: Vec<String>,
    pub port: u16,
    /// Whether the peer says it holds a cluster token (an agent without one can never join).
    pub has_token: bool,
    /// Whether this agent is a member of this coordinator's cluster now.
    pub joined: bool,
}

/// The last scan of address ranges for Ollama servers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryScan {
    pub ranges: Vec<String>,
    pub port: u16,
    /// When the last scan finished; `None` before the first.
    pub scanned_at_ms: Option<u64>,
    /// Addresses tried.
    pub addresses: u32,
    /// What answered `/api/version` as Ollama (each joins the routing as a node).
    pub found: Vec<FoundServer>,
    /// What listens on the port but is not Ollama, and why.
    pub rejected: Vec<RejectedAddress>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FoundServer {
    /// `IP:PORT`.
    pub address: String,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RejectedAddress {
    pub address: String,
    pub reason: String,
}

/// `GET /api/sollol/v1/distributed`: the models served split across agents, and their pipelines.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DistributedList {
    pub models: Vec<DistributedModel>,
}

/// One distributed model: its current plan (if planned) and what its generation steps cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistributedModel {
    pub model: String,
    /// Whether a pipeline is planned and loaded now (the first request plans it).
    pub planned: bool,
    /// `sha256:…` of the file every stage holds.
    pub digest: Option<String>,
    pub layers: u32,
    /// First to last.
    pub stages: Vec<PipelineStage>,
    /// Why the plan is what it is, one line per decision.
    pub reasons: Vec<String>,
    /// Generation steps (tokens) since the plan was made.
    pub tokens: u64,
    pub tokens_per_second: Option<f64>,
    /// Average time per transfer (coordinator → first stage, stage → stage, last stage → coordinator).
    pub hop_ms: Option<f64>,
    pub bytes_per_token: Option<f64>,
    /// Plans replaced mid-request because a stage failed, since the coordinator started.
    pub replans: u64,
    pub last_error: Option<String>,
    /// A plan being made now (stages describing or loading), if any.
    #[serde(default)]
    pub planning: Option<PlanProgress>,
}

/// One stage of a pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineStage {
    pub node_id: String,
    pub name: String,
    pub address: String,
    /// Layers `layers_start..layers_end`.
    pub layers_start: u32,
    pub layers_end: u32,
    pub embed: bool,
    pub head: bool,
    /// The stage process's resident memory after loading its part.
    pub resident_bytes: u64,
    pub free_memory_bytes: u64,
    /// Average compute per generated token on this stage.
    pub compute_ms_per_token: Option<f64>,
}

/// Where a plan in progress stands (`DistributedModel::planning`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanProgress {
    pub phase: PlanPhase,
    /// Since planning started.
    pub elapsed_ms: u64,
    /// Empty while the agents are described.
    pub stages: Vec<StageProgress>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanPhase {
    /// Asking the agents what they hold and have free.
    Describing,
    /// Each stage loading (or fetching) its part.
    Loading,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageProgress {
    pub name: String,
    pub layers_start: u32,
    pub layers_end: u32,
    pub loaded: bool,
    /// Tensor bytes fetched from a peer so far.
    pub fetched_bytes: u64,
    /// Tensor bytes the stage fetches in all (0: it has them).
    #[serde(default)]
    pub fetch_total_bytes: u64,
}

/// `GET /api/sollol/v1/session` (and the answer to signing in): whether the gateway needs an API
/// key, and which key's session this browser holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub keys_required: bool,
    pub signed_in_as: Option<String>,
}

/// `POST /api/sollol/v1/session`: a dashboard signs in with an API key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignIn {
    pub key: String,
}

impl std::fmt::Debug for SignIn {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SignIn { key: <hidden> }")
    }
}

/// `GET /api/sollol/v1/coordinators`: the coordinators of this cluster as this one sees them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorList {
    /// The id of the coordinator that answered.
    pub this: String,
    /// This coordinator first, then the others by id.
    pub coordinators: Vec<CoordinatorInfo>,
}

/// One coordinator of the group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorInfo {
    /// Its node id.
    pub id: String,
    pub name: String,
    /// Its HTTP gateway as it announces it (`http://HOST:PORT`); empty until known.
    pub gateway_url: String,
    /// Its cluster port, `HOST:PORT`.
    pub cluster_address: String,
    pub state: CoordinatorState,
    /// When it started (Unix milliseconds; 0 when unknown).
    pub started_at_ms: u64,
    /// Whether it runs the group's background decisions (replicas): the live coordinator with the
    /// smallest id.
    pub leader: bool,
    /// Requests it has in flight on the nodes, as it last told the group.
    pub in_flight: u32,
    /// (node, model) pairs it has measured.
    pub learned_pairs: u32,
    /// Why it is refused, or what was last wrong with its link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// How a coordinator stands in the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoordinatorState {
    /// The coordinator that answered.
    This,
    /// Gossiping now.
    Alive,
    /// Known, not heard from lately.
    Down,
    /// Its shared configuration differs: the two do not form a group (see `detail`).
    Refused,
}

/// `GET /api/sollol/v1/learned`: the per-(node, model) figures routing uses now, this coordinator's
/// own measurements merged with the other coordinators'.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LearnedList {
    pub pairs: Vec<LearnedPair>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LearnedPair {
    pub node_id: String,
    pub model: String,
    pub decode_tokens_per_second: f64,
    pub prompt_tokens_per_second: f64,
    pub time_to_first_token_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_load_ms: Option<f64>,
    pub samples: u32,
    /// How many coordinators' measurements were merged into these figures.
    pub coordinators: u32,
}
