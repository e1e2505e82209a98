//! Planning: which agents run which layers of a model. Pure decisions over what the candidates
//! described; [`split_layers`] divides the layers in proportion to speed or memory.

use std::collections::HashMap;
use std::ops::Range;

use super::PipelineError;

/// An agent that could hold a stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub node_id: String,
    pub name: String,
    /// The agent's stage port, `HOST:PORT`.
    pub address: String,
}

/// One stage of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedStage {
    pub candidate: Candidate,
    pub layers: Range<usize>,
    pub free_memory_bytes: u64,
}

/// Which agent runs which layers of a model, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub model: String,
    pub digest: String,
    /// The digest of the file's tensor manifest: what a stage fetching tensors checks them against.
    pub manifest: [u8; 32],
    pub layers: usize,
    pub stages: Vec<PlannedStage>,
    /// One line per decision, for the API and the logs.
    pub reasons: Vec<String>,
}

/// Splits `layers` into contiguous ranges, one per stage, in proportion to `weights` (measured speed,
/// or free memory when speeds are unknown), never giving a stage more layers than 90% of its free
/// memory holds at `bytes_per_layer`.
pub fn split_layers(
    layers: usize,
    bytes_per_layer: u64,
    free: &[u64],
    weights: &[f64],
) -> Result<Vec<Range<usize>>, String> {
    if free.is_empty() {
        return Err("no stage to place layers on".to_owned());
    }
    if layers < free.len() {
        return Err(format!(
            "{} stages for {layers} layers: every stage needs at least one",
            free.len()
        ));
    }
    let capacity: Vec<usize> = free
        .iter()
        .map(|bytes| usize::try_from(bytes / 10 * 9 / bytes_per_layer.max(1)).unwrap_or(usize::MAX))
        .collect();
    let total_capacity: usize = capacity
        .iter()
        .fold(0, |sum, each| sum.saturating_add(*each));
    if total_capacity < layers || capacity.contains(&0) {
        return Err(format!(
            "not enough free memory: {layers} layers of {} MiB, the stages hold {:?} layers",
            bytes_per_layer / (1 << 20),
            capacity
        ));
    }
    let total_weight: f64 = weights.iter().filter(|weight| weight.is_finite()).sum();
    // Shares by largest remainder, at least one layer each, then capped and the surplus moved on.
    let exact: Vec<f64> = weights
        .iter()
        .map(|weight| layers as f64 * weight / total_weight.max(f64::MIN_POSITIVE))
        .collect();
    let mut counts: Vec<usize> = exact
        .iter()
        .map(|share| (share.floor() as usize).max(1))
        .collect();
    let mut order: Vec<usize> = (0..free.len()).collect();
    order.sort_by(|a, b| {
        let remainder = |index: usize| exact[index] - exact[index].floor();
        remainder(*b).total_cmp(&remainder(*a))
    });
    while counts.iter().sum::<usize>() < layers {
        for index in &order {
            if counts.iter().sum::<usize>() < layers {
                counts[*index] += 1;
            }
        }
    }
    while counts.iter().sum::<usize>() > layers {
        let largest = (0..counts.len())
            .max_by_key(|index| counts[*index])
            .unwrap_or(0);
        counts[largest] -= 1;
    }
    loop {
        let surplus: usize = counts
            .iter()
            .zip(&capacity)
            .map(|(count, cap)| count.saturating_sub(*cap))
            .sum();
        if surplus == 0 {
            break;
        }
        for (count, cap) in counts.iter_mut().zip(&capacity) {
            *count = (*count).min(*cap);
        }
        let mut left = surplus;
        for (count, cap) in counts.iter_mut().zip(&capacity) {
            let room = cap - *count;
            let moved = room.min(left);
            *count += moved;
            left -= moved;
        }
    }
    let mut start = 0;
    Ok(counts
        .iter()
        .map(|count| {
            let range = start..start + count;
            start += count;
            range
        })
        .collect())
}

/// A stage's copy of the model, as it described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ModelCopy {
    /// The file's content digest: every stage must compute with the same weights.
    pub digest: String,
    /// The digest of its tensor manifest, computed with `digest`.
    pub manifest: [u8; 32],
    pub layers: usize,
    pub file_bytes: u64,
}

/// What the described candidates offer a plan.
#[derive(Debug)]
pub(super) struct Offers<'a> {
    /// The stages, in order.
    pub stages: &'a [Candidate],
    /// The memory each stage offers.
    pub free: &'a [u64],
    /// Each stage's copy of the model (none: it fetches its part), then the copies of the agents
    /// described beyond the stages, which serve only as sources.
    pub copies: &'a [Option<ModelCopy>],
    /// The names of the agents holding a copy, stages or not.
    pub holders: &'a [String],
}

impl Offers<'_> {
    /// The copy every holder has: the first one found, refused when any other holder's differs.
    pub(super) fn agreed_copy(&self, model: &str) -> Result<ModelCopy, PipelineError> {
        let Some(copy) = self.copies.iter().flatten().next().cloned() else {
            return Err(PipelineError::Plan(format!(
                "no agent holds a copy of {model}: at least one must (the others fetch their parts from it)"
            )));
        };
        let first_name = self.holders.first().cloned().unwrap_or_default();
        for (index, other) in self.copies.iter().enumerate() {
            if let Some(other) = other
                && (other.digest != copy.digest || other.manifest != copy.manifest)
            {
                let node = self
                    .stages
                    .get(index)
                    .map_or_else(|| "a source".to_owned(), |candidate| candidate.name.clone());
                return Err(PipelineError::Refused {
                    node,
                    message: if other.digest == copy.digest {
                        format!(
                            "its copy of {model} has {first_name}'s digest ({}) but other tensors: one of the two copies changed since its digest was taken",
                            copy.digest
                        )
                    } else {
                        format!(
                            "its copy of {model} is {}, {first_name}'s is {}: every stage must hold the same file",
                            other.digest, copy.digest
                        )
                    },
                });
            }
        }
        Ok(copy)
    }
}

