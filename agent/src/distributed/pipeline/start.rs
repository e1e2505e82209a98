//! Starting a pipeline: describing the candidates, planning the layers over them, loading each stage's
//! part (reporting the progress) and connecting the batcher to the first stage.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use sollol_shared::api::{PlanPhase, StageProgress};
use sollol_shared::layers::{PartSpec, StageReply, StageRequest};
use tokio::sync::mpsc;

use super::batch::{machines, send_batches};
use super::link::Link;
use super::plan::{self, ModelCopy, Offers, Plan};
use super::{Candidate, Pipeline, PipelineError, PipelineStats, Timeouts};
use crate::cluster::identity::ClusterToken;

/// Where a plan in progress stands, as [`Pipeline::start_with_speeds`] reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub phase: PlanPhase,
    pub stages: Vec<StageProgress>,
}

/// What the candidates said when described: the stages chosen, with a connection each, and the copies
/// of the model among all the candidates asked.
#[derive(Debug)]
struct Described {
    links: Vec<Arc<Link>>,
    chosen: Vec<Candidate>,
    /// Each chosen stage's copy, then the copies of the candidates described beyond the stages.
    copies: Vec<Option<ModelCopy>>,
    /// The memory each chosen stage offers.
    free: Vec<u64>,
    /// The stage addresses of the candidates holding a copy, where the others fetch their parts.
    sources: Vec<String>,
    /// The names of the candidates holding a copy.
    holders: Vec<String>,
}

impl Described {
    fn offers(&self) -> Offers<'_> {
        Offers {
            stages: &self.chosen,
            free: &self.free,
            copies: &self.copies,
            holders: &self.holders,
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
        let described = describe(model, candidates, max_stages, token, timeouts).await?;
        let offers = described.offers();
        let copy = offers.agreed_copy(model)?;
        let plan = plan::plan(model, copy, &offers, max_stages, speeds)?;
        let (resident_bytes, fetched_bytes) = load(
            model,
            &plan,
            &described.links,
            &described.sources,
            timeouts,
            progress,
        )
        .await?;
        Ok(Self::connect(
            plan,
            described.links,
            resident_bytes,
            fetched_bytes,
            timeouts,
        ))
    }

    /// The pipeline over stages that loaded their parts: the batcher sends to the first stage, with as
    /// many batches in flight as the stages have machines.
    fn connect(
        plan: Plan,
        links: Vec<Arc<Link>>,
        resident_bytes: Vec<u64>,
        fetched_bytes: Vec<u64>,
        timeouts: Timeouts,
    ) -> Self {
        let (steps, queued) = mpsc::unbounded_channel();
        let addresses: Vec<String> = plan
            .stages
            .iter()
            .map(|stage| stage.candidate.address.clone())
            .collect();
        tokio::spawn(send_batches(
            Arc::clone(&links[0]),
            queued,
            machines(&addresses),
        ));
        Self {
            plan,
            resident_bytes,
            fetched_bytes,
            steps,
            links,
            next_sequence: AtomicU64::new(rand::random::<u64>() >> 1),
            timeouts,
            stats: Mutex::new(PipelineStats::default()),
        }
    }
}

/// Connects to the candidates in order and asks each about `model`: the first `max_stages` become the
/// stages; every candidate is described (up to a few more than needed), so that stages without a copy
/// can fetch their parts from any agent that has one, stage or not.
async fn describe(
    model: &str,
    candidates: &[Candidate],
    max_stages: usize,
    token: &ClusterToken,
    timeouts: Timeouts,
) -> Result<Described, PipelineError> {
    let request = StageRequest::Describe {
        model: model.to_owned(),
    };
    let mut described = Described {
        links: Vec::new(),
        chosen: Vec::new(),
        copies: Vec::new(),
        free: Vec::new(),
        sources: Vec::new(),
        holders: Vec::new(),
    };
    for candidate in candidates.iter().take(max_stages + 8) {
        let link = Link::open(
            described.links.len(),
            &candidate.address,
            token,
            timeouts.handshake,
        )
        .await?;
        let (copy, free_memory) = match link.ask(&request, timeouts.load).await? {
            StageReply::Described {
                digest,
                manifest,
                layers,
                file_bytes,
                free_memory_bytes,
            } => {
                described.sources.push(candidate.address.clone());
                described.holders.push(candidate.name.clone());
                let copy = ModelCopy {
                    digest,
                    manifest,
                    layers: layers as usize,
                    file_bytes,
                };
                (Some(copy), free_memory_bytes)
            }
            StageReply::Lacking { free_memory_bytes } => (None, free_memory_bytes),
            other => {
                return Err(PipelineError::Protocol {
                    node: link.name().to_owned(),
                    answer: format!("{other:?}"),
                });
            }
        };
        if described.links.len() < max_stages {
            described.copies.push(copy);
            described.free.push(free_memory);
            described.links.push(link);
            described.chosen.push(candidate.clone());
        } else if copy.is_some() {
            // Not a stage, but a source: its copy must match too.
            described.copies.push(copy);
        }
    }
    if described.links.is_empty() {
        return Err(PipelineError::Plan(format!(
            "no agent can hold a stage of {model}: no agent with a stage port is up"
        )));
    }
    Ok(described)
}

/// Loads every stage's part of `plan` at once, telling each its next stage and where to fetch what it
/// lacks, and reports each stage's progress; each stage's resident and fetched bytes.
async fn load(
    model: &str,
    plan: &Plan,
    links: &[Arc<Link>],
    sources: &[String],
    timeouts: Timeouts,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<(Vec<u64>, Vec<u64>), PipelineError> {
    let stages = &plan.stages;
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
                digest: plan.digest.clone(),
                manifest: plan.manifest,
                start: stage.layers.start as u32,
                end: stage.layers.end as u32,
                embed: index == 0,
                head: index + 1 == stages.len(),
            },
            next: stages
                .get(index + 1)
                .map(|next| next.candidate.address.clone()),
            sources: sources.to_vec(),
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
    Ok((resident_bytes, fetched))
}
