//! The gateway's priority queue: requests wait here when every candidate node is saturated.
//!
//! A waiter is woken when a request finishes somewhere; the waiter with the
//! highest effective priority goes first, where waiting raises priority by
//! one level per `aging` interval so no request starves. The queue is bounded
//! in length (overflow is refused at once) and in wait time. The choice of
//! who goes next is the pure [`sollol_policy::admission::next_waiter`].

use std::sync::Mutex;
use std::time::Instant;

use sollol_policy::admission::{Place, QueueSettings, Rejected, next_waiter};
use tokio::sync::oneshot;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
