//! The stage server: an agent's share of distributed inference (`sollol_shared::layers` describes the
//! protocol), and the protocol's client handshake ([`dial`]).
//!
//! A stage lets in only peers holding the cluster token, loads the part of a model the coordinator asks
//! for from its own copy (matched by content digest, so every stage computes with the same weights),
//! keeps one KV cache per sequence, runs its layers and hands the hidden states to the next stage
//! itself; the last stage samples and answers the coordinator. One part of one model at a time: a
//! `Load` of another part replaces it (and forgets its sequences).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sollol_shared::layers::{
    Forward, LAYER_MAGIC, LAYER_PROTOCOL_VERSION, LayerAuth, LayerChallenge, LayerHello,
    LayerWelcome, MAX_LAYER_FRAME_BYTES, Output, PartSpec, Sampling, StageInput, StageReply,
    StageRequest, StageTrace,
};
use sollol_shared::protocol::{Refusal, RefusalCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster::identity::ClusterToken;
use crate::cluster::wire::{self, ProofSide};
use sollol_engine::engine::{self, ModelFile};
use sollol_engine::gguf::Gguf;
use sollol_engine::model::{KvCache, Model, Part, Segment, Shape};
use sollol_engine::sampling::{Sampler, SamplingOptions};

mod fetch;

/// Handshake frames are small; only requests may be large.
const HANDSHAKE_FRAME_BYTES: u32 = 64 * 1024;

#[derive(Clone, Debug)]
pub struct StageSettings {
    pub node_id: String,
    pub node_name: String,
    pub models_dir: PathBuf,
    pub ollama_store: Option<PathBuf>,
    pub token: ClusterToken,
    pub handshake_timeout: Duration,
    /// The most memory this node offers to models (`engine.max_memory`); `None`: what is available.
    pub memory_limit: Option<u64>,
}

/// Who answered a [`dial`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagePeer {
    pub node_id: String,
    pub node_name: String,
    pub build_version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot connect to the stage at {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("the stage at {address} refused: {refusal}")]
    Refused { address: String, refusal: Refusal },
    #[error("the stage at {address} did not prove it holds the cluster token")]
    BadProof { address: String },
    #[error("the handshake with the stage at {address} failed: {message}")]
    Handshake { address: String, message: String },
}

