//! Picking the next token from logits: repeat penalty, then temperature with top-k, top-p and min-p,
//! as Ollama's options name them. Temperature 0 is greedy. Pure: a draw depends on the seed and the position.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Ollama's sampling options, with Ollama's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    /// How many of the latest tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.0,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

#[derive(Debug)]
pub struct Sampler {
    options: SamplingOptions,
    seed: u64,
}

impl Sampler {
    pub fn new(options: SamplingOptions) -> Self {
        let seed = options.seed.unwrap_or_else(rand::random);
        Self { options, seed }
    }

    /// The seed in use (the request's, or the one drawn for it).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next token given the logits and the tokens so far (prompt and output).
    pub fn next(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        let options = &self.options;
        if options.repeat_penalty != 1.0 && options.repeat_penalty > 0.0 {
            let recent = &history[history.len().saturating_sub(options.repeat_last_n)..];
            let mut seen = recent.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for token in seen {
                if let Some(logit) = logits.get_mut(token as usize) {
                    *logit = if *logit > 0.0 {
                        *logit / options.repeat_penalty
                    } else {
                        *logit * options.repeat_penalty
                    };
                }
            }
        }
        if options.temperature <= 0.0 {
            return greedy(&logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, logit)| logit.is_finite())
            .map(|(index, logit)| (index as u32, *logit / options.temperature))
            .collect();
        if candidates.is_empty() {
            return greedy(&logits);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if options.top_k > 0 {
            candidates.truncate(options.top_k);
        }
        let top = candidates[0].1;
        let mut weights: Vec<f32> = candidates
            .iter()
            .map(|(_, logit)| (logit - top).exp())
            .collect();
        let total: f32 = weights.iter().sum();
        for weight in &mut weights {
            *weight /= total;
        }
        // min-p: drop tokens far less likely than the best.
        let floor = options.min_p.clamp(0.0, 1.0) * weights[0];
        // top-p: keep the smallest prefix whose probability reaches top_p.
        let mut kept = 0;
        let mut mass = 0.0;
        for weight in &weights {
            if kept > 0 && (*weight < floor || mass >= options.top_p) {
                break;
            }
            mass += weight;
            kept += 1;
        }
        // The draw depends on the seed and the position only, so a sequence re-run from any point
        // (a distributed model re-planned mid-answer) samples as it would have.
        let position = history.len() as u64;
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ position.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let pick = rng.random::<f32>() * mass;
        let mut running = 0.0;
        for (index, weight) in weights.iter().take(kept).enumerate() {
            running += weight;
            if pick < running {
                return candidates[index].0;
            }
        }
        candidates[kept - 1].0
    }
}

/// Index of the largest logit; the first one on ties.
pub fn greedy(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (index, logit) in logits.iter().enumerate() {
        if *logit > logits[best] {
            best = index;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(temperature: f32) -> SamplingOptions {
        SamplingOptions {
            temperature,
            repeat_penalty: 1.0,
            seed: Some(7),
            ..SamplingOptions::default()
        }
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut sampler = Sampler::new(options(0.0));
        assert_eq!(sampler.next(&[0.1, 2.0, 1.9], &[]), 1);
    }

    #[test]
    fn the_repeat_penalty_lowers_seen_tokens() {
        let mut sampler = Sampler::new(SamplingOptions {
            repeat_penalty: 2.0,
            ..options(0.0)
        });
        assert_eq!(sampler.next(&[0.1, 2.0, 1.9], &[1]), 2);
    }

    #[test]
    fn top_k_one_always_picks_the_best() {
        let mut sampler = Sampler::new(SamplingOptions {
            top_k: 1,
            ..options(1.5)
        });
        for _ in 0..50 {
            assert_eq!(sampler.next(&[1.0, 3.0, 2.9, -1.0], &[]), 1);
        }
    }

    #[test]
    fn a_seed_makes_sampling_repeatable_and_top_p_cuts_the_tail() {
        let logits = [2.0, 1.9, 1.8, -20.0];
        let history = [0u32; 100];
        let sampler = |seed| {
            Sampler::new(SamplingOptions {
                seed: Some(seed),
                top_p: 0.95,
                repeat_penalty: 1.0,
                ..options(1.0)
            })
        };
        // One draw per position (the history's length).
        let draw = |seed| {
            let mut sampler = sampler(seed);
            (0..100)
                .map(|position| sampler.next(&logits, &history[..position]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert!(!draw(1).contains(&3), "a token outside top-p was drawn");
        assert!(draw(1).contains(&1) && draw(1).contains(&2));
        // A sampler started afresh at position 50 draws what the first one drew there.
        assert_eq!(sampler(1).next(&logits, &history[..50]), draw(1)[50]);
    }
}
