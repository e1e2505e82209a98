//! Rate limits as token buckets: how many requests (or generated tokens) per minute a key or an
//! application may use, and how long it must wait when it used them up. Pure: the clock is handed in.

use std::time::{Duration, Instant};

/// A limit per minute; the bucket holds at most one minute's worth, so a quiet client may burst that much.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_minute: u64,
}

impl Rate {
    fn per_second(self) -> f64 {
        self.per_minute as f64 / 60.0
    }

    fn capacity(self) -> f64 {
        self.per_minute as f64
    }
}

/// What is left of one limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    available: f64,
    updated: Instant,
}

impl Bucket {
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self {
            available: rate.capacity(),
            updated: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.available = (self.available + elapsed * rate.per_second()).min(rate.capacity());
        self.updated = now;
    }

    /// How long until `amount` is available (zero: now); `None` when it never will be (no rate, or
    /// more than the bucket holds).
    fn wait_for(&self, rate: Rate, amount: f64) -> Option<Duration> {
        if self.available >= amount {
            return Some(Duration::ZERO);
        }
        if rate.per_minute == 0 || amount > rate.capacity() {
            return None;
        }
        Some(Duration::from_secs_f64(
            (amount - self.available) / rate.per_second(),
        ))
    }

    /// How long until `amount` can be taken (zero: now), without taking it.
    pub fn available_in(&mut self, rate: Rate, amount: f64, now: Instant) -> Duration {
        self.refill(rate, now);
        self.wait_for(rate, amount)
            .unwrap_or(Duration::from_secs(60))
    }

    /// Takes `amount` now, or says how long to wait before it can be taken.
    pub fn take(&mut self, rate: Rate, amount: f64, now: Instant) -> Result<(), Duration> {
        match self.available_in(rate, amount, now) {
            wait if wait.is_zero() => {
                self.available -= amount;
                Ok(())
            }
            wait => Err(wait),
        }
    }

    /// Charges `amount` already used (the tokens of an answer once it is known): the bucket may go
    /// below zero, and then nothing more is admitted until it has refilled.
    pub fn charge(&mut self, rate: Rate, amount: f64, now: Instant) {
        self.refill(rate, now);
        self.available -= amount;
    }

    /// Zero when something may be admitted now, else how long until the bucket is back above zero.
    pub fn overdrawn_for(&mut self, rate: Rate, now: Instant) -> Duration {
        self.refill(rate, now);
        if self.available > 0.0 || rate.per_minute == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(-self.available / rate.per_second() + 1e-3)
    }
}

/// `Retry-After` in whole seconds, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u32 {
    u32::try_from(wait.as_secs_f64().ceil() as u64)
        .unwrap_or(u32::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_minutes_burst_then_its_rate() {
        let start = Instant::now();
        let rate = Rate { per_minute: 60 };
        let mut bucket = Bucket::full(rate, start);
        for _ in 0..60 {
            assert_eq!(bucket.take(rate, 1.0, start), Ok(()));
        }
        let wait = bucket.take(rate, 1.0, start).expect_err("empty");
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        assert_eq!(
            bucket.take(rate, 1.0, start + Duration::from_secs(1)),
            Ok(())
        );
        // Never more than a minute's worth, however long it rests.
        let later = start + Duration::from_secs(3600);
        for _ in 0..60 {
            assert_eq!(bucket.take(rate, 1.0, later), Ok(()));
        }
        assert!(bucket.take(rate, 1.0, later).is_err());
    }

    #[test]
    fn charged_tokens_hold_back_the_next_request_until_repaid() {
        let start = Instant::now();
        let rate = Rate { per_minute: 600 };
        let mut bucket = Bucket::full(rate, start);
        assert_eq!(bucket.overdrawn_for(rate, start), Duration::ZERO);
        // One long answer: 900 tokens against 600 a minute.
        bucket.charge(rate, 900.0, start);
        let wait = bucket.overdrawn_for(rate, start);
        assert!((wait.as_secs_f64() - 30.0).abs() < 0.01, "{wait:?}");
        assert_eq!(
            bucket.overdrawn_for(rate, start + Duration::from_secs(31)),
            Duration::ZERO
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
    }
}