/// Plans `copy` of `model` over the offered stages: the layers split in proportion to `speeds` (layers
/// per second, by node name) when every stage has one, else to free memory, with a reason per decision.
pub(super) fn plan(
    model: &str,
    copy: ModelCopy,
    offers: &Offers<'_>,
    max_stages: usize,
    speeds: &HashMap<String, f64>,
) -> Result<Plan, PipelineError> {
    let ModelCopy {
        digest,
        manifest,
        layers,
        file_bytes,
    } = copy;
    let fetching: Vec<String> = offers
        .stages
        .iter()
        .zip(offers.copies)
        .filter(|(_, copy)| copy.is_none())
        .map(|(candidate, _)| {
            format!(
                "{}: no copy of the model; fetches its part from {}",
                candidate.name,
                offers.holders.join(" or ")
            )
        })
        .collect();
    let bytes_per_layer = file_bytes / layers.max(1) as u64;
    let measured: Option<Vec<f64>> = offers
        .stages
        .iter()
        .map(|candidate| {
            speeds
                .get(&candidate.name)
                .copied()
                .filter(|speed| *speed > 0.0)
        })
        .collect();
    let by_speed = measured.is_some();
    let weights =
        measured.unwrap_or_else(|| offers.free.iter().map(|bytes| *bytes as f64).collect());
    let ranges = split_layers(layers, bytes_per_layer, offers.free, &weights)
        .map_err(PipelineError::Plan)?;
    let mut reasons = vec![format!(
        "{model} ({digest}): {layers} layers of about {} MiB, split in proportion to {} over {} of at most {max_stages} stages, within 90% of each one's free memory",
        bytes_per_layer / (1 << 20),
        if by_speed {
            "the speed measured on earlier plans"
        } else {
            "free memory"
        },
        offers.stages.len()
    )];
    reasons.extend(fetching);
    let stages: Vec<PlannedStage> = offers
        .stages
        .iter()
        .zip(&ranges)
        .zip(offers.free)
        .map(|((candidate, range), free)| {
            reasons.push(format!(
                "{}: layers {}..{} ({} MiB free){}{}",
                candidate.name,
                range.start,
                range.end,
                free / (1 << 20),
                if range.start == 0 { ", embeddings" } else { "" },
                if range.end == layers {
                    ", output head and sampling"
                } else {
                    ""
                },
            ));
            PlannedStage {
                candidate: candidate.clone(),
                layers: range.clone(),
                free_memory_bytes: *free,
            }
        })
        .collect();
    Ok(Plan {
        model: model.to_owned(),
        digest,
        manifest,
        layers,
        stages,
        reasons,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_memory(
        layers: usize,
        bytes_per_layer: u64,
        free: &[u64],
    ) -> Result<Vec<Range<usize>>, String> {
        let weights: Vec<f64> = free.iter().map(|bytes| *bytes as f64).collect();
        split_layers(layers, bytes_per_layer, free, &weights)
    }

    #[test]
    fn layers_follow_measured_speed_within_memory() {
        const MIB: u64 = 1 << 20;
        // Twice as fast, twice the layers, when memory allows.
        assert_eq!(
            split_layers(30, MIB, &[1000 * MIB; 2], &[2.0, 1.0]).expect("plan"),
            [0..20, 20..30]
        );
        // Ten times as fast but room for 22 layers only: 22, the rest to the other stage.
        assert_eq!(
            split_layers(30, 40 * MIB, &[1000 * MIB; 2], &[10.0, 1.0]).expect("plan"),
            [0..22, 22..30]
        );
    }

    #[test]
    fn layers_follow_free_memory_and_never_exceed_it() {
        const MIB: u64 = 1 << 20;
        // Equal memory: an even split.
        assert_eq!(
            by_memory(30, 3 * MIB, &[1000 * MIB; 2]).expect("plan"),
            [0..15, 15..30]
        );
        assert_eq!(
            by_memory(30, 3 * MIB, &[1000 * MIB; 3]).expect("plan"),
            [0..10, 10..20, 20..30]
        );
        // Twice the memory, about twice the layers.
        assert_eq!(
            by_memory(30, 3 * MIB, &[2000 * MIB, 1000 * MIB]).expect("plan"),
            [0..20, 20..30]
        );
        // A stage with little memory gets its small share (2 of 30 here; it could hold 5).
        let ranges = by_memory(30, 10 * MIB, &[56 * MIB, 1000 * MIB, 1000 * MIB]).expect("plan");
        assert_eq!(ranges, [0..2, 2..16, 16..30]);
        // Every stage within what 90% of its memory holds, whatever the rounding.
        for free in [[445u64, 750, 300], [480, 700, 900], [120, 4000, 130]] {
            let free = free.map(|mib| mib * MIB);
            if let Ok(ranges) = by_memory(12, 30 * MIB, &free) {
                assert_eq!(ranges.last().map(|range| range.end), Some(12));
                for (range, free) in ranges.iter().zip(free) {
                    assert!(range.len() as u64 * 30 * MIB <= free / 10 * 9, "{ranges:?}");
                }
            }
        }
        // Not enough memory in total, or a stage that holds nothing: refused with the figures.
        let refused = by_memory(30, 100 * MIB, &[1000 * MIB, 1000 * MIB]).expect_err("too big");
        assert!(refused.contains("not enough free memory"), "{refused}");
        assert!(by_memory(2, MIB, &[MIB, MIB, MIB]).is_err());
    }
}
