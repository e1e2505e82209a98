//! Which node serves a request: pure decisions over a snapshot of candidates. No IO, not async, no clocks.
//!
//! The caller gathers [`Candidate`]s (healthy nodes that have the model, with
//! their live load and what was learned about them) and a [`RequestShape`],
//! and gets back a [`Decision`]: every candidate ranked best first with its
//! predicted cost, the [`DecisionKind`] and a short reason for people.
//! Randomness comes in as a number so tests are tables. [`Choice`] names how
//! the node of one attempt was chosen, for the history and the metrics.

use std::fmt::Write as _;
use std::time::Duration;

/// Routing strategies; `Intelligent` is the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Lowest predicted completion time: queue wait + cold load + prompt + decode.
    Intelligent,
    RoundRobin,
    /// Fewest requests in flight per slot.
    LeastLoaded,
    /// Lowest learned time to first token.
    LatencyFirst,
    /// Fewest requests served so far.
    Fairness,
    Random,
}

impl Strategy {
    pub const ALL: [Self; 6] = [
        Self::Intelligent,
        Self::RoundRobin,
        Self::LeastLoaded,
        Self::LatencyFirst,
        Self::Fairness,
        Self::Random,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Intelligent => "intelligent",
            Self::RoundRobin => "round_robin",
            Self::LeastLoaded => "least_loaded",
            Self::LatencyFirst => "latency_first",
            Self::Fairness => "fairness",
            Self::Random => "random",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().to_ascii_lowercase().replace('-', "_");
        Self::ALL
            .into_iter()
            .find(|strategy| strategy.as_str() == text)
    }
}

/// What kind of decision sent a request to its node: few and fixed, so the metrics' labels stay few.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecisionKind {
    /// The strategy's first pick.
    Best,
    /// The node that served the conversation before, kept for its warm KV cache.
    Affinity,
    /// An unmeasured node tried now and then so that it gets measured.
    Exploration,
    /// The next node after the ones before it failed.
    Failover,
    /// A second node asked because the first was slow to answer.
    Hedge,
    /// The gateway's own short request measuring a node never measured with the model.
    Calibration,
    /// The gateway's own load-only request, loading a model before requests need it (history's
    /// demand, or a queue that a warm node would shorten).
    Warmup,
}

impl DecisionKind {
    pub const ALL: [Self; 7] = [
        Self::Best,
        Self::Affinity,
        Self::Exploration,
        Self::Failover,
        Self::Hedge,
        Self::Calibration,
        Self::Warmup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Best => "best",
            Self::Affinity => "affinity",
            Self::Exploration => "exploration",
            Self::Failover => "failover",
            Self::Hedge => "hedge",
            Self::Calibration => "calibration",
            Self::Warmup => "warmup",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// How the node of one attempt was chosen: by a strategy for a client's request, or by the gateway
/// itself to calibrate a node (no strategy chose that one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Choice {
    strategy: Option<Strategy>,
    kind: DecisionKind,
}

impl Choice {
    /// A calibration: the gateway measuring a node with a request of its own.
    pub const CALIBRATION: Self = Self {
        strategy: None,
        kind: DecisionKind::Calibration,
    };

    /// A warm-up: the gateway loading a model on a node with a load-only request of its own.
    pub const WARMUP: Self = Self {
        strategy: None,
        kind: DecisionKind::Warmup,
    };

    /// A client's request sent where `strategy` ranked it; `kind` says how (best, affinity,
    /// exploration, failover or hedge). A calibration is [`Choice::CALIBRATION`], never this.
    pub fn routed(strategy: Strategy, kind: DecisionKind) -> Self {
        Self {
            strategy: Some(strategy),
            kind,
        }
    }

    /// The strategy that chose the node; `None` for the gateway's own requests (calibration, warm-up).
    pub fn strategy(self) -> Option<Strategy> {
        self.strategy
    }

    pub fn kind(self) -> DecisionKind {
        self.kind
    }

    /// The name the history's `strategy` column, the API and the metrics' `strategy` label show: the
    /// strategy's name, or the kind (`calibration`, `warmup`) for the gateway's own requests, which no
    /// strategy chose.
    pub fn strategy_label(self) -> &'static str {
        self.strategy.map_or(self.kind.as_str(), Strategy::as_str)
    }
}

