//! What routing learns from each response: per (node, model) speeds and load times from Ollama's own timings.
//!
//! The request path sends an [`Outcome`] with `try_send` and never waits; one
//! task owns the table, folds outcomes in with exponential moving averages,
//! publishes an immutable [`Learned`] snapshot, and hands the updated rows to
//! the history so a restarted coordinator starts from them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster::group::Others;
use crate::history::{HistorySender, Outcome, PairRow, Record, RequestRow};
use crate::observability::Observer;
use crate::telemetry::unix_ms;
use sollol_policy::routing::{DecisionKind, PairStats};

/// Weight of the newest sample in the moving averages.
const SMOOTHING: f64 = 0.3;
/// A load shorter than this was a warm model, not a cold load.
const COLD_LOAD_THRESHOLD: Duration = Duration::from_millis(250);
const QUEUE_CAPACITY: usize = 8192;
/// The snapshot is published at most this often: copying the whole table for every few outcomes cost
/// a busy gateway more than routing itself, and routing on a table 10 ms old loses nothing.
const PUBLISH_GAP: Duration = Duration::from_millis(10);

/// Everything learned so far.
#[derive(Clone, Debug, Default)]
pub struct Learned {
    pub pairs: HashMap<(String, String), PairStats>,
    /// Requests served per node since start.
    pub served: HashMap<String, u64>,
    /// When each (node, model) last answered successfully, in Unix milliseconds.
    /// Per node, per model (nested so that lookups by `&str` allocate nothing).
    pub last_served_ms: HashMap<String, HashMap<String, u64>>,
    /// Requests each node was seen to run at once without queueing them.
    pub slots: HashMap<String, u32>,
    /// `pairs` grouped by node, rebuilt with every snapshot, so per-node questions do not scan every pair.
    pub by_node: HashMap<String, Vec<(String, PairStats)>>,
    /// This coordinator's own measurements (what it publishes to the other coordinators); `pairs` is
    /// these merged with the others'.
    pub own: Arc<BTreeMap<(String, String), PairStats>>,
    /// How many coordinators' measurements went into each pair of `pairs` (absent: this one's alone).
    pub merged_from: HashMap<(String, String), u32>,
}

impl Learned {
    pub fn pair(&self, node_id: &str, model: &str) -> Option<PairStats> {
        self.by_node
            .get(node_id)?
            .iter()
            .find(|(name, _)| name == model)
            .map(|(_, stats)| *stats)
    }

    /// When the model last answered on the node, in Unix milliseconds.
    pub fn served_ms(&self, node_id: &str, model: &str) -> Option<u64> {
        self.last_served_ms.get(node_id)?.get(model).copied()
    }

    /// The node's best-measured statistics with any model other than `model`.
    pub fn node_stats(&self, node_id: &str, model: &str) -> Option<PairStats> {
        self.by_node
            .get(node_id)?
            .iter()
            .filter(|(other, _)| other != model)
            .map(|(_, stats)| *stats)
            .max_by_key(|stats| stats.samples)
    }

    fn rebuild_index(&mut self) {
        self.by_node.clear();
        for ((node, model), stats) in &self.pairs {
            self.by_node
                .entry(node.clone())
                .or_default()
                .push((model.clone(), *stats));
        }
    }

    /// Parallel requests the node was seen to run without queueing; at least 1.
    pub fn slots(&self, node_id: &str) -> u32 {
        self.slots.get(node_id).copied().unwrap_or(1).max(1)
    }

    /// Whether the model answered on the node after the node's last report, so it is loaded even if that report says otherwise.
    pub fn served_since(&self, node_id: &str, model: &str, report_ms: u64) -> bool {
        self.served_ms(node_id, model)
            .is_some_and(|served_ms| served_ms >= report_ms)
    }

    /// Whether the model is loaded on the node as far as the gateway knows: the node's last report
    /// (`reported_loaded`, at `report_ms`) lists it or it answered since, and no more than `capacity - 1`
    /// of the node's other `installed` models answered after it (a node holding `capacity` models unloads
    /// the least recently used one to load another).
    pub fn believed_loaded(
        &self,
        node_id: &str,
        model: &str,
        reported_loaded: bool,
        report_ms: u64,
        installed: &[String],
        capacity: usize,
    ) -> bool {
        let served = |model: &str| self.served_ms(node_id, model);
        let this = served(model);
        let used_ms = match (reported_loaded, this) {
            (_, Some(served_ms)) if served_ms >= report_ms => served_ms,
            (true, served_ms) => served_ms.unwrap_or(report_ms).max(report_ms),
            (false, _) => return false,
        };
        if installed.len() <= capacity {
            return true;
        }
        let newer = installed
            .iter()
            .filter(|other| other.as_str() != model)
            .filter(|other| served(other).is_some_and(|served_ms| served_ms > used_ms))
            .count();
        newer < capacity.max(1)
    }
}

