//! Observability: Prometheus metrics, the live event stream and the statistics behind the dashboard.
//!
//! The [`Observer`] is fed from two places and never blocks either: the learner
//! task hands it every finished attempt (counters, histograms, a `finished`
//! event), and the gateway tells it where each request was routed. A watcher
//! task turns changes in the cluster snapshot into `node` events. Statistics
//! over a window are computed by [`aggregate`], a pure function over rows read
//! back from SQLite.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sollol_shared::BUILD_VERSION;
use sollol_shared::api::{
    Aggregate, HardwareSample, LiveEvent, NodeLoad, NodeStatus, Percentiles, RequestEntry,
    RequestStatus, RoutingDecision, SeriesPoint, Stats, StatsWindow,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::cluster::SharedView;
use crate::history::{RequestRow, candidates_of, tokens_per_second};

/// Events buffered for slow SSE clients before they are told they lagged.
const EVENT_BUFFER: usize = 1024;
/// Upper bounds of the latency histograms, in seconds.
const BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Hardware samples kept per node (10 minutes at the default 2-second heartbeat).
const SAMPLES_PER_NODE: usize = 300;
/// How often the cluster snapshot is compared for `node` events.
const NODE_WATCH_EVERY: Duration = Duration::from_millis(250);

#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Observations at or below each bound of `BUCKETS` (not cumulative here).
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(index) = BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.buckets[index] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }
}

#[derive(Clone, Debug, Default)]
struct RequestSeries {
    count: u64,
    output_tokens: u64,
    duration: Histogram,
    first_token: Histogram,
}

/// Counters since start; the gauges are read from the live state when rendering.
#[derive(Debug, Default)]
struct Metrics {
    /// By (node name, model, status).
    requests: BTreeMap<(String, String, &'static str), RequestSeries>,
    /// By (strategy, kind of reason).
    decisions: BTreeMap<(&'static str, &'static str), u64>,
}

/// Live state the exposition reads at scrape time.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Requests in flight by node id.
    pub in_flight: BTreeMap<String, u32>,
    pub queued: usize,
    pub history_dropped: u64,
    pub learning_dropped: u64,
}

/// The hub of the observability surface; cheap to call from the request path.
#[derive(Debug)]
pub struct Observer {
    view: SharedView,
    events: broadcast::Sender<Arc<LiveEvent>>,
    metrics: Mutex<Metrics>,
    /// Hardware samples per node id since start, oldest first, at most `SAMPLES_PER_NODE`.
    samples: Mutex<HashMap<String, VecDeque<HardwareSample>>>,
}

