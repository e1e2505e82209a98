//! Distributed inference, the driving side: plans a model's layers over agents' stages, loads the parts,
//! and runs sequences through the stages (`sollol_shared::layers` describes the protocol; `stage` is
//! the agents' side).
//!
//! The coordinator keeps one connection to every stage. It sends token ids to the first stage only;
//! the stages pass hidden states along among themselves, and the last stage answers each step with the
//! sampled token id. A stage that dies or stops answering fails the step with [`PipelineError::Stage`];
//! the caller re-plans on the stages left and re-runs the sequence from its tokens so far.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sollol_shared::api::{PlanPhase, StageProgress};
use sollol_shared::layers::{
    Forward, MAX_LAYER_FRAME_BYTES, Output, PartSpec, Sampling, StageInput, StageReply,
    StageRequest, StageTrace,
};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::cluster::identity::ClusterToken;
use crate::cluster::wire;
use crate::distributed::stage::{DialError, StagePeer, dial};

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

/// An agent that could hold a stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub node_id: String,
    pub name: String,
    /// The agent's stage port, `HOST:PORT`.
    pub address: String,
}

/// One stage of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedStage {
    pub candidate: Candidate,
    pub layers: Range<usize>,
    pub free_memory_bytes: u64,
}

/// Which agent runs which layers of a model, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub model: String,
    pub digest: String,
    pub layers: usize,
    pub stages: Vec<PlannedStage>,
    /// One line per decision, for the API and the logs.
    pub reasons: Vec<String>,
}

/// Splits `layers` into contiguous ranges, one per stage, in proportion to `weights` (measured speed,
/// or free memory when speeds are unknown), never giving a stage more layers than 90% of its free
/// memory holds at `bytes_per_layer`.
pub fn split_layers(
    layers: usize,
    bytes_per_layer: u64,
    free: &[u64],
    weights: &[f64],
) -> Result<Vec<Range<usize>>, String> {
    if free.is_empty() {
        return Err("no stage to place layers on".to_owned());
    }
    if layers < free.len() {
        return Err(format!(
            "{} stages for {layers} layers: every stage needs at least one",
            free.len()
        ));
    }
    let capacity: Vec<usize> = free
        .iter()
        .map(|bytes| usize::try_from(bytes / 10 * 9 / bytes_per_layer.max(1)).unwrap_or(usize::MAX))
        .collect();
    let total_capacity: usize = capacity
        .iter()
        .fold(0, |sum, each| sum.saturating_add(*each));
    if total_capacity < layers || capacity.contains(&0) {
        return Err(format!(
            "not enough free memory: {layers} layers of {} MiB, the stages hold {:?} layers",
            bytes_per_layer / (1 << 20),
            capacity
        ));
    }
    let total_weight: f64 = weights.iter().filter(|weight| weight.is_finite()).sum();
    // Shares by largest remainder, at least one layer each, then capped and the surplus moved on.
    let exact: Vec<f64> = weights
        .iter()
        .map(|weight| layers as f64 * weight / total_weight.max(f64::MIN_POSITIVE))
        .collect();
    let mut counts: Vec<usize> = exact
        .iter()
        .map(|share| (share.floor() as usize).max(1))
        .collect();
    let mut order: Vec<usize> = (0..free.len()).collect();
    order.sort_by(|a, b| {
        let remainder = |index: usize| exact[index] - exact[index].floor();
        remainder(*b).total_cmp(&remainder(*a))
    });
    while counts.iter().sum::<usize>() < layers {
        for index in &order {
            if counts.iter().sum::<usize>() < layers {
                counts[*index] += 1;
            }
        }
    }
    while counts.iter().sum::<usize>() > layers {
        let largest = (0..counts.len())
            .max_by_key(|index| counts[*index])
            .unwrap_or(0);
        counts[largest] -= 1;
    }
    loop {
        let surplus: usize = counts
            .iter()
            .zip(&capacity)
            .map(|(count, cap)| count.saturating_sub(*cap))
            .sum();
        if surplus == 0 {
            break;
        }
        for (count, cap) in counts.iter_mut().zip(&capacity) {
            *count = (*count).min(*cap);
        }
        let mut left = surplus;
        for (count, cap) in counts.iter_mut().zip(&capacity) {
            let room = cap - *count;
            let moved = room.min(left);
            *count += moved;
            left -= moved;
        }
    }
    let mut start = 0;
    Ok(counts
        .iter()
        .map(|count| {
            let range = start..start + count;
            start += count;
            range
        })
        .collect())
}

/// Where a plan in progress stands, as [`Pipeline::start_with_speeds`] reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub phase: PlanPhase,
    pub stages: Vec<StageProgress>,
}

/// A connection to one stage, its answers routed to whoever waits for them.
#[derive(Debug)]
struct Link {
    peer: StagePeer,
    address: String,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    routes: Arc<Routes>,
}

/// Where a stage's answers go: per sequence, or (answers that name none) to the plan's driver.
#[derive(Debug, Default)]
struct Routes {
    /// Answers with the index of the stage they came from.
    sequences: Mutex<HashMap<u64, mpsc::UnboundedSender<(usize, StageReply)>>>,
    control: Mutex<Option<mpsc::UnboundedSender<StageReply>>>,
    /// Why the connection ended, once it has.
    lost: Mutex<Option<String>>,
}

