//! Per-node circuit breakers: stop sending requests to a node that keeps failing, and let it back once it answers.
//!
//! The state machine is pure (the caller passes the time). A node opens after
//! `failures_to_open` consecutive failures and gets no requests while open.
//! When the open period ends, one request is let through as a trial: success
//! closes the breaker, failure opens it again for twice as long, capped at
//! `max_open`. If the trial never reports (cancelled), another is let through
//! one period later. An active probe (`GET /api/version`) of a node whose
//! trial is due counts as a failed trial when it fails, so dead nodes back off
//! without costing real requests. A node is never banned forever.

use std::time::{Duration, Instant};

/// Breaker settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerSettings {
    pub failures_to_open: u32,
    pub first_open: Duration,
    pub max_open: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures_to_open: 3,
            first_open: Duration::from_secs(1),
            max_open: Duration::from_secs(30),
        }
    }
}

/// One node's breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breaker {
    Closed {
        consecutive_failures: u32,
    },
    /// No requests until `until`; then one trial per `period`.
    Open {
        until: Instant,
        period: Duration,
    },
}

impl Default for Breaker {
    fn default() -> Self {
        Self::Closed {
            consecutive_failures: 0,
        }
    }
}

impl Breaker {
    /// Whether a request may go to the node now; a trial request after the open period is counted as let through.
    pub fn allow(&mut self, now: Instant) -> bool {
        match *self {
            Self::Closed { .. } => true,
            Self::Open { until, period } if now >= until => {
                *self = Self::Open {
                    until: now + period,
                    period,
                };
                true
            }
            Self::Open { .. } => false,
        }
    }

    /// Whether the node would take a request now, without letting one through.
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Closed { .. })
    }

    /// Whether the open period is over (a trial or a probe is due).
    pub fn trial_due(&self, now: Instant) -> bool {
        matches!(self, Self::Open { until, .. } if now >= *until)
    }

    pub fn on_success(&mut self) {
        *self = Self::Closed {
            consecutive_failures: 0,
        };
    }

    /// A request or probe failed on the node; returns whether the breaker is newly open.
    pub fn on_failure(&mut self, now: Instant, settings: &BreakerSettings) -> bool {
        match *self {
            Self::Closed {
                consecutive_failures,
            } => {
                let failures = consecutive_failures.saturating_add(1);
                if failures >= settings.failures_to_open.max(1) {
                    *self = Self::Open {
                        until: now + settings.first_open,
                        period: settings.first_open,
                    };
                    true
                } else {
                    *self = Self::Closed {
                        consecutive_failures: failures,
                    };
                    false
                }
            }
            Self::Open { period, .. } => {
                let period = period.saturating_mul(2).clamp(
                    settings.first_open,
                    settings.max_open.max(settings.first_open),
                );
                *self = Self::Open {
                    until: now + period,
                    period,
                };
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failures_to_open: 3,
            first_open: Duration::from_secs(1),
            max_open: Duration::from_secs(8),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_closes_on_a_good_trial() {
        let now = Instant::now();
        let mut breaker = Breaker::default();
        assert!(!breaker.on_failure(now, &settings()));
        breaker.on_success();
        assert!(!breaker.on_failure(now, &settings()));
        assert!(!breaker.on_failure(now, &settings()));
        assert!(breaker.allow(now));
        assert!(breaker.on_failure(now, &settings()));
        assert!(!breaker.allow(now));
        let later = now + Duration::from_secs(1);
        assert!(breaker.trial_due(later));
        assert!(breaker.allow(later), "one trial after the open period");
        assert!(!breaker.allow(later), "only one");
        assert!(
            breaker.allow(later + Duration::from_secs(1)),
            "another if the first never reported"
        );
        breaker.on_success();
        assert!(breaker.is_closed());
    }

    #[test]
    fn failed_trials_double_the_period_up_to_the_cap() {
        let now = Instant::now();
        let mut breaker = Breaker::default();
        for _ in 0..3 {
            breaker.on_failure(now, &settings());
        }
        let mut periods = Vec::new();
        for _ in 0..6 {
            breaker.on_failure(now, &settings());
            if let Breaker::Open { period, .. } = breaker {
                periods.push(period.as_secs());
            }
        }
        assert_eq!(periods, vec![2, 4, 8, 8, 8, 8]);
    }

    proptest! {
        /// Whatever happens, an open breaker's period stays within [first_open, max_open]: never banned forever.
        #[test]
        fn never_banned_forever(events in proptest::collection::vec(0u8..3, 0..200)) {
            let settings = settings();
            let start = Instant::now();
            let mut breaker = Breaker::default();
            for (step, event) in events.into_iter().enumerate() {
                let now = start + Duration::from_millis(step as u64 * 10);
                match event {
                    0 => { breaker.on_failure(now, &settings); }
                    1 => breaker.on_success(),
                    _ => { breaker.allow(now); }
                }
                if let Breaker::Open { until, period } = breaker {
                    prop_assert!(period >= settings.first_open && period <= settings.max_open);
                    prop_assert!(until <= now + settings.max_open);
                }
            }
            breaker.on_success();
            prop_assert!(breaker.is_closed());
        }

        /// Fewer consecutive failures than the threshold never open it.
        #[test]
        fn short_failure_runs_stay_closed(runs in proptest::collection::vec(0u32..3, 0..50)) {
            let now = Instant::now();
            let mut breaker = Breaker::default();
            for run in runs {
                for _ in 0..run {
                    prop_assert!(!breaker.on_failure(now, &settings()));
                }
                breaker.on_success();
            }
            prop_assert!(breaker.is_closed());
        }
    }
}
