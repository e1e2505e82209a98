//! Observability: Prometheus metrics, the live event stream and the statistics behind the dashboard.
//!
//! The [`Observer`] is fed from two places and never blocks either: the learner
//! task hands it every finished attempt (counters, histograms, a `finished`
//! event), and the gateway tells it where each request was routed. A watcher
//! task turns changes in the cluster snapshot into `node` events and hardware
//! samples. `metrics` renders the exposition, `events` owns the live feed,
//! `stats` computes statistics over a window with [`aggregate`], a pure
//! function over rows read back from SQLite, and `transfers` follows models
//! copied between nodes (the gateway reports each copy).

mod events;
mod metrics;
mod stats;
mod transfers;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use sollol_shared::api::{HardwareSample, LiveEvent};
use tokio::sync::broadcast;

use crate::cluster::SharedView;
use crate::history::RequestRow;
use metrics::Metrics;

pub use events::watch_nodes;
pub use metrics::{CacheFigures, Gauges, render_distributed};
pub use stats::aggregate;
pub use transfers::TransferId;

/// Events buffered for slow SSE clients before they are told they lagged.
const EVENT_BUFFER: usize = 1024;
/// Hardware samples kept per node (10 minutes at the default 2-second heartbeat).
const SAMPLES_PER_NODE: usize = 300;

/// The hub of the observability surface; cheap to call from the request path.
/// The metrics label of every model no node lists.
pub const OTHER_MODEL: &str = "other";

#[derive(Debug)]
pub struct Observer {
    view: SharedView,
    events: broadcast::Sender<Arc<LiveEvent>>,
    metrics: Mutex<Metrics>,
    /// Hardware samples per node id since start, oldest first, at most `SAMPLES_PER_NODE`.
    samples: Mutex<HashMap<String, VecDeque<HardwareSample>>>,
    transfers: Mutex<transfers::Transfers>,
}

impl Observer {
    pub fn new(view: SharedView) -> Self {
        Self {
            view,
            events: broadcast::channel(EVENT_BUFFER).0,
            metrics: Mutex::new(Metrics::default()),
            samples: Mutex::new(HashMap::new()),
            transfers: Mutex::new(Default::default()),
        }
    }

    /// The hardware samples of a node since the coordinator started, oldest first.
    pub fn samples(&self, node_id: &str) -> Vec<HardwareSample> {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node_id)
            .map(|samples| samples.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Keeps the node's newest hardware report as a sample, once per report.
    fn add_sample(&self, node: &sollol_shared::api::Node) {
        let Some(hardware) = &node.hardware else {
            return;
        };
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let samples = samples.entry(node.id.clone()).or_default();
        if samples
            .back()
            .is_some_and(|last| last.at_ms >= node.last_seen_ms)
        {
            return;
        }
        if samples.len() == SAMPLES_PER_NODE {
            samples.pop_front();
        }
        samples.push_back(HardwareSample::of(node.last_seen_ms, hardware));
    }

    /// A new subscriber to the live events.
    /// The name of a node, or its id when it is unknown.
    pub fn node_name(&self, node_id: &str) -> String {
        self.view
            .load()
            .nodes
            .iter()
            .find(|node| node.id == node_id)
            .map_or_else(|| node_id.to_owned(), |node| node.name.clone())
    }

    /// An attempt finished: counted, and pushed to the live feed.
    pub fn finished(&self, row: &RequestRow) {
        let node = self.node_name(&row.node_id);
        // Any client may name any model (a pull of a made-up name, a typo): only models some node
        // lists get a metrics series of their own, so the label set stays bounded.
        let known = self
            .view
            .load()
            .backends
            .iter()
            .any(|backend| backend.has_model(&row.model));
        let model = if known {
            row.model.clone()
        } else {
            OTHER_MODEL.to_owned()
        };
        self.metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .count(node.clone(), model, row);
        if self.wanted() {
            self.publish(LiveEvent::Finished {
                request: events::entry_of(row, node),
            });
        }
    }
}