fn sequence_of(reply: &StageReply) -> Option<u64> {
    match reply {
        StageReply::Opened { sequence }
        | StageReply::Sampled { sequence, .. }
        | StageReply::Logits { sequence, .. }
        | StageReply::Closed { sequence }
        | StageReply::Failed { sequence, .. } => Some(*sequence),
        _ => None,
    }
}

impl Link {
    async fn open(
        index: usize,
        address: &str,
        token: &ClusterToken,
        timeout: Duration,
    ) -> Result<Arc<Self>, PipelineError> {
        let (stream, peer) = dial(address, token, timeout).await?;
        let (mut reader, writer) = stream.into_split();
        let routes = Arc::new(Routes::default());
        let reading = Arc::clone(&routes);
        tokio::spawn(async move {
            let reason = loop {
                match wire::read_message_within::<StageReply, _>(&mut reader, MAX_LAYER_FRAME_BYTES)
                    .await
                {
                    Ok(reply) => match sequence_of(&reply) {
                        Some(sequence) => {
                            let route = reading
                                .sequences
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .get(&sequence)
                                .cloned();
                            if let Some(route) = route {
                                let _ = route.send((index, reply));
                            }
                        }
                        None => {
                            let route = reading
                                .control
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .clone();
                            if let Some(route) = route {
                                let _ = route.send(reply);
                            }
                        }
                    },
                    Err(error) => break error.to_string(),
                }
            };
            *reading.lost.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.clone());
            // Everyone waiting on this stage hears that it is gone.
            let waiting: Vec<_> = reading
                .sequences
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(sequence, route)| (*sequence, route.clone()))
                .collect();
            for (sequence, route) in waiting {
                let _ = route.send((
                    index,
                    StageReply::Failed {
                        sequence,
                        message: format!("connection lost: {reason}"),
                        downstream: false,
                    },
                ));
            }
            reading
                .control
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
        });
        Ok(Arc::new(Self {
            peer,
            address: address.to_owned(),
            writer: tokio::sync::Mutex::new(writer),
            routes,
        }))
    }

    fn name(&self) -> &str {
        &self.peer.node_name
    }

    async fn send(&self, request: &StageRequest) -> Result<(), PipelineError> {
        if let Some(reason) = self
            .routes
            .lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(PipelineError::Stage {
                node: self.name().to_owned(),
                message: format!("connection lost: {reason}"),
            });
        }
        let mut writer = self.writer.lock().await;
        wire::write_message_within(&mut *writer, request, MAX_LAYER_FRAME_BYTES)
            .await
            .map_err(|error| PipelineError::Stage {
                node: self.name().to_owned(),
                message: error.to_string(),
            })
    }

    /// Sends a request whose answer names no sequence and waits for that answer.
    async fn ask(
        &self,
        request: &StageRequest,
        timeout: Duration,
    ) -> Result<StageReply, PipelineError> {
        self.ask_reporting(request, timeout, &|_, _| {}).await
    }

    /// [`Link::ask`], passing the [`StageReply::Fetching`] progress that comes first to `fetching`
    /// (bytes so far, in all); `timeout` runs from the last message.
    async fn ask_reporting(
        &self,
        request: &StageRequest,
        timeout: Duration,
        fetching: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<StageReply, PipelineError> {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        *self
            .routes
            .control
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(sender);
        self.send(request).await?;
        let answer = loop {
            match tokio::time::timeout(timeout, receiver.recv()).await {
                Ok(Some(StageReply::Fetching {
                    done_bytes,
                    total_bytes,
                })) => fetching(done_bytes, total_bytes),
                other => break other,
            }
        };
        match answer {
            Ok(Some(StageReply::Refused(refusal))) => Err(PipelineError::Refused {
                node: self.name().to_owned(),
                message: refusal.message,
            }),
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err(PipelineError::Stage {
                node: self.name().to_owned(),
                message: "connection lost".to_owned(),
            }),
            Err(_) => Err(PipelineError::Stage {
                node: self.name().to_owned(),
                message: format!("no answer within {timeout:?}"),
            }),
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

/// A generation step waiting for its batch, and where to say it was sent (with the batch's share of
/// the in-flight limit, held until the step's answer arrives).
#[derive(Debug)]
struct Queued {
    step: Forward,
    sent: oneshot::Sender<Result<Arc<OwnedSemaphorePermit>, String>>,
}

/// Most sequences' steps sent to the first stage in one batch.
const BATCH_STEPS: usize = 16;

/// Sends the queued generation steps to the first stage in batches: all the steps waiting when a batch
/// may go join it. At most `in_flight` batches travel the pipeline at once: one per machine among the
/// stages (stages on one machine share its cores, so more batches there would only split the work into
/// smaller, less efficient batches; on separate machines each stage works on a batch of its own).
async fn send_batches(
    first: Arc<Link>,
    mut queued: mpsc::UnboundedReceiver<Queued>,
    in_flight: usize,
) {
    let limit = Arc::new(Semaphore::new(in_flight.max(1)));
    while let Some(head) = queued.recv().await {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let permit = Arc::new(permit);
        // The sequences whose answers just freed the permit queue their next steps right after it:
        // let them, so that they join this batch rather than follow alone.
        tokio::task::yield_now().await;
        let mut batch = vec![head];
        while batch.len() < BATCH_STEPS {
            match queued.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let (steps, waiting): (Vec<Forward>, Vec<_>) = batch
            .into_iter()
            .map(|queued| (queued.step, queued.sent))
            .unzip();
        let sent = first.send(&StageRequest::Forward { steps }).await;
        for waiting in waiting {
            let _ = waiting.send(match &sent {
                Ok(()) => Ok(Arc::clone(&permit)),
                Err(error) => Err(error.to_string()),
            });
        }
    }
}

/// How many machines `addresses` (`host:port`) are on.
fn machines(addresses: &[String]) -> usize {
    let mut hosts: Vec<&str> = addresses
        .iter()
        .map(|address| {
            address
                .rsplit_once(':')
                .map_or(address.as_str(), |(host, _)| host)
        })
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    hosts.len()
}

/// What generation steps (one token in, one token out) cost, summed since the plan started.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PipelineStats {
    pub steps: u64,
    /// Wall time of the steps, seen from the coordinator.
    pub step_seconds: f64,
    /// Compute time per stage, first to last.
    pub stage_compute_seconds: Vec<f64>,
    /// Bytes on the wire: the token to the first stage, hidden states between stages, the answer.
    pub bytes: u64,
    /// The most sequences a stage ran in one batch.
    pub largest_batch: u32,
}

impl PipelineStats {
    /// Average time a step spends between machines per transfer (coordinator to the first stage,
    /// stage to stage, last stage back): the step's wall time less its compute, over the transfers.
    pub fn hop_seconds(&self) -> f64 {
        let transfers = (self.stage_compute_seconds.len() + 1) as f64 * self.steps as f64;
        let compute: f64 = self.stage_compute_seconds.iter().sum();
        if transfers == 0.0 {
            0.0
        } else {
            ((self.step_seconds - compute) / transfers).max(0.0)
        }
    }

    pub fn bytes_per_token(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.bytes as f64 / self.steps as f64
        }
    }
}

impl Pipeline {
    /// Connects to the candidates (in order, the first `max_stages` that hold `model`), checks they
    /// hold the same copy of it (digest) and speak this protocol version, plans the layers over them
    /// and loads each stage's part. Fails at this point, before any request runs, when a stage is
    /// incompatible.
    pub async fn start(
        model: &str,
        candidates: &[Candidate],
        max_stages: usize,
        token: &ClusterToken,
        timeouts: Timeouts,
    ) -> Result<Self, PipelineError> {
        Self::start_with_speeds(
            model,
            candidates,
            max_stages,
            token,
            timeouts,
            &HashMap::new(),
            &|_| {},
        )
        .await
    }

    /// [`Pipeline::start`], splitting the layers in proportion to `speeds` (layers per second, by node
    /// name, measured on earlier plans) when every stage has one, else to free memory.
    pub async fn start_with_speeds(
        model: &str,
        candidates: &[Candidate],
        max_stages: usize,
        token: &ClusterToken,
        timeouts: Timeouts,
        speeds: &HashMap<String, f64>,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<Self, PipelineError> {
        progress(&Progress {
            phase: PlanPhase::Describing,
            stages: Vec::new(),
        });
        let describe = StageRequest::Describe {
            model: model.to_owned(),
        };
        let mut links = Vec::new();
        let mut chosen = Vec::new();
        // Every candidate is described (up to a few more than needed), so that stages without a copy
        // can fetch their parts from any agent that has one, stage or not.
        let mut copies: Vec<Option<(String, usize, u64)>> = Vec::new();
        let mut free = Vec::new();
        let mut sources = Vec::new();
        let mut holders = Vec::new();
        for candidate in candidates.iter().take(max_stages + 8) {
            let link =
                Link::open(links.len(), &candidate.address, token, timeouts.handshake).await?;
            let (copy, free_memory) = match link.ask(&describe, timeouts.load).await? {
                StageReply::Described {
                    digest,
                    layers,
                    file_bytes,
                    free_memory_bytes,
                } => {
                    sources.push(candidate.address.clone());
                    holders.push(candidate.name.clone());
                    (
                        Some((digest, layers as usize, file_bytes)),
                        free_memory_bytes,
                    )
                }
                StageReply::Lacking { free_memory_bytes } => (None, free_memory_bytes),
                other => {
                    return Err(PipelineError::Protocol {
                        node: link.name().to_owned(),
                        answer: format!("{other:?}"),
                    });
                }
            };
            if links.len() < max_stages {
                copies.push(copy);
                free.push(free_memory);
                links.push(link);
                chosen.push(candidate.clone());
            } else if copy.is_some() {
                // Not a stage, but a source: its copy must match too.
                copies.push(copy);
            }
        }
        if links.is_empty() {
            return Err(PipelineError::Plan(format!(
                "no agent can hold a stage of {model}: no agent with a stage port is up"
            )));
        }
        let Some((digest, layers, file_bytes)) = copies.iter().flatten().next().cloned() else {
            return Err(PipelineError::Plan(format!(
                "no agent holds a copy of {model}: at least one must (the others fetch their parts from it)"
            )));
        };
        let first_name = holders.first().cloned().unwrap_or_default();
        for (index, copy) in copies.iter().enumerate() {
            if let Some((other, _, _)) = copy
                && *other != digest
            {
                let node = chosen
                    .get(index)
                    .map_or_else(|| "a source".to_owned(), |candidate| candidate.name.clone());
                return Err(PipelineError::Refused {
                    node,
                    message: format!(
                        "its copy of {model} is {other}, {first_name}'s is {digest}: every stage must hold the same file"
                    ),
                });
            }
        }
        let fetching: Vec<String> = chosen
            .iter()
            .zip(&copies)
            .filter(|(_, copy)| copy.is_none())
            .map(|(candidate, _)| {
                format!(
                    "{}: no copy of the model; fetches its part from {}",
                    candidate.name,
                    holders.join(" or ")
                )
            })
            .collect();
        let candidates = chosen.as_slice();
        let bytes_per_layer = file_bytes / layers.max(1) as u64;
        let measured: Option<Vec<f64>> = chosen
            .iter()
            .map(|candidate| {
                speeds
                    .get(&candidate.name)
                    .copied()
                    .filter(|speed| *speed > 0.0)
            })
            .collect();
        let by_speed = measured.is_some();
        let weights = measured.unwrap_or_else(|| free.iter().map(|bytes| *bytes as f64).collect());
        let ranges =
            split_layers(layers, bytes_per_layer, &free, &weights).map_err(PipelineError::Plan)?;
        let mut reasons = vec![format!(
            "{model} ({digest}): {layers} layers of about {} MiB, split in proportion to {} over {} of at most {max_stages} stages, within 90% of each one's free memory",
            bytes_per_layer / (1 << 20),
            if by_speed {
                "the speed measured on earlier plans"
            } else {
                "free memory"
            },
            links.len()
        )];
        reasons.extend(fetching);
        let stages: Vec<PlannedStage> = candidates
            .iter()
            .zip(&ranges)
            .zip(&free)
            .map(|((candidate, range), free)| {
                reasons.push(format!(
                    "{}: layers {}..{} ({} MiB free){}{}",
                    candidate.name,
                    range.start,
                    range.end,
                    free / (1 << 20),
                    if range.start == 0 { ", embeddings" } else { "" },
                    if range.end == layers {
                        ", output head and sampling"
                    } else {
                        ""
                    },
                ));
                PlannedStage {
                    candidate: candidate.clone(),
                    layers: range.clone(),
                    free_memory_bytes: *free,
                }
            })
            .collect();
        let loading = Mutex::new(Progress {
            phase: PlanPhase::Loading,
            stages: stages
                .iter()
                .map(|stage| StageProgress {
                    name: stage.candidate.name.clone(),
                    layers_start: u32::try_from(stage.layers.start).unwrap_or(u32::MAX),
                    layers_end: u32::try_from(stage.layers.end).unwrap_or(u32::MAX),
                    loaded: false,
                    fetched_bytes: 0,
                    fetch_total_bytes: 0,
                })
                .collect(),
        });
        progress(&loading.lock().unwrap_or_else(PoisonError::into_inner));
        let loading = &loading;
        let loads = stages.iter().enumerate().map(|(index, stage)| {
            let link = Arc::clone(&links[index]);
            let request = StageRequest::Load {
                part: PartSpec {
                    model: model.to_owned(),
                    digest: digest.clone(),
                    start: stage.layers.start as u32,
                    end: stage.layers.end as u32,
                    embed: index == 0,
                    head: index + 1 == stages.len(),
                },
                next: stages
                    .get(index + 1)
                    .map(|next| next.candidate.address.clone()),
                sources: sources.clone(),
            };
            async move {
                let report = |update: &dyn Fn(&mut StageProgress)| {
                    let mut now = loading.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(stage) = now.stages.get_mut(index) {
                        update(stage);
                    }
                    progress(&now);
                };
                let answer = link
                    .ask_reporting(&request, timeouts.load, &|done, total| {
                        report(&|stage| {
                            stage.fetched_bytes = done;
                            stage.fetch_total_bytes = total;
                        });
                    })
                    .await;
                if let Ok(StageReply::Loaded { fetched_bytes, .. }) = &answer {
                    report(&|stage| {
                        stage.loaded = true;
                        stage.fetched_bytes = *fetched_bytes;
                    });
                }
                (answer, link)
            }
        });
        let mut resident_bytes = Vec::with_capacity(stages.len());
        let mut fetched = Vec::with_capacity(stages.len());
        for (answer, link) in futures_util::future::join_all(loads).await {
            match answer? {
                StageReply::Loaded {
                    resident_bytes: bytes,
                    fetched_bytes,
                    ..
                } => {
                    resident_bytes.push(bytes);
                    fetched.push(fetched_bytes);
                }
                other => {
                    return Err(PipelineError::Protocol {
                        node: link.name().to_owned(),
                        answer: format!("{other:?}"),
                    });
                }
            }
        }
        let (steps, queued) = mpsc::unbounded_channel();
        let addresses: Vec<String> = stages
            .iter()
            .map(|stage| stage.candidate.address.clone())
            .collect();
        tokio::spawn(send_batches(
            Arc::clone(&links[0]),
            queued,
            machines(&addresses),
        ));
        Ok(Self {
            plan: Plan {
                model: model.to_owned(),
                digest,
                layers,
                stages,
                reasons,
            },
            resident_bytes,
            fetched_bytes: fetched,
            steps,
            links,
            next_sequence: AtomicU64::new(rand::random::<u64>() >> 1),
            timeouts,
            stats: Mutex::new(PipelineStats::default()),
        })
    }

    /// Generation steps' costs so far.
    pub fn stats(&self) -> PipelineStats {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(
        &self,
        wall: Duration,
        request_bytes: usize,
        trace: &[StageTrace],
        reply_bytes: usize,
    ) {
        let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        stats.steps += 1;
        stats.step_seconds += wall.as_secs_f64();
        if stats.stage_compute_seconds.len() < trace.len() {
            stats.stage_compute_seconds.resize(trace.len(), 0.0);
        }
        for (total, stage) in stats.stage_compute_seconds.iter_mut().zip(trace) {
            *total += f64::from(stage.compute_us) / 1e6;
        }
        let between: u64 = trace.iter().map(|stage| u64::from(stage.sent_bytes)).sum();
        let batch = trace.iter().map(|stage| stage.batch).max().unwrap_or(1);
        stats.largest_batch = stats.largest_batch.max(batch);
        stats.bytes += (request_bytes + reply_bytes) as u64 + between;
    }

    /// The model file's header from the first stage (tokenizer and chat template, no weights).
    pub async fn header(&self) -> Result<(Vec<u8>, u64), PipelineError> {
        match self.links[0]
            .ask(&StageRequest::Header { digest: None }, self.timeouts.load)
            .await?
        {
            StageReply::Header { bytes, file_bytes } => Ok((bytes, file_bytes)),
            other => Err(PipelineError::Protocol {
                node: self.links[0].name().to_owned(),
                answer: format!("{other:?}"),
            }),
        }
    }

    /// Opens a sequence on every stage; the last one samples with `sampling` and knows `history`.
    pub async fn open(
        &self,
        sampling: Sampling,
        history: &[u32],
    ) -> Result<Sequence<'_>, PipelineError> {
        let id = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::unbounded_channel();
        for link in &self.links {
            link.routes
                .sequences
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, sender.clone());
        }
        let mut sequence = Sequence {
            pipeline: self,
            id,
            replies: receiver,
            position: 0,
        };
        let last = self.links.len() - 1;
        for (index, link) in self.links.iter().enumerate() {
            link.send(&StageRequest::Open {
                sequence: id,
                sampling: (index == last).then(|| sampling.clone()),
                history: if index == last {
                    history.to_vec()
                } else {
                    Vec::new()
                },
            })
            .await?;
        }
        // Every stage must hold the sequence before the first forward reaches it.
        let mut opened = 0;
        while opened < self.links.len() {
            match sequence.next_reply(self.timeouts.handshake).await? {
                StageReply::Opened { .. } => opened += 1,
                other => return Err(sequence.unexpected(other)),
            }
        }
        Ok(sequence)
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

/// One sequence running through a pipeline.
#[derive(Debug)]
pub struct Sequence<'a> {
    pipeline: &'a Pipeline,
    id: u64,
    replies: mpsc::UnboundedReceiver<(usize, StageReply)>,
    /// Tokens the stages have processed.
    pub position: usize,
}

/// What the last stage answered a forward with.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Token(u32),
    Logits(Vec<f32>),
}

impl Sequence<'_> {
    async fn next_reply(&mut self, timeout: Duration) -> Result<StageReply, PipelineError> {
        let name = |index: usize| {
            self.pipeline
                .links
                .get(index)
                .map(|link| link.name().to_owned())
                .unwrap_or_default()
        };
        match tokio::time::timeout(timeout, self.replies.recv()).await {
            Ok(Some((
                index,
                StageReply::Failed {
                    message,
                    downstream,
                    ..
                },
            ))) => {
                // A stage that cannot reach the next one blames the next one.
                let culprit = if downstream { index + 1 } else { index };
                Err(PipelineError::Stage {
                    node: name(culprit),
                    message,
                })
            }
            Ok(Some((_, reply))) => Ok(reply),
            Ok(None) => Err(PipelineError::Plan("the pipeline was dropped".to_owned())),
            Err(_) => Err(PipelineError::Stage {
                node: self
                    .pipeline
                    .links
                    .last()
                    .map(|link| link.name().to_owned())
                    .unwrap_or_default(),
                message: format!("no answer within {timeout:?}"),
            }),
        }
    }

    fn unexpected(&self, reply: StageReply) -> PipelineError {
        PipelineError::Protocol {
            node: "a stage".to_owned(),
            answer: format!("{reply:?}"),
        }
    }

    /// Runs `tokens` (a prompt, or the last generated token) through the stages and returns the last
    /// stage's answer for the final position: a sampled token, or the logits when `logits`.
    pub async fn feed(&mut self, tokens: &[u32], logits: bool) -> Result<Answer, PipelineError> {
        let first = &self.pipeline.links[0];
        let started = std::time::Instant::now();
        let chunks: Vec<&[u32]> = tokens.chunks(PROMPT_CHUNK).collect();
        let mut request_bytes = 0;
        // A generation step's share of the in-flight limit, until its answer is here.
        let mut in_flight = None;
        for (index, chunk) in chunks.iter().enumerate() {
            let output = match (index + 1 == chunks.len(), logits) {
                (false, _) => Output::None,
                (true, false) => Output::Sample,
                (true, true) => Output::Logits,
            };
            let step = Forward {
                sequence: self.id,
                start: u32::try_from(self.position).unwrap_or(u32::MAX),
                input: StageInput::Tokens(chunk.to_vec()),
                output,
                trace: Vec::new(),
            };
            // One step of a frame's bytes: the frame's few bytes of framing shared by the batch.
            request_bytes += postcard::experimental::serialized_size(&step).unwrap_or(0) + 4;
            if tokens.len() == 1 {
                // Generation steps of concurrent sequences travel together.
                let (sent, confirmed) = oneshot::channel();
                self.pipeline
                    .steps
                    .send(Queued { step, sent })
                    .map_err(|_| PipelineError::Plan("the pipeline was dropped".to_owned()))?;
                let permit = confirmed
                    .await
                    .map_err(|_| PipelineError::Plan("the pipeline was dropped".to_owned()))?
                    .map_err(|message| PipelineError::Stage {
                        node: first.name().to_owned(),
                        message,
                    })?;
                in_flight = Some(permit);
            } else {
                first
                    .send(&StageRequest::Forward { steps: vec![step] })
                    .await?;
            }
            self.position += chunk.len();
        }
        let timeout = self.pipeline.timeouts.step * u32::try_from(chunks.len().max(1)).unwrap_or(1);
        let reply = self.next_reply(timeout).await;
        drop(in_flight);
        let reply = reply?;
        let reply_bytes = postcard::experimental::serialized_size(&reply).unwrap_or(0) + 4;
        match reply {
            StageReply::Sampled { token, trace, .. } => {
                if tokens.len() == 1 {
                    self.pipeline
                        .record(started.elapsed(), request_bytes, &trace, reply_bytes);
                }
                Ok(Answer::Token(token))
            }
            StageReply::Logits { values, .. } => Ok(Answer::Logits(values)),
            other => Err(self.unexpected(other)),
        }
    }
}

impl Drop for Sequence<'_> {
    fn drop(&mut self) {
        for link in &self.pipeline.links {
            link.routes
                .sequences
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.id);
            let link = Arc::clone(link);
            let sequence = self.id;
            // Best effort: a stage that is gone has forgotten the sequence anyway.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = link.send(&StageRequest::Close { sequence }).await;
                });
            }
        }
    }
}

