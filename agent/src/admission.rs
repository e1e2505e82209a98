//! The gateway's priority queue: requests wait here when every candidate node is saturated.
//!
//! A waiter is woken when a request finishes somewhere; the waiter with the
//! highest effective priority goes first, where waiting raises priority by
//! one level per `aging` interval so no request starves. The queue is bounded
//! in length (overflow is refused at once) and in wait time. The choice of
//! who goes next is a pure function, [`next_waiter`].

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

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

#[derive(Debug)]
struct Waiter {
    id: u64,
    priority: u8,
    since: Instant,
    wake: oneshot::Sender<()>,
}

/// Shared by every request of the gateway.
#[derive(Debug)]
pub struct Admission {
    settings: QueueSettings,
    waiters: Mutex<Vec<Waiter>>,
    next_id: std::sync::atomic::AtomicU64,
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

impl Admission {
    pub fn new(settings: QueueSettings) -> Self {
        Self {
            settings,
            waiters: Mutex::new(Vec::new()),
            next_id: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    /// Waits until woken by a finished request, or fails when the queue is full or the wait too long.
    /// `since` is when the request first started waiting, so a re-queued request keeps its age.
    pub async fn wait(&self, priority: u8, since: Instant) -> Result<(), Rejected> {
        let remaining = self
            .settings
            .timeout
            .checked_sub(since.elapsed())
            .unwrap_or_default();
        if remaining.is_zero() {
            return Err(Rejected::TimedOut(self.settings.timeout));
        }
        let (wake, woken) = oneshot::channel();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut waiters = self.lock();
            if waiters.len() >= self.settings.capacity {
                return Err(Rejected::QueueFull(waiters.len()));
            }
            waiters.push(Waiter {
                id,
                priority,
                since,
                wake,
            });
        }
        let result = tokio::time::timeout(remaining, woken).await;
        // Whatever happened, this request is no longer waiting.
        self.lock().retain(|waiter| waiter.id != id);
        match result {
            Ok(_) => Ok(()),
            Err(_) => Err(Rejected::TimedOut(self.settings.timeout)),
        }
    }

    /// A request finished: let the next waiter try again.
    pub fn release(&self) {
        let mut waiters = self.lock();
        let now = Instant::now();
        let places: Vec<Place> = waiters
            .iter()
            .map(|waiter| Place {
                priority: waiter.priority,
                waited: now.duration_since(waiter.since),
            })
            .collect();
        if let Some(index) = next_waiter(&places, self.settings.aging) {
            let waiter = waiters.swap_remove(index);
            let _ = waiter.wake.send(());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiter>> {
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
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

    #[tokio::test]
    async fn queue_is_bounded_and_times_out() {
        let admission = std::sync::Arc::new(Admission::new(QueueSettings {
            capacity: 1,
            timeout: Duration::from_millis(100),
            aging: Duration::from_secs(10),
        }));
        let waiting = {
            let admission = std::sync::Arc::clone(&admission);
            tokio::spawn(async move { admission.wait(5, Instant::now()).await })
        };
        while admission.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            admission.wait(5, Instant::now()).await,
            Err(Rejected::QueueFull(1))
        );
        assert_eq!(
            waiting.await.expect("task"),
            Err(Rejected::TimedOut(Duration::from_millis(100)))
        );
        assert_eq!(admission.waiting(), 0);
    }

    #[tokio::test]
    async fn release_wakes_the_highest_priority() {
        let admission = std::sync::Arc::new(Admission::new(QueueSettings {
            capacity: 8,
            timeout: Duration::from_secs(5),
            aging: Duration::from_secs(60),
        }));
        let (order_sender, mut order) = tokio::sync::mpsc::unbounded_channel();
        for (count, priority) in [2u8, 8, 5].into_iter().enumerate() {
            let admission = std::sync::Arc::clone(&admission);
            let order_sender = order_sender.clone();
            let waiter = std::sync::Arc::clone(&admission);
            tokio::spawn(async move {
                waiter
                    .wait(priority, Instant::now())
                    .await
                    .expect("admitted");
                order_sender.send(priority).expect("send");
            });
            while admission.waiting() < count + 1 {
                tokio::task::yield_now().await;
            }
        }
        let mut seen = Vec::new();
        for _ in 0..3 {
            admission.release();
            seen.push(order.recv().await.expect("woken"));
        }
        assert_eq!(seen, vec![8, 5, 2]);
    }
}
