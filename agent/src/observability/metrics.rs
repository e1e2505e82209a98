//! The Prometheus exposition behind `GET /metrics`: the request counters and histograms the learner
//! feeds, the routing decisions by strategy and kind, and the gauges read from live state at scrape time.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::PoisonError;

use sollol_policy::routing::Choice;
use sollol_shared::BUILD_VERSION;
use sollol_shared::api::NodeStatus;

use super::Observer;
use crate::cluster::ClusterView;
use crate::history::RequestRow;

/// Upper bounds of the latency histograms, in seconds.
const BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Live state the exposition reads at scrape time.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Requests in flight by node id.
    pub in_flight: BTreeMap<String, u32>,
    pub queued: usize,
    pub history_dropped: u64,
    pub learning_dropped: u64,
    /// The gateway's response cache; zeros when it is off.
    pub cache: CacheFigures,
}

/// The response cache's counters and size, read at scrape time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheFigures {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
    pub entries: u64,
}

/// Counters since start; the gauges are read from the live state when rendering.
#[derive(Debug, Default)]
pub(super) struct Metrics {
    /// By (node name, model, status).
    requests: BTreeMap<(String, String, &'static str), RequestSeries>,
    /// By how the node was chosen; labelled (and sorted by label) only when rendered.
    decisions: HashMap<Choice, u64>,
    /// Models copied between nodes, by (source, target, outcome): how many, bytes moved, seconds.
    transfers: BTreeMap<(String, String, &'static str), (u64, u64, f64)>,
}

impl Metrics {
    /// Counts a finished attempt on the node named `node`, under the label `model`.
    pub(super) fn count(&mut self, node: String, model: String, row: &RequestRow) {
        let status = if row.ok { "ok" } else { "failed" };
        let series = self.requests.entry((node, model, status)).or_default();
        series.count += 1;
        series.output_tokens += row.output_tokens.unwrap_or(0);
        series.duration.observe(row.total_ms as f64 / 1000.0);
        if let Some(first_token) = row.time_to_first_token_ms {
            series.first_token.observe(first_token as f64 / 1000.0);
        }
        *self.decisions.entry(row.choice).or_default() += 1;
    }

    /// Counts a copy between nodes that ended, with the bytes it moved.
    pub(super) fn count_transfer(&mut self, transfer: &sollol_shared::api::Transfer, fetched: u64) {
        let outcome = match transfer.state {
            sollol_shared::api::TransferState::Done => "done",
            _ => "failed",
        };
        let series = self
            .transfers
            .entry((transfer.source.clone(), transfer.target.clone(), outcome))
            .or_default();
        series.0 += 1;
        series.1 += fetched;
        series.2 += transfer.duration_ms as f64 / 1000.0;
    }

    /// The copies between nodes, by source, target and outcome.
    fn render_transfers(&self, out: &mut String) {
        for (name, help, value) in [
            (
                "sollol_model_transfers_total",
                "Models copied between nodes (pulls served node to node), by source, target and outcome.",
                (|series: &(u64, u64, f64)| series.0.to_string()) as fn(&(u64, u64, f64)) -> String,
            ),
            (
                "sollol_model_transfer_bytes_total",
                "Bytes those copies moved.",
                |series: &(u64, u64, f64)| series.1.to_string(),
            ),
            (
                "sollol_model_transfer_seconds_total",
                "Time those copies took, summed.",
                |series: &(u64, u64, f64)| format!("{:.3}", series.2),
            ),
        ] {
            header(out, name, "counter", help);
            for ((source, target, outcome), series) in &self.transfers {
                let _ = writeln!(
                    out,
                    "{name}{{source=\"{}\",target=\"{}\",outcome=\"{outcome}\"}} {}",
                    escape(source),
                    escape(target),
                    value(series)
                );
            }
        }
    }

    /// The request counters and the latency histograms, by node, model and status.
    fn render_requests(&self, out: &mut String) {
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
            header(out, name, "counter", help);
            for (key, series) in &self.requests {
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
            header(out, name, "histogram", help);
            for (key, series) in &self.requests {
                write_histogram(out, name, &labels(key), pick(series));
            }
        }
    }

    /// The routing decisions by strategy and kind, in the order of their labels.
    fn render_decisions(&self, out: &mut String) {
        header(
            out,
            "sollol_routing_decisions_total",
            "counter",
            "Routing decisions by strategy and kind (best, affinity, exploration, failover, hedge, calibration, warmup).",
        );
        let mut decisions: Vec<(&str, &str, u64)> = self
            .decisions
            .iter()
            .map(|(choice, count)| (choice.strategy_label(), choice.kind().as_str(), *count))
            .collect();
        decisions.sort_unstable();
        for (strategy, kind, count) in decisions {
            let _ = writeln!(
                out,
                "sollol_routing_decisions_total{{strategy=\"{strategy}\",kind=\"{kind}\"}} {count}"
            );
        }
    }
}

impl Observer {
    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self, gauges: &Gauges) -> String {
        let view = self.view.load();
        let mut out = String::with_capacity(8192);
        render_build_info(&mut out);
        {
            let metrics = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
            metrics.render_requests(&mut out);
            metrics.render_decisions(&mut out);
            metrics.render_transfers(&mut out);
        }
        render_load(&mut out, &view, gauges);
        render_node_gauges(&mut out, &view);
        render_gpu_gauges(&mut out, &view);
        render_drops(&mut out, gauges);
        render_cache(&mut out, &gauges.cache);
        out
    }
}

fn render_build_info(out: &mut String) {
    header(
        out,
        "sollol_build_info",
        "gauge",
        "The running sollol version.",
    );
    let _ = writeln!(
        out,
        "sollol_build_info{{version=\"{}\"}} 1",
        escape(BUILD_VERSION)
    );
}

/// Requests in flight per node and waiting in the queue.
fn render_load(out: &mut String, view: &ClusterView, gauges: &Gauges) {
    let name_of: HashMap<&str, &str> = view
        .nodes
        .iter()
        .map(|node| (node.id.as_str(), node.name.as_str()))
        .collect();
    header(
        out,
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
        out,
        "sollol_requests_queued",
        "gauge",
        "Requests waiting in the gateway's priority queue.",
    );
    let _ = writeln!(out, "sollol_requests_queued {}", gauges.queued);
}

/// Whether each node is up, and its hardware figures.
fn render_node_gauges(out: &mut String, view: &ClusterView) {
    header(out, "sollol_node_up", "gauge", "1 when the node is up.");
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
        header(out, name, "gauge", help);
        for node in &view.nodes {
            if let Some(value) = node.hardware.as_ref().and_then(read) {
                let _ = writeln!(out, "{name}{{node=\"{}\"}} {value}", escape(&node.name));
            }
        }
    }
}