/// The request path's handle: reads the snapshot, queues outcomes.
#[derive(Debug)]
pub struct Learner {
    learned: Arc<ArcSwap<Learned>>,
    sender: mpsc::Sender<Outcome>,
    dropped: AtomicU64,
}

impl Learner {
    /// Starts the learning task from what the history remembered; with `peers`, the published figures
    /// are this coordinator's merged with the other live coordinators'.
    pub fn start(
        remembered: Vec<(String, String, PairStats)>,
        peers: Option<Peers>,
        history: HistorySender,
        observer: Arc<Observer>,
        shutdown: CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Arc<Self> {
        let mut learned = Learned {
            pairs: remembered
                .into_iter()
                .map(|(node, model, stats)| ((node, model), stats))
                .collect(),
            served: HashMap::new(),
            last_served_ms: HashMap::new(),
            slots: HashMap::new(),
            by_node: HashMap::new(),
            own: Arc::default(),
            merged_from: HashMap::new(),
        };
        learned.rebuild_index();
        let learned = Arc::new(ArcSwap::from_pointee(learned));
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        tasks.spawn(run(
            Arc::clone(&learned),
            peers,
            receiver,
            history,
            observer,
            shutdown,
        ));
        Arc::new(Self {
            learned,
            sender,
            dropped: AtomicU64::new(0),
        })
    }

    pub fn snapshot(&self) -> Arc<Learned> {
        self.learned.load_full()
    }

    /// Queues an outcome without waiting; a full queue drops it and counts the drop.
    pub fn record(&self, outcome: Outcome) {
        if self.sender.try_send(outcome).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The other coordinators' figures, and this coordinator's id (the merge's order).
#[derive(Debug)]
pub struct Peers {
    pub own_id: String,
    pub others: tokio::sync::watch::Receiver<Arc<Others>>,
}

async fn run(
    learned: Arc<ArcSwap<Learned>>,
    mut peers: Option<Peers>,
    mut receiver: mpsc::Receiver<Outcome>,
    history: HistorySender,
    observer: Arc<Observer>,
    shutdown: CancellationToken,
) {
    let mut table = (*learned.load_full()).clone();
    publish(&learned, &mut table, peers.as_ref());
    let mut evidence: HashMap<String, SlotEvidence> = HashMap::new();
    let mut batch = Vec::new();
    let mut published = Instant::now();
    let mut unpublished = false;
    loop {
        let publish_at = published + PUBLISH_GAP;
        tokio::select! {
            received = receiver.recv_many(&mut batch, 256) => {
                if received == 0 {
                    break;
                }
            }
            () = tokio::time::sleep_until(publish_at.into()), if unpublished => {
                publish(&learned, &mut table, peers.as_ref());
                (published, unpublished) = (Instant::now(), false);
                continue;
            }
            changed = others_changed(peers.as_mut()) => {
                if !changed {
                    peers = None;
                }
                unpublished = true;
                continue;
            }
            () = shutdown.cancelled() => break,
        }
        let now_ms = unix_ms(SystemTime::now());
        let mut touched = Vec::new();
        for outcome in batch.drain(..) {
            *table.served.entry(outcome.node_id.clone()).or_default() += 1;
            let key = (outcome.node_id.clone(), outcome.model.clone());
            if outcome.ok {
                table
                    .last_served_ms
                    .entry(outcome.node_id.clone())
                    .or_default()
                    .insert(outcome.model.clone(), now_ms);
                if let Some((concurrent, waited)) = slot_evidence(&outcome) {
                    let evidence = evidence.entry(outcome.node_id.clone()).or_default();
                    evidence.add(concurrent, waited);
                    table
                        .slots
                        .insert(outcome.node_id.clone(), evidence.slots());
                }
            }
            if let Some(updated) = update(table.pairs.get(&key).copied(), &outcome) {
                table.pairs.insert(key.clone(), updated);
                touched.push(key);
            }
            let row = RequestRow::of(&outcome, now_ms);
            observer.finished(&row);
            history.record(Record::Request(Box::new(row)));
        }
        touched.sort();
        touched.dedup();
        for (node_id, model) in touched {
            if let Some(stats) = table.pairs.get(&(node_id.clone(), model.clone())) {
                history.record(Record::Pair(PairRow {
                    node_id,
                    model,
                    stats: *stats,
                    updated_ms: now_ms,
                }));
            }
        }
        unpublished = true;
        if Instant::now() >= publish_at {
            publish(&learned, &mut table, peers.as_ref());
            (published, unpublished) = (Instant::now(), false);
        }
    }
}

/// Waits for the other coordinators' figures to change; `false` when they never will again (no group,
/// or it stopped).
async fn others_changed(peers: Option<&mut Peers>) -> bool {
    match peers {
        Some(peers) => peers.others.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

type OwnPairs = BTreeMap<(String, String), PairStats>;

/// Publishes the table, merged with the other live coordinators' figures when there are any.
fn publish(learned: &ArcSwap<Learned>, table: &mut Learned, peers: Option<&Peers>) {
    let own: BTreeMap<(String, String), PairStats> = table
        .pairs
        .iter()
        .map(|(key, stats)| (key.clone(), *stats))
        .collect();
    let mut view = table.clone();
    if let Some(peers) = peers {
        let others = peers.others.borrow().clone();
        let mut contributions: Vec<(&str, &OwnPairs)> = others
            .alive()
            .map(|peer| (peer.id.as_str(), &peer.figures.pairs))
            .collect();
        if !contributions.is_empty() {
            contributions.push((peers.own_id.as_str(), &own));
            contributions.sort_by_key(|(id, _)| *id);
            let merged =
                sollol_policy::group::merge_pairs(contributions.iter().map(|(_, pairs)| *pairs));
            view.pairs = merged
                .iter()
                .map(|(key, (stats, _))| (key.clone(), *stats))
                .collect();
            view.merged_from = merged
                .into_iter()
                .map(|(key, (_, count))| (key, count))
                .collect();
            for peer in others.alive() {
                for (node, slots) in &peer.figures.slots {
                    let mine = view.slots.entry(node.clone()).or_insert(*slots);
                    *mine = (*mine).max(*slots);
                }
            }
        }
    }
    view.own = Arc::new(own);
    view.rebuild_index();
    learned.store(Arc::new(view));
}

/// Folds one outcome into a pair's statistics. Pure.
pub fn update(previous: Option<PairStats>, outcome: &Outcome) -> Option<PairStats> {
    if !outcome.ok {
        return previous;
    }
    let timings = outcome.timings.unwrap_or_default();
    // A warm-up is a load and nothing else: it tells the load time, never a speed or a first token.
    if outcome.choice.kind() == DecisionKind::Warmup {
        let stats = previous?;
        return Some(PairStats {
            cold_load: (timings.load >= COLD_LOAD_THRESHOLD)
                .then(|| {
                    let new = timings.load.as_secs_f64();
                    Duration::from_secs_f64(
                        stats
                            .cold_load
                            .map_or(new, |old| smooth(old.as_secs_f64(), new)),
                    )
                })
                .or(stats.cold_load),
            ..stats
        });
    }
    let decode = (timings.eval_tokens >= 2 && !timings.eval.is_zero())
        .then(|| timings.eval_tokens as f64 / timings.eval.as_secs_f64());
    let prompt = (timings.prompt_tokens >= 4 && !timings.prompt.is_zero())
        .then(|| timings.prompt_tokens as f64 / timings.prompt.as_secs_f64());
    // Without `load_duration`, the load is what the answer's time leaves after prompt and generation,
    // trusted only when nothing else of ours ran on the node (so no slot wait hides in it).
    let load = if timings.load_reported {
        Some(timings.load)
    } else if outcome.concurrent == 0 {
        let total = if timings.total.is_zero() {
            outcome.total
        } else {
            timings.total
        };
        Some(total.saturating_sub(timings.prompt + timings.eval))
    } else {
        None
    };
    let cold_load = load.filter(|load| *load >= COLD_LOAD_THRESHOLD);
    let warm_first_token = load
        .is_some_and(|load| load < COLD_LOAD_THRESHOLD)
        .then_some(outcome.time_to_first_byte);
    match previous {
        None => {
            let decode = decode?;
            Some(PairStats {
                decode_tokens_per_second: decode,
                prompt_tokens_per_second: prompt.unwrap_or(decode * 10.0),
                cold_load,
                time_to_first_token: warm_first_token.unwrap_or(outcome.time_to_first_byte),
                samples: 1,
            })
        }
        Some(stats) => Some(PairStats {
            decode_tokens_per_second: decode.map_or(stats.decode_tokens_per_second, |value| {
                smooth(stats.decode_tokens_per_second, value)
            }),
            prompt_tokens_per_second: prompt.map_or(stats.prompt_tokens_per_second, |value| {
                smooth(stats.prompt_tokens_per_second, value)
            }),
            cold_load: match (stats.cold_load, cold_load) {
                (Some(old), Some(new)) => Some(Duration::from_secs_f64(smooth(
                    old.as_secs_f64(),
                    new.as_secs_f64(),
                ))),
                (old, new) => new.or(old),
            },
            time_to_first_token: warm_first_token.map_or(stats.time_to_first_token, |value| {
                Duration::from_secs_f64(smooth(
                    stats.time_to_first_token.as_secs_f64(),
                    value.as_secs_f64(),
                ))
            }),
            samples: stats.samples.saturating_add(1),
        }),
    }
}

/// What one request says about a node's slots: it started beside `concurrent` others (the key), and
/// whether Ollama's timings show it waited for a slot (total minus load, prompt and generation). `None`
/// when it says nothing (it ran alone, or has no timings). Pure.
pub fn slot_evidence(outcome: &Outcome) -> Option<(u32, bool)> {
    let timings = outcome.timings?;
    // Without `load_duration` a load and a wait for a slot look alike.
    if outcome.concurrent == 0 || !timings.load_reported {
        return None;
    }
    let working = timings.load + timings.prompt + timings.eval;
    let waited = timings.total.checked_sub(working).unwrap_or_default();
    let allowance = Duration::from_millis(50).max((timings.prompt + timings.eval) / 10);
    Some((outcome.concurrent, waited > allowance))
}

/// Counts of (ran at once, waited) per number of other requests in flight, for one node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlotEvidence {
    by_concurrency: Vec<(u32, u32)>,
}

/// Concurrency levels tracked; a node with more slots than this is treated as having this many.
const MAX_TRACKED_SLOTS: usize = 16;

impl SlotEvidence {
    pub fn add(&mut self, concurrent: u32, waited: bool) {
        let index = (concurrent as usize).min(MAX_TRACKED_SLOTS) - 1;
        if self.by_concurrency.len() <= index {
            self.by_concurrency.resize(index + 1, (0, 0));
        }
        let (ran, queued) = &mut self.by_concurrency[index];
        if waited {
            *queued += 1;
        } else {
            *ran += 1;
        }
    }

    /// Slots the evidence supports: 1 + the highest level up to which requests mostly ran at once
    /// (at least 3 such requests, and at least four times as many as waited). Timing luck cannot ratchet it up.
    pub fn slots(&self) -> u32 {
        let mut slots = 1;
        for (index, (ran, queued)) in self.by_concurrency.iter().enumerate() {
            if *ran >= 3 && *ran >= queued.saturating_mul(4) {
                slots = index as u32 + 2;
            } else {
                break;
            }
        }
        slots
    }
}

fn smooth(old: f64, new: f64) -> f64 {
    old + SMOOTHING * (new - old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_with_room_for_one_model_holds_the_last_one_served() {
        let mut learned = Learned::default();
        let installed: Vec<String> = vec!["a".into(), "b".into()];
        let node = "n";
        let loaded = |learned: &Learned, model: &str, reported: bool, capacity: usize| {
            learned.believed_loaded(node, model, reported, 1_000, &installed, capacity)
        };
        assert!(loaded(&learned, "a", true, 1), "reported loaded");
        assert!(
            !loaded(&learned, "b", false, 1),
            "neither reported nor served"
        );
        learned
            .last_served_ms
            .entry(node.into())
            .or_default()
            .insert("b".into(), 2_000);
        assert!(loaded(&learned, "b", false, 1), "served since the report");
        assert!(
            !loaded(&learned, "a", true, 1),
            "b pushed a out of the only place"
        );
        assert!(loaded(&learned, "a", true, 2), "room for both");
        learned
            .last_served_ms
            .entry(node.into())
            .or_default()
            .insert("a".into(), 3_000);
        assert!(loaded(&learned, "a", true, 1));
        assert!(!loaded(&learned, "b", false, 1));
    }
    use crate::history::OllamaTimings;
    use sollol_policy::routing::{Choice, DecisionKind, Strategy};

    fn outcome(eval_tokens: u64, eval_ms: u64, load_ms: u64, ok: bool) -> Outcome {
        Outcome {
            node_id: "n".into(),
            model: "m".into(),
            path: "/api/chat".into(),
            app: "test".into(),
            ok,
            time_to_first_byte: Duration::from_millis(load_ms + 50),
            total: Duration::from_millis(load_ms + eval_ms + 50),
            timings: Some(OllamaTimings {
                total: Duration::from_millis(load_ms + 100 + eval_ms),
                load: Duration::from_millis(load_ms),
                prompt_tokens: 100,
                prompt: Duration::from_millis(100),
                eval_tokens,
                eval: Duration::from_millis(eval_ms),
                load_reported: true,
            }),
            choice: Choice::routed(Strategy::Intelligent, DecisionKind::Best),
            reason: String::new(),
            candidates: Arc::from([]),
            concurrent: 0,
        }
    }

    #[test]
    fn a_load_left_out_of_the_timings_is_read_from_the_clock() {
        let warm = update(None, &outcome(40, 1000, 0, true)).expect("measured");
        // The same answer after a 2 s load, from a server that does not send load_duration.
        let mut cold = outcome(40, 1000, 2000, true);
        if let Some(timings) = cold.timings.as_mut() {
            timings.load = Duration::ZERO;
            timings.load_reported = false;
        }
        let learned = update(Some(warm), &cold).expect("still measured");
        let load = learned.cold_load.expect("the load is learned");
        assert!(
            (load.as_secs_f64() - 2.0).abs() < 0.01,
            "total 3.1 s less 0.1 s prompt and 1 s generation: {load:?}"
        );
        assert_eq!(
            learned.time_to_first_token, warm.time_to_first_token,
            "the slow first token was the load, not a slower node"
        );
        // Beside another request of ours the time may be a wait for a slot: nothing is read from it.
        cold.concurrent = 1;
        let beside = update(Some(warm), &cold).expect("measured");
        assert_eq!(beside.cold_load, warm.cold_load);
        assert_eq!(slot_evidence(&cold), None);
    }

    #[test]
    fn slots_are_seen_from_concurrent_requests_that_did_not_wait() {
        let mut ran_beside_two = outcome(40, 1000, 0, true);
        ran_beside_two.concurrent = 2;
        assert_eq!(slot_evidence(&ran_beside_two), Some((2, false)));
        let mut waited = ran_beside_two.clone();
        if let Some(timings) = waited.timings.as_mut() {
            timings.total += Duration::from_millis(900);
        }
        assert_eq!(
            slot_evidence(&waited),
            Some((2, true)),
            "it queued, so it says nothing about slots"
        );
        assert_eq!(
            slot_evidence(&outcome(40, 1000, 0, true)),
            None,
            "alone, it says nothing either"
        );
    }

    #[test]
    fn learns_rates_and_cold_loads() {
        let first = update(None, &outcome(40, 1000, 3000, true)).expect("learned");
        assert_eq!(first.decode_tokens_per_second, 40.0);
        assert_eq!(first.prompt_tokens_per_second, 1000.0);
        assert_eq!(first.cold_load, Some(Duration::from_secs(3)));
        assert_eq!(first.samples, 1);
        let second = update(Some(first), &outcome(80, 1000, 1, true)).expect("learned");
        assert!((second.decode_tokens_per_second - 52.0).abs() < 1e-9);
        assert_eq!(
            second.cold_load,
            Some(Duration::from_secs(3)),
            "a warm request keeps the cold-load estimate"
        );
        assert_eq!(
            second.time_to_first_token,
            Duration::from_secs_f64(3.05 + 0.3 * (0.051 - 3.05))
        );
        assert_eq!(
            update(Some(second), &outcome(80, 1000, 1, false)),
            Some(second),
            "failures teach no speed"
        );
        assert_eq!(
            update(None, &outcome(0, 0, 0, true)),
            None,
            "nothing to learn without tokens"
        );
    }

    #[test]
    fn slots_need_consistent_evidence() {
        fn check(events: &[(u32, bool)], expected: u32) {
            let mut evidence = SlotEvidence::default();
            for (concurrent, waited) in events {
                evidence.add(*concurrent, *waited);
            }
            assert_eq!(evidence.slots(), expected, "{events:?}");
        }
        check(&[], 1);
        check(&[(1, false), (1, false)], 1);
        check(&[(1, false), (1, false), (1, false)], 2);
        // One lucky request beside two others proves nothing while most of them waited.
        check(
            &[
                (1, false),
                (1, false),
                (1, false),
                (2, false),
                (2, true),
                (2, true),
            ],
            2,
        );
        check(
            &[(1, false); 4]
                .iter()
                .copied()
                .chain([(2, false); 4])
                .collect::<Vec<_>>(),
            3,
        );
        // Levels must hold from the bottom up.
        check(&[(2, false), (2, false), (2, false)], 1);
    }
}
