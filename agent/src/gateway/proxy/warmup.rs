//! Warm-up: models loaded before requests need them, with Ollama's load-only request (`/api/generate`
//! without a prompt), so that no client pays a cold load the coordinator could foresee.
//!
//! Two reasons to warm a model on a node: the history's demand (`sollol_policy::warmup::plan`, checked
//! every second: at start, when a node joins, when a node's Ollama restarted), and a request
//! whose best node is full while an idle node with room would serve the next one sooner (`invest`).
//! Warm-ups give way: they start only on idle nodes while nothing waits in the priority queue, one at a
//! time per node; while one runs, routing counts only the load time left (`Candidate::warming`). Each is
//! an attempt of its own in the request feed and the metrics (strategy and kind `warmup`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header;
use serde_json::json;
use sollol_policy::routing::{self, Candidate, Choice, Decision, Warming};
use sollol_policy::warmup::{self, Demand, WarmNode, WarmupSettings};
use tokio_util::sync::CancellationToken;

use super::Proxy;
use crate::cluster::{Backend, SharedView};
use crate::history::{HistoryReader, OllamaTimings, Outcome};
use crate::telemetry::unix_ms;

/// How often the plan is checked, and the demand read again.
const CHECK_EVERY: Duration = Duration::from_secs(1);
const READ_DEMAND_EVERY: Duration = Duration::from_secs(60);
/// A pair is warmed again at most this often after a failed load…
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// …and after one that worked (a node that cannot keep the model must not be loaded every second).
const WARM_AGAIN_AFTER: Duration = Duration::from_secs(10);
/// The unloading request's own answer (served after it was routed) still counts as before the unload.
const UNLOAD_ANSWER_MS: u64 = 300_000;
/// The longest a load may take.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Warm-up settings from the configuration; `None` in `ProxySettings` turns it off.
#[derive(Clone, Copy, Debug)]
pub struct WarmupConfig {
    /// How far back the demand is read.
    pub window: Duration,
    pub plan: WarmupSettings,
}

/// A load the gateway is running on a node.
#[derive(Clone, Debug)]
pub(super) struct Loading {
    model: String,
    started: Instant,
    expected: Duration,
}

/// The warm-up state routing reads: a load running per node (a snapshot, replaced whole), when each
/// pair was last warmed or tried, and the most models each node was seen holding.
#[derive(Debug, Default)]
pub(super) struct Warmups {
    running: arc_swap::ArcSwap<HashMap<String, Loading>>,
    /// Per pair: when it was last tried, and whether that load failed.
    tried: std::sync::Mutex<HashMap<(String, String), (Instant, bool)>>,
    /// Per node, the most models it was seen holding at once (a snapshot routing reads without a lock).
    capacity: arc_swap::ArcSwap<HashMap<String, usize>>,
    /// Models a client asked to unload (`keep_alive: 0`), and when (Unix milliseconds).
    unloaded: std::sync::Mutex<HashMap<String, u64>>,
}

impl Warmups {
    /// The node's running load as routing sees it for `model`.
    pub(super) fn warming(&self, node_id: &str, model: &str) -> Option<Warming> {
        let running = self.running.load();
        let loading = running.get(node_id)?;
        Some(Warming {
            same_model: loading.model == model,
            remaining: loading.expected.saturating_sub(loading.started.elapsed()),
        })
    }

    /// The loads running now: (node, model, time still expected).
    pub(super) fn running(&self) -> Vec<(String, String, Duration)> {
        self.running
            .load()
            .iter()
            .map(|(node, loading)| {
                (
                    node.clone(),
                    loading.model.clone(),
                    loading.expected.saturating_sub(loading.started.elapsed()),
                )
            })
            .collect()
    }

    fn is_running(&self, node_id: &str) -> bool {
        self.running.load().contains_key(node_id)
    }

    /// Marks a load as started, unless one runs on the node or the pair was tried within `RETRY_AFTER`.
    fn begin(&self, node_id: &str, model: &str, expected: Duration) -> bool {
        {
            let mut tried = super::lock(&self.tried);
            let key = (node_id.to_owned(), model.to_owned());
            let too_soon = |(at, failed): &(Instant, bool)| {
                at.elapsed()
                    < if *failed {
                        RETRY_AFTER
                    } else {
                        WARM_AGAIN_AFTER
                    }
            };
            if tried.get(&key).is_some_and(too_soon) || self.is_running(node_id) {
                return false;
            }
            tried.insert(key, (Instant::now(), false));
        }
        let loading = Loading {
            model: model.to_owned(),
            started: Instant::now(),
            expected,
        };
        self.running.rcu(|running| {
            let mut running = HashMap::clone(running);
            running.insert(node_id.to_owned(), loading.clone());
            running
        });
        true
    }

