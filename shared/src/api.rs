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
}

/// `GET /api/sollol/v1/nodes/{id}`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeDetail {
    pub node: Node,
    /// Most recent first.
    pub events: Vec<NodeEvent>,
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
}

/// `GET /readyz` and `GET /healthz`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub detail: String,
}
