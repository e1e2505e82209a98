//! Distributed inference, the driving side: plans a model's layers over agents' stages, loads the parts,
//! and runs sequences through the stages (`sollol_shared::layers` describes the protocol; `stage` is
//! the agents' side).
//!
//! The coordinator keeps one connection to every stage. It sends token ids to the first stage only;
//! the stages pass hidden states along among themselves, and the last stage answers each step with the
//! sampled token id. A stage that dies or stops answering fails the step with [`PipelineError::Stage`];
//! the caller re-plans on the stages left and re-runs the sequence from its tokens so far.
//!
//! The submodules: `plan` decides which stage runs which layers, `start` describes the candidates, plans
//! and loads the parts, `link` is the connection to one stage, `sequence` runs one sequence through the
//! stages, `batch` sends concurrent sequences' steps together, `stats` sums what the steps cost, and
//! `supervisor` keeps a model's pipeline and re-plans it when a stage fails.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sollol_shared::layers::{StageReply, StageRequest};
use tokio::sync::mpsc;

use crate::distributed::stage::DialError;

mod batch;
mod link;
mod plan;
mod sequence;
mod start;
mod stats;
mod supervisor;

use batch::Queued;
use link::Link;
pub use plan::{Candidate, Plan, PlannedStage, split_layers};
pub use sequence::{Answer, Sequence};
pub use start::Progress;
pub use stats::PipelineStats;
pub use supervisor::{Distributed, EXCLUDE_FOR, Generated};

/// Prompt tokens sent to the first stage per forward: the stages work on one chunk while the next
/// stage works on the previous one.
pub const PROMPT_CHUNK: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("{0}")]
    Plan(String),
    #[error("stage {node} refused: {message}")]
    Refused { node: String, message: String },
    #[error("stage {node} failed: {message}")]
    Stage { node: String, message: String },
    #[error("stage {node} answered out of turn: {answer}")]
    Protocol { node: String, answer: String },
    /// Picking a token from the logits failed here (a format's grammar).
    #[error("{0}")]
    Chooser(String),
}

impl PipelineError {
    /// The node to leave out of the next plan, when a stage (not the plan) failed.
    pub fn failed_node(&self) -> Option<&str> {
        match self {
            Self::Stage { node, .. } => Some(node),
            _ => None,
        }
    }
}

/// How long plan-time requests (describing and loading) may take.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub handshake: Duration,
    pub load: Duration,
    /// Per generated token (a prompt's forward gets this per chunk).
    pub step: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(5),
            load: Duration::from_secs(300),
            step: Duration::from_secs(60),
        }
    }
}

/// A planned, loaded pipeline: one connection per stage.
#[derive(Debug)]
pub struct Pipeline {
    pub plan: Plan,
    /// Each stage's resident memory after loading.
    pub resident_bytes: Vec<u64>,
    /// Tensor bytes each stage fetched from a peer to load its part (0: it had them).
    pub fetched_bytes: Vec<u64>,
    links: Vec<Arc<Link>>,
    next_sequence: AtomicU64,
    timeouts: Timeouts,
    stats: Mutex<PipelineStats>,
    /// Generation steps waiting to go to the first stage together.
    steps: mpsc::UnboundedSender<Queued>,
}
impl Pipeline {
    /// The model file's header from the first stage (tokenizer and chat template, no weights).
    pub async fn header(&self) -> Result<(Vec<u8>, u64), PipelineError> {
        match self.links[0]
            .ask(&StageRequest::Header { digest: None }, self.timeouts.load)
            .await?
        {
            StageReply::Header {
                bytes, file_bytes, ..
            } => Ok((bytes, file_bytes)),
            other => Err(PipelineError::Protocol {
                node: self.links[0].name().to_owned(),
                answer: format!("{other:?}"),
            }),
        }
    }

    /// The stages' names, first to last.
    pub fn stage_names(&self) -> Vec<String> {
        self.links
            .iter()
            .map(|link| link.name().to_owned())
            .collect()
    }

    /// The stages' addresses, first to last.
    pub fn stage_addresses(&self) -> Vec<String> {
        self.links.iter().map(|link| link.address.clone()).collect()
    }
}