impl Observer {
    pub fn new(view: SharedView) -> Self {
        Self {
            view,
            events: broadcast::channel(EVENT_BUFFER).0,
            metrics: Mutex::new(Metrics::default()),
            samples: Mutex::new(HashMap::new()),
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
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.events.subscribe()
    }

    fn publish(&self, event: LiveEvent) {
        // No subscriber is not an error: the event is simply not needed.
        let _ = self.events.send(Arc::new(event));
    }

    /// Whether anyone listens to the live events (building one is wasted otherwise).
    pub fn wanted(&self) -> bool {
        self.events.receiver_count() > 0
    }

    /// The name of a node, or its id when it is unknown.
    pub fn node_name(&self, node_id: &str) -> String {
        self.view
            .load()
            .nodes
            .iter()
            .find(|node| node.id == node_id)
            .map_or_else(|| node_id.to_owned(), |node| node.name.clone())
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

    /// An attempt finished: counted, and pushed to the live feed.
    pub fn finished(&self, row: &RequestRow) {
        let node = self.node_name(&row.node_id);
        let status = if row.ok { "ok" } else { "failed" };
        {
            let mut metrics = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
            let series = metrics
                .requests
                .entry((node.clone(), row.model.clone(), status))
                .or_default();
            series.count += 1;
            series.output_tokens += row.output_tokens.unwrap_or(0);
            series.duration.observe(row.total_ms as f64 / 1000.0);
            if let Some(first_token) = row.time_to_first_token_ms {
                series.first_token.observe(first_token as f64 / 1000.0);
            }
            let kind = if row.strategy == "calibration" {
                "calibration"
            } else {
                reason_kind(&row.reason)
            };
            *metrics.decisions.entry((row.strategy, kind)).or_default() += 1;
        }
        if self.wanted() {
            self.publish(LiveEvent::Finished {
                request: entry_of(row, node),
            });
        }
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self, gauges: &Gauges) -> String {
        let view = self.view.load();
        let mut out = String::with_capacity(8192);
        let name_of: HashMap<&str, &str> = view
            .nodes
            .iter()
            .map(|node| (node.id.as_str(), node.name.as_str()))
            .collect();
        header(
            &mut out,
            "sollol_build_info",
            "gauge",
            "The running sollol version.",
        );
        let _ = writeln!(
            out,
            "sollol_build_info{{version=\"{}\"}} 1",
            escape(BUILD_VERSION)
        );
        {
            let metrics = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
            let labels = |(node, model, status): &(String, String, &str)| {
                format!(
                    "node=\"{}\",model=\"{}\",status=\"{status}\"",
                    escape(node),
                    escape(model)
                )
            };
            for (name, help, count) in [
                (
                    "sollol_requests_total",
                    "Requests routed to a node (each failover attempt counts), by node, model and status.",
                    (|series: &RequestSeries| series.count) as fn(&RequestSeries) -> u64,
                ),
                (
                    "sollol_output_tokens_total",
                    "Tokens generated, from Ollama's eval_count.",
                    |series: &RequestSeries| series.output_tokens,
                ),
            ] {
                header(&mut out, name, "counter", help);
                for (key, series) in &metrics.requests {
                    let _ = writeln!(out, "{name}{{{}}} {}", labels(key), count(series));
                }
            }
            for (name, help, pick) in [
                (
                    "sollol_request_duration_seconds",
                    "Time from routing to the last byte of the answer.",
                    (|series: &RequestSeries| &series.duration) as fn(&RequestSeries) -> &Histogram,
                ),
                (
                    "sollol_time_to_first_token_seconds",
                    "Time before generation began (cold load, queueing, prompt).",
                    |series: &RequestSeries| &series.first_token,
                ),
            ] {
                header(&mut out, name, "histogram", help);
                for (key, series) in &metrics.requests {
                    write_histogram(&mut out, name, &labels(key), pick(series));
                }
            }
            header(
                &mut out,
                "sollol_routing_decisions_total",
                "counter",
                "Routing decisions by strategy and kind (best, affinity, exploration, failover, hedge, calibration).",
            );
            for ((strategy, kind), count) in &metrics.decisions {
                let _ = writeln!(
                    out,
                    "sollol_routing_decisions_total{{strategy=\"{strategy}\",kind=\"{kind}\"}} {count}"
                );
            }
        }
        header(
            &mut out,
            "sollol_requests_in_flight",
            "gauge",
            "Requests the gateway has running on each node.",
        );
        for (node_id, count) in &gauges.in_flight {
            let name = name_of.get(node_id.as_str()).copied().unwrap_or(node_id);
            let _ = writeln!(
                out,
                "sollol_requests_in_flight{{node=\"{}\"}} {count}",
                escape(name)
            );
        }
        header(
            &mut out,
            "sollol_requests_queued",
            "gauge",
            "Requests waiting in the gateway's priority queue.",
        );
        let _ = writeln!(out, "sollol_requests_queued {}", gauges.queued);
        header(
            &mut out,
            "sollol_node_up",
            "gauge",
            "1 when the node is up.",
        );
        for node in &view.nodes {
            let _ = writeln!(
                out,
                "sollol_node_up{{node=\"{}\"}} {}",
                escape(&node.name),
                u8::from(node.status == NodeStatus::Up)
            );
        }
        type NodeGauge = fn(&sollol_shared::hardware::HardwareReport) -> Option<f64>;
        let node_gauges: [(&str, &str, NodeGauge); 5] = [
            (
                "sollol_node_cpu_utilization_ratio",
                "CPU busy time, 0 to 1.",
                |hardware| {
                    hardware
                        .cpu
                        .utilisation_percent
                        .map(|percent| f64::from(percent) / 100.0)
                },
            ),
            (
                "sollol_node_memory_total_bytes",
                "Physical memory.",
                |hardware| Some(hardware.memory.total_bytes as f64),
            ),
            (
                "sollol_node_memory_available_bytes",
                "Memory available without swapping.",
                |hardware| Some(hardware.memory.available_bytes as f64),
            ),
            (
                "sollol_node_temperature_celsius",
                "The hottest temperature sensor of the node.",
                |hardware| {
                    hardware
                        .temperatures
                        .iter()
                        .map(|reading| f64::from(reading.celsius))
                        .reduce(f64::max)
                },
            ),
            (
                "sollol_node_load_average",
                "One-minute load average.",
                |hardware| Some(f64::from(hardware.cpu.load_average[0])),
            ),
        ];
        for (name, help, read) in node_gauges {
            header(&mut out, name, "gauge", help);
            for node in &view.nodes {
                if let Some(value) = node.hardware.as_ref().and_then(read) {
                    let _ = writeln!(out, "{name}{{node=\"{}\"}} {value}", escape(&node.name));
                }
            }
        }
        type GpuGauge = fn(&sollol_shared::hardware::GpuInfo) -> Option<f64>;
        let gpu_gauges: [(&str, &str, GpuGauge); 4] = [
            ("sollol_node_gpu_memory_total_bytes", "GPU memory.", |gpu| {
                Some(gpu.vram_total_bytes as f64)
            }),
            (
                "sollol_node_gpu_memory_used_bytes",
                "GPU memory in use.",
                |gpu| Some(gpu.vram_used_bytes as f64),
            ),
            (
                "sollol_node_gpu_utilization_ratio",
                "GPU busy time, 0 to 1.",
                |gpu| {
                    gpu.utilisation_percent
                        .map(|percent| f64::from(percent) / 100.0)
                },
            ),
            (
                "sollol_node_gpu_temperature_celsius",
                "GPU temperature.",
                |gpu| gpu.temperature_celsius.map(f64::from),
            ),
        ];
        for (name, help, read) in gpu_gauges {
            header(&mut out, name, "gauge", help);
            for node in &view.nodes {
                for gpu in node.hardware.iter().flat_map(|hardware| &hardware.gpus) {
                    if let Some(value) = read(gpu) {
                        let _ = writeln!(
                            out,
                            "{name}{{node=\"{}\",gpu=\"{}\"}} {value}",
                            escape(&node.name),
                            gpu.index
                        );
                    }
                }
            }
        }
        header(
            &mut out,
            "sollol_history_records_dropped_total",
            "counter",
            "History records dropped because the SQLite writer fell behind.",
        );
        let _ = writeln!(
            out,
            "sollol_history_records_dropped_total {}",
            gauges.history_dropped
        );
        header(
            &mut out,
            "sollol_learning_outcomes_dropped_total",
            "counter",
            "Finished requests the learner could not take (its queue was full).",
        );
        let _ = writeln!(
            out,
            "sollol_learning_outcomes_dropped_total {}",
            gauges.learning_dropped
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn write_histogram(out: &mut String, name: &str, labels: &str, histogram: &Histogram) {
    let mut cumulative = 0;
    for (bound, count) in BUCKETS.iter().zip(histogram.buckets) {
        cumulative += count;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels},le=\"+Inf\"}} {}",
        histogram.count
    );
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", histogram.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", histogram.count);
}

/// A label value escaped as the exposition format wants.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A few fixed kinds of routing reason, so the metric's labels stay few.
pub fn reason_kind(reason: &str) -> &'static str {
    if reason.starts_with("failover") {
        "failover"
    } else if reason.starts_with("hedged") {
        "hedge"
    } else if reason.contains("affinity") {
        "affinity"
    } else if reason.contains("explor") {
        "exploration"
    } else {
        "best"
    }
}

/// The feed entry of a finished attempt.
fn entry_of(row: &RequestRow, node: String) -> RequestEntry {
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
            strategy: row.strategy.to_owned(),
            reason: row.reason.clone(),
            candidates: candidates_of(&row.candidates),
        },
    }
}

