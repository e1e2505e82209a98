//! What a pipeline's generation steps cost: wall time, each stage's compute, bytes on the wire.

use std::sync::PoisonError;
use std::time::Duration;

use sollol_shared::layers::StageTrace;

use super::Pipeline;

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
    /// Generation steps' costs so far.
    pub fn stats(&self) -> PipelineStats {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn record(
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
}
