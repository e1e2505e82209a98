//! Capped exponential backoff with jitter, for the agent's reconnect loop. Pure: the caller brings the random numbers.

use std::time::Duration;

/// Delays double from `initial` up to `max`; each delay is drawn in `[step / 2, step]`.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The un-jittered step for the next delay: `min(max, initial × 2^failures)`.
    pub fn step(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, given a uniform random number in `[0, 1)`, and counts a failure.
    pub fn next_delay(&mut self, unit_random: f64) -> Duration {
        let step = self.step();
        self.failures = self.failures.saturating_add(1);
        let unit_random = if unit_random.is_finite() {
            unit_random.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let half = step / 2;
        half + (step - half).mul_f64(unit_random)
    }

    /// A successful connection starts the sequence again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every delay stays within [step/2, max] and the step never shrinks until a reset.
        #[test]
        fn delays_are_bounded_and_steps_grow(
            initial_ms in 1u64..10_000,
            max_ms in 1u64..600_000,
            randoms in proptest::collection::vec(0.0f64..1.0, 1..80),
        ) {
            let initial = Duration::from_millis(initial_ms);
            let max = Duration::from_millis(max_ms);
            let cap = max.max(initial);
            let mut backoff = Backoff::new(initial, max);
            let mut previous_step = Duration::ZERO;
            for random in randoms {
                let step = backoff.step();
                prop_assert!(step >= previous_step);
                prop_assert!(step <= cap);
                let delay = backoff.next_delay(random);
                prop_assert!(delay <= cap, "delay {delay:?} over cap {cap:?}");
                prop_assert!(delay >= step / 2, "delay {delay:?} under half of {step:?}");
                previous_step = step;
            }
            backoff.reset();
            prop_assert_eq!(backoff.step(), initial.min(cap));
        }

        /// Out-of-range random inputs never push a delay past the cap.
        #[test]
        fn garbage_randoms_are_clamped(random in proptest::num::f64::ANY, failures in 0u32..200) {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            for _ in 0..failures {
                backoff.next_delay(0.5);
            }
            let delay = backoff.next_delay(random);
            prop_assert!(delay <= Duration::from_secs(5));
        }
    }

    #[test]
    fn doubles_until_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let steps: Vec<u64> = (0..6)
            .map(|_| {
                let step = backoff.step().as_millis() as u64;
                backoff.next_delay(0.0);
                step
            })
            .collect();
        assert_eq!(steps, vec![500, 1000, 2000, 4000, 4000, 4000]);
    }
}