/// Pushes a `node` event whenever a node's status, hardware sample, Ollama state or load changes.
pub async fn watch_nodes(
    observer: Arc<Observer>,
    in_flight: impl Fn() -> BTreeMap<String, u32> + Send + 'static,
    shutdown: CancellationToken,
) {
    let mut last: HashMap<String, (Arc<sollol_shared::api::Node>, u32)> = HashMap::new();
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
                        node: sollol_shared::api::Node::clone(node),
                        load: NodeLoad { in_flight: load },
                    });
                }
            }
        }
    }
}

/// Statistics of `entries` (any order) for `window` ending at `until_ms`; `node_name` names node ids.
pub fn aggregate(
    entries: &[RequestEntry],
    window: StatsWindow,
    until_ms: u64,
    node_name: impl Fn(&str) -> String,
) -> Stats {
    let since_ms = until_ms.saturating_sub(window.millis());
    let bucket_ms = window.bucket_millis();
    let in_window: Vec<&RequestEntry> = entries
        .iter()
        .filter(|entry| entry.at_ms >= since_ms && entry.at_ms <= until_ms)
        .collect();
    let group = |key: &dyn Fn(&RequestEntry) -> String| -> Vec<Aggregate> {
        let mut groups: BTreeMap<String, Vec<&RequestEntry>> = BTreeMap::new();
        for entry in &in_window {
            groups.entry(key(entry)).or_default().push(entry);
        }
        let mut aggregates: Vec<Aggregate> = groups
            .into_iter()
            .map(|(key, entries)| summarize(key, &entries))
            .collect();
        aggregates.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.key.cmp(&b.key)));
        aggregates
    };
    let buckets = (window.millis() / bucket_ms) as usize;
    let mut series: Vec<Vec<&RequestEntry>> = vec![Vec::new(); buckets];
    for entry in &in_window {
        let index = ((entry.at_ms - since_ms) / bucket_ms) as usize;
        series[index.min(buckets - 1)].push(entry);
    }
    Stats {
        window,
        since_ms,
        until_ms,
        bucket_ms,
        total: summarize("all".to_owned(), &in_window),
        by_node: group(&|entry| node_name(&entry.node_id)),
        by_model: group(&|entry| entry.model.clone()),
        by_app: group(&|entry| entry.app.clone()),
        series: series
            .iter()
            .enumerate()
            .map(|(index, entries)| {
                let summary = summarize(String::new(), entries);
                SeriesPoint {
                    at_ms: since_ms + index as u64 * bucket_ms,
                    requests: summary.requests,
                    errors: summary.errors,
                    latency_ms: summary.latency_ms,
                    time_to_first_token_ms: summary.time_to_first_token_ms,
                    tokens_per_second: summary.output_tokens as f64 * 1000.0 / bucket_ms as f64,
                }
            })
            .collect(),
    }
}

