//! The stage server: an agent's share of distributed inference (`sollol_shared::layers` describes the
//! protocol), and the protocol's client handshake ([`dial`]).
//!
//! A stage lets in only peers holding the cluster token, loads the part of a model the coordinator asks
//! for from its own copy (matched by content digest, so every stage computes with the same weights),
//! keeps one KV cache per sequence, runs its layers and hands the hidden states to the next stage
//! itself; the last stage samples and answers the coordinator. One part of one model at a time: a
//! `Load` of another part replaces it (and forgets its sequences).
//!
//! The submodules: `handshake` is the protocol's handshake on both sides, `copies` the node's model
//! files matched by content digest, `part` describing a copy and loading a part of it, `fetch` the
//! tensors fetched from or served to peers, `compute` the sequences and their batched forwards,
//! `memory` what memory this node offers, `transfer` whole model files copied between agents (the
//! cluster's model management), and `ollama` handing such a copy to the node's Ollama.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sollol_shared::layers::{Forward, MAX_LAYER_FRAME_BYTES, PartSpec, StageReply, StageRequest};
use sollol_shared::protocol::{Refusal, RefusalCode};
use tokio::net::tcp::OwnedWriteHalf;

use crate::cluster::secure::SecureWriter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster::identity::ClusterToken;
use crate::cluster::wire;
use crate::distributed::manifest::TensorManifest;
use sollol_engine::engine::ModelFile;
use sollol_engine::model::{KvCache, Model};
use sollol_engine::sampling::Sampler;

mod compute;
mod copies;
mod fetch;
mod handshake;
mod memory;
mod ollama;
mod part;
mod transfer;

pub use handshake::{DialError, StagePeer, dial};
pub use memory::{offered_memory, resident_bytes};

#[derive(Clone, Debug)]
pub struct StageSettings {
    pub node_id: String,
    pub node_name: String,
    pub models_dir: PathBuf,
    pub ollama_store: Option<PathBuf>,
    /// The node's Ollama, where copied models go; `None` when the built-in engine serves the node
    /// (copies go into `models_dir`).
    pub ollama_url: Option<String>,
    /// Most bytes the files in `models_dir` may take (`engine.max_disk`).
    pub max_disk: Option<u64>,
    pub token: ClusterToken,
    pub handshake_timeout: Duration,
    /// The most memory this node offers to models (`engine.max_memory`); `None`: what is available.
    pub memory_limit: Option<u64>,
}

/// Serves the layer protocol on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, settings: StageSettings, shutdown: CancellationToken) {
    let stage = Arc::new(Stage {
        settings,
        part: tokio::sync::Mutex::new(None),
        next: tokio::sync::Mutex::new(None),
        sequences: Mutex::new(HashMap::new()),
        digests: Mutex::new(HashMap::new()),
        contents: Mutex::new(HashMap::new()),
        receiving: Mutex::new(HashMap::new()),
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(Arc::clone(&stage), stream, shutdown.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "the stage port failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = shutdown.cancelled() => return,
        }
    }
}

/// The part a stage holds.
#[derive(Debug)]
struct LoadedPart {
    spec: PartSpec,
    file: ModelFile,
    model: Model,
}

/// One sequence's state on this stage.
#[derive(Debug)]
struct Sequence {
    cache: KvCache,
    /// The connection of whoever opened it (the coordinator): where results go.
    reply: mpsc::Sender<StageReply>,
    /// The last stage's sampler and the tokens so far (prompt and output), for the repeat penalty.
    sampler: Option<Sampler>,
    history: Vec<u32>,
}

#[derive(Debug)]
struct Stage {
    settings: StageSettings,
    part: tokio::sync::Mutex<Option<Arc<LoadedPart>>>,
    /// The connection to the next stage: its address and writing half.
    next: tokio::sync::Mutex<Option<(String, SecureWriter<OwnedWriteHalf>)>>,
    sequences: Mutex<HashMap<u64, Sequence>>,
    /// Content digests and tensor manifests computed so far, by path, length and modification time.
    digests: Mutex<HashMap<CopyKey, (String, Arc<TensorManifest>)>>,
    /// Content digests alone (of files offered to peers), the same way.
    contents: Mutex<HashMap<CopyKey, String>>,
    receiving: transfer::Receiving,
}

type CopyKey = (PathBuf, u64, std::time::SystemTime);

fn refusal(code: RefusalCode, message: impl Into<String>) -> StageReply {
    StageReply::Refused(Refusal {
        code,
        message: message.into(),
    })
}