/// Connects to the stage at `address` and completes the authenticated, versioned handshake.
pub async fn dial(
    address: &str,
    token: &ClusterToken,
    timeout: Duration,
) -> Result<(TcpStream, StagePeer), DialError> {
    let failed = |message: String| DialError::Handshake {
        address: address.to_owned(),
        message,
    };
    let exchange = async {
        let mut stream =
            TcpStream::connect(address)
                .await
                .map_err(|source| DialError::Connect {
                    address: address.to_owned(),
                    source,
                })?;
        stream.set_nodelay(true).ok();
        stream
            .write_all(&LAYER_MAGIC)
            .await
            .map_err(|error| failed(error.to_string()))?;
        let nonce = wire::nonce();
        let hello = LayerHello {
            protocol_version: LAYER_PROTOCOL_VERSION,
            build_version: sollol_shared::BUILD_VERSION.to_owned(),
            nonce,
        };
        wire::write_message(&mut stream, &hello)
            .await
            .map_err(|error| failed(error.to_string()))?;
        let challenge: LayerChallenge =
            wire::read_message_within(&mut stream, HANDSHAKE_FRAME_BYTES)
                .await
                .map_err(|error| failed(error.to_string()))?;
        let (peer, stage_nonce) = match challenge {
            LayerChallenge::Refused(refusal) => {
                return Err(DialError::Refused {
                    address: address.to_owned(),
                    refusal,
                });
            }
            LayerChallenge::Challenge {
                build_version,
                node_id,
                node_name,
                nonce: stage_nonce,
                proof,
                ..
            } => {
                if !wire::verify_proof(token, ProofSide::Stage, &nonce, "", &proof) {
                    return Err(DialError::BadProof {
                        address: address.to_owned(),
                    });
                }
                (
                    StagePeer {
                        node_id,
                        node_name,
                        build_version,
                    },
                    stage_nonce,
                )
            }
        };
        let auth = LayerAuth {
            proof: wire::proof(token, ProofSide::LayerClient, &stage_nonce, ""),
        };
        wire::write_message(&mut stream, &auth)
            .await
            .map_err(|error| failed(error.to_string()))?;
        match wire::read_message_within(&mut stream, HANDSHAKE_FRAME_BYTES)
            .await
            .map_err(|error| failed(error.to_string()))?
        {
            LayerWelcome::Welcome => Ok((stream, peer)),
            LayerWelcome::Refused(refusal) => Err(DialError::Refused {
                address: address.to_owned(),
                refusal,
            }),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(failed(format!("no answer within {timeout:?}"))))
}

/// Serves the layer protocol on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, settings: StageSettings, shutdown: CancellationToken) {
    let stage = Arc::new(Stage {
        settings,
        part: tokio::sync::Mutex::new(None),
        next: tokio::sync::Mutex::new(None),
        sequences: Mutex::new(HashMap::new()),
        digests: Mutex::new(HashMap::new()),
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
    next: tokio::sync::Mutex<Option<(String, OwnedWriteHalf)>>,
    sequences: Mutex<HashMap<u64, Sequence>>,
    /// Content digests computed so far, by path and length.
    digests: Mutex<HashMap<(PathBuf, u64), String>>,
}

fn refusal(code: RefusalCode, message: impl Into<String>) -> StageReply {
    StageReply::Refused(Refusal {
        code,
        message: message.into(),
    })
}

async fn connection(stage: Arc<Stage>, mut stream: TcpStream, shutdown: CancellationToken) {
    stream.set_nodelay(true).ok();
    let timeout = stage.settings.handshake_timeout;
    match tokio::time::timeout(timeout, stage.handshake(&mut stream)).await {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => {
            tracing::info!(%reason, "stage connection refused");
            return;
        }
        Err(_) => return,
    }
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
    async fn handshake(&self, stream: &mut TcpStream) -> Result<(), String> {
        let mut magic = [0u8; 8];
        stream
            .read_exact(&mut magic)
            .await
            .map_err(|error| error.to_string())?;
        if magic != LAYER_MAGIC {
            return Err("not a sollol layer client".to_owned());
        }
        let hello: LayerHello = wire::read_message_within(stream, HANDSHAKE_FRAME_BYTES)
            .await
            .map_err(|error| error.to_string())?;
        if hello.protocol_version != LAYER_PROTOCOL_VERSION {
            let message = format!(
                "version mismatch: this stage ({}) speaks layer protocol v{LAYER_PROTOCOL_VERSION} (sollol {}), the peer v{} (sollol {})",
                self.settings.node_name,
                sollol_shared::BUILD_VERSION,
                hello.protocol_version,
                hello.build_version
            );
            let reply = LayerChallenge::Refused(Refusal {
                code: RefusalCode::IncompatibleVersion,
                message: message.clone(),
            });
            let _ = wire::write_message(stream, &reply).await;
            return Err(message);
        }
        let nonce = wire::nonce();
        let challenge = LayerChallenge::Challenge {
            protocol_version: LAYER_PROTOCOL_VERSION,
            build_version: sollol_shared::BUILD_VERSION.to_owned(),
            node_id: self.settings.node_id.clone(),
            node_name: self.settings.node_name.clone(),
            nonce,
            proof: wire::proof(&self.settings.token, ProofSide::Stage, &hello.nonce, ""),
        };
        wire::write_message(stream, &challenge)
            .await
            .map_err(|error| error.to_string())?;
        let auth: LayerAuth = wire::read_message_within(stream, HANDSHAKE_FRAME_BYTES)
            .await
            .map_err(|error| error.to_string())?;
        if !wire::verify_proof(
            &self.settings.token,
            ProofSide::LayerClient,
            &nonce,
            "",
            &auth.proof,
        ) {
            let reply = LayerWelcome::Refused(Refusal {
                code: RefusalCode::BadToken,
                message: "the peer holds another cluster token".to_owned(),
            });
            let _ = wire::write_message(stream, &reply).await;
            return Err("bad token".to_owned());
        }
        wire::write_message(stream, &LayerWelcome::Welcome)
            .await
            .map_err(|error| error.to_string())
    }

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
        };
        if let Some(reply) = reply {
            let _ = replies.send(reply).await;
        }
    }

    /// The memory this node offers to a part now: what it has available, within `engine.max_memory`.
    fn offered_memory(&self) -> u64 {
        let available = free_memory_bytes();
        self.settings
            .memory_limit
            .map_or(available, |limit| available.min(limit))
    }

    /// The models this node has, with their content digests computed on demand.
    async fn files(&self) -> Vec<ModelFile> {
        let models_dir = self.settings.models_dir.clone();
        let store = self.settings.ollama_store.clone();
        tokio::task::spawn_blocking(move || engine::discover(&models_dir, store.as_deref()))
            .await
            .unwrap_or_default()
    }

    async fn digest_of(&self, file: &ModelFile) -> Result<String, String> {
        let key = (file.path.clone(), file.size_bytes);
        if let Some(digest) = self
            .digests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(digest.clone());
        }
        let path = file.path.clone();
        let digest = tokio::task::spawn_blocking(move || engine::content_digest(&path))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| format!("cannot read {}: {error}", file.path.display()))?;
        self.digests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, digest.clone());
        Ok(digest)
    }

    async fn describe(&self, model: &str) -> StageReply {
        let files = self.files().await;
        let wanted = sollol_shared::model_name::normalize(model);
        let Some(file) = files.iter().find(|file| file.name == wanted) else {
            tracing::info!(model = %wanted, has = %names(&files), "no copy of the model here: a plan can still fetch a part");
            return StageReply::Lacking {
                free_memory_bytes: self.offered_memory(),
            };
        };
        let digest = match self.digest_of(file).await {
            Ok(digest) => digest,
            Err(message) => return refusal(RefusalCode::ModelMissing, message),
        };
        let path = file.path.clone();
        let layers = tokio::task::spawn_blocking(move || -> Result<usize, String> {
            let handle = std::fs::File::open(&path).map_err(|error| error.to_string())?;
            let length = handle.metadata().map_err(|error| error.to_string())?.len();
            let gguf = Gguf::read(std::io::BufReader::new(handle), length)
                .map_err(|error| error.to_string())?;
            Ok(Shape::read(&gguf)
                .map_err(|error| error.to_string())?
                .layers)
        })
        .await
        .map_err(|error| error.to_string())
        .and_then(|layers| layers);
        match layers {
            Ok(layers) => StageReply::Described {
                digest,
                layers: u32::try_from(layers).unwrap_or(u32::MAX),
                file_bytes: file.size_bytes,
                free_memory_bytes: self.offered_memory(),
            },
            Err(message) => refusal(
                RefusalCode::BadRequest,
                format!("{wanted} on {}: {message}", self.settings.node_name),
            ),
        }
    }

    /// Loads `spec` (fetching what it lacks from `sources`, with [`StageReply::Fetching`] on `progress`)
    /// and connects to `next`.
    async fn load(
        &self,
        spec: PartSpec,
        next: Option<String>,
        sources: Vec<String>,
        progress: &mpsc::Sender<StageReply>,
    ) -> StageReply {
        let started = Instant::now();
        let mut fetched_bytes = 0;
        let mut part = self.part.lock().await;
        if part.as_ref().is_none_or(|loaded| loaded.spec != spec) {
            let wanted = sollol_shared::model_name::normalize(&spec.model);
            let file = match self.find_copy(&wanted, &spec.digest).await {
                Ok(Some(file)) => file,
                Ok(None) => match self.partial_copy(&spec, &sources, progress).await {
                    Ok((file, fetched)) => {
                        fetched_bytes = fetched;
                        file
                    }
                    Err(message) => {
                        return refusal(
                            RefusalCode::ModelMissing,
                            format!(
                                "node {} has no copy of {wanted} ({}) and could not fetch its part: {message}",
                                self.settings.node_name, spec.digest
                            ),
                        );
                    }
                },
                Err(reply) => return reply,
            };
            // The old part's memory goes before the new one is read.
            *part = None;
            self.sequences
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            let load_spec = spec.clone();
            let path = file.path.clone();
            let loaded = tokio::task::spawn_blocking(move || -> Result<Model, String> {
                let handle = std::fs::File::open(&path).map_err(|error| error.to_string())?;
                let length = handle.metadata().map_err(|error| error.to_string())?.len();
                let gguf = Gguf::read(std::io::BufReader::new(handle), length)
                    .map_err(|error| error.to_string())?;
                Model::load(
                    &path,
                    &gguf,
                    Part {
                        embed: load_spec.embed,
                        layers: load_spec.start as usize..load_spec.end as usize,
                        head: load_spec.head,
                    },
                )
                .map_err(|error| error.to_string())
            })
            .await
            .map_err(|error| error.to_string())
            .and_then(|model| model);
            match loaded {
                Ok(model) => {
                    tracing::info!(model = %wanted, layers = ?(spec.start..spec.end), embed = spec.embed, head = spec.head, "stage loaded its part");
                    *part = Some(Arc::new(LoadedPart { spec, file, model }));
                }
                Err(message) => {
                    return refusal(
                        RefusalCode::BadRequest,
                        format!(
                            "node {} cannot load {wanted}: {message}",
                            self.settings.node_name
                        ),
                    );
                }
            }
        }
        drop(part);
        let mut link = self.next.lock().await;
        match next {
            None => *link = None,
            Some(address) => {
                if link.as_ref().is_none_or(|(linked, _)| *linked != address) {
                    match dial(
                        &address,
                        &self.settings.token,
                        self.settings.handshake_timeout,
                    )
                    .await
                    {
                        Ok((stream, _)) => {
                            let (mut reader, writer) = stream.into_split();
                            // The next stage answers the coordinator, not us: drain whatever comes.
                            tokio::spawn(async move {
                                let mut sink = [0u8; 4096];
                                while matches!(reader.read(&mut sink).await, Ok(read) if read > 0) {
                                }
                            });
                            *link = Some((address, writer));
                        }
                        Err(error) => {
                            *link = None;
                            return refusal(
                                RefusalCode::BadRequest,
                                format!(
                                    "node {} cannot reach the next stage: {error}",
                                    self.settings.node_name
                                ),
                            );
                        }
                    }
                }
            }
        }
        StageReply::Loaded {
            resident_bytes: resident_bytes(),
            load_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            fetched_bytes,
        }
    }

    async fn open(
        &self,
        sequence: u64,
        sampling: Option<Sampling>,
        history: Vec<u32>,
        replies: &mpsc::Sender<StageReply>,
    ) -> StageReply {
        let part = self.part.lock().await.clone();
        let Some(part) = part else {
            return refusal(
                RefusalCode::BadRequest,
                "no model part is loaded on this stage",
            );
        };
        let sampler = sampling.map(|sampling| {
            Sampler::new(SamplingOptions {
                temperature: sampling.temperature,
                top_k: sampling.top_k as usize,
                top_p: sampling.top_p,
                min_p: sampling.min_p,
                repeat_penalty: sampling.repeat_penalty,
                repeat_last_n: sampling.repeat_last_n as usize,
                seed: Some(sampling.seed),
            })
        });
        self.sequences
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                sequence,
                Sequence {
                    cache: part.model.new_cache(),
                    reply: replies.clone(),
                    sampler,
                    history,
                },
            );
        StageReply::Opened { sequence }
    }

    /// Runs `steps` (each a different sequence) as one batch; hands the hidden states on to the next
    /// stage in one frame, or (last stage) answers each sequence's opener.
    async fn forward(&self, steps: Vec<Forward>, replies: &mpsc::Sender<StageReply>) {
        let part = self.part.lock().await.clone();
        let mut batch = Vec::with_capacity(steps.len());
        let mut answers = Vec::new();
        {
            let mut sequences = self
                .sequences
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for step in steps {
                match sequences.remove(&step.sequence) {
                    Some(sequence) if part.is_some() => batch.push((step, sequence)),
                    _ => answers.push((
                        replies.clone(),
                        StageReply::Failed {
                            sequence: step.sequence,
                            message: format!(
                                "node {} has no open sequence {}",
                                self.settings.node_name, step.sequence
                            ),
                            downstream: false,
                        },
                    )),
                }
            }
        }
        let mut onward = Vec::new();
        if let Some(part) = part.filter(|_| !batch.is_empty()) {
            let started = Instant::now();
            let run = move || {
                let results = compute(&part, &mut batch);
                (batch, results)
            };
            // On this worker when the runtime allows (one thread hand-off less per forward).
            let computed = if tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread
            {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    tokio::task::block_in_place(run)
                }))
                .map_err(|_| ())
            } else {
                tokio::task::spawn_blocking(run).await.map_err(|_| ())
            };
            let Ok((batch, results)) = computed else {
                tracing::error!("a stage computation panicked");
                return;
            };
            // Each step is charged its share of the batch.
            let size = batch.len();
            let share = started.elapsed().as_micros() / size as u128;
            let mut sequences = self
                .sequences
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for ((mut step, sequence), result) in batch.into_iter().zip(results) {
                let reply = sequence.reply.clone();
                sequences.insert(step.sequence, sequence);
                step.trace.push(StageTrace {
                    compute_us: u32::try_from(share).unwrap_or(u32::MAX),
                    sent_bytes: 0,
                    batch: u32::try_from(size).unwrap_or(u32::MAX),
                });
                let answer = match result {
                    Err(message) => StageReply::Failed {
                        sequence: step.sequence,
                        message: format!("node {}: {message}", self.settings.node_name),
                        downstream: false,
                    },
                    Ok(Computed::Nothing) => continue,
                    Ok(Computed::Sampled(token)) => StageReply::Sampled {
                        sequence: step.sequence,
                        token,
                        trace: step.trace,
                    },
                    Ok(Computed::Logits(values)) => StageReply::Logits {
                        sequence: step.sequence,
                        values,
                        trace: step.trace,
                    },
                    Ok(Computed::Hidden { tokens, values }) => {
                        // The hidden states dominate the frame; the rest is a few dozen bytes.
                        if let Some(mine) = step.trace.last_mut() {
                            mine.sent_bytes =
                                u32::try_from(values.len() * 4 + 32).unwrap_or(u32::MAX);
                        }
                        step.input = StageInput::Hidden { tokens, values };
                        onward.push((reply, step));
                        continue;
                    }
                };
                answers.push((reply, answer));
            }
        }
        if !onward.is_empty() {
            let (owners, steps): (Vec<_>, Vec<_>) = onward.into_iter().unzip();
            let sequences: Vec<u64> = steps.iter().map(|step| step.sequence).collect();
            let request = StageRequest::Forward { steps };
            let mut link = self.next.lock().await;
            let sent = match link.as_mut() {
                Some((_, writer)) => {
                    wire::write_message_within(writer, &request, MAX_LAYER_FRAME_BYTES)
                        .await
                        .map_err(|error| error.to_string())
                }
                None => Err("no next stage is connected".to_owned()),
            };
            if let Err(message) = sent {
                *link = None;
                for (owner, sequence) in owners.into_iter().zip(sequences) {
                    answers.push((
                        owner,
                        StageReply::Failed {
                            sequence,
                            message: format!(
                                "node {} cannot hand its output to the next stage: {message}",
                                self.settings.node_name
                            ),
                            downstream: true,
                        },
                    ));
                }
            }
        }
        for (reply, answer) in answers {
            let _ = reply.send(answer).await;
        }
    }

    async fn header(&self, digest: Option<String>) -> StageReply {
        let path = match digest {
            Some(digest) => match self.copy_holding(&digest, &[]).await {
                Some(path) => path,
                None => {
                    return refusal(
                        RefusalCode::ModelMissing,
                        format!("node {} has no copy of {digest}", self.settings.node_name),
                    );
                }
            },
            None => match self.part.lock().await.as_ref() {
                Some(part) => part.file.path.clone(),
                None => {
                    return refusal(
                        RefusalCode::BadRequest,
                        "no model part is loaded on this stage",
                    );
                }
            },
        };
        let read = tokio::task::spawn_blocking(move || engine::header_bytes(&path))
            .await
            .map_err(|error| error.to_string())
            .and_then(|read| read.map_err(|error| error.to_string()));
        match read {
            Ok((bytes, file_bytes)) => StageReply::Header { bytes, file_bytes },
            Err(message) => refusal(RefusalCode::BadRequest, message),
        }
    }

    /// The local full copy of `wanted` with `digest`: `Ok(None)` when there is none, a refusal when the
    /// file named like the model has other content.
    async fn find_copy(&self, wanted: &str, digest: &str) -> Result<Option<ModelFile>, StageReply> {
        let files = self.files().await;
        let mut named_digest = None;
        // The file named like the model first, then any file with the same content.
        let mut ordered: Vec<&ModelFile> = files.iter().filter(|f| f.name == wanted).collect();
        ordered.extend(files.iter().filter(|f| f.name != wanted));
        for file in ordered {
            match self.digest_of(file).await {
                Ok(found) if found == digest => return Ok(Some(file.clone())),
                Ok(found) if file.name == wanted => named_digest = Some(found),
                _ => {}
            }
        }
        match named_digest {
            Some(found) => Err(refusal(
                RefusalCode::DigestMismatch,
                format!(
                    "node {}'s copy of {wanted} is {found}, the plan needs {digest}",
                    self.settings.node_name
                ),
            )),
            None => Ok(None),
        }
    }
}

