//! The layer protocol: how the coordinator drives the stages of a distributed model, and how each stage
//! hands its activations straight to the next. Postcard in length-prefixed frames (as the agent ↔
//! coordinator protocol), on each agent's stage port.
//!
//! ```text
//! client (coordinator, or a stage dialling the next)          stage
//!   LAYER_MAGIC, LayerHello { versions, nonce_c }      ->
//!                                                      <-    LayerChallenge { versions, nonce_s, proof_s }  (or Refused)
//!   LayerAuth { proof_c }                              ->
//!                                                      <-    LayerWelcome                                  (or Refused)
//!   StageRequest ...                                   ->
//!                                                      <-    StageReply ...
//! ```
//!
//! Both sides prove they hold the cluster token (HMAC-SHA256 over the other side's nonce, each side with
//! its own context), and both name their protocol and build versions first, so a mismatch is refused
//! with both versions named, at plan time, before any request runs.
//!
//! A request's flow: the coordinator loads a part of the model on each stage ([`StageRequest::Load`],
//! naming the next stage's address), opens the sequence on every stage ([`StageRequest::Open`]; the
//! last stage gets the sampling settings and the tokens so far), then sends token ids to the first
//! stage ([`StageRequest::Forward`]). Each stage runs its layers and sends the hidden states to the next
//! stage itself (the steps of several sequences that arrived together run, and travel on, as one
//! batch); the last stage samples and answers the coordinator with the token id
//! ([`StageReply::Sampled`]), on the coordinator's own connection to it. Activations never pass through
//! the coordinator, and a generated token costs one hidden state per hop plus a few bytes.

use serde::{Deserialize, Serialize};

use crate::protocol::Refusal;

/// The layer protocol version this build speaks.
/// 3: every frame after the handshake is encrypted and authenticated, as on the cluster link.
/// 4: fetched tensors are checked against a tensor manifest the plan names (`PartSpec::manifest`).
/// 5: whole model files copied between agents (`Offer`, `Blob`, `Receive`).
pub const LAYER_PROTOCOL_VERSION: u32 = 5;

/// The first bytes a layer client sends, before any frame.
pub const LAYER_MAGIC: [u8; 8] = *b"SOLLOLL\x01";

/// Frames longer than this are refused (hidden states of a prompt chunk of a large model fit).
pub const MAX_LAYER_FRAME_BYTES: u32 = 64 * 1024 * 1024;

/// Domain separation of the stage's proof: HMAC(token, context ‖ client nonce).
pub const STAGE_PROOF_CONTEXT: &[u8] = b"sollol/v1/stage-proof";

/// Domain separation of the client's proof: HMAC(token, context ‖ stage nonce).
pub const LAYER_CLIENT_PROOF_CONTEXT: &[u8] = b"sollol/v1/layer-client-proof";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerHello {
    pub protocol_version: u32,
    pub build_version: String,
    pub nonce: [u8; 32],
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerChallenge {
    Refused(Refusal),
    Challenge {
        protocol_version: u32,
        build_version: String,
        /// The stage's node id and name, for messages.
        node_id: String,
        node_name: String,
        nonce: [u8; 32],
        proof: [u8; 32],
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerAuth {
    pub proof: [u8; 32],
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerWelcome {
    Refused(Refusal),
    Welcome,
}

/// Which part of which model a stage holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartSpec {
    /// Ollama-style `name:tag`.
    pub model: String,
    /// `sha256:…` of the GGUF file's content; a stage whose copy differs refuses.
    pub digest: String,
    /// The digest of the file's tensor manifest (the SHA-256 of its header and of each tensor), as every
    /// holder described it: a stage fetching tensors checks each one against it.
    pub manifest: [u8; 32],
    /// Layers `start..end`.
    pub start: u32,
    pub end: u32,
    /// The token embedding (first stage).
    pub embed: bool,
    /// The output norm, head and sampling (last stage).
    pub head: bool,
}

/// How an Ollama request samples, as the last stage needs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: u32,
    /// Chosen by the coordinator when the request names none, so a re-planned sequence samples as
    /// the first plan would have.
    pub seed: u64,
}

/// What one [`Forward`] carries: token ids into the first stage, hidden states after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StageInput {
    Tokens(Vec<u32>),
    /// `tokens` rows of the model's embedding width, f32 (smaller types move the logits, see the brief).
    Hidden {
        tokens: u32,
        values: Vec<f32>,
    },
}

impl StageInput {
    /// Positions it carries.
    pub fn rows(&self) -> usize {
        match self {
            Self::Tokens(ids) => ids.len(),
            Self::Hidden { tokens, .. } => *tokens as usize,
        }
    }
}

/// What the last stage does with a forward's last position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// Nothing: a prompt chunk before the last.
    None,
    /// Sample a token and answer [`StageReply::Sampled`].
    Sample,
    /// Answer the logits ([`StageReply::Logits`]): for checks, ~200 KB a token.
    Logits,
}