/// What was learned about one (node, model) pair from Ollama's own timings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairStats {
    /// Generated tokens per second of one request.
    pub decode_tokens_per_second: f64,
    pub prompt_tokens_per_second: f64,
    /// Time to load the model when it was cold.
    pub cold_load: Option<Duration>,
    /// Time to first token with the model loaded (gateway view).
    pub time_to_first_token: Duration,
    pub samples: u32,
}

/// One node that can serve the request.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub node_id: String,
    pub name: String,
    /// Requests this gateway has in flight on the node now.
    pub in_flight: u32,
    /// Requests the node runs at once; more wait in its queue.
    pub slots: u32,
    /// Whether the node reported the model as loaded (`/api/ps`).
    pub model_loaded: bool,
    /// `None` until the pair has been measured.
    pub stats: Option<PairStats>,
    /// Requests served by the node so far (for `Fairness`).
    pub served: u64,
    /// The node served the last request with this request's prefix, so its KV cache is warm.
    pub has_affinity: bool,
    /// What the node showed with another model, used while this pair is unmeasured.
    pub node_stats: Option<PairStats>,
    /// The gateway is measuring the node with a request of its own: it is busy with an unknown cost.
    pub calibrating: bool,
    /// A model load the gateway started on the node (a warm-up) and still running.
    pub warming: Option<Warming>,
}

/// A warm-up running on a candidate: a load of this request's model (it will be loaded sooner than a
/// cold load), or of another model (the node loads one model at a time, so this request waits for it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Warming {
    pub same_model: bool,
    /// The load's expected time left: the learned cold load less the time it has run, at least zero.
    pub remaining: Duration,
}

/// The request as routing sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestShape {
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

/// Assumptions for pairs never measured: optimistic, so new and recovered nodes get tried.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Priors {
    pub decode_tokens_per_second: f64,
    pub prompt_tokens_per_second: f64,
    pub cold_load: Duration,
    /// A measured candidate this much slower than the best is still tried this often (0–1), to keep learning.
    pub exploration: f64,
    /// Affinity is kept unless the affine node is predicted this many times slower than the best.
    pub affinity_tolerance: f64,
    /// Added to a node being calibrated: it is busy for an unknown time, so it is tried last.
    pub calibrating_penalty: Duration,
}

impl Default for Priors {
    fn default() -> Self {
        Self {
            decode_tokens_per_second: 100.0,
            prompt_tokens_per_second: 1000.0,
            cold_load: Duration::from_secs(2),
            exploration: 0.05,
            affinity_tolerance: 1.5,
            calibrating_penalty: Duration::from_secs(60),
        }
    }
}

/// The candidates ranked best first, with why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub strategy: Strategy,
    /// Indexes into the candidate slice, best first; every candidate appears once.
    pub ranking: Vec<usize>,
    /// Predicted completion time of each candidate, by candidate index (only `Intelligent` predicts; others use their own score).
    pub predicted: Vec<Duration>,
    /// How the first candidate came first: best, affinity or exploration.
    pub kind: DecisionKind,
    /// The decision in words, for people; code reads `kind`, never this.
    pub reason: String,
}

impl Decision {
    pub fn first(&self) -> Option<usize> {
        self.ranking.first().copied()
    }
}

/// Predicted completion time of one request on one candidate.
pub fn predict(candidate: &Candidate, shape: &RequestShape, priors: &Priors) -> Duration {
    // An unmeasured pair on a measured node: the node's showing with another model is the best guess.
    let stats = candidate.stats.or(candidate.node_stats);
    let decode = stats.map_or(priors.decode_tokens_per_second, |stats| {
        stats.decode_tokens_per_second
    });
    let prompt = stats.map_or(priors.prompt_tokens_per_second, |stats| {
        stats.prompt_tokens_per_second
    });
    let service =
        seconds_for(shape.prompt_tokens, prompt) + seconds_for(shape.output_tokens, decode);
    let slots = candidate.slots.max(1);
    // Requests beyond the slots wait for a slot to free; each waiting round costs about one service time.
    let waiting_rounds = (candidate.in_flight + 1).div_ceil(slots).saturating_sub(1);
    // A full node shares its compute: running beside others slows each request a little.
    let sharing = if slots > 1 {
        1.0 + 0.25 * f64::from(candidate.in_flight.min(slots - 1)) / f64::from(slots - 1)
    } else {
        1.0
    };
    let cold = stats
        .and_then(|stats| stats.cold_load)
        .unwrap_or(priors.cold_load)
        .as_secs_f64();
    // A warm-up of this model already running is that much nearer done; one of another model holds
    // the node's loader until it ends.
    let (load, loader_busy) = match candidate.warming {
        _ if candidate.model_loaded => (0.0, 0.0),
        Some(warming) if warming.same_model => (warming.remaining.as_secs_f64(), 0.0),
        Some(warming) => (cold, warming.remaining.as_secs_f64()),
        None => (cold, 0.0),
    };
    let total = f64::from(waiting_rounds) * service + loader_busy + load + service * sharing;
    Duration::from_secs_f64(total.clamp(0.0, 1e9))
}

