//! Replicas kept by the coordinator: for each model in `models.replicas` (or set through
//! `PUT /api/sollol/v1/replicas/MODEL`), as many up nodes hold it as asked (`all`: every node whose
//! Ollama answers). Every few seconds the keeper compares the wanted counts with the view and, for a
//! model short of copies, pulls it onto the roomiest nodes that lack it (`targets::placed`) the way a
//! client's pull would go: node to node from a holder, else one registry pull and copies of that. A
//! node that goes away drops the count, so the next round repairs it. Nothing is ever removed: a copy
//! above the count stays (removing is `sollol rm`'s job).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::Method;
use hyper::body::Bytes;
use serde_json::json;
use sollol_shared::api::{ReplicaCount, ReplicaList, ReplicaStatus};
use tokio_util::sync::CancellationToken;

use super::progress::Progress;
use super::upstream::{Call, settle};
use super::{peers, targets};
use crate::gateway::GatewayState;

/// How often the wanted counts are compared with the view.
const ROUND_EVERY: Duration = Duration::from_secs(2);
/// After adding copies of a model, the next look at it waits this long (the new copies appear in the
/// view with the nodes' next reports).
const SETTLE: Duration = Duration::from_secs(5);
/// After a failed attempt, the next waits this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// The wanted counts and how keeping them goes.
#[derive(Debug, Default)]
pub struct Replicas {
    wanted: Mutex<BTreeMap<String, Wanted>>,
}

#[derive(Clone, Debug)]
struct Wanted {
    count: ReplicaCount,
    origin: &'static str,
    /// No attempt before this.
    next: Option<Instant>,
    busy: bool,
    last_error: Option<String>,
}

impl Replicas {
    /// The counts of `models.replicas`.
    pub fn from_config(replicas: &[(String, ReplicaCount)]) -> Self {
        let wanted = replicas
            .iter()
            .map(|(model, count)| {
                (
                    model.clone(),
                    Wanted {
                        count: *count,
                        origin: "config",
                        next: None,
                        busy: false,
                        last_error: None,
                    },
                )
            })
            .collect();
        Self {
            wanted: Mutex::new(wanted),
        }
    }

    /// Sets (or with `None` forgets) the count of `model`, at run time.
    pub fn set(&self, model: &str, count: Option<ReplicaCount>) -> bool {
        let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        match count {
            None => wanted.remove(model).is_some(),
            Some(count) => {
                let entry = wanted.entry(model.to_owned()).or_insert(Wanted {
                    count,
                    origin: "api",
                    next: None,
                    busy: false,
                    last_error: None,
                });
                entry.count = count;
                entry.origin = "api";
                entry.next = None;
                true
            }
        }
    }

    /// Every wanted count with the nodes holding the model now.
    pub fn list(&self, state: &GatewayState) -> ReplicaList {
        let view = state.view.load();
        let wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        ReplicaList {
            replicas: wanted
                .iter()
                .map(|(model, wanted)| ReplicaStatus {
                    model: model.clone(),
                    wanted: wanted.count,
                    holders: targets::holders(&view, model)
                        .iter()
                        .map(|node| node.name.clone())
                        .collect(),
                    origin: wanted.origin.to_owned(),
                    last_error: wanted.last_error.clone(),
                })
                .collect(),
        }
    }

    /// The models short of copies now, each marked busy: what this round works on.
    fn due(&self, holders: &HashMap<String, usize>, nodes: usize) -> Vec<(String, usize)> {
        let now = Instant::now();
        let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        wanted
            .iter_mut()
            .filter(|(_, wanted)| !wanted.busy && wanted.next.is_none_or(|next| next <= now))
            .filter_map(|(model, wanted)| {
                let have = holders.get(model).copied().unwrap_or(0);
                let want = wanted.count.on(nodes);
                (have < want).then(|| {
                    wanted.busy = true;
                    (model.clone(), want - have)
                })
            })
            .collect()
    }

    fn finished(&self, model: &str, outcome: Result<(), String>) {
        let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(wanted) = wanted.get_mut(model) {
            wanted.busy = false;
            wanted.next = Some(Instant::now() + if outcome.is_ok() { SETTLE } else { RETRY_AFTER });
            wanted.last_error = outcome.err();
        }
    }
}

/// Keeps the wanted counts until `shutdown`.
pub async fn keep(state: Arc<GatewayState>, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(ROUND_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        // One coordinator of a group adds the copies: the others would add the same ones again.
        if !state.group.leads() {
            continue;
        }
        let view = state.view.load_full();
        let learned = state.proxy.learner().snapshot();
        let mut holders: HashMap<String, usize> = HashMap::new();
        for backend in &view.backends {
            for model in &backend.models {
                *holders.entry(model.clone()).or_default() += 1;
            }
        }
        for (model, missing) in state.replicas.due(&holders, view.backends.len()) {
            let nodes = targets::placed(&view, &learned, &model, missing);
            if nodes.is_empty() {
                state.replicas.finished(
                    &model,
                    Err("no up node that lacks it has room for it".to_owned()),
                );
                continue;
            }
            let names: Vec<String> = nodes.iter().map(|node| node.name.clone()).collect();
            tracing::info!(%model, nodes = ?names, "adding copies to keep the wanted count");
            let state = Arc::clone(&state);
            let plan = peers::plan(&view, &model, nodes);
            tokio::spawn(async move {
                let call = Call {
                    api: &state.models,
                    method: Method::POST,
                    path: "/api/pull",
                    body: Bytes::from(json!({"model": model}).to_string()),
                    origin: None,
                };
                let events = peers::run(plan, &call, &state.models.token, &state.observer, &model);
                let last = settle(Progress::new(names), events).await;
                let outcome = match last.get("error").and_then(|error| error.as_str()) {
                    Some(error) => {
                        tracing::warn!(%model, %error, "adding copies failed");
                        Err(error.to_owned())
                    }
                    None => Ok(()),
                };
                state.replicas.finished(&model, outcome);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_short_of_copies_is_due_once_until_its_attempt_ends() {
        let replicas = Replicas::from_config(&[
            ("a:1b".to_owned(), ReplicaCount::All),
            ("b:1b".to_owned(), ReplicaCount::Nodes(2)),
        ]);
        let holders = HashMap::from([("a:1b".to_owned(), 3), ("b:1b".to_owned(), 1)]);
        assert_eq!(replicas.due(&holders, 3), [("b:1b".to_owned(), 1)]);
        // Busy: not due again while its copies are being added.
        assert!(replicas.due(&holders, 3).is_empty());
        replicas.finished("b:1b", Err("no room".to_owned()));
        assert!(
            replicas.due(&holders, 3).is_empty(),
            "waits before retrying"
        );
        // `all` follows the cluster's size; a count larger than the cluster is every node.
        let grown = HashMap::from([("a:1b".to_owned(), 3), ("b:1b".to_owned(), 2)]);
        replicas.set("b:1b", Some(ReplicaCount::Nodes(5)));
        assert_eq!(
            replicas.due(&grown, 4),
            [("a:1b".to_owned(), 1), ("b:1b".to_owned(), 2)]
        );
        assert!(replicas.set("b:1b", None));
        assert!(!replicas.set("b:1b", None));
    }
}