fn summarize(key: String, entries: &[&RequestEntry]) -> Aggregate {
    let requests = entries.len() as u64;
    let ok: Vec<&&RequestEntry> = entries
        .iter()
        .filter(|entry| entry.status == RequestStatus::Ok)
        .collect();
    let errors = requests - ok.len() as u64;
    let latency: Vec<u64> = ok.iter().map(|entry| entry.total_ms).collect();
    let first_token: Vec<u64> = ok
        .iter()
        .filter_map(|entry| entry.time_to_first_token_ms)
        .collect();
    let output_tokens: u64 = ok.iter().filter_map(|entry| entry.output_tokens).sum();
    // Tokens over generation time: sum of tokens / sum of (tokens / rate) for requests with a rate.
    let (rated_tokens, generation_seconds) = ok
        .iter()
        .filter_map(|entry| Some((entry.output_tokens?, entry.tokens_per_second?)))
        .fold((0.0, 0.0), |(tokens, seconds), (count, rate)| {
            (tokens + count as f64, seconds + count as f64 / rate)
        });
    Aggregate {
        key,
        requests,
        errors,
        error_rate: if requests == 0 {
            0.0
        } else {
            errors as f64 / requests as f64
        },
        latency_ms: percentiles(latency),
        time_to_first_token_ms: percentiles(first_token),
        output_tokens,
        tokens_per_second: (generation_seconds > 0.0).then(|| rated_tokens / generation_seconds),
        last_at_ms: entries.iter().map(|entry| entry.at_ms).max().unwrap_or(0),
    }
}