    fn end(&self, node_id: &str, model: &str, ok: bool) {
        if !ok
            && let Some((_, failed)) =
                super::lock(&self.tried).get_mut(&(node_id.to_owned(), model.to_owned()))
        {
            *failed = true;
        }
        self.running.rcu(|running| {
            let mut running = HashMap::clone(running);
            running.remove(node_id);
            running
        });
    }

    /// The most models the node was seen holding at once, `loaded_now` included; at least 1.
    pub(super) fn capacity_of(&self, node_id: &str, loaded_now: usize) -> usize {
        self.capacity
            .load()
            .get(node_id)
            .copied()
            .unwrap_or(1)
            .max(loaded_now)
            .max(1)
    }

    /// Raises the nodes' limits to what they hold now, or held before a restart (their last reports
    /// in the history).
    pub(super) fn remember_capacity(&self, seen: impl IntoIterator<Item = (String, usize)>) {
        let raised: Vec<(String, usize)> = seen
            .into_iter()
            .filter(|(node, count)| self.capacity_of(node, *count) > self.capacity_of(node, 0))
            .collect();
        if raised.is_empty() {
            return;
        }
        self.capacity.rcu(|capacity| {
            let mut capacity = HashMap::clone(capacity);
            for (node, count) in &raised {
                let seen = capacity.entry(node.clone()).or_insert(1);
                *seen = (*seen).max(*count);
            }
            capacity
        });
    }

    /// When the pair was last warmed (or tried).
    fn last_tried(&self, node_id: &str, model: &str) -> Option<Instant> {
        super::lock(&self.tried)
            .get(&(node_id.to_owned(), model.to_owned()))
            .map(|(at, _)| *at)
    }
}

impl Proxy {
    /// A client asked for `model` to be unloaded: a node losing it is not a restart to repair, until
    /// the model is served there again.
    pub(super) fn unloaded_on_purpose(&self, model: &str) {
        if self.settings.warmup.is_some() {
            super::lock(&self.warmups.unloaded)
                .insert(model.to_owned(), unix_ms(SystemTime::now()));
        }
    }