/// Priors for unmeasured nodes once some are measured: as slow as the slowest measured node and as slow
/// to load as the slowest load seen, so a request goes to an unknown node only when it is plausibly better.
/// With nothing measured, the optimistic defaults stand.
fn informed_priors(candidates: &[Candidate], priors: &Priors) -> Priors {
    let measured: Vec<PairStats> = candidates
        .iter()
        .filter_map(|candidate| candidate.stats.or(candidate.node_stats))
        .collect();
    if measured.is_empty() {
        return *priors;
    }
    let slowest =
        |rate: fn(&PairStats) -> f64| measured.iter().map(rate).fold(f64::INFINITY, f64::min);
    Priors {
        decode_tokens_per_second: slowest(|stats| stats.decode_tokens_per_second),
        prompt_tokens_per_second: slowest(|stats| stats.prompt_tokens_per_second),
        cold_load: measured
            .iter()
            .filter_map(|stats| stats.cold_load)
            .max()
            .unwrap_or(priors.cold_load)
            .max(priors.cold_load),
        ..*priors
    }
}

fn seconds_for(tokens: u32, rate: f64) -> f64 {
    if rate.is_finite() && rate > 0.0 {
        f64::from(tokens) / rate
    } else {
        0.0
    }
}

/// Ranks the candidates. `random` is uniform in [0, 1); `round_robin_counter` increases by one per request.
pub fn choose(
    candidates: &[Candidate],
    shape: &RequestShape,
    strategy: Strategy,
    priors: &Priors,
    random: f64,
    round_robin_counter: u64,
) -> Decision {
    let informed = informed_priors(candidates, priors);
    let predicted: Vec<Duration> = candidates
        .iter()
        .map(|candidate| {
            let mut estimate = predict(candidate, shape, &informed);
            if candidate.calibrating {
                estimate += priors.calibrating_penalty;
            }
            estimate
        })
        .collect();
    let count = candidates.len();
    let mut ranking: Vec<usize> = (0..count).collect();
    if count == 0 {
        return Decision {
            strategy,
            ranking,
            predicted,
            kind: DecisionKind::Best,
            reason: "no candidates".to_owned(),
        };
    }
    let by_name = |a: &usize, b: &usize| candidates[*a].name.cmp(&candidates[*b].name);
    let (kind, reason) = match strategy {
        Strategy::Intelligent => {
            ranking.sort_by(|a, b| {
                predicted[*a]
                    .cmp(&predicted[*b])
                    .then_with(|| by_name(a, b))
            });
            intelligent_adjustments(candidates, shape, &predicted, &mut ranking, priors, random)
        }
        Strategy::RoundRobin => {
            ranking.sort_by(by_name);
            let start = (round_robin_counter % count as u64) as usize;
            ranking.rotate_left(start);
            (DecisionKind::Best, "round robin".to_owned())
        }
        Strategy::LeastLoaded => {
            ranking.sort_by(|a, b| {
                let load = |index: usize| {
                    f64::from(candidates[index].in_flight)
                        / f64::from(candidates[index].slots.max(1))
                };
                load(*a).total_cmp(&load(*b)).then_with(|| by_name(a, b))
            });
            (
                DecisionKind::Best,
                format!(
                    "fewest in flight per slot ({} in flight)",
                    candidates[ranking[0]].in_flight
                ),
            )
        }
        Strategy::LatencyFirst => {
            ranking.sort_by(|a, b| {
                let latency = |index: usize| {
                    candidates[index]
                        .stats
                        .map_or(Duration::ZERO, |stats| stats.time_to_first_token)
                };
                latency(*a).cmp(&latency(*b)).then_with(|| by_name(a, b))
            });
            (
                DecisionKind::Best,
                "lowest learned time to first token".to_owned(),
            )
        }
        Strategy::Fairness => {
            ranking.sort_by(|a, b| {
                candidates[*a]
                    .served
                    .cmp(&candidates[*b].served)
                    .then_with(|| by_name(a, b))
            });
            (
                DecisionKind::Best,
                format!("fewest served ({})", candidates[ranking[0]].served),
            )
        }
        Strategy::Random => {
            ranking.sort_by(by_name);
            let pick = ((random.clamp(0.0, 0.999_999) * count as f64) as usize).min(count - 1);
            ranking.swap(0, pick);
            (DecisionKind::Best, "random".to_owned())
        }
    };
    Decision {
        strategy,
        ranking,
        predicted,
        kind,
        reason,
    }
}

