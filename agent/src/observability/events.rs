//! The live event feed (`GET /api/sollol/v1/events`): where requests were routed, how they finished,
//! and how nodes changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sollol_shared::api::{LiveEvent, Node, NodeLoad, RequestEntry, RequestStatus, RoutingDecision};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::Observer;
use crate::history::{RequestRow, tokens_per_second};

/// How often the cluster snapshot is compared for `node` events.
const NODE_WATCH_EVERY: Duration = Duration::from_millis(250);

impl Observer {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.events.subscribe()
    }

    pub(super) fn publish(&self, event: LiveEvent) {
        // No subscriber is not an error: the event is simply not needed.
        let _ = self.events.send(Arc::new(event));
    }

    /// Whether anyone listens to the live events (building one is wasted otherwise).
    pub fn wanted(&self) -> bool {
        self.events.receiver_count() > 0
    }

    /// A request was sent to `node` (a name) for `decision`'s reason.
    pub fn routed(
        &self,
        model: &str,
        path: &str,
        app: &str,
        node: &str,
        decision: RoutingDecision,
    ) {
        if self.wanted() {
            self.publish(LiveEvent::Routed {
                at_ms: crate::telemetry::unix_ms(std::time::SystemTime::now()),
                model: model.to_owned(),
                path: path.to_owned(),
                app: app.to_owned(),
                node: node.to_owned(),
                decision,
            });
        }
    }
}

/// The feed entry of a finished attempt.
pub(super) fn entry_of(row: &RequestRow, node: String) -> RequestEntry {
    RequestEntry {
        id: 0,
        at_ms: row.at_ms,
        node_id: row.node_id.clone(),
        node,
        model: row.model.clone(),
        path: row.path.clone(),
        app: row.app.clone(),
        status: if row.ok {
            RequestStatus::Ok
        } else {
            RequestStatus::Failed
        },
        prompt_tokens: row.prompt_tokens,
        output_tokens: row.output_tokens,
        time_to_first_byte_ms: row.time_to_first_byte_ms,
        time_to_first_token_ms: row.time_to_first_token_ms,
        total_ms: row.total_ms,
        load_ms: row.load_ms,
        tokens_per_second: tokens_per_second(row.output_tokens, row.eval_ms),
        decision: RoutingDecision {
            strategy: row.choice.strategy_label().to_owned(),
            reason: row.reason.clone(),
            candidates: row.candidates.to_vec(),
        },
    }
}

/// Pushes a `node` event whenever a node's status, hardware sample, Ollama state or load changes.
pub async fn watch_nodes(
    observer: Arc<Observer>,
    in_flight: impl Fn() -> BTreeMap<String, u32> + Send + 'static,
    shutdown: CancellationToken,
) {
    let mut last: HashMap<String, (Arc<Node>, u32)> = HashMap::new();
    let mut ticker = tokio::time::interval(NODE_WATCH_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let view = observer.view.load_full();
        let loads = in_flight();
        let wanted = observer.wanted();
        for node in &view.nodes {
            let load = loads.get(&node.id).copied().unwrap_or(0);
            let changed = last.get(&node.id).is_none_or(|(seen, seen_load)| {
                !Arc::ptr_eq(seen, node) && **seen != **node || *seen_load != load
            });
            if changed {
                last.insert(node.id.clone(), (Arc::clone(node), load));
                observer.add_sample(node);
                if wanted {
                    observer.publish(LiveEvent::Node {
                        node: Node::clone(node),
                        load: NodeLoad { in_flight: load },
                    });
                }
            }
        }
    }
}