/// Each GPU's figures, by node and GPU index.
fn render_gpu_gauges(out: &mut String, view: &ClusterView) {
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
        header(out, name, "gauge", help);
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
}

/// Records the history and the learner had to drop.
fn render_drops(out: &mut String, gauges: &Gauges) {
    header(
        out,
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
        out,
        "sollol_learning_outcomes_dropped_total",
        "counter",
        "Finished requests the learner could not take (its queue was full).",
    );
    let _ = writeln!(
        out,
        "sollol_learning_outcomes_dropped_total {}",
        gauges.learning_dropped
    );
}

/// The response cache: requests answered from it and not, and what it holds.
fn render_cache(out: &mut String, cache: &CacheFigures) {
    for (name, kind, help, value) in [
        (
            "sollol_cache_hits_total",
            "counter",
            "Cacheable requests answered from the response cache, without a node.",
            cache.hits,
        ),
        (
            "sollol_cache_misses_total",
            "counter",
            "Cacheable requests the response cache had no answer for (routed to a node).",
            cache.misses,
        ),
        (
            "sollol_cache_bytes",
            "gauge",
            "Bytes the response cache holds, answers and bookkeeping.",
            cache.bytes,
        ),
        (
            "sollol_cache_entries",
            "gauge",
            "Answers the response cache holds.",
            cache.entries,
        ),
    ] {
        header(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::SharedView;
    use crate::history::{Outcome, RequestRow};
    use sollol_policy::routing::{DecisionKind, Strategy};
    use std::sync::Arc;

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

    /// The decisions' labels come from the choice each attempt carries, sorted by label, calibrations
    /// under their own strategy label; nothing is read out of the reason's words.
    #[test]
    fn decisions_are_counted_by_strategy_and_kind() {
        let view: SharedView = Arc::new(arc_swap::ArcSwap::from_pointee(
            crate::cluster::ClusterView::default(),
        ));
        let observer = Observer::new(view);
        let row = |choice: Choice, reason: &str| {
            RequestRow::of(
                &Outcome {
                    node_id: "n".to_owned(),
                    model: "m".to_owned(),
                    path: "/api/chat".to_owned(),
                    app: "test".to_owned(),
                    ok: true,
                    time_to_first_byte: std::time::Duration::ZERO,
                    total: std::time::Duration::ZERO,
                    timings: None,
                    choice,
                    reason: reason.to_owned(),
                    candidates: Arc::from([]),
                    concurrent: 0,
                },
                0,
            )
        };
        let intelligent = |kind| Choice::routed(Strategy::Intelligent, kind);
        for (choice, reason) in [
            (
                intelligent(DecisionKind::Failover),
                "failover #1 after: a: HTTP 500",
            ),
            (
                intelligent(DecisionKind::Hedge),
                "hedged: a had not answered after 300 ms",
            ),
            (
                intelligent(DecisionKind::Affinity),
                "prefix affinity: a served this conversation",
            ),
            (
                intelligent(DecisionKind::Best),
                "lowest predicted time 120ms",
            ),
            (
                intelligent(DecisionKind::Best),
                "lowest predicted time 90ms",
            ),
            (
                Choice::routed(Strategy::RoundRobin, DecisionKind::Best),
                "round robin",
            ),
            (
                Choice::CALIBRATION,
                "measuring a node never measured with this model",
            ),
            // A reason that mentions a failover is still counted by its kind.
            (
                intelligent(DecisionKind::Exploration),
                "exploring unmeasured node failover-spare",
            ),
        ] {
            observer.finished(&row(choice, reason));
        }
        let exposition = observer.render(&Gauges::default());
        let decisions: Vec<&str> = exposition
            .lines()
            .filter(|line| line.starts_with("sollol_routing_decisions_total{"))
            .collect();
        assert_eq!(
            decisions,
            [
                "sollol_routing_decisions_total{strategy=\"calibration\",kind=\"calibration\"} 1",
                "sollol_routing_decisions_total{strategy=\"intelligent\",kind=\"affinity\"} 1",
                "sollol_routing_decisions_total{strategy=\"intelligent\",kind=\"best\"} 2",
                "sollol_routing_decisions_total{strategy=\"intelligent\",kind=\"exploration\"} 1",
                "sollol_routing_decisions_total{strategy=\"intelligent\",kind=\"failover\"} 1",
                "sollol_routing_decisions_total{strategy=\"intelligent\",kind=\"hedge\"} 1",
                "sollol_routing_decisions_total{strategy=\"round_robin\",kind=\"best\"} 1",
            ]
        );
    }

    /// Any client may name any model; only models a node lists get a series of their own.
    #[test]
    fn models_no_node_lists_share_one_label() {
        let view = crate::cluster::ClusterView {
            backends: vec![Arc::new(crate::cluster::Backend {
                node_id: "n".to_owned(),
                name: "gpu1".to_owned(),
                base_url: "http://127.0.0.1:1".to_owned(),
                models: vec!["llama3.2:3b".to_owned()],
                digests: vec!["a80c4f17acd5".to_owned()],
                loaded: Vec::new(),
                reported_ms: 0,
            })],
            ..crate::cluster::ClusterView::default()
        };
        let observer = Observer::new(Arc::new(arc_swap::ArcSwap::from_pointee(view)));
        for model in [
            "llama3.2:3b",
            "made-up-1:latest",
            "made-up-2:latest",
            "typo:3b",
        ] {
            let outcome = Outcome {
                node_id: "n".to_owned(),
                model: model.to_owned(),
                path: "/api/pull".to_owned(),
                app: "test".to_owned(),
                ok: true,
                time_to_first_byte: std::time::Duration::ZERO,
                total: std::time::Duration::ZERO,
                timings: None,
                choice: Choice::routed(Strategy::Intelligent, DecisionKind::Best),
                reason: String::new(),
                candidates: Arc::from([]),
                concurrent: 0,
            };
            observer.finished(&RequestRow::of(&outcome, 0));
        }
        let exposition = observer.render(&Gauges::default());
        let counts: Vec<&str> = exposition
            .lines()
            .filter(|line| line.starts_with("sollol_requests_total{"))
            .collect();
        assert_eq!(
            counts,
            [
                "sollol_requests_total{node=\"n\",model=\"llama3.2:3b\",status=\"ok\"} 1",
                "sollol_requests_total{node=\"n\",model=\"other\",status=\"ok\"} 3",
            ]
        );
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