async fn connection(stage: Arc<Stage>, mut stream: TcpStream, shutdown: CancellationToken) {
    stream.set_nodelay(true).ok();
    let timeout = stage.settings.handshake_timeout;
    let key = match tokio::time::timeout(timeout, stage.handshake(&mut stream)).await {
        Ok(Ok(key)) => key,
        Ok(Err(reason)) => {
            tracing::info!(%reason, "stage connection refused");
            return;
        }
        Err(_) => return,
    };
    let secured =
        crate::cluster::secure::secure_tcp(stream, crate::cluster::secure::Role::Listener, &key);
    let stream = match tokio::time::timeout(timeout, secured).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::info!(%error, "stage link encryption failed");
            return;
        }
        Err(_) => return,
    };
    let (mut reader, mut writer) = stream.into_split();
    let (replies, mut outgoing) = mpsc::channel::<StageReply>(64);
    let writing = tokio::spawn(async move {
        while let Some(reply) = outgoing.recv().await {
            if wire::write_message_within(&mut writer, &reply, MAX_LAYER_FRAME_BYTES)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // Requests are read ahead, so that the forwards waiting when a batch starts join it.
    let (requests, mut incoming) = mpsc::channel::<StageRequest>(256);
    let reading = tokio::spawn(async move {
        loop {
            let request = tokio::select! {
                request = wire::read_message_within::<StageRequest, _>(&mut reader, MAX_LAYER_FRAME_BYTES) => request,
                () = shutdown.cancelled() => break,
            };
            let Ok(request) = request else { break };
            if requests.send(request).await.is_err() {
                break;
            }
        }
    });
    let mut pending = None;
    while let Some(request) = match pending.take() {
        Some(request) => Some(request),
        None => incoming.recv().await,
    } {
        match request {
            StageRequest::Forward { mut steps } => {
                pending = gather(&mut steps, &mut incoming);
                stage.forward(steps, &replies).await;
            }
            other => stage.handle(other, &replies).await,
        }
    }
    reading.abort();
    // Sequences opened on this connection have no one to answer any more.
    stage
        .sequences
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|_, sequence| !sequence.reply.same_channel(&replies));
    drop(replies);
    let _ = writing.await;
}

/// Most steps in one batch, and most rows (prompt tokens count one each).
const BATCH_STEPS: usize = 16;
const BATCH_ROWS: usize = 512;

/// Adds to `steps` the forwards already waiting in `incoming`, as long as each sequence appears once and
/// the batch stays within [`BATCH_STEPS`] and [`BATCH_ROWS`]; returns the request that could not join.
fn gather(
    steps: &mut Vec<Forward>,
    incoming: &mut mpsc::Receiver<StageRequest>,
) -> Option<StageRequest> {
    let rows = |steps: &[Forward]| -> usize { steps.iter().map(|step| step.input.rows()).sum() };
    while steps.len() < BATCH_STEPS {
        let Ok(request) = incoming.try_recv() else {
            return None;
        };
        match request {
            StageRequest::Forward { steps: more }
                if steps.len() + more.len() <= BATCH_STEPS
                    && rows(steps) + rows(&more) <= BATCH_ROWS
                    && more
                        .iter()
                        .all(|step| steps.iter().all(|taken| taken.sequence != step.sequence)) =>
            {
                steps.extend(more);
            }
            other => return Some(other),
        }
    }
    None
}

impl Stage {
    async fn handle(&self, request: StageRequest, replies: &mpsc::Sender<StageReply>) {
        let reply = match request {
            StageRequest::Describe { model } => Some(self.describe(&model).await),
            StageRequest::Load {
                part,
                next,
                sources,
            } => Some(self.load(part, next, sources, replies).await),
            StageRequest::Tensors { digest, names } => {
                self.send_tensors(&digest, &names, replies).await;
                None
            }
            StageRequest::Open {
                sequence,
                sampling,
                history,
            } => Some(self.open(sequence, sampling, history, replies).await),
            StageRequest::Forward { steps } => {
                self.forward(steps, replies).await;
                None
            }
            StageRequest::Close { sequence } => {
                self.sequences
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&sequence);
                Some(StageReply::Closed { sequence })
            }
            StageRequest::Header { digest } => Some(self.header(digest).await),
            StageRequest::Offer { model } => Some(self.offer(&model).await),
            StageRequest::Blob { digest, offset } => {
                self.send_blob(&digest, offset, replies).await;
                None
            }
            StageRequest::Receive { model, sources } => {
                Some(self.receive(&model, &sources, replies).await)
            }
        };
        if let Some(reply) = reply {
            let _ = replies.send(reply).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sollol_shared::layers::{Output, StageInput};

    fn step(sequence: u64, tokens: usize) -> Forward {
        Forward {
            sequence,
            start: 0,
            input: StageInput::Tokens(vec![1; tokens]),
            output: Output::Sample,
            trace: Vec::new(),
        }
    }

    fn forward(sequences: &[u64], tokens: usize) -> StageRequest {
        StageRequest::Forward {
            steps: sequences
                .iter()
                .map(|sequence| step(*sequence, tokens))
                .collect(),
        }
    }

    fn sequences(steps: &[Forward]) -> Vec<u64> {
        steps.iter().map(|step| step.sequence).collect()
    }

    #[tokio::test]
    async fn a_batch_takes_the_waiting_forwards_of_other_sequences_only() {
        let (sender, mut incoming) = mpsc::channel(16);
        for request in [
            forward(&[2, 3], 1),
            forward(&[4], 1),
            // Sequence 3 again (its next prompt chunk): it waits for the next batch.
            forward(&[3], 1),
            forward(&[5], 1),
            StageRequest::Close { sequence: 9 },
        ] {
            sender.send(request).await.expect("queued");
        }
        let mut steps = vec![step(1, 1)];
        let left = gather(&mut steps, &mut incoming);
        assert_eq!(sequences(&steps), [1, 2, 3, 4]);
        let Some(StageRequest::Forward { steps: mut next }) = left else {
            panic!("the repeated sequence waits");
        };
        assert_eq!(sequences(&next), [3]);

        // The next batch takes what follows, up to a request of another kind, which waits its turn.
        let left = gather(&mut next, &mut incoming);
        assert_eq!(sequences(&next), [3, 5]);
        assert!(matches!(left, Some(StageRequest::Close { sequence: 9 })));

        // A forward that would pass the row limit waits too.
        sender
            .send(forward(&[6], BATCH_ROWS))
            .await
            .expect("queued");
        let mut steps = vec![step(7, 1)];
        let left = gather(&mut steps, &mut incoming);
        assert_eq!(sequences(&steps), [7]);
        assert!(matches!(left, Some(StageRequest::Forward { .. })));
        assert!(gather(&mut steps, &mut incoming).is_none());
    }
}