/// Affinity and exploration on top of the cost ranking; returns the kind of decision and its reason.
fn intelligent_adjustments(
    candidates: &[Candidate],
    shape: &RequestShape,
    predicted: &[Duration],
    ranking: &mut Vec<usize>,
    priors: &Priors,
    random: f64,
) -> (DecisionKind, String) {
    let best = ranking[0];
    let best_cost = predicted[best].as_secs_f64();
    // Prefix affinity: keep the warm KV cache unless that node is clearly worse. Its prediction counts the
    // whole prompt, but with the prefix cached the node skips most of that work, so that much is forgiven.
    if let Some(position) = ranking
        .iter()
        .position(|index| candidates[*index].has_affinity)
    {
        let affine = ranking[position];
        let prompt_rate = candidates[affine]
            .stats
            .or(candidates[affine].node_stats)
            .map_or(priors.prompt_tokens_per_second, |stats| {
                stats.prompt_tokens_per_second
            });
        let cached = seconds_for(shape.prompt_tokens, prompt_rate);
        if position > 0
            && predicted[affine].as_secs_f64() - cached <= best_cost * priors.affinity_tolerance
        {
            ranking.remove(position);
            ranking.insert(0, affine);
            return (
                DecisionKind::Affinity,
                format!(
                    "prefix affinity: {} served this conversation ({} predicted vs best {})",
                    candidates[affine].name,
                    millis(predicted[affine]),
                    millis(predicted[best])
                ),
            );
        }
    }
    // Exploration: now and then try an unmeasured candidate, so new and recovered nodes are learned;
    // only one that has the model loaded, so that no client request pays a cold load to explore
    // (calibration measures the others with the gateway's own requests).
    if random < priors.exploration
        && let Some(position) = ranking.iter().position(|index| {
            let candidate = &candidates[*index];
            candidate.stats.is_none()
                && candidate.node_stats.is_none()
                && candidate.in_flight == 0
                && candidate.model_loaded
        })
        && position > 0
    {
        let unmeasured = ranking.remove(position);
        ranking.insert(0, unmeasured);
        return (
            DecisionKind::Exploration,
            format!("exploring unmeasured node {}", candidates[unmeasured].name),
        );
    }
    let mut reason = format!("lowest predicted time {}", millis(predicted[best]));
    let candidate = &candidates[best];
    match candidate.warming {
        Some(warming) if !candidate.model_loaded => {
            let what = if warming.same_model {
                "model loading"
            } else {
                "node loading another model"
            };
            let _ = write!(reason, ", {what} ({} left)", millis(warming.remaining));
        }
        _ if !candidate.model_loaded => reason.push_str(", includes cold load"),
        _ => {}
    }
    if candidate.in_flight >= candidate.slots.max(1) {
        let _ = write!(reason, ", queued behind {}", candidate.in_flight);
    }
    if candidate.stats.is_none() {
        reason.push_str(", unmeasured (optimistic estimate)");
    }
    (DecisionKind::Best, reason)
}

fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(decode: f64) -> PairStats {
        PairStats {
            decode_tokens_per_second: decode,
            prompt_tokens_per_second: 1000.0,
            cold_load: Some(Duration::from_secs(3)),
            time_to_first_token: Duration::from_millis(100),
            samples: 10,
        }
    }

    fn candidate(
        name: &str,
        decode: Option<f64>,
        in_flight: u32,
        slots: u32,
        loaded: bool,
    ) -> Candidate {
        Candidate {
            node_id: name.to_owned(),
            name: name.to_owned(),
            in_flight,
            slots,
            model_loaded: loaded,
            stats: decode.map(stats),
            served: 0,
            has_affinity: false,
            node_stats: None,
            calibrating: false,
            warming: None,
        }
    }

    fn shape() -> RequestShape {
        RequestShape {
            prompt_tokens: 100,
            output_tokens: 40,
        }
    }

    fn winner(candidates: &[Candidate], strategy: Strategy, random: f64, counter: u64) -> String {
        let decision = choose(
            candidates,
            &shape(),
            strategy,
            &Priors::default(),
            random,
            counter,
        );
        let mut seen = decision.ranking.clone();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..candidates.len()).collect::<Vec<_>>(),
            "every candidate ranked once"
        );
        candidates[decision.first().expect("a winner")].name.clone()
    }

    #[test]
    fn intelligent_table() {
        fn check(candidates: &[Candidate], expected: &str) {
            assert_eq!(
                winner(candidates, Strategy::Intelligent, 0.5, 0),
                expected,
                "{candidates:#?}"
            );
        }
        // The faster node wins when both are idle and loaded.
        check(
            &[
                candidate("slow", Some(10.0), 0, 1, true),
                candidate("fast", Some(120.0), 0, 2, true),
            ],
            "fast",
        );
        // A cold fast node loses to a warm medium node when the load costs more than the speed gains.
        check(
            &[
                candidate("fast", Some(120.0), 0, 2, false),
                candidate("mid", Some(40.0), 0, 2, true),
            ],
            "mid",
        );
        // A busy fast node (both slots full) still beats a slow idle node for a short answer.
        check(
            &[
                candidate("fast", Some(120.0), 2, 2, true),
                candidate("slow", Some(10.0), 0, 1, true),
            ],
            "fast",
        );
        // ... but not when its queue is deep.
        check(
            &[
                candidate("fast", Some(120.0), 12, 2, true),
                candidate("mid", Some(40.0), 0, 2, true),
            ],
            "mid",
        );
        // An unmeasured node gets the optimistic prior.
        check(
            &[
                candidate("new", None, 0, 1, true),
                candidate("slow", Some(10.0), 0, 1, true),
            ],
            "new",
        );
    }

    #[test]
    fn predictions_grow_with_queue_and_cold_load() {
        let priors = Priors::default();
        let idle = predict(&candidate("a", Some(40.0), 0, 1, true), &shape(), &priors);
        let queued = predict(&candidate("a", Some(40.0), 1, 1, true), &shape(), &priors);
        let cold = predict(&candidate("a", Some(40.0), 0, 1, false), &shape(), &priors);
        assert!(queued > idle && cold > idle, "{idle:?} {queued:?} {cold:?}");
        assert_eq!(cold - idle, Duration::from_secs(3));
        // 100 prompt tokens at 1000/s + 40 tokens at 40/s.
        assert_eq!(idle, Duration::from_millis(1100));
    }

    #[test]
    fn affinity_holds_unless_clearly_worse() {
        let mut near = vec![
            candidate("a", Some(100.0), 0, 1, true),
            candidate("b", Some(90.0), 0, 1, true),
        ];
        near[1].has_affinity = true;
        assert_eq!(winner(&near, Strategy::Intelligent, 0.5, 0), "b");
        let mut far = vec![
            candidate("a", Some(100.0), 0, 1, true),
            candidate("b", Some(10.0), 0, 1, true),
        ];
        far[1].has_affinity = true;
        assert_eq!(winner(&far, Strategy::Intelligent, 0.5, 0), "a");
    }

    #[test]
    fn a_running_warm_up_counts_only_the_load_time_left() {
        let cold = candidate("cold", Some(100.0), 0, 1, false);
        let mut warming = cold.clone();
        warming.warming = Some(Warming {
            same_model: true,
            remaining: Duration::from_millis(500),
        });
        let mut busy = cold.clone();
        busy.warming = Some(Warming {
            same_model: false,
            remaining: Duration::from_millis(500),
        });
        let priors = Priors::default();
        let at = |candidate: &Candidate| predict(candidate, &shape(), &priors).as_secs_f64();
        assert!(
            (at(&cold) - at(&warming) - 2.5).abs() < 1e-6,
            "3 s load, 2.5 s done"
        );
        assert!(
            (at(&busy) - at(&cold) - 0.5).abs() < 1e-6,
            "waits for the other load"
        );
        let mut loaded = busy.clone();
        loaded.model_loaded = true;
        assert!(
            at(&loaded) < at(&cold) - 2.9,
            "a loaded model does not wait for the loader"
        );
        let decision = choose(
            &[cold, warming],
            &shape(),
            Strategy::Intelligent,
            &priors,
            0.5,
            0,
        );
        assert_eq!(decision.ranking[0], 1);
        assert!(
            decision.reason.contains("model loading (500ms left)"),
            "{}",
            decision.reason
        );
    }

    #[test]
    fn exploration_tries_unmeasured_nodes_rarely() {
        let candidates = vec![
            candidate("measured", Some(200.0), 0, 1, true),
            candidate("unmeasured", None, 0, 1, true),
        ];
        assert_eq!(
            winner(&candidates, Strategy::Intelligent, 0.5, 0),
            "measured"
        );
        assert_eq!(
            winner(&candidates, Strategy::Intelligent, 0.01, 0),
            "unmeasured"
        );
    }

    #[test]
    fn other_strategies() {
        let candidates = vec![
            Candidate {
                served: 5,
                ..candidate("a", Some(10.0), 3, 1, true)
            },
            Candidate {
                served: 1,
                ..candidate("b", Some(100.0), 1, 2, true)
            },
            Candidate {
                served: 9,
                ..candidate("c", None, 0, 1, true)
            },
        ];
        assert_eq!(winner(&candidates, Strategy::RoundRobin, 0.0, 0), "a");
        assert_eq!(winner(&candidates, Strategy::RoundRobin, 0.0, 1), "b");
        assert_eq!(winner(&candidates, Strategy::RoundRobin, 0.0, 5), "c");
        assert_eq!(winner(&candidates, Strategy::LeastLoaded, 0.0, 0), "c");
        assert_eq!(winner(&candidates, Strategy::Fairness, 0.0, 0), "b");
        assert_eq!(winner(&candidates, Strategy::Random, 0.0, 0), "a");
        assert_eq!(winner(&candidates, Strategy::Random, 0.99, 0), "c");
        assert_eq!(winner(&candidates, Strategy::LatencyFirst, 0.0, 0), "c");
    }

    #[test]
    fn strategies_parse_by_name() {
        for strategy in Strategy::ALL {
            assert_eq!(Strategy::parse(strategy.as_str()), Some(strategy));
        }
        assert_eq!(Strategy::parse("Round-Robin"), Some(Strategy::RoundRobin));
        assert_eq!(Strategy::parse("fastest"), None);
    }

    #[test]
    fn decisions_carry_their_kind() {
        fn check(candidates: &[Candidate], random: f64, expected: DecisionKind) {
            let decision = choose(
                candidates,
                &shape(),
                Strategy::Intelligent,
                &Priors::default(),
                random,
                0,
            );
            assert_eq!(decision.kind, expected, "{}", decision.reason);
        }
        let mut affine = vec![
            candidate("a", Some(100.0), 0, 1, true),
            candidate("b", Some(90.0), 0, 1, true),
        ];
        affine[1].has_affinity = true;
        check(&affine, 0.5, DecisionKind::Affinity);
        // A node whose name mentions affinity is explored, not kept for affinity: the kind is not read from words.
        let exploring = vec![
            candidate("measured", Some(200.0), 0, 1, true),
            candidate("unmeasured-affinity", None, 0, 1, true),
        ];
        check(&exploring, 0.01, DecisionKind::Exploration);
        check(&exploring, 0.5, DecisionKind::Best);
        // Never at the price of a cold load for a client.
        let cold = vec![
            candidate("measured", Some(200.0), 0, 1, true),
            candidate("unmeasured-cold", None, 0, 1, false),
        ];
        check(&cold, 0.01, DecisionKind::Best);
    }

    #[test]
    fn choices_are_labelled_as_the_history_and_metrics_show_them() {
        for kind in DecisionKind::ALL {
            assert_eq!(DecisionKind::parse(kind.as_str()), Some(kind));
        }
        let routed = Choice::routed(Strategy::RoundRobin, DecisionKind::Failover);
        assert_eq!(
            (routed.strategy_label(), routed.kind().as_str()),
            ("round_robin", "failover")
        );
        assert_eq!(Choice::CALIBRATION.strategy(), None);
        assert_eq!(
            (
                Choice::CALIBRATION.strategy_label(),
                Choice::CALIBRATION.kind().as_str()
            ),
            ("calibration", "calibration")
        );
    }

    #[test]
    fn no_candidates_is_an_empty_decision() {
        let decision = choose(
            &[],
            &shape(),
            Strategy::Intelligent,
            &Priors::default(),
            0.0,
            0,
        );
        assert_eq!(decision.first(), None);
    }
}