/// What a forward produced.
enum Computed {
    Nothing,
    Hidden { tokens: u32, values: Vec<f32> },
    Sampled(u32),
    Logits(Vec<f32>),
}

/// Runs a batch of steps (each its own sequence) through the part's layers at once; one result per
/// step, in order. A step with bad input fails alone.
fn compute(part: &LoadedPart, batch: &mut [(Forward, Sequence)]) -> Vec<Result<Computed, String>> {
    let model = &part.model;
    let width = model.shape.embedding;
    let mut hidden = Vec::new();
    // Each step's rows in the batch, or why it has none.
    let rows: Vec<Result<usize, String>> = batch
        .iter_mut()
        .map(|(step, _)| {
            let values = match &mut step.input {
                StageInput::Tokens(ids) => model
                    .embed(ids)
                    .and_then(|rows| Ok(rows.flatten_all()?.to_vec1::<f32>()?))
                    .map_err(|error| error.to_string())?,
                StageInput::Hidden { tokens, values } => {
                    if values.len() != *tokens as usize * width || *tokens == 0 {
                        return Err(format!(
                            "{} hidden values for {tokens} tokens of width {width}",
                            values.len()
                        ));
                    }
                    std::mem::take(values)
                }
            };
            hidden.extend_from_slice(&values);
            Ok(values.len() / width)
        })
        .collect();
    let mut segments: Vec<Segment<'_>> = batch
        .iter_mut()
        .zip(&rows)
        .filter_map(|((step, sequence), rows)| {
            let tokens = *rows.as_ref().ok()?;
            sequence.cache.length = step.start as usize;
            Some(Segment {
                tokens,
                cache: &mut sequence.cache,
            })
        })
        .collect();
    let out = if segments.is_empty() {
        Ok(Vec::new())
    } else {
        model
            .layers_batch(hidden, &mut segments)
            .map_err(|error| error.to_string())
    };
    drop(segments);
    let out = match out {
        Ok(out) => out,
        Err(message) => {
            return rows
                .into_iter()
                .map(|rows| rows.and_then(|_| Err(message.clone())))
                .collect();
        }
    };
    // Each step's output rows, its cache advanced past them.
    let mut offset = 0;
    let outputs: Vec<Result<&[f32], String>> = batch
        .iter_mut()
        .zip(rows)
        .map(|((step, sequence), rows)| {
            let tokens = rows?;
            sequence.cache.length = step.start as usize + tokens;
            offset += tokens;
            Ok(&out[(offset - tokens) * width..offset * width])
        })
        .collect();
    if !part.spec.head {
        return outputs
            .into_iter()
            .map(|values| {
                let values = values?;
                Ok(Computed::Hidden {
                    tokens: u32::try_from(values.len() / width).unwrap_or(u32::MAX),
                    values: values.to_vec(),
                })
            })
            .collect();
    }
    last_stage_answers(model, batch, outputs)
}