/// A distributed model's pipeline, kept between requests and re-planned when a stage fails.
#[derive(Debug)]
pub struct Distributed {
    pub model: String,
    /// Why it is distributed: listed in the configuration, or too large for any one node.
    why: String,
    max_stages: usize,
    token: ClusterToken,
    timeouts: Timeouts,
    current: tokio::sync::Mutex<Option<Arc<Pipeline>>>,
    /// Stages that failed lately, by node name, left out of plans for [`EXCLUDE_FOR`].
    excluded: Mutex<HashMap<String, std::time::Instant>>,
    replans: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Layers per second per generated token, by node name, measured on earlier plans.
    speeds: Mutex<HashMap<String, f64>>,
    /// The plan being made now, with when it started.
    planning: Mutex<Option<(std::time::Instant, Progress)>>,
}

/// How long a failed stage stays out of plans (it may come back, or be down by then).
pub const EXCLUDE_FOR: Duration = Duration::from_secs(30);

/// Plans tried for one request before it fails.
const MAX_PLANS: usize = 3;

/// What a distributed generation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    /// Plans that failed mid-request and were replaced.
    pub replans: usize,
    /// Whether a stop token ended it (else the limit, or the caller).
    pub stopped: bool,
}

impl Distributed {
    pub fn new(model: &str, max_stages: usize, token: ClusterToken, timeouts: Timeouts) -> Self {
        Self {
            why: String::new(),
            model: model.to_owned(),
            max_stages,
            token,
            timeouts,
            current: tokio::sync::Mutex::new(None),
            excluded: Mutex::new(HashMap::new()),
            replans: AtomicU64::new(0),
            last_error: Mutex::new(None),
            speeds: Mutex::new(HashMap::new()),
            planning: Mutex::new(None),
        }
    }