/// What one stage spent on one forward, carried along the pipeline and back to the coordinator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTrace {
    /// Microseconds the stage computed.
    pub compute_us: u32,
    /// Bytes of the frame it sent to the next stage (0 for the last).
    pub sent_bytes: u32,
    /// Sequences the stage ran in the same batch (this one included).
    pub batch: u32,
}

/// Positions `start..` of one sequence, as [`StageRequest::Forward`] carries them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Forward {
    pub sequence: u64,
    pub start: u32,
    pub input: StageInput,
    pub output: Output,
    /// One entry per stage the forward went through so far.
    pub trace: Vec<StageTrace>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StageRequest {
    /// What the stage can hold of `model`: answered [`StageReply::Described`], or
    /// [`StageReply::Lacking`] when it has no copy (it can still fetch a part from a peer).
    Describe { model: String },
    /// Load `part` (a no-op when it is loaded already) and connect to `next`, the following stage's
    /// address, unless this is the last stage. A stage without a copy fetches just the part's tensors
    /// from one of `sources` (stages that hold the file), once, and keeps them.
    Load {
        part: PartSpec,
        next: Option<String>,
        sources: Vec<String>,
    },
    /// Send these tensors of the file with `digest`: answered by [`StageReply::TensorChunk`] frames,
    /// then [`StageReply::TensorsSent`].
    Tensors { digest: String, names: Vec<String> },
    /// Start `sequence` on this stage; the last stage gets `sampling` and the tokens so far.
    Open {
        sequence: u64,
        sampling: Option<Sampling>,
        history: Vec<u32>,
    },
    /// Run these sequences' positions through this stage, as one batch (each sequence at most once):
    /// the weights are read once for all of them. A stage hands the batch on to the next as one frame.
    Forward { steps: Vec<Forward> },
    /// Forget `sequence` (its KV cache).
    Close { sequence: u64 },
    /// The GGUF file's header (metadata, tokenizer, template, tensor directory; no tensor data): of the
    /// file with `digest`, or of the loaded part's file.
    Header { digest: Option<String> },
    /// Whether this node can give a copy of `model` (a GGUF file in its models dir, or the model's blob in
    /// its Ollama store): answered [`StageReply::Offered`], or [`StageReply::Lacking`].
    Offer { model: String },
    /// Send the whole file with content `digest` from byte `offset` on: [`StageReply::BlobChunk`] frames,
    /// then [`StageReply::BlobSent`]. The receiver checks the digest.
    Blob { digest: String, offset: u64 },
    /// Get a copy of `model` from one of `sources` (agents' stage addresses that hold it, tried in order,
    /// a transfer broken off resumed from the next) and install it: into the models dir of a node served
    /// by the built-in engine, else into the node's Ollama (`/api/blobs` and `/api/create`). Answered by
    /// [`StageReply::Receiving`] reports, then [`StageReply::Received`] (or a refusal saying why).
    Receive { model: String, sources: Vec<String> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StageReply {
    Refused(Refusal),
    Described {
        digest: String,
        /// The digest of the file's tensor manifest, computed with `digest`.
        manifest: [u8; 32],
        layers: u32,
        /// Bytes of the whole GGUF file.
        file_bytes: u64,
        /// Memory the node has free now.
        free_memory_bytes: u64,
    },
    /// The stage has no copy of the model (answering `Describe`), with the memory it has free.
    Lacking {
        free_memory_bytes: u64,
    },
    Loaded {
        /// The stage process's resident memory after loading.
        resident_bytes: u64,
        load_ms: u64,
        /// Tensor bytes fetched from a peer for this load (0 with a local copy, or when cached).
        fetched_bytes: u64,
    },
    /// Part of a tensor's bytes (`offset` within the tensor of `size` bytes), in order; `last` on the
    /// tensor's last chunk. The receiver checks the tensor against the plan's manifest.
    TensorChunk {
        name: String,
        offset: u64,
        size: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        last: bool,
    },
    TensorsSent,
    /// While a [`StageRequest::Load`] fetches tensors from a peer: bytes fetched so far of the
    /// `total_bytes` it needs, after each chunk.
    Fetching {
        done_bytes: u64,
        total_bytes: u64,
    },
    Opened {
        sequence: u64,
    },
    Sampled {
        sequence: u64,
        token: u32,
        /// Every stage's share of the forward that produced it, first to last.
        trace: Vec<StageTrace>,
    },
    Logits {
        sequence: u64,
        values: Vec<f32>,
        trace: Vec<StageTrace>,
    },
    Closed {
        sequence: u64,
    },
    /// A forward of `sequence` failed on this stage, or (`downstream`) could not reach the next one.
    Failed {
        sequence: u64,
        message: String,
        downstream: bool,
    },
    Header {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        file_bytes: u64,
        /// The SHA-256 of each tensor, in the order of the header's tensor directory (empty when asked
        /// for the loaded part's header): with the header, the manifest a plan's `PartSpec` names.
        tensors: Vec<[u8; 32]>,
    },
    /// Answering [`StageRequest::Offer`]: the file's content digest and length.
    Offered {
        digest: String,
        bytes: u64,
    },
    /// The next bytes of a [`StageRequest::Blob`], in order.
    BlobChunk {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The end of a [`StageRequest::Blob`]: every byte from the offset was sent.
    BlobSent,
    /// While a [`StageRequest::Receive`] copies: `done_bytes` of `total_bytes` (resumed bytes included),
    /// from the stage at `source`.
    Receiving {
        source: String,
        digest: String,
        done_bytes: u64,
        total_bytes: u64,
    },
    /// A source of a [`StageRequest::Receive`] failed (gone, or it sent bytes that do not match its
    /// digest, which are discarded); the next source is tried.
    SourceFailed {
        source: String,
        message: String,
    },
    /// The end of a [`StageRequest::Receive`]: the model is installed (`fetched_bytes` 0 when the node
    /// had it already).
    Received {
        digest: String,
        bytes: u64,
        fetched_bytes: u64,
        millis: u64,
        source: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte fields are encoded as postcard's byte strings (a length and the bytes, copied whole), which
    /// is exactly how a sequence of `u8` is encoded: the wire format did not change.
    #[test]
    fn byte_fields_keep_the_wire_format_of_a_u8_sequence() {
        #[derive(Serialize)]
        enum Before {
            #[allow(dead_code)]
            Other,
            Chunk {
                bytes: Vec<u8>,
            },
        }
        let bytes: Vec<u8> = (0..=255).chain(0..44).collect();
        let before = postcard::to_stdvec(&Before::Chunk {
            bytes: bytes.clone(),
        })
        .expect("encode");
        let reply = StageReply::BlobChunk { bytes };
        let after = postcard::to_stdvec(&reply).expect("encode");
        // The variant index differs; the payload does not.
        assert_eq!(after[1..], before[1..]);
        let decoded: StageReply =
            postcard::from_bytes(&postcard::to_stdvec(&reply).expect("encode")).expect("decode");
        assert_eq!(decoded, reply);
    }
}
