//! Who waits and who goes next in the gateway's priority queue: priorities, the queue's settings, why a
//! request is turned away, and [`next_waiter`], the pure choice of the next waiter. The queue itself (with
//! its waking) lives in the gateway.

use std::time::Duration;

/// Lowest and highest priority a request may ask for; 5 is the default.
pub const MIN_PRIORITY: u8 = 1;
pub const MAX_PRIORITY: u8 = 10;
pub const DEFAULT_PRIORITY: u8 = 5;

/// Why a request did not get through the queue.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("every node that has this model is saturated and {0} requests are already waiting")]
    QueueFull(usize),
    #[error("every node that has this model stayed saturated for {} s", .0.as_secs_f64())]
    TimedOut(Duration),
}

/// Queue settings.
#[derive(Clone, Copy, Debug)]
pub struct QueueSettings {
    pub capacity: usize,
    pub timeout: Duration,
    /// Waiting this long raises a request's priority by one level.
    pub aging: Duration,
}

/// A waiter's place in line, as [`next_waiter`] sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Place {
    pub priority: u8,
    pub waited: Duration,
}

/// Who goes next: the highest priority after aging, the longest wait among equals. Pure.
pub fn next_waiter(places: &[Place], aging: Duration) -> Option<usize> {
    let effective = |place: &Place| {
        let aged = if aging.is_zero() {
            0.0
        } else {
            place.waited.as_secs_f64() / aging.as_secs_f64()
        };
        f64::from(place.priority) + aged
    };
    (0..places.len()).max_by(|a, b| {
        effective(&places[*a])
            .total_cmp(&effective(&places[*b]))
            .then_with(|| places[*a].waited.cmp(&places[*b].waited))
    })
}

/// Parses `X-Sollol-Priority`: a whole number from 1 to 10.
pub fn parse_priority(text: &str) -> Option<u8> {
    text.trim()
        .parse::<u8>()
        .ok()
        .filter(|priority| (MIN_PRIORITY..=MAX_PRIORITY).contains(priority))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(priority: u8, waited_ms: u64) -> Place {
        Place {
            priority,
            waited: Duration::from_millis(waited_ms),
        }
    }

    #[test]
    fn next_waiter_table() {
        fn check(places: &[Place], expected: Option<usize>) {
            assert_eq!(
                next_waiter(places, Duration::from_secs(10)),
                expected,
                "{places:?}"
            );
        }
        check(&[], None);
        check(&[place(5, 0)], Some(0));
        check(&[place(5, 100), place(9, 0)], Some(1));
        check(&[place(5, 100), place(5, 200)], Some(1));
        // Aging: a low-priority request that waited 50 s (5 levels) beats a fresh priority-9 one.
        check(&[place(9, 0), place(5, 50_000)], Some(1));
        check(&[place(9, 0), place(5, 30_000)], Some(0));
    }

    #[test]
    fn priorities_parse() {
        assert_eq!(parse_priority("1"), Some(1));
        assert_eq!(parse_priority(" 10 "), Some(10));
        assert_eq!(parse_priority("0"), None);
        assert_eq!(parse_priority("11"), None);
        assert_eq!(parse_priority("high"), None);
    }
}
