//! The supervisor of a distributed model's pipeline ([`Distributed`]): keeps one between requests,
//! re-plans without a stage that failed and re-runs the request, and reports the status for the API.

use sollol_engine::remote::RemoteGeneration;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::{Answer, Candidate, Pipeline, PipelineError, Progress, Timeouts};
use crate::cluster::identity::ClusterToken;

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

    /// Generates up to `generation.limit` tokens after its prompt, handing each to `on_token` (false
    /// stops); its stop tokens end the answer; with a chooser, each step's logits come back and it picks
    /// the token. When a stage fails, plans again on `candidates()` without it and re-runs the prompt and the tokens so
    /// far: the caller sees a pause, and (sampling depending only on seed and position) the same tokens.
    pub async fn generate(
        &self,
        candidates: impl Fn() -> Vec<Candidate>,
        generation: RemoteGeneration<'_>,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Generated, PipelineError> {
        let RemoteGeneration {
            sampling,
            prompt,
            limit,
            stop_tokens,
            mut choose,
        } = generation;
        let is_stop = |token| stop_tokens.contains(&token);
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
                    let token = match (sequence.feed(&input, choose.is_some()).await?, &mut choose)
                    {
                        (Answer::Token(token), None) => token,
                        // Chosen here: a format's grammar masks the logits first.
                        (Answer::Logits(mut logits), Some(choose)) => {
                            choose(&mut logits).map_err(PipelineError::Chooser)?
                        }
                        _ => {
                            return Err(PipelineError::Plan(
                                "the last stage answered logits for a token or a token for logits"
                                    .to_owned(),
                            ));
                        }
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