    /// Why the model is distributed (the first of its status's reasons).
    pub fn because(mut self, why: impl Into<String>) -> Self {
        self.why = why.into();
        self
    }

    /// The plan being made now, if any.
    fn planning(&self) -> Option<sollol_shared::api::PlanProgress> {
        self.planning
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(started, progress)| sollol_shared::api::PlanProgress {
                phase: progress.phase,
                elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                stages: progress.stages.clone(),
            })
    }

    /// Remembers each stage's speed (layers per second per generated token) from `pipeline`'s trace.
    fn measure(&self, pipeline: &Pipeline) {
        let stats = pipeline.stats();
        if stats.steps == 0 {
            return;
        }
        let mut speeds = self.speeds.lock().unwrap_or_else(PoisonError::into_inner);
        for (stage, seconds) in pipeline
            .plan
            .stages
            .iter()
            .zip(&stats.stage_compute_seconds)
        {
            let per_token = seconds / stats.steps as f64;
            if per_token > 0.0 {
                speeds.insert(
                    stage.candidate.name.clone(),
                    stage.layers.len() as f64 / per_token,
                );
            }
        }
    }

    /// The plan in use and what its steps cost, for the API and the metrics.
    pub async fn status(&self) -> sollol_shared::api::DistributedModel {
        // While a plan is being made the lock is held: report the progress instead of waiting.
        let planning = self.planning();
        let pipeline = match self.current.try_lock() {
            Ok(current) => current.clone(),
            Err(_) if planning.is_some() => None,
            // Held only for a moment (a request taking the pipeline).
            Err(_) => self.current.lock().await.clone(),
        };
        let last_error = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let replans = self.replans.load(Ordering::Relaxed);
        let Some(pipeline) = pipeline else {
            return sollol_shared::api::DistributedModel {
                model: self.model.clone(),
                planned: false,
                digest: None,
                layers: 0,
                stages: Vec::new(),
                reasons: vec![self.why.clone()],
                tokens: 0,
                tokens_per_second: None,
                hop_ms: None,
                bytes_per_token: None,
                replans,
                last_error,
                planning,
            };
        };
        let stats = pipeline.stats();
        let per_token =
            |seconds: f64| (stats.steps > 0).then(|| seconds * 1e3 / stats.steps as f64);
        let count = pipeline.plan.stages.len();
        sollol_shared::api::DistributedModel {
            model: self.model.clone(),
            planned: true,
            digest: Some(pipeline.plan.digest.clone()),
            layers: u32::try_from(pipeline.plan.layers).unwrap_or(u32::MAX),
            stages: pipeline
                .plan
                .stages
                .iter()
                .enumerate()
                .map(|(index, stage)| sollol_shared::api::PipelineStage {
                    node_id: stage.candidate.node_id.clone(),
                    name: stage.candidate.name.clone(),
                    address: stage.candidate.address.clone(),
                    layers_start: u32::try_from(stage.layers.start).unwrap_or(u32::MAX),
                    layers_end: u32::try_from(stage.layers.end).unwrap_or(u32::MAX),
                    embed: index == 0,
                    head: index + 1 == count,
                    resident_bytes: pipeline.resident_bytes.get(index).copied().unwrap_or(0),
                    free_memory_bytes: stage.free_memory_bytes,
                    compute_ms_per_token: stats
                        .stage_compute_seconds
                        .get(index)
                        .and_then(|seconds| per_token(*seconds)),
                })
                .collect(),
            reasons: std::iter::once(self.why.clone())
                .chain(pipeline.plan.reasons.iter().cloned())
                .collect(),
            tokens: stats.steps,
            tokens_per_second: (stats.step_seconds > 0.0)
                .then(|| stats.steps as f64 / stats.step_seconds),
            hop_ms: (stats.steps > 0).then(|| stats.hop_seconds() * 1e3),
            bytes_per_token: (stats.steps > 0).then(|| stats.bytes_per_token()),
            replans,
            last_error,
            planning,
        }
    }

    /// The pipeline in use, planned and loaded on `candidates` (minus recently failed ones) if there
    /// is none yet.
    pub async fn pipeline(&self, candidates: &[Candidate]) -> Result<Arc<Pipeline>, PipelineError> {
        let mut current = self.current.lock().await;
        if let Some(pipeline) = current.as_ref() {
            return Ok(Arc::clone(pipeline));
        }
        let usable: Vec<Candidate> = {
            let mut excluded = self.excluded.lock().unwrap_or_else(PoisonError::into_inner);
            excluded.retain(|_, since| since.elapsed() < EXCLUDE_FOR);
            candidates
                .iter()
                .filter(|candidate| !excluded.contains_key(&candidate.name))
                .cloned()
                .collect()
        };
        let speeds = self
            .speeds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let began = std::time::Instant::now();
        let report = |progress: &Progress| {
            *self.planning.lock().unwrap_or_else(PoisonError::into_inner) =
                Some((began, progress.clone()));
        };
        let started = Pipeline::start_with_speeds(
            &self.model,
            &usable,
            self.max_stages,
            &self.token,
            self.timeouts,
            &speeds,
            &report,
        )
        .await;
        *self.planning.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let pipeline = match started {
            Ok(pipeline) => Arc::new(pipeline),
            Err(error) => {
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
                return Err(error);
            }
        };
        for reason in &pipeline.plan.reasons {
            tracing::info!(model = %self.model, "{reason}");
        }
        *current = Some(Arc::clone(&pipeline));
        Ok(pipeline)
    }

    /// Forgets the pipeline after `node` failed; the next request plans again without it.
    pub async fn failed(&self, node: &str) {
        self.replans.fetch_add(1, Ordering::Relaxed);
        if let Some(pipeline) = self.current.lock().await.as_ref() {
            self.measure(pipeline);
        }
        self.excluded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node.to_owned(), std::time::Instant::now());
        *self.current.lock().await = None;
    }

    /// Generates up to `limit` tokens after `prompt`, handing each to `on_token` (false stops). When a
    /// stage fails, plans again on `candidates()` without it and re-runs the prompt and the tokens so
    /// far: the caller sees a pause, and (sampling depending only on seed and position) the same tokens.
    pub async fn generate(
        &self,
        candidates: impl Fn() -> Vec<Candidate>,
        sampling: &Sampling,
        prompt: &[u32],
        limit: usize,
        is_stop: impl Fn(u32) -> bool,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Generated, PipelineError> {
        let mut tokens = Vec::new();
        let mut replans = 0;
        loop {
            let pipeline = self.pipeline(&candidates()).await?;
            let mut history = prompt.to_vec();
            history.extend_from_slice(&tokens);
            let run = async {
                let mut sequence = pipeline.open(sampling.clone(), &history).await?;
                let mut input = history.clone();
                while tokens.len() < limit {
                    let Answer::Token(token) = sequence.feed(&input, false).await? else {
                        return Err(PipelineError::Plan(
                            "logits where a token was due".to_owned(),
                        ));
                    };
                    if is_stop(token) {
                        return Ok(true);
                    }
                    tokens.push(token);
                    if !on_token(token) {
                        break;
                    }
                    input = vec![token];
                }
                Ok(false)
            };
            match run.await {
                Ok(stopped) => {
                    self.measure(&pipeline);
                    return Ok(Generated {
                        tokens,
                        replans,
                        stopped,
                    });
                }
                Err(error) => {
                    *self
                        .last_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
                    match error.failed_node() {
                        Some(node) if replans + 1 < MAX_PLANS => {
                            tracing::warn!(model = %self.model, %node, %error, "a stage failed mid-request: planning again without it");
                            self.failed(node).await;
                            replans += 1;
                        }
                        _ => return Err(error),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn stages_on_one_host_count_as_one_machine() {
        let addresses = |list: &[&str]| -> Vec<String> {
            list.iter().map(|address| (*address).to_owned()).collect()
        };
        assert_eq!(
            machines(&addresses(&["127.0.0.1:7001", "127.0.0.1:7002"])),
            1
        );
        assert_eq!(
            machines(&addresses(&[
                "10.0.0.2:7001",
                "10.0.0.3:7001",
                "10.0.0.2:7002"
            ])),
            2
        );
        assert_eq!(
            machines(&addresses(&["[::1]:7001", "[::1]:7002", "pi.lan:7001"])),
            2
        );
    }

    use super::*;

    fn by_memory(
        layers: usize,
        bytes_per_layer: u64,
        free: &[u64],
    ) -> Result<Vec<Range<usize>>, String> {
        let weights: Vec<f64> = free.iter().map(|bytes| *bytes as f64).collect();
        split_layers(layers, bytes_per_layer, free, &weights)
    }

    #[test]
    fn layers_follow_measured_speed_within_memory() {
        const MIB: u64 = 1 << 20;
        // Twice as fast, twice the layers, when memory allows.
        assert_eq!(
            split_layers(30, MIB, &[1000 * MIB; 2], &[2.0, 1.0]).expect("plan"),
            [0..20, 20..30]
        );
        // Ten times as fast but room for 22 layers only: 22, the rest to the other stage.
        assert_eq!(
            split_layers(30, 40 * MIB, &[1000 * MIB; 2], &[10.0, 1.0]).expect("plan"),
            [0..22, 22..30]
        );
    }

    #[test]
    fn layers_follow_free_memory_and_never_exceed_it() {
        const MIB: u64 = 1 << 20;
        // Equal memory: an even split.
        assert_eq!(
            by_memory(30, 3 * MIB, &[1000 * MIB; 2]).expect("plan"),
            [0..15, 15..30]
        );
        assert_eq!(
            by_memory(30, 3 * MIB, &[1000 * MIB; 3]).expect("plan"),
            [0..10, 10..20, 20..30]
        );
        // Twice the memory, about twice the layers.
        assert_eq!(
            by_memory(30, 3 * MIB, &[2000 * MIB, 1000 * MIB]).expect("plan"),
            [0..20, 20..30]
        );
        // A stage with little memory gets its small share (2 of 30 here; it could hold 5).
        let ranges = by_memory(30, 10 * MIB, &[56 * MIB, 1000 * MIB, 1000 * MIB]).expect("plan");
        assert_eq!(ranges, [0..2, 2..16, 16..30]);
        // Every stage within what 90% of its memory holds, whatever the rounding.
        for free in [[445u64, 750, 300], [480, 700, 900], [120, 4000, 130]] {
            let free = free.map(|mib| mib * MIB);
            if let Ok(ranges) = by_memory(12, 30 * MIB, &free) {
                assert_eq!(ranges.last().map(|range| range.end), Some(12));
                for (range, free) in ranges.iter().zip(free) {
                    assert!(range.len() as u64 * 30 * MIB <= free / 10 * 9, "{ranges:?}");
                }
            }
        }
        // Not enough memory in total, or a stage that holds nothing: refused with the figures.
        let refused = by_memory(30, 100 * MIB, &[1000 * MIB, 1000 * MIB]).expect_err("too big");
        assert!(refused.contains("not enough free memory"), "{refused}");
        assert!(by_memory(2, MIB, &[MIB, MIB, MIB]).is_err());
    }
}
