//! Selection: which nodes may serve a request (model, wanted node, open breakers, the distributed
//! front), and waiting in the priority queue while all of them are saturated.
//!
//! On a big cluster intelligent routing does not weigh every node for every request: the nodes with
//! the model are ranked by their predicted time when idle (at most every [`SHORTLIST_FRESH`], per
//! model), and a request weighs them with their live load a few at a time, best first, until one
//! would serve it without queueing. A thousand nodes then cost a request about what a dozen do.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use sollol_policy::admission::Rejected;
use sollol_policy::routing::{self, Candidate, RequestShape, Strategy};

use super::{Proxy, lock};
use crate::cluster::{Backend, ClusterView, SharedView};
use crate::gateway::ApiError;
use crate::gateway::learning::Learned;

/// Clusters with more nodes for a model than this use the ranked shortlist (intelligent routing only).
const SHORTLIST_ABOVE: usize = 64;
/// Nodes weighed with their live load at a time, walking the ranking.
const SHORTLIST_STEP: usize = 16;
/// How long a model's ranking is used before it is built again from the newest view and learning.
const SHORTLIST_FRESH: Duration = Duration::from_millis(250);
/// Unmeasured nodes kept at the front of each step, so exploration and calibration still find them.
const UNMEASURED_KEPT: usize = 2;

/// Each model's nodes ranked by predicted time when idle.
#[derive(Debug, Default)]
pub(crate) struct Rankings(Mutex<HashMap<String, Arc<Ranking>>>);

#[derive(Debug)]
struct Ranking {
    built_at: Instant,
    /// Backend indexes into the view the ranking was built from, with their node ids (a newer view
    /// with other nodes at those places makes the ranking stale).
    order: Vec<(usize, Arc<str>)>,
    /// Unmeasured nodes, by name.
    unmeasured: Vec<(usize, Arc<str>)>,
}

/// Which nodes may serve a request.
pub(super) struct Selection<'a> {
    pub(super) model: &'a str,
    pub(super) requested_name: &'a str,
    pub(super) wanted_node: Option<&'a str>,
    /// The node that last served this conversation, if any.
    pub(super) affine_node: Option<String>,
    pub(super) strategy: Strategy,
    pub(super) shape: &'a RequestShape,
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
        if let Some(shortlist) = self.shortlist(proxy, view, &learned) {
            return Ok(shortlist);
        }
        let mut candidates: Vec<(usize, Candidate)> = view
            .backends
            .iter()
            .enumerate()
            // A node the client names is asked even when its last report does not list the model (a
            // model copied there a moment ago is listed a heartbeat later); it answers 404 itself.
            .filter(|(_, backend)| match self.wanted_node {
                Some(wanted) => backend.name == wanted || backend.node_id == wanted,
                None => backend.has_model(self.model),
            })
            .map(|(index, backend)| (index, self.candidate(proxy, &learned, backend)))
            .collect();
        if let Some(front) = proxy.settings.distributed_front.as_deref()
            && candidates
                .iter()
                .any(|(_, candidate)| candidate.node_id == front)
        {
            candidates.retain(|(_, candidate)| candidate.node_id == front);
        }
        // Nodes whose breaker is open are left out, unless that leaves nobody.
        let usable = usable(proxy, &candidates);
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
                format!("node {wanted:?} is not up with a reachable Ollama"),
            )
        } else {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("model \"{requested_name}\" not found, try pulling it first"),
            )
        })
    }
}

