//! Rate limits per API key and per application (`coordinator.requests_per_minute`,
//! `coordinator.tokens_per_minute`): every forwarded request takes one request from each bucket it
//! is counted in, and its answer's generated tokens are charged afterwards. The decisions are
//! [`sollol_policy::quota`]'s; this keeps the buckets, bounded in number (applications are names
//! clients choose).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use sollol_policy::quota::{Bucket, Rate};

/// Buckets kept at most; the least recently used go first (a new one starts full).
const MAX_TRACKED: usize = 4096;

#[derive(Debug)]
struct Entry {
    requests: Bucket,
    tokens: Bucket,
    used: Instant,
}

/// Every limited identity's buckets.
#[derive(Debug)]
pub struct Quotas {
    requests: Option<Rate>,
    tokens: Option<Rate>,
    table: Mutex<HashMap<String, Entry>>,
}

impl Quotas {
    /// 0 per minute: that limit is off.
    pub fn new(requests_per_minute: u64, tokens_per_minute: u64) -> Self {
        let rate = |per_minute| (per_minute > 0).then_some(Rate { per_minute });
        Self {
            requests: rate(requests_per_minute),
            tokens: rate(tokens_per_minute),
            table: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_on(&self) -> bool {
        self.requests.is_some() || self.tokens.is_some()
    }

    /// Admits one request counted against each of `who` (`key:NAME`, `app:NAME`), or says how long
    /// to wait; a refused request takes nothing.
    pub fn admit(&self, who: &[String]) -> Result<(), Duration> {
        if !self.is_on() {
            return Ok(());
        }
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let mut wait = Duration::ZERO;
        for id in who {
            let entry = self.entry(&mut table, id, now);
            if let Some(rate) = self.tokens {
                wait = wait.max(entry.tokens.overdrawn_for(rate, now));
            }
            if let Some(rate) = self.requests {
                wait = wait.max(entry.requests.available_in(rate, 1.0, now));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(rate) = self.requests {
            for id in who {
                let entry = self.entry(&mut table, id, now);
                entry.requests.charge(rate, 1.0, now);
            }
        }
        Ok(())
    }

    /// Charges the generated tokens of an answer to each of `who`.
    pub fn charge_tokens(&self, who: &[String], tokens: u64) {
        let Some(rate) = self.tokens else {
            return;
        };
        if tokens == 0 {
            return;
        }
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        for id in who {
            self.entry(&mut table, id, now)
                .tokens
                .charge(rate, tokens as f64, now);
        }
    }

    fn entry<'t>(
        &self,
        table: &'t mut HashMap<String, Entry>,
        id: &str,
        now: Instant,
    ) -> &'t mut Entry {
        if !table.contains_key(id) && table.len() >= MAX_TRACKED {
            let oldest = table
                .iter()
                .min_by_key(|(_, entry)| entry.used)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                table.remove(&oldest);
            }
        }
        let unlimited = Rate { per_minute: 0 };
        let entry = table.entry(id.to_owned()).or_insert_with(|| Entry {
            requests: Bucket::full(self.requests.unwrap_or(unlimited), now),
            tokens: Bucket::full(self.tokens.unwrap_or(unlimited), now),
            used: now,
        });
        entry.used = now;
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn each_key_and_each_application_has_its_own_minute() {
        let quotas = Quotas::new(3, 0);
        for _ in 0..3 {
            assert_eq!(quotas.admit(&who(&["key:a", "app:chat"])), Ok(()));
        }
        let wait = quotas
            .admit(&who(&["key:a", "app:chat"]))
            .expect_err("limited");
        assert!(
            wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        // Another key through the same application is limited by the application's bucket...
        assert!(quotas.admit(&who(&["key:b", "app:chat"])).is_err());
        // ... and, refused, took nothing from key b.
        for _ in 0..3 {
            assert_eq!(quotas.admit(&who(&["key:b", "app:other"])), Ok(()));
        }
        assert!(quotas.admit(&who(&["key:b", "app:third"])).is_err());
    }

    #[test]
    fn generated_tokens_are_charged_after_the_answer() {
        let quotas = Quotas::new(0, 100);
        assert_eq!(quotas.admit(&who(&["key:a"])), Ok(()));
        quotas.charge_tokens(&who(&["key:a"]), 250);
        let wait = quotas.admit(&who(&["key:a"])).expect_err("overdrawn");
        assert!(
            wait > Duration::from_secs(89) && wait < Duration::from_secs(91),
            "{wait:?}"
        );
        assert_eq!(quotas.admit(&who(&["key:b"])), Ok(()));
    }

    #[test]
    fn off_means_off_and_the_table_stays_bounded() {
        let off = Quotas::new(0, 0);
        for _ in 0..1000 {
            assert_eq!(off.admit(&who(&["app:x"])), Ok(()));
        }
        let on = Quotas::new(10, 0);
        for index in 0..(MAX_TRACKED + 100) {
            assert_eq!(on.admit(&[format!("app:{index}")]), Ok(()));
        }
        assert_eq!(on.table.lock().expect("lock").len(), MAX_TRACKED);
    }
}
