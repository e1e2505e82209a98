//! Selection: which nodes may serve a request (model, wanted node, open breakers, the distributed
//! front), and waiting in the priority queue while all of them are saturated.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::http::StatusCode;
use sollol_policy::admission::Rejected;
use sollol_policy::routing::Candidate;

use super::{Proxy, lock};
use crate::cluster::{ClusterView, SharedView};
use crate::gateway::ApiError;

/// Which nodes may serve a request.
pub(super) struct Selection<'a> {
    pub(super) model: &'a str,
    pub(super) requested_name: &'a str,
    pub(super) any_node: bool,
    pub(super) wanted_node: Option<&'a str>,
    /// The node that last served this conversation, if any.
    pub(super) affine_node: Option<String>,
}

impl Selection<'_> {
    /// Waits in the priority queue while every candidate is saturated (each has as many requests as
    /// its slots and the node's own queue allow), then returns the snapshot and its candidates.
    pub(super) async fn wait_for_capacity(
        &self,
        proxy: &Proxy,
        view: &SharedView,
        priority: u8,
    ) -> Result<(Arc<ClusterView>, Vec<(usize, Candidate)>), ApiError> {
        let queued_since = Instant::now();
        loop {
            let view = view.load_full();
            let candidates = self.candidates(proxy, &view)?;
            let depth = proxy.settings.node_queue_depth;
            if candidates
                .iter()
                .any(|(_, candidate)| candidate.in_flight < candidate.slots + depth)
            {
                return Ok((view, candidates));
            }
            proxy.admission.wait(priority, queued_since).await.map_err(
                |rejected| match rejected {
                    Rejected::QueueFull(_) => {
                        ApiError::new(StatusCode::TOO_MANY_REQUESTS, rejected.to_string())
                            .retry_after(1)
                    }
                    Rejected::TimedOut(_) => {
                        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, rejected.to_string())
                    }
                },
            )?;
        }
    }

    /// The candidates in `view` with their live load, by index into `view.backends`; an error when there are none.
    fn candidates(
        &self,
        proxy: &Proxy,
        view: &ClusterView,
    ) -> Result<Vec<(usize, Candidate)>, ApiError> {
        let learned = proxy.learner.snapshot();
        let mut candidates: Vec<(usize, Candidate)> = view
            .backends
            .iter()
            .enumerate()
            .filter(|(_, backend)| self.any_node || backend.has_model(self.model))
            .filter(|(_, backend)| {
                self.wanted_node
                    .is_none_or(|wanted| backend.name == wanted || backend.node_id == wanted)
            })
            .map(|(index, backend)| {
                let candidate = Candidate {
                    node_id: backend.node_id.clone(),
                    name: backend.name.clone(),
                    in_flight: proxy.load_of(&backend.node_id).load(Ordering::Relaxed),
                    slots: proxy
                        .settings
                        .node_slots
                        .max(learned.slots(&backend.node_id)),
                    model_loaded: learned.believed_loaded(
                        &backend.node_id,
                        self.model,
                        backend.has_loaded(self.model),
                        backend.reported_ms,
                        &backend.models,
                        proxy
                            .warmups
                            .capacity_of(&backend.node_id, backend.loaded.len()),
                    ),
                    stats: learned.pair(&backend.node_id, self.model),
                    served: learned.served.get(&backend.node_id).copied().unwrap_or(0),
                    has_affinity: self.affine_node.as_deref() == Some(backend.node_id.as_str()),
                    node_stats: learned.node_stats(&backend.node_id, self.model),
                    calibrating: proxy
                        .calibrating
                        .get(&backend.node_id)
                        .load(Ordering::Relaxed)
                        > 0,
                    warming: proxy.warmups.warming(&backend.node_id, self.model),
                };
                (index, candidate)
            })
            .collect();
        if let Some(front) = proxy.settings.distributed_front.as_deref()
            && !self.any_node
            && candidates
                .iter()
                .any(|(_, candidate)| candidate.node_id == front)
        {
            candidates.retain(|(_, candidate)| candidate.node_id == front);
        }
        // Nodes whose breaker is open are left out, unless that leaves nobody.
        let now = Instant::now();
        let usable: Vec<(usize, Candidate)> = candidates
            .iter()
            .filter(|(_, candidate)| {
                let breaker = proxy.breaker_of(&candidate.node_id);
                let breaker = lock(&breaker);
                breaker.is_closed() || breaker.trial_due(now)
            })
            .cloned()
            .collect();
        if !usable.is_empty() {
            return Ok(usable);
        }
        if !candidates.is_empty() {
            return Ok(candidates);
        }
        let requested_name = self.requested_name;
        Err(if view.backends.is_empty() {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no Ollama node is available: {} known node(s), none up with a reachable Ollama",
                    view.nodes.len()
                ),
            )
        } else if let Some(wanted) = self.wanted_node {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("node {wanted:?} is not up or does not have model \"{requested_name}\""),
            )
        } else {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("model \"{requested_name}\" not found, try pulling it first"),
            )
        })
    }
}
