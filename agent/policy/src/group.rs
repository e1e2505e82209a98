//! What coordinators of one cluster tell each other, and how one coordinator combines it with its own.
//!
//! Each coordinator publishes [`Figures`]: what it learned per (node, model), the requests it has in
//! flight per node, the nodes whose breaker it holds open, the models it is loading. Another
//! coordinator routes on its own figures merged with everyone's ([`merge_pairs`], [`PeerLoad`]).
//!
//! The merge is symmetric: every coordinator weighs the same contributions the same way, in the same
//! order (by coordinator id), so once the group's gossip has settled they all route on the same
//! figures, to the bit.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::routing::PairStats;

/// A measurement counts at most this many samples in the merge: each coordinator's figures are moving
/// averages, so a coordinator with a long history is not more right about now than one with a short one.
pub const MAX_WEIGHT: u32 = 16;

/// What one coordinator publishes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    /// Its own measurements, by (node id, model).
    pub pairs: BTreeMap<(String, String), PairStats>,
    /// Requests each node was seen to run at once.
    pub slots: BTreeMap<String, u32>,
    /// Requests it has in flight per node (absent: none).
    pub in_flight: BTreeMap<String, u32>,
    /// Nodes whose breaker it holds open.
    pub open_breakers: Vec<String>,
    /// Loads it runs now: (node id, model, time it still expects the load to take).
    pub warming: Vec<(String, String, Duration)>,
}

/// The others' load on the nodes, summed, for routing's candidates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerLoad {
    pub in_flight: HashMap<String, u32>,
    /// Nodes some other coordinator holds open, with how many do.
    pub open_breakers: HashMap<String, u32>,
    /// A load another coordinator runs on the node: the model, and the time it still expects it to take.
    pub warming: HashMap<String, (String, Duration)>,
}

impl PeerLoad {
    /// Sums the other coordinators' figures.
    pub fn of<'a>(peers: impl IntoIterator<Item = &'a Figures>) -> Self {
        let mut load = Self::default();
        for figures in peers {
            for (node, count) in &figures.in_flight {
                *load.in_flight.entry(node.clone()).or_default() += count;
            }
            for node in &figures.open_breakers {
                *load.open_breakers.entry(node.clone()).or_default() += 1;
            }
            for (node, model, remaining) in &figures.warming {
                load.warming
                    .entry(node.clone())
                    .or_insert_with(|| (model.clone(), *remaining));
            }
        }
        load
    }

    pub fn in_flight(&self, node_id: &str) -> u32 {
        self.in_flight.get(node_id).copied().unwrap_or(0)
    }

    pub fn breaker_open(&self, node_id: &str) -> bool {
        self.open_breakers.contains_key(node_id)
    }

    /// The load another coordinator runs on the node: its model and expected remaining time.
    pub fn warming(&self, node_id: &str) -> Option<(&str, Duration)> {
        self.warming
            .get(node_id)
            .map(|(model, remaining)| (model.as_str(), *remaining))
    }
}

/// Merges every coordinator's measurements of each pair into one: figures averaged with weights
/// `min(samples, MAX_WEIGHT)`, contributions taken in the order given (callers pass them sorted by
/// coordinator id, their own included), `samples` summed. Also says how many coordinators measured
/// each pair.
pub fn merge_pairs<'a>(
    contributions: impl IntoIterator<Item = &'a BTreeMap<(String, String), PairStats>>,
) -> HashMap<(String, String), (PairStats, u32)> {
    let mut sums: HashMap<(String, String), Sum> = HashMap::new();
    for pairs in contributions {
        for (key, stats) in pairs {
            sums.entry(key.clone()).or_default().add(stats);
        }
    }
    sums.into_iter()
        .map(|(key, sum)| (key, (sum.stats(), sum.count)))
        .collect()
}

#[derive(Default)]
struct Sum {
    /// The only contribution while there is one: taken as it is, not divided back out of a sum.
    first: Option<PairStats>,
    weight: f64,
    decode: f64,
    prompt: f64,
    first_token: f64,
    cold_weight: f64,
    cold: f64,
    samples: u32,
    count: u32,
}