/// The last stage's answers to a batch whose layers ran (`outputs`: each step's rows): the logits of every
/// step that wants them in one pass over the output matrix, then each step's logits or sampled token.
fn last_stage_answers(
    model: &Model,
    batch: &mut [(Forward, Sequence)],
    outputs: Vec<Result<&[f32], String>>,
) -> Vec<Result<Computed, String>> {
    let width = model.shape.embedding;
    let last_rows: Vec<f32> = batch
        .iter()
        .zip(&outputs)
        .filter(|((step, _), _)| step.output != Output::None)
        .filter_map(|(_, values)| values.as_ref().ok())
        .flat_map(|values| &values[values.len() - width..])
        .copied()
        .collect();
    let count = last_rows.len() / width;
    let logits = if count == 0 {
        Ok(Vec::new())
    } else {
        model
            .logits_rows(&last_rows, count)
            .map_err(|error| error.to_string())
    };
    let vocab = logits
        .as_ref()
        .map_or(0, |logits| logits.len() / count.max(1));
    let mut next = 0;
    batch
        .iter_mut()
        .zip(outputs)
        .map(|((step, sequence), values)| {
            values?;
            if step.output == Output::None {
                return Ok(Computed::Nothing);
            }
            let logits = logits.as_ref().map_err(Clone::clone)?;
            next += 1;
            let mine = &logits[(next - 1) * vocab..next * vocab];
            if step.output == Output::Logits {
                return Ok(Computed::Logits(mine.to_vec()));
            }
            let sampler = sequence
                .sampler
                .as_mut()
                .ok_or("the sequence was opened without sampling settings")?;
            let token = sampler.next(mine, &sequence.history);
            sequence.history.push(token);
            Ok(Computed::Sampled(token))
        })
        .collect()
}

fn names(files: &[ModelFile]) -> String {
    if files.is_empty() {
        return "none".to_owned();
    }
    files
        .iter()
        .map(|file| file.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The node's available memory now (`MemAvailable`), 0 when unknown.
fn free_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .map(|text| crate::telemetry::procfs::parse_meminfo(&text).available_bytes)
        .unwrap_or(0)
}

/// This process's resident memory (`VmRSS`), 0 when unknown.
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

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
