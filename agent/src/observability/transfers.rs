//! Models copied between nodes: the copies under way and the most recent finished ones (for
//! `GET /api/sollol/v1/transfers` and `sollol models`), a `transfer` event at each report, and the
//! transfer counters of `/metrics` once each ends.

use std::collections::{BTreeMap, VecDeque};
use std::sync::PoisonError;
use std::time::{Instant, SystemTime};

use sollol_shared::api::{LiveEvent, Transfer, TransferList, TransferState};

use super::Observer;
use crate::telemetry::unix_ms;

/// Finished copies kept for the list.
const FINISHED_KEPT: usize = 32;

/// The copies the coordinator started, by id.
#[derive(Debug, Default)]
pub(super) struct Transfers {
    next: u64,
    active: BTreeMap<u64, (Instant, Transfer)>,
    finished: VecDeque<Transfer>,
}

/// One copy's handle: what the gateway reports through.
#[derive(Debug)]
pub struct TransferId(u64);

impl Observer {
    /// A copy of `model` onto the node named `target` starts.
    pub fn transfer_started(&self, model: &str, target: &str) -> TransferId {
        let transfer = Transfer {
            started_ms: unix_ms(SystemTime::now()),
            model: model.to_owned(),
            digest: String::new(),
            source: String::new(),
            target: target.to_owned(),
            done_bytes: 0,
            total_bytes: 0,
            state: TransferState::Copying,
            duration_ms: 0,
            error: None,
        };
        let mut transfers = self
            .transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        transfers.next += 1;
        let id = transfers.next;
        transfers.active.insert(id, (Instant::now(), transfer));
        TransferId(id)
    }

    /// The copy has `done` of `total` bytes, from the node named `source`.
    pub fn transfer_progress(
        &self,
        id: &TransferId,
        source: &str,
        digest: &str,
        done: u64,
        total: u64,
    ) {
        let event = {
            let mut transfers = self
                .transfers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let Some((started, transfer)) = transfers.active.get_mut(&id.0) else {
                return;
            };
            source.clone_into(&mut transfer.source);
            digest.clone_into(&mut transfer.digest);
            transfer.done_bytes = done;
            transfer.total_bytes = total;
            transfer.duration_ms = started.elapsed().as_millis() as u64;
            transfer.clone()
        };
        if self.wanted() {
            self.publish(LiveEvent::Transfer { transfer: event });
        }
    }

    /// The copy ended: `fetched` bytes moved, or why it failed. Counted in the metrics.
    pub fn transfer_ended(&self, id: TransferId, fetched: u64, outcome: Result<(), String>) {
        let ended = {
            let mut transfers = self
                .transfers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let Some((started, mut transfer)) = transfers.active.remove(&id.0) else {
                return;
            };
            transfer.duration_ms = started.elapsed().as_millis() as u64;
            match outcome {
                Ok(()) => {
                    transfer.state = TransferState::Done;
                    transfer.done_bytes = transfer.total_bytes;
                }
                Err(error) => {
                    transfer.state = TransferState::Failed;
                    transfer.error = Some(error);
                }
            }
            if transfers.finished.len() == FINISHED_KEPT {
                transfers.finished.pop_back();
            }
            transfers.finished.push_front(transfer.clone());
            transfer
        };
        self.metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .count_transfer(&ended, fetched);
        if self.wanted() {
            self.publish(LiveEvent::Transfer { transfer: ended });
        }
    }

    /// The copies under way (oldest first), then the finished ones (newest first).
    pub fn transfers(&self) -> TransferList {
        let transfers = self
            .transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<Transfer> = transfers
            .active
            .values()
            .map(|(started, transfer)| {
                let mut transfer = transfer.clone();
                transfer.duration_ms = started.elapsed().as_millis() as u64;
                transfer
            })
            .collect();
        list.extend(transfers.finished.iter().cloned());
        TransferList { transfers: list }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_listed_while_under_way_then_with_its_outcome_and_counted() {
        let observer = Observer::new(Default::default());
        let mut events = observer.subscribe();
        let first = observer.transfer_started("llama3.2:3b", "b");
        let second = observer.transfer_started("llama3.2:3b", "c");
        observer.transfer_progress(&first, "a", "sha256:00", 50, 200);
        let Ok(event) = events.try_recv() else {
            panic!("a progress event")
        };
        assert!(matches!(
            &*event,
            LiveEvent::Transfer { transfer } if transfer.done_bytes == 50 && transfer.source == "a"
        ));
        observer.transfer_ended(second, 10, Err("no room".to_owned()));
        let list = observer.transfers().transfers;
        assert_eq!(list.len(), 2);
        assert_eq!(
            (list[0].target.as_str(), list[0].state),
            ("b", TransferState::Copying)
        );
        assert_eq!(list[1].error.as_deref(), Some("no room"));
        observer.transfer_ended(first, 200, Ok(()));
        let states: Vec<TransferState> = observer
            .transfers()
            .transfers
            .iter()
            .map(|transfer| transfer.state)
            .collect();
        assert_eq!(states, [TransferState::Done, TransferState::Failed]);
        let metrics = observer.render(&Default::default());
        assert!(
            metrics.contains(
                "sollol_model_transfers_total{source=\"a\",target=\"b\",outcome=\"done\"} 1"
            ) && metrics.contains(
                "sollol_model_transfer_bytes_total{source=\"a\",target=\"b\",outcome=\"done\"} 200"
            ),
            "{metrics}"
        );
    }
}