impl Sum {
    fn add(&mut self, stats: &PairStats) {
        if self.count == 0 {
            self.first = Some(*stats);
        }
        let weight = f64::from(stats.samples.clamp(1, MAX_WEIGHT));
        self.weight += weight;
        self.decode += weight * stats.decode_tokens_per_second;
        self.prompt += weight * stats.prompt_tokens_per_second;
        self.first_token += weight * stats.time_to_first_token.as_secs_f64();
        if let Some(cold) = stats.cold_load {
            self.cold_weight += weight;
            self.cold += weight * cold.as_secs_f64();
        }
        self.samples = self.samples.saturating_add(stats.samples);
        self.count += 1;
    }

    fn stats(&self) -> PairStats {
        if self.count == 1
            && let Some(only) = self.first
        {
            return only;
        }
        let weight = self.weight.max(f64::MIN_POSITIVE);
        PairStats {
            decode_tokens_per_second: self.decode / weight,
            prompt_tokens_per_second: self.prompt / weight,
            cold_load: (self.cold_weight > 0.0)
                .then(|| Duration::from_secs_f64((self.cold / self.cold_weight).max(0.0))),
            time_to_first_token: Duration::from_secs_f64((self.first_token / weight).max(0.0)),
            samples: self.samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(decode: f64, samples: u32) -> PairStats {
        PairStats {
            decode_tokens_per_second: decode,
            prompt_tokens_per_second: decode * 10.0,
            cold_load: None,
            time_to_first_token: Duration::from_millis(100),
            samples,
        }
    }

    fn pairs(entries: &[(&str, f64, u32)]) -> BTreeMap<(String, String), PairStats> {
        entries
            .iter()
            .map(|(node, decode, samples)| {
                (
                    ((*node).to_owned(), "m".to_owned()),
                    stats(*decode, *samples),
                )
            })
            .collect()
    }

    #[test]
    fn one_coordinator_alone_keeps_its_figures() {
        let own = pairs(&[("a", 40.0, 3)]);
        let merged = merge_pairs([&own]);
        let (stats, count) = merged[&("a".to_owned(), "m".to_owned())];
        assert_eq!(count, 1);
        assert_eq!(stats.decode_tokens_per_second, 40.0);
        assert_eq!(stats.samples, 3);
    }

    #[test]
    fn figures_are_weighted_by_samples_up_to_the_cap() {
        let first = pairs(&[("a", 10.0, 1)]);
        let second = pairs(&[("a", 40.0, 1000)]);
        let merged = merge_pairs([&first, &second]);
        let (stats, count) = merged[&("a".to_owned(), "m".to_owned())];
        assert_eq!(count, 2);
        let expected = (10.0 + 40.0 * f64::from(MAX_WEIGHT)) / f64::from(MAX_WEIGHT + 1);
        assert!((stats.decode_tokens_per_second - expected).abs() < 1e-9);
        assert_eq!(stats.samples, 1001);
    }

    #[test]
    fn a_pair_only_another_coordinator_measured_is_taken_whole() {
        let own = pairs(&[("a", 10.0, 2)]);
        let peer = pairs(&[("b", 30.0, 5)]);
        let merged = merge_pairs([&own, &peer]);
        assert_eq!(merged.len(), 2);
        assert_eq!(
            merged[&("b".to_owned(), "m".to_owned())]
                .0
                .decode_tokens_per_second,
            30.0
        );
    }

    #[test]
    fn every_coordinator_merging_the_same_sorted_contributions_gets_the_same_bits() {
        let a = pairs(&[("n", 13.7, 3)]);
        let b = pairs(&[("n", 41.3, 7)]);
        let c = pairs(&[("n", 0.1, 16)]);
        let once = merge_pairs([&a, &b, &c]);
        let again = merge_pairs([&a, &b, &c]);
        assert_eq!(once, again);
    }

    #[test]
    fn peer_load_sums_the_others() {
        let mut first = Figures::default();
        first.in_flight.insert("a".into(), 2);
        first.open_breakers.push("b".into());
        first
            .warming
            .push(("a".into(), "m".into(), Duration::from_secs(2)));
        let mut second = Figures::default();
        second.in_flight.insert("a".into(), 3);
        let load = PeerLoad::of([&first, &second]);
        assert_eq!(load.in_flight("a"), 5);
        assert_eq!(load.in_flight("b"), 0);
        assert!(load.breaker_open("b") && !load.breaker_open("a"));
        assert_eq!(load.warming("a"), Some(("m", Duration::from_secs(2))));
        assert_eq!(load.warming("b"), None);
    }
}
