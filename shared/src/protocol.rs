//! The agent ↔ coordinator protocol: postcard messages in length-prefixed TCP frames.
//!
//! A connection starts with the 8-byte [`MAGIC`] from the agent, then frames of
//! a 4-byte big-endian length followed by that many bytes of postcard.
//!
//! ```text
//! agent                                   coordinator
//!   MAGIC, Hello                    ->
//!                                   <-    HelloReply::Challenge(nonce_c)   (or Refused)
//!   Auth(proof_a, nonce_a)          ->
//!                                   <-    AuthReply::Welcome(proof_c)      (or Refused)
//!   AgentMessage::Report ...        ->
//!                                   <-    CoordinatorMessage::Closing      (on shutdown)
//!   AgentMessage::Goodbye           ->
//! ```
//!
//! Compatibility rules, which hold for every protocol version:
//! - every [`Hello`] starts with `protocol_version` then `build_version`, so a
//!   peer of any version can read them ([`HelloPrefix`]) and name both versions
//!   in its refusal;
//! - `Refused` is variant 0 of every reply enum and [`Refusal`] never changes
//!   shape, so a refusal is readable by any version;
//! - new [`RefusalCode`]s are only appended.
//!
//! The cluster token never crosses the wire: each side proves it holds the
//! token with an HMAC-SHA256 over the other side's random nonce (see
//! [`AGENT_PROOF_CONTEXT`] and [`COORDINATOR_PROOF_CONTEXT`]).

use serde::{Deserialize, Serialize};

use crate::hardware::NodeReport;

/// The protocol version this build speaks.
/// 2: reports carry the agent's stage address (distributed inference); 3: the memory limit; 4: every
/// frame after the handshake is encrypted and authenticated (Noise `NNpsk0`, key from the token and
/// both nonces).
pub const PROTOCOL_VERSION: u32 = 4;

/// The first bytes an agent sends, before any frame.
pub const MAGIC: [u8; 8] = *b"SOLLOL\x00\x01";

/// Frames longer than this are refused and the connection closed.
pub const MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// Length of the random nonces in the challenge–response.
pub const NONCE_BYTES: usize = 32;

/// Domain separation for the agent's proof: HMAC(token, context ‖ coordinator nonce ‖ node id).
pub const AGENT_PROOF_CONTEXT: &[u8] = b"sollol/v1/agent-proof";

/// Domain separation for the coordinator's proof: HMAC(token, context ‖ agent nonce ‖ node id).
pub const COORDINATOR_PROOF_CONTEXT: &[u8] = b"sollol/v1/coordinator-proof";

/// The part of a [`Hello`] that every protocol version shares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloPrefix {
    pub protocol_version: u32,
    pub build_version: String,
}

/// The agent's first frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub build_version: String,
    /// Stable identity of the node, kept in the agent's data directory.
    pub node_id: String,
    /// Human name of the node, the host name unless configured.
    pub node_name: String,
    /// How often this agent sends a report; the coordinator judges health by it.
    pub heartbeat_interval_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum HelloReply {
    Refused(Refusal),
    Challenge {
        protocol_version: u32,
        build_version: String,
        nonce: [u8; NONCE_BYTES],
    },
}

/// The agent's second frame: its proof over the coordinator's nonce, and its own nonce.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Auth {
    pub proof: [u8; 32],
    pub nonce: [u8; NONCE_BYTES],
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AuthReply {
    Refused(Refusal),
    Welcome { proof: [u8; 32] },
}

/// Frames the agent sends once it is welcomed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    Report(Box<NodeReport>),
    /// The agent is stopping on purpose: the node is marked "left", not "down".
    Goodbye {
        reason: String,
    },
}

/// Frames the coordinator sends once the agent is welcomed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    Refused(Refusal),
    /// The coordinator is shutting down; the agent should reconnect later.
    Closing {
        reason: String,
    },
    /// The coordinators of the cluster as this one sees them: itself (`this`, its id) and the other
    /// live ones. Sent after the welcome and whenever the group changes, only by a coordinator with
    /// others (an agent of an earlier release never gets it). An agent given one address, or
    /// discovering, joins the others too.
    Coordinators {
        this: String,
        others: Vec<CoordinatorAddress>,
    },
}

/// Another coordinator of the cluster: its id and its cluster address, `IP:PORT`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CoordinatorAddress {
    pub id: String,
    pub address: String,
}

/// Why a peer was turned away, in a shape that never changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

/// Append-only list of refusal reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    /// The peer did not start with [`MAGIC`]: not a sollol agent.
    BadMagic,
    /// A frame could not be decoded.
    Malformed,
    /// A frame was longer than [`MAX_FRAME_BYTES`].
    FrameTooLarge,
    /// The peers speak different protocol versions.
    IncompatibleVersion,
    /// The proof did not match: the agent holds another cluster token.
    BadToken,
    /// The handshake did not finish in time.
    Timeout,
    /// The coordinator is shutting down.
    ShuttingDown,
    /// Layer protocol: the stage has no copy of the model asked for.
    ModelMissing,
    /// Layer protocol: the stage's copy of the model has another digest than the plan's.
    DigestMismatch,
    /// Layer protocol: the request cannot be served as asked (layers out of range, unknown sequence…).
    BadRequest,
    /// Coordinator group: the two coordinators' shared configuration differs (the message names the
    /// sections).
    ConfigDiffers,
}

impl RefusalCode {
    /// Whether trying again later can succeed without someone changing configuration.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Timeout | Self::ShuttingDown)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