    /// Keeps the models the history's demand predicts loaded where the router would send them, until
    /// `shutdown`. Reads the demand from `history` every minute.
    pub async fn warm_up(
        &self,
        view: SharedView,
        history: Option<Arc<HistoryReader>>,
        shutdown: CancellationToken,
    ) {
        let Some(config) = self.settings.warmup else {
            return;
        };
        let mut demand: Vec<Demand> = Vec::new();
        let mut demand_read: Option<Instant> = None;
        let mut restarts = Restarts::default();
        loop {
            if demand_read.is_none_or(|at| at.elapsed() >= READ_DEMAND_EVERY)
                && let Some(reader) = &history
            {
                demand = read_demand(Arc::clone(reader), config.window).await;
                demand_read = Some(Instant::now());
                if !demand.is_empty() {
                    tracing::debug!(
                        models = demand.len(),
                        "warm-up demand read from the history"
                    );
                }
            }
            if !demand.is_empty() {
                restarts.observe(&view.load());
                self.warm_planned(&view, &demand, &config.plan, &restarts);
            }
            tokio::select! {
                () = tokio::time::sleep(CHECK_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Starts the planned loads that are due on idle nodes.
    fn warm_planned(
        &self,
        view: &SharedView,
        demand: &[Demand],
        settings: &WarmupSettings,
        restarts: &Restarts,
    ) {
        let view = view.load_full();
        let learned = self.learner.snapshot();
        self.warmups.remember_capacity(
            view.backends
                .iter()
                .map(|backend| (backend.node_id.clone(), backend.loaded.len())),
        );
        let backends: Vec<&Arc<Backend>> = view
            .backends
            .iter()
            .filter(|backend| Some(&backend.node_id) != self.settings.distributed_front.as_ref())
            .collect();
        let nodes: Vec<WarmNode> = backends
            .iter()
            .map(|backend| WarmNode {
                name: backend.name.clone(),
                models: backend.models.clone(),
                loaded: backend.loaded.clone(),
                capacity: self
                    .warmups
                    .capacity_of(&backend.node_id, backend.loaded.len()),
                slots: self
                    .settings
                    .node_slots
                    .max(learned.slots(&backend.node_id)),
                speeds: learned
                    .by_node
                    .get(&backend.node_id)
                    .map(|pairs| {
                        pairs
                            .iter()
                            .map(|(model, stats)| (model.clone(), stats.decode_tokens_per_second))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect();
        for load in warmup::plan(demand, &nodes, settings) {
            let backend = backends[load.node];
            let model = load.model.as_str();
            let key = (backend.node_id.clone(), model.to_owned());
            if learned.believed_loaded(
                &backend.node_id,
                model,
                backend.has_loaded(model),
                backend.reported_ms,
                &backend.models,
                nodes[load.node].capacity,
            ) {
                continue;
            }
            // A model warmed or served here before is loaded again only when the node lost it in a
            // restart; one it let expire or unloaded on purpose is left alone.
            let used_before = learned.served_ms(&backend.node_id, model).is_some()
                || self.warmups.last_tried(&backend.node_id, model).is_some();
            let unloaded_since_use =
                super::lock(&self.warmups.unloaded)
                    .get(model)
                    .is_some_and(|unloaded_ms| {
                        learned
                            .served_ms(&backend.node_id, model)
                            .is_none_or(|served_ms| served_ms <= unloaded_ms + UNLOAD_ANSWER_MS)
                    });
            if used_before && (!restarts.lost(&key) || unloaded_since_use) {
                continue;
            }
            if self.is_idle(&backend.node_id) {
                self.start_warmup(
                    backend,
                    model,
                    "warm-up from history: the model is asked for and this node would serve it",
                );
            }
        }
    }

    /// Whether nothing runs or waits that a warm-up could delay.
    fn is_idle(&self, node_id: &str) -> bool {
        self.load_of(node_id).load(Ordering::Relaxed) == 0
            && self.calibrating.get(node_id).load(Ordering::Relaxed) == 0
            && self.admission.waiting() == 0
            && !self.warmups.is_running(node_id)
    }

    /// Spare capacity: when the chosen node will make this request wait for a slot, an idle node with
    /// room that holds the model but has it cold would serve the next such request sooner once warm,
    /// so its model is loaded now (the request itself still goes to the best node).
    pub(super) fn invest(
        &self,
        model: &str,
        decision: &Decision,
        candidates: &[Candidate],
        backends: &[&Arc<Backend>],
    ) {
        if self.settings.warmup.is_none() {
            return;
        }
        let Some(best) = decision.first() else {
            return;
        };
        let chosen = &candidates[best];
        if chosen.in_flight < chosen.slots.max(1) {
            return;
        }
        let waiting = decision.predicted[best];
        let learned = self.learner.snapshot();
        // Models the node holds as far as the gateway knows, against the most it was seen holding.
        let has_room = |backend: &Backend| {
            let capacity = self
                .warmups
                .capacity_of(&backend.node_id, backend.loaded.len());
            let held = backend
                .models
                .iter()
                .filter(|model| {
                    learned.believed_loaded(
                        &backend.node_id,
                        model,
                        backend.has_loaded(model),
                        backend.reported_ms,
                        &backend.models,
                        capacity,
                    )
                })
                .count();
            held < capacity
        };
        let spare = decision
            .ranking
            .iter()
            .copied()
            .filter(|index| {
                let candidate = &candidates[*index];
                !candidate.model_loaded
                    && candidate.warming.is_none()
                    && candidate.in_flight == 0
                    && has_room(backends[*index])
            })
            .find(|index| {
                let warm = Candidate {
                    model_loaded: true,
                    ..candidates[*index].clone()
                };
                let shape = routing::RequestShape {
                    prompt_tokens: 0,
                    output_tokens: 32,
                };
                routing::predict(&warm, &shape, &self.settings.priors) < waiting
            });
        if let Some(index) = spare
            && self.is_idle(&candidates[index].node_id)
        {
            self.start_warmup(
                backends[index],
                model,
                "warm-up for spare capacity: the best node is full and this idle node would serve sooner once warm",
            );
        }
    }

    /// Sends the load-only request in the background; the outcome goes to the learner like any attempt
    /// (the wall-clock time is the load time it learns).
    fn start_warmup(&self, backend: &Arc<Backend>, model: &str, reason: &'static str) {
        let learned = self.learner.snapshot();
        let expected = learned
            .pair(&backend.node_id, model)
            .or_else(|| learned.node_stats(&backend.node_id, model))
            .and_then(|stats| stats.cold_load)
            .unwrap_or(self.settings.priors.cold_load);
        if !self.warmups.begin(&backend.node_id, model, expected) {
            return;
        }
        let body = json!({"model": model});
        let request = hyper::Request::post(format!("{}/api/generate", backend.base_url))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())));
        let Ok(request) = request else {
            self.warmups.end(&backend.node_id, model, false);
            return;
        };
        tracing::info!(node = %backend.name, %model, reason, "warming up");
        let client = self.client.clone();
        let learner = Arc::clone(&self.learner);
        let warmups = Arc::clone(&self.warmups);
        let node_id = backend.node_id.clone();
        let name = backend.name.clone();
        let mut outcome = Outcome {
            node_id: backend.node_id.clone(),
            model: model.to_owned(),
            path: "/api/generate".to_owned(),
            app: "sollol-warmup".to_owned(),
            ok: false,
            time_to_first_byte: Duration::ZERO,
            total: Duration::ZERO,
            timings: None,
            choice: Choice::WARMUP,
            reason: reason.to_owned(),
            candidates: Arc::from([]),
            concurrent: 0,
        };
        tokio::spawn(async move {
            let started = Instant::now();
            let answered = tokio::time::timeout(LOAD_TIMEOUT, async {
                let response = client.request(request).await.ok()?;
                let ok = response.status().is_success();
                response.into_body().collect().await.ok()?;
                Some(ok)
            })
            .await;
            outcome.total = started.elapsed();
            outcome.time_to_first_byte = outcome.total;
            outcome.ok = matches!(answered, Ok(Some(true)));
            warmups.end(&node_id, &outcome.model, outcome.ok);
            if outcome.ok {
                outcome.timings = Some(OllamaTimings {
                    total: outcome.total,
                    load: outcome.total,
                    load_reported: true,
                    ..OllamaTimings::default()
                });
            } else {
                tracing::warn!(node = %name, model = %outcome.model, "warm-up failed");
            }
            learner.record(outcome);
        });
    }
}

/// Which models nodes lost in a restart: every model a node held gone at once, before the time Ollama
/// said it would unload them (`expires_at` of `/api/ps`). A model that expired, or one unloaded while
/// others stay, is not lost.
#[derive(Debug, Default)]
struct Restarts {
    /// Per node, the models last seen loaded and when Ollama said they would be unloaded.
    loaded: HashMap<String, Vec<(String, Option<SystemTime>)>>,
    lost: std::collections::HashSet<(String, String)>,
}

impl Restarts {
    fn observe(&mut self, view: &crate::cluster::ClusterView) {
        let now = SystemTime::now();
        for node in &view.nodes {
            let Some(ollama) = node.ollama.as_ref().filter(|ollama| ollama.reachable) else {
                continue;
            };
            let loaded: Vec<(String, Option<SystemTime>)> = ollama
                .loaded
                .iter()
                .map(|model| {
                    (
                        crate::cluster::normalize_model(&model.name),
                        model.expires_at.as_deref().and_then(parse_rfc3339),
                    )
                })
                .collect();
            let before = self.loaded.insert(node.id.clone(), loaded.clone());
            let Some(before) = before else { continue };
            let all_gone = !before.is_empty()
                && before
                    .iter()
                    .all(|(model, _)| !loaded.iter().any(|(now, _)| now == model));
            if all_gone {
                for (model, expires) in before {
                    if expires.is_some_and(|expires| expires > now) {
                        self.lost.insert((node.id.clone(), model));
                    }
                }
            }
            for (model, _) in &loaded {
                self.lost.remove(&(node.id.clone(), model.clone()));
            }
        }
    }

    fn lost(&self, key: &(String, String)) -> bool {
        self.lost.contains(key)
    }
}

/// An RFC 3339 time as Ollama writes it (`2026-12-05T10:00:00.123456789-07:00`, or `Z`).
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let (local, offset_seconds) = if let Some(local) = text.strip_suffix('Z') {
        (local, 0i64)
    } else {
        let split = text.len().checked_sub(6)?;
        let (local, offset) = text.split_at(split);
        let sign = match offset.as_bytes().first()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let (hours, minutes) = offset[1..].split_once(':')?;
        let seconds = hours.parse::<i64>().ok()? * 3600 + minutes.parse::<i64>().ok()? * 60;
        (local, sign * seconds)
    };
    let utc_as_if = humantime::parse_rfc3339_weak(local).ok()?;
    let shift = Duration::from_secs(offset_seconds.unsigned_abs());
    if offset_seconds >= 0 {
        utc_as_if.checked_sub(shift)
    } else {
        utc_as_if.checked_add(shift)
    }
}

/// The demand of the window, read on a blocking thread; empty when the history cannot say.
async fn read_demand(reader: Arc<HistoryReader>, window: Duration) -> Vec<Demand> {
    let since_ms = unix_ms(SystemTime::now()).saturating_sub(window.as_millis() as u64);
    match tokio::task::spawn_blocking(move || reader.demand(since_ms)).await {
        Ok(Ok(rows)) => rows
            .into_iter()
            .map(|(model, requests)| Demand { model, requests })
            .collect(),
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot read the demand for warm-up from the history");
            Vec::new()
        }
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_times_are_read_with_their_offsets() {
        let utc = parse_rfc3339("2026-12-05T10:00:00Z").expect("utc");
        let behind = parse_rfc3339("2026-12-05T03:00:00.123456789-07:00").expect("offset");
        let ahead = parse_rfc3339("2026-12-05T11:30:00+01:30").expect("offset");
        assert_eq!(
            behind.duration_since(utc).expect("later"),
            Duration::from_nanos(123_456_789)
        );
        assert_eq!(ahead, utc);
        assert_eq!(parse_rfc3339("soon"), None);
        assert_eq!(parse_rfc3339("2026-12-05T10:00:00+0100"), None);
    }
}