impl Selection<'_> {
    /// One node as routing weighs it, with its live load.
    fn candidate(&self, proxy: &Proxy, learned: &Learned, backend: &Backend) -> Candidate {
        let peers = proxy.peer_load();
        Candidate {
            node_id: backend.node_id.clone(),
            name: backend.name.clone(),
            in_flight: proxy.load_of(&backend.node_id).load(Ordering::Relaxed)
                + peers.in_flight(&backend.node_id),
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
            warming: proxy
                .warmups
                .warming(&backend.node_id, self.model)
                .or_else(|| {
                    let (model, remaining) = peers.warming(&backend.node_id)?;
                    Some(sollol_policy::routing::Warming {
                        same_model: model == self.model,
                        remaining,
                    })
                }),
        }
    }

    /// The shortlist of a big cluster: the model's ranking walked [`SHORTLIST_STEP`] nodes at a time
    /// (with the conversation's node and a few unmeasured ones) until a usable node would serve without
    /// queueing; `None` when the whole cluster is weighed instead (small clusters, other strategies, a
    /// wanted node, a distributed front).
    fn shortlist(
        &self,
        proxy: &Proxy,
        view: &ClusterView,
        learned: &Learned,
    ) -> Option<Vec<(usize, Candidate)>> {
        if self.strategy != Strategy::Intelligent
            || self.wanted_node.is_some()
            || proxy.settings.distributed_front.is_some()
            || view.backends.len() <= SHORTLIST_ABOVE
        {
            return None;
        }
        let mut ranking = self.ranking(proxy, view, learned, false)?;
        // A newer view with other nodes at the ranked places (a node joined or left): ranked again.
        let placed = |(index, id): &(usize, Arc<str>)| {
            view.backends
                .get(*index)
                .is_some_and(|backend| *backend.node_id == **id)
        };
        if !ranking.order.iter().take(SHORTLIST_STEP).all(placed) {
            ranking = self.ranking(proxy, view, learned, true)?;
        }
        let weigh = |index: usize| self.candidate(proxy, learned, &view.backends[index]);
        let mut chosen: Vec<(usize, Candidate)> = Vec::with_capacity(SHORTLIST_STEP + 4);
        let mut seen = std::collections::HashSet::new();
        let mut add = |entry: &(usize, Arc<str>), chosen: &mut Vec<(usize, Candidate)>| {
            if placed(entry) && seen.insert(entry.0) {
                chosen.push((entry.0, weigh(entry.0)));
            }
        };
        if let Some(affine) = self.affine_node.as_deref()
            && let Some(index) = view
                .backends
                .iter()
                .position(|backend| backend.node_id == affine && backend.has_model(self.model))
        {
            add(&(index, Arc::from(affine)), &mut chosen);
        }
        for entry in ranking.unmeasured.iter().take(UNMEASURED_KEPT) {
            add(entry, &mut chosen);
        }
        for step in ranking.order.chunks(SHORTLIST_STEP) {
            for entry in step {
                add(entry, &mut chosen);
            }
            let usable = usable(proxy, &chosen);
            if usable
                .iter()
                .any(|(_, candidate)| candidate.in_flight < candidate.slots.max(1))
            {
                return Some(usable);
            }
        }
        // Every node weighed and all would queue: the caller weighs them all again as usual.
        None
    }

    /// The model's ranking, built again when older than [`SHORTLIST_FRESH`] or when `again`.
    fn ranking(
        &self,
        proxy: &Proxy,
        view: &ClusterView,
        learned: &Learned,
        again: bool,
    ) -> Option<Arc<Ranking>> {
        let now = Instant::now();
        if !again
            && let Some(ranking) = lock(&proxy.rankings.0).get(self.model)
            && now.duration_since(ranking.built_at) < SHORTLIST_FRESH
        {
            return Some(Arc::clone(ranking));
        }
        // Weighed as if idle and untouched by warm-ups or calibration: the order of what each node
        // would cost a request like this one; live load is weighed per request.
        let (indexes, idle): (Vec<usize>, Vec<Candidate>) = view
            .backends
            .iter()
            .enumerate()
            .filter(|(_, backend)| backend.has_model(self.model))
            .map(|(index, backend)| {
                let mut candidate = self.candidate(proxy, learned, backend);
                candidate.in_flight = 0;
                candidate.calibrating = false;
                candidate.warming = None;
                candidate.has_affinity = false;
                (index, candidate)
            })
            .unzip();
        if idle.is_empty() {
            return None;
        }
        let decision = routing::choose(
            &idle,
            self.shape,
            Strategy::Intelligent,
            &proxy.settings.priors,
            1.0,
            0,
        );
        let id = |position: usize| {
            (
                indexes[position],
                Arc::<str>::from(idle[position].node_id.as_str()),
            )
        };
        let mut unmeasured: Vec<usize> = (0..idle.len())
            .filter(|position| {
                idle[*position].stats.is_none() && idle[*position].node_stats.is_none()
            })
            .collect();
        unmeasured.sort_by(|a, b| idle[*a].name.cmp(&idle[*b].name));
        let ranking = Arc::new(Ranking {
            built_at: now,
            order: decision
                .ranking
                .iter()
                .map(|position| id(*position))
                .collect(),
            unmeasured: unmeasured.into_iter().map(id).collect(),
        });
        lock(&proxy.rankings.0).insert(self.model.to_owned(), Arc::clone(&ranking));
        Some(ranking)
    }
}

/// The candidates whose breaker lets a request through now.
fn usable(proxy: &Proxy, candidates: &[(usize, Candidate)]) -> Vec<(usize, Candidate)> {
    let peers = proxy.peer_load();
    candidates
        .iter()
        .filter(|(_, candidate)| !peers.breaker_open(&candidate.node_id))
        .filter(|(_, candidate)| proxy.lets_through(&candidate.node_id))
        .cloned()
        .collect()
}
