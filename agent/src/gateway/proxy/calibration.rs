//! Calibration: idle nodes never measured with a model are measured in the background with a short
//! generation of the gateway's own, so that no client request pays for exploring an unknown node.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header;
use serde_json::json;
use sollol_policy::routing::{Candidate, Choice, Decision};

use super::{InFlight, Proxy, lock};
use crate::cluster::Backend;
use crate::history::{OllamaTimings, Outcome};

/// A (node, model) pair is calibrated at most this often, with this many generated tokens.
const CALIBRATE_EVERY: Duration = Duration::from_secs(600);
const CALIBRATION_TOKENS: u32 = 8;

impl Proxy {
    /// Calibrates every idle, never-measured candidate the decision did not pick (only on routes whose
    /// answers carry Ollama's timings, and only when calibration is on).
    pub(super) fn calibrate_idle(
        &self,
        learns: bool,
        model: &str,
        decision: &Decision,
        candidates: &[Candidate],
        backends: &[&Arc<Backend>],
    ) {
        if !learns || !self.settings.calibration {
            return;
        }
        let chosen = decision.first();
        let due: Vec<usize> = {
            // One lock for the whole decision; checking a pair allocates nothing.
            let mut calibrated = lock(&self.calibrated);
            let now = Instant::now();
            let mut due = Vec::new();
            for (index, candidate) in candidates.iter().enumerate() {
                let unmeasured = candidate.stats.is_none() && candidate.node_stats.is_none();
                if !unmeasured || candidate.in_flight > 0 || Some(index) == chosen {
                    continue;
                }
                let recent = calibrated.get(model).and_then(|nodes| {
                    nodes
                        .get(&candidate.node_id)
                        .filter(|at| now.duration_since(**at) < CALIBRATE_EVERY)
                });
                if recent.is_none() {
                    calibrated
                        .entry(model.to_owned())
                        .or_default()
                        .insert(candidate.node_id.clone(), now);
                    due.push(index);
                }
            }
            due
        };
        for index in due {
            self.calibrate(backends[index], model);
        }
    }

    /// Measures a never-measured (node, model) pair in the background with a short generation of the
    /// gateway's own, so no client request pays for exploring an unknown node. Its caller marked the
    /// pair (at most once per `CALIBRATE_EVERY`); the node counts as busy meanwhile.
    fn calibrate(&self, backend: &Backend, model: &str) {
        let body = json!({
            "model": model,
            "prompt": "Say hello.",
            "stream": false,
            "options": {"num_predict": CALIBRATION_TOKENS},
        });
        let Ok(request) = hyper::Request::post(format!("{}/api/generate", backend.base_url))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
        else {
            return;
        };
        let load = self.load_of(&backend.node_id);
        let concurrent = load.load(Ordering::Relaxed);
        let in_flight = InFlight::new(load, Arc::clone(&self.admission));
        let calibrating = InFlight::new(
            self.calibrating.get(&backend.node_id),
            Arc::clone(&self.admission),
        );
        let client = self.client.clone();
        let learner = Arc::clone(&self.learner);
        let timeout = self.settings.response_timeout;
        let mut outcome = Outcome {
            node_id: backend.node_id.clone(),
            model: model.to_owned(),
            path: "/api/generate".to_owned(),
            app: "sollol-calibration".to_owned(),
            ok: false,
            time_to_first_byte: Duration::ZERO,
            total: Duration::ZERO,
            timings: None,
            choice: Choice::CALIBRATION,
            reason: "measuring a node never measured with this model".to_owned(),
            candidates: Arc::from([]),
            concurrent,
        };
        tracing::debug!(node = %backend.name, %model, "calibrating");
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let _calibrating = calibrating;
            let started = Instant::now();
            let answer = tokio::time::timeout(timeout, async {
                let response = client.request(request).await.ok()?;
                if !response.status().is_success() {
                    return None;
                }
                response
                    .into_body()
                    .collect()
                    .await
                    .ok()
                    .map(|collected| collected.to_bytes())
            })
            .await;
            outcome.total = started.elapsed();
            outcome.time_to_first_byte = outcome.total;
            if let Ok(Some(bytes)) = answer {
                outcome.ok = true;
                outcome.timings = OllamaTimings::from_slice(&bytes);
            }
            learner.record(outcome);
        });
    }
}
