//! Batching concurrent sequences' generation steps: the steps waiting when a batch may go travel to the
//! first stage together, with as many batches in flight as the stages have machines.

use std::sync::Arc;

use sollol_shared::layers::{Forward, StageRequest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::link::Link;

/// A generation step waiting for its batch, and where to say it was sent (with the batch's share of
/// the in-flight limit, held until the step's answer arrives).
#[derive(Debug)]
pub(super) struct Queued {
    pub(super) step: Forward,
    pub(super) sent: oneshot::Sender<Result<Arc<OwnedSemaphorePermit>, String>>,
}

/// Most sequences' steps sent to the first stage in one batch.
const BATCH_STEPS: usize = 16;

/// Sends the queued generation steps to the first stage in batches: all the steps waiting when a batch
/// may go join it. At most `in_flight` batches travel the pipeline at once: one per machine among the
/// stages (stages on one machine share its cores, so more batches there would only split the work into
/// smaller, less efficient batches; on separate machines each stage works on a batch of its own).
pub(super) async fn send_batches(
    first: Arc<Link>,
    mut queued: mpsc::UnboundedReceiver<Queued>,
    in_flight: usize,
) {
    let limit = Arc::new(Semaphore::new(in_flight.max(1)));
    while let Some(head) = queued.recv().await {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let permit = Arc::new(permit);
        // The sequences whose answers just freed the permit queue their next steps right after it:
        // let them, so that they join this batch rather than follow alone.
        tokio::task::yield_now().await;
        let mut batch = vec![head];
        while batch.len() < BATCH_STEPS {
            match queued.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let (steps, waiting): (Vec<Forward>, Vec<_>) = batch
            .into_iter()
            .map(|queued| (queued.step, queued.sent))
            .unzip();
        let sent = first.send(&StageRequest::Forward { steps }).await;
        for waiting in waiting {
            let _ = waiting.send(match &sent {
                Ok(()) => Ok(Arc::clone(&permit)),
                Err(error) => Err(error.to_string()),
            });
        }
    }
}

/// How many machines `addresses` (`host:port`) are on.
pub(super) fn machines(addresses: &[String]) -> usize {
    let mut hosts: Vec<&str> = addresses
        .iter()
        .map(|address| {
            address
                .rsplit_once(':')
                .map_or(address.as_str(), |(host, _)| host)
        })
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    hosts.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_on_one_host_count_as_one_machine() {
        let addresses = |list: &[&str]| -> Vec<String> {
            list.iter().map(|address| (*address).to_owned()).collect()
        };
        assert_eq!(
            machines(&addresses(&["127.0.0.1:7001", "127.0.0.1:7002"])),
            1
        );
        assert_eq!(
            machines(&addresses(&[
                "10.0.0.2:7001",
                "10.0.0.3:7001",
                "10.0.0.2:7002"
            ])),
            2
        );
        assert_eq!(
            machines(&addresses(&["[::1]:7001", "[::1]:7002", "pi.lan:7001"])),
            2
        );
    }
}