/// Nearest-rank percentiles; `None` for no values.
fn percentiles(mut values: Vec<u64>) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = |fraction: f64| {
        let index = (fraction * values.len() as f64).ceil() as usize;
        values[index.clamp(1, values.len()) - 1]
    };
    Some(Percentiles {
        p50: rank(0.50),
        p95: rank(0.95),
        p99: rank(0.99),
    })
}

/// The distributed models' figures in the exposition format (appended to [`Observer::render`]'s).
pub fn render_distributed(models: &[sollol_shared::api::DistributedModel]) -> String {
    let mut out = String::new();
    type ModelCount = fn(&sollol_shared::api::DistributedModel) -> u64;
    let counters: [(&str, &str, ModelCount); 2] = [
        (
            "sollol_distributed_tokens_total",
            "Tokens generated through the model's current pipeline.",
            |model| model.tokens,
        ),
        (
            "sollol_distributed_replans_total",
            "Pipelines replaced mid-request because a stage failed.",
            |model| model.replans,
        ),
    ];
    for (name, help, count) in counters {
        header(&mut out, name, "counter", help);
        for model in models {
            let _ = writeln!(
                out,
                "{name}{{model=\"{}\"}} {}",
                escape(&model.model),
                count(model)
            );
        }
    }
    type ModelFigure = fn(&sollol_shared::api::DistributedModel) -> Option<f64>;
    let figures: [(&str, &str, ModelFigure); 3] = [
        (
            "sollol_distributed_hop_seconds",
            "Average time per transfer of a generation step (coordinator to first stage, stage to stage, back).",
            |model| model.hop_ms.map(|ms| ms / 1e3),
        ),
        (
            "sollol_distributed_bytes_per_token",
            "Bytes on the wire per generated token, all hops together.",
            |model| model.bytes_per_token,
        ),
        (
            "sollol_distributed_tokens_per_second",
            "Generation speed of the pipeline, seen from the coordinator.",
            |model| model.tokens_per_second,
        ),
    ];
    for (name, help, figure) in figures {
        header(&mut out, name, "gauge", help);
        for model in models {
            if let Some(value) = figure(model) {
                let _ = writeln!(out, "{name}{{model=\"{}\"}} {value}", escape(&model.model));
            }
        }
    }
    type StageFigure = fn(&sollol_shared::api::PipelineStage) -> Option<f64>;
    let stage_figures: [(&str, &str, StageFigure); 2] = [
        (
            "sollol_distributed_stage_compute_seconds",
            "Average compute per generated token on each stage.",
            |stage| stage.compute_ms_per_token.map(|ms| ms / 1e3),
        ),
        (
            "sollol_distributed_stage_resident_bytes",
            "Resident memory of each stage's process after loading its part.",
            |stage| Some(stage.resident_bytes as f64),
        ),
    ];
    for (name, help, figure) in stage_figures {
        header(&mut out, name, "gauge", help);
        for model in models {
            for (index, stage) in model.stages.iter().enumerate() {
                if let Some(value) = figure(stage) {
                    let _ = writeln!(
                        out,
                        "{name}{{model=\"{}\",stage=\"{index}\",node=\"{}\"}} {value}",
                        escape(&model.model),
                        escape(&stage.name)
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at_ms: u64, node: &str, model: &str, ok: bool, total_ms: u64) -> RequestEntry {
        RequestEntry {
            id: at_ms,
            at_ms,
            node_id: node.to_owned(),
            node: node.to_owned(),
            model: model.to_owned(),
            path: "/api/chat".to_owned(),
            app: "test".to_owned(),
            status: if ok {
                RequestStatus::Ok
            } else {
                RequestStatus::Failed
            },
            prompt_tokens: Some(10),
            output_tokens: Some(20),
            time_to_first_byte_ms: total_ms,
            time_to_first_token_ms: Some(total_ms / 2),
            total_ms,
            load_ms: None,
            tokens_per_second: Some(40.0),
            decision: RoutingDecision {
                strategy: "intelligent".to_owned(),
                reason: "lowest predicted time".to_owned(),
                candidates: Vec::new(),
            },
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(
            percentiles(values),
            Some(Percentiles {
                p50: 50,
                p95: 95,
                p99: 99
            })
        );
        assert_eq!(percentiles(vec![7]).map(|p| (p.p50, p.p99)), Some((7, 7)));
        assert_eq!(percentiles(Vec::new()), None);
    }

    #[test]
    fn aggregates_group_count_and_window() {
        let until = 1_000_000;
        let entries = vec![
            entry(until - 1_000, "a", "m1", true, 100),
            entry(until - 2_000, "a", "m2", true, 300),
            entry(until - 3_000, "b", "m1", false, 50),
            // Outside a 5-minute window.
            entry(until - 400_000, "b", "m1", true, 10),
        ];
        let stats = aggregate(&entries, StatsWindow::FiveMinutes, until, |id| {
            format!("node-{id}")
        });
        assert_eq!(stats.total.requests, 3);
        assert_eq!(stats.total.errors, 1);
        assert_eq!(
            stats
                .by_node
                .iter()
                .map(|a| (a.key.as_str(), a.requests))
                .collect::<Vec<_>>(),
            [("node-a", 2), ("node-b", 1)]
        );
        assert_eq!(stats.by_node[1].error_rate, 1.0);
        assert_eq!(stats.by_node[1].latency_ms, None);
        assert_eq!(stats.by_model[0].key, "m1");
        assert_eq!(stats.total.latency_ms.map(|p| p.p99), Some(300));
        assert_eq!(stats.total.output_tokens, 40);
        assert_eq!(stats.total.tokens_per_second, Some(40.0));
        assert_eq!(stats.series.len(), 60);
        assert_eq!(
            stats.series.iter().map(|point| point.requests).sum::<u64>(),
            3
        );
        assert_eq!(stats.series.last().map(|point| point.requests), Some(3));
    }

    /// Every `sollol_*` name the shipped Grafana dashboard queries is a family `/metrics` declares.
    #[test]
    fn the_grafana_dashboard_uses_only_real_metrics() {
        let view: SharedView = Arc::new(arc_swap::ArcSwap::from_pointee(
            crate::cluster::ClusterView::default(),
        ));
        let exposition = Observer::new(view).render(&Gauges::default());
        let families: Vec<&str> = exposition
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|line| line.split_whitespace().next())
            .collect();
        let dashboard = include_str!("../../../docs/grafana-dashboard.json");
        let mut used = 0;
        for (start, _) in dashboard.match_indices("sollol_") {
            let name: String = dashboard[start..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                families.contains(&family),
                "the Grafana dashboard uses {name}, which /metrics does not declare"
            );
            used += 1;
        }
        assert!(used >= 10, "only {used} metric references found");
    }

    #[test]
    fn reasons_fall_into_few_kinds() {
        assert_eq!(reason_kind("failover #1 after: a: HTTP 500"), "failover");
        assert_eq!(
            reason_kind("hedged: a had not answered after 300 ms"),
            "hedge"
        );
        assert_eq!(reason_kind("kept prefix affinity"), "affinity");
        assert_eq!(reason_kind("lowest predicted time 120ms"), "best");
    }

    #[test]
    fn histogram_buckets_are_cumulative_in_the_exposition() {
        let mut histogram = Histogram::default();
        for seconds in [0.01, 0.2, 0.2, 400.0] {
            histogram.observe(seconds);
        }
        let mut out = String::new();
        write_histogram(&mut out, "x", "node=\"a\"", &histogram);
        assert!(
            out.contains("x_bucket{node=\"a\",le=\"0.05\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{node=\"a\",le=\"0.25\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{node=\"a\",le=\"300\"} 3\n"), "{out}");
        assert!(
            out.contains("x_bucket{node=\"a\",le=\"+Inf\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("x_count{node=\"a\"} 4\n"), "{out}");
    }
}
