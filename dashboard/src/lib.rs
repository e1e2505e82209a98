//! The sollol dashboard: a client-side rendered Leptos app over the coordinator's `/api/sollol/v1` API.
//!
//! Snapshots come from the JSON API; changes arrive live over Server-Sent
//! Events (`/api/sollol/v1/events`): node status, hardware samples and load,
//! and every finished request with its routing decision. Window statistics
//! are re-read every few seconds. Everything is served by the coordinator;
//! the page loads nothing from other hosts.

mod format;

use std::collections::{BTreeMap, VecDeque};

use leptos::prelude::*;
use serde::de::DeserializeOwned;
use sollol_shared::api::{
    API_PREFIX, Aggregate, ClusterSummary, DistributedList, DistributedModel, LiveEvent, Node,
    NodeDetail, NodeList, NodeStatus, PlanPhase, RequestEntry, RequestList, RequestStatus, Stats,
    StatsWindow,
};
use wasm_bindgen::JsCast;
use wasm_bindgen::closure::Closure;
use wasm_bindgen_futures::JsFuture;

/// Finished requests kept in the live feed.
const FEED_LENGTH: usize = 40;
/// How often statistics and the summary are re-read.
const STATS_EVERY_MS: u64 = 5000;
/// How often a node's page re-reads its detail.
const DETAIL_EVERY_MS: u64 = 3000;
/// Delay before a closed event stream is opened again.
const RECONNECT_MS: i32 = 3000;

#[derive(Clone, Debug, PartialEq)]
enum Connection {
    Connecting,
    Live,
    Lost(String),
}

#[derive(Clone, Debug, PartialEq)]
enum Route {
    Overview,
    Node(String),
}

impl Route {
    fn from_hash(hash: &str) -> Self {
        match hash.trim_start_matches('#').strip_prefix("/node/") {
            Some(id) if !id.is_empty() => Self::Node(id.to_owned()),
            _ => Self::Overview,
        }
    }
}

/// Everything the page shows; every field is a signal, so the store is `Copy`.
#[derive(Clone, Copy)]
struct Store {
    summary: RwSignal<Option<ClusterSummary>>,
    /// `None` until the first node list arrives.
    nodes: RwSignal<Option<Vec<Node>>>,
    loads: RwSignal<BTreeMap<String, u32>>,
    feed: RwSignal<VecDeque<RequestEntry>>,
    /// Requests finished since this page opened, from the live stream.
    finished_live: RwSignal<u64>,
    stats: RwSignal<Option<Stats>>,
    /// Models served split across agents, with their pipelines (empty when none).
    distributed: RwSignal<Vec<DistributedModel>>,
    window: RwSignal<StatsWindow>,
    connection: RwSignal<Connection>,
    /// The last failed API read, cleared by the next good one.
    error: RwSignal<Option<String>>,
    route: RwSignal<Route>,
    detail: RwSignal<Option<NodeDetail>>,
    /// Browser time, advanced every second so "last seen" ages.
    now_ms: RwSignal<f64>,
}

impl Store {
    fn new() -> Self {
        Self {
            summary: RwSignal::new(None),
            nodes: RwSignal::new(None),
            loads: RwSignal::new(BTreeMap::new()),
            feed: RwSignal::new(VecDeque::new()),
            finished_live: RwSignal::new(0),
            stats: RwSignal::new(None),
            distributed: RwSignal::new(Vec::new()),
            window: RwSignal::new(StatsWindow::FiveMinutes),
            connection: RwSignal::new(Connection::Connecting),
            error: RwSignal::new(None),
            route: RwSignal::new(Route::from_hash(&location_hash())),
            detail: RwSignal::new(None),
            now_ms: RwSignal::new(js_sys::Date::now()),
        }
    }

    fn apply(self, event: LiveEvent) {
        match event {
            LiveEvent::Node { node, load } => {
                self.loads.update(|loads| {
                    loads.insert(node.id.clone(), load.in_flight);
                });
                self.nodes.update(|nodes| {
                    let nodes = nodes.get_or_insert_with(Vec::new);
                    match nodes.iter_mut().find(|known| known.id == node.id) {
                        Some(known) => *known = node,
                        None => {
                            nodes.push(node);
                            nodes.sort_by(|a, b| a.name.cmp(&b.name));
                        }
                    }
                });
            }
            LiveEvent::Finished { request } => {
                self.finished_live.update(|count| *count += 1);
                self.feed.update(|feed| {
                    feed.push_front(request);
                    feed.truncate(FEED_LENGTH);
                });
            }
            LiveEvent::Routed { .. } => {}
            LiveEvent::Lagged { .. } => load_snapshot(self),
        }
    }
}

#[component]
pub fn App() -> impl IntoView {
    let store = Store::new();
    load_snapshot(store);
    load_stats(store);
    connect_live(store);
    let _ = set_interval_with_handle(
        move || load_stats(store),
        std::time::Duration::from_millis(STATS_EVERY_MS),
    );
    let _ = set_interval_with_handle(
        move || store.now_ms.set(js_sys::Date::now()),
        std::time::Duration::from_millis(1000),
    );
    let _ = set_interval_with_handle(
        move || {
            if let Route::Node(id) = store.route.get_untracked() {
                load_detail(store, id);
            }
        },
        std::time::Duration::from_millis(DETAIL_EVERY_MS),
    );
    let hash_listener = window_event_listener(leptos::ev::hashchange, move |_| {
        let route = Route::from_hash(&location_hash());
        if let Route::Node(id) = &route {
            store.detail.set(None);
            load_detail(store, id.clone());
        }
        store.route.set(route);
    });
    std::mem::forget(hash_listener);
    if let Route::Node(id) = store.route.get_untracked() {
        load_detail(store, id);
    }
    view! {
        <header>
            <a class="brand" href="#/">"sollol"</a>
            <span class="subtitle">"cluster dashboard"</span>
            <ConnectionBadge store=store/>
        </header>
        {move || store.error.get().map(|error| view! {
            <p class="banner error" role="alert">"Cannot read the coordinator's API: " {error} " — retrying."</p>
        })}
        <main>
            {move || match store.route.get() {
                Route::Overview => view! { <Overview store=store/> }.into_any(),
                Route::Node(id) => view! { <NodePage store=store id=id/> }.into_any(),
            }}
        </main>
    }
}

#[component]
fn ConnectionBadge(store: Store) -> impl IntoView {
    move || {
        match store.connection.get() {
        Connection::Connecting => {
            view! { <span class="badge connecting" id="connection">"connecting…"</span> }.into_any()
        }
        Connection::Live => view! { <span class="badge live" id="connection">"live"</span> }.into_any(),
        Connection::Lost(reason) => view! {
            <span class="badge lost" id="connection" title=reason>"disconnected — reconnecting"</span>
        }
        .into_any(),
    }
    }
}

#[component]
fn Overview(store: Store) -> impl IntoView {
    view! {
        <Summary store=store/>
        <NodeCards store=store/>
        <Pipelines store=store/>
        <section class="panel">
            <div class="panel-head">
                <h2>"Traffic"</h2>
                <WindowPicker store=store/>
            </div>
            <Charts store=store/>
        </section>
        <div class="columns">
            <section class="panel">
                <h2>"Models"</h2>
                <AggregateTable store=store pick=|stats: &Stats| stats.by_model.clone() label="Model" id="models"/>
            </section>
            <section class="panel">
                <h2>"Applications"</h2>
                <AggregateTable store=store pick=|stats: &Stats| stats.by_app.clone() label="Application" id="apps"/>
            </section>
        </div>
        <section class="panel">
            <h2>"Live requests"</h2>
            <Feed store=store/>
        </section>
    }
}

/// Distributed models: each one's pipeline, stage by stage, and what a token costs.
#[component]
fn Pipelines(store: Store) -> impl IntoView {
    move || {
        let models = store.distributed.get();
        (!models.is_empty()).then(|| {
            view! {
                <section class="panel" id="pipelines">
                    <h2>"Distributed models"</h2>
                    {models.into_iter().map(|model| view! { <PipelineView model=model/> }).collect_view()}
                </section>
            }
        })
    }
}

#[component]
fn PipelineView(model: DistributedModel) -> impl IntoView {
    let figure = |value: Option<f64>, unit: &str, digits: usize| {
        value.map_or_else(
            || "–".to_owned(),
            |value| format!("{value:.digits$} {unit}"),
        )
    };
    let summary = if model.planned {
        format!(
            "{} stages · {} · {} per hop · {} per token · {} re-plans",
            model.stages.len(),
            figure(model.tokens_per_second, "tokens/s", 1),
            figure(model.hop_ms, "ms", 2),
            model
                .bytes_per_token
                .map_or_else(|| "–".to_owned(), |bytes| format::bytes(bytes as u64)),
            model.replans
        )
    } else if let Some(planning) = &model.planning {
        let seconds = planning.elapsed_ms as f64 / 1e3;
        match planning.phase {
            PlanPhase::Describing => format!("planning: describing the agents ({seconds:.1} s)"),
            PlanPhase::Loading => format!(
                "planning: loading the stages ({seconds:.1} s): {}",
                planning
                    .stages
                    .iter()
                    .map(|stage| format!(
                        "{} {}–{} {}{}",
                        stage.name,
                        stage.layers_start,
                        stage.layers_end.saturating_sub(1),
                        if stage.loaded { "✓" } else { "…" },
                        if stage.fetch_total_bytes > 0 && !stage.loaded {
                            format!(
                                ", fetched {} of {}",
                                format::bytes(stage.fetched_bytes),
                                format::bytes(stage.fetch_total_bytes)
                            )
                        } else {
                            String::new()
                        }
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    } else {
        "not planned yet: the first request plans it".to_owned()
    };
    view! {
        <div class="pipeline" data-model=model.model.clone()>
            <div class="pipeline-head"><strong>{model.model.clone()}</strong> " " <span class="muted">{summary}</span></div>
            <ol class="stages">
                {model.stages.iter().map(|stage| {
                    let mut roles = Vec::new();
                    if stage.embed { roles.push("embeddings"); }
                    if stage.head { roles.push("head, sampling"); }
                    view! {
                        <li class="stage">
                            <a href=format!("#/node/{}", stage.node_id)>{stage.name.clone()}</a>
                            <div class="stage-layers">{format!("layers {}–{}", stage.layers_start, stage.layers_end.saturating_sub(1))}</div>
                            <div class="muted">{roles.join(", ")}</div>
                            <div class="muted">{format!("{} resident", format::bytes(stage.resident_bytes))}</div>
                            <div class="muted">{figure(stage.compute_ms_per_token, "ms/token", 2)}</div>
                        </li>
                    }
                }).collect_view()}
            </ol>
            {model.last_error.clone().map(|error| view! { <p class="state error">"last error: " {error}</p> })}
            {(!model.reasons.is_empty()).then(|| view! {
                <details><summary>"why this plan"</summary>
                    <ul>{model.reasons.iter().map(|reason| view! { <li>{reason.clone()}</li> }).collect_view()}</ul>
                </details>
            })}
        </div>
    }
}

#[component]
fn Summary(store: Store) -> impl IntoView {
    move || {
        let nodes = store.nodes.get().unwrap_or_default();
        let count = |status: NodeStatus| nodes.iter().filter(|node| node.status == status).count();
        let in_flight: u32 = store.loads.get().values().sum();
        let window_requests = store.stats.get().map(|stats| stats.total.requests);
        let version = store
            .summary
            .get()
            .map(|summary| summary.build_version)
            .unwrap_or_default();
        view! {
            <section class="summary" id="summary">
                <div class="stat"><b>{nodes.len()}</b>" nodes"</div>
                <div class="stat up"><b>{count(NodeStatus::Up)}</b>" up"</div>
                <div class="stat suspect"><b>{count(NodeStatus::Suspect)}</b>" suspect"</div>
                <div class="stat down"><b>{count(NodeStatus::Down)}</b>" down"</div>
                <div class="stat"><b id="in-flight">{in_flight}</b>" in flight"</div>
                <div class="stat"><b id="requests-live">{store.finished_live.get()}</b>" requests since opened"</div>
                <div class="stat"><b id="requests-window">{window_requests.map_or("–".to_owned(), |count| count.to_string())}</b>
                    " in the last " {store.window.get().as_str()}</div>
                <div class="version">"sollol " {version}</div>
            </section>
        }
    }
}

#[component]
fn NodeCards(store: Store) -> impl IntoView {
    move || {
        match store.nodes.get() {
        None => view! { <p class="state">"Loading nodes…"</p> }.into_any(),
        Some(nodes) if nodes.is_empty() => view! {
            <p class="state" id="no-nodes">"No nodes yet. Run "<code>"sollol agent --join HOST:PORT --token TOKEN"</code>
            " on a machine, or list plain Ollama servers in "<code>"coordinator.nodes"</code>"."</p>
        }
        .into_any(),
        Some(nodes) => {
            let loads = store.loads.get();
            let now = store.now_ms.get();
            view! {
                <section class="cards" id="nodes">
                    {nodes.into_iter().map(|node| {
                        let in_flight = loads.get(&node.id).copied().unwrap_or(0);
                        view! { <NodeCard node=node in_flight=in_flight now=now/> }
                    }).collect_view()}
                </section>
            }
            .into_any()
        }
    }
    }
}

#[component]
fn NodeCard(node: Node, in_flight: u32, now: f64) -> impl IntoView {
    let status = node.status.as_str();
    let hardware = node.hardware.clone();
    let bars = hardware.map(|hardware| {
        let used = hardware
            .memory
            .total_bytes
            .saturating_sub(hardware.memory.available_bytes);
        let cpu = hardware.cpu.utilisation_percent.map(f64::from);
        let gpus = hardware
            .gpus
            .iter()
            .map(|gpu| {
                let utilisation = gpu.utilisation_percent.map(f64::from);
                view! {
                    <Bar label=format!("GPU {}", gpu.index) value=utilisation.unwrap_or(0.0)
                        text=utilisation.map_or("–".to_owned(), |percent| format!("{percent:.0}%"))/>
                    <Bar label="VRAM".to_owned()
                        value=format::percent(gpu.vram_used_bytes as f64, gpu.vram_total_bytes as f64)
                        text=format!("{} / {}", format::bytes(gpu.vram_used_bytes), format::bytes(gpu.vram_total_bytes))/>
                }
            })
            .collect_view();
        let temperature = hardware
            .temperatures
            .iter()
            .map(|reading| reading.celsius)
            .reduce(f32::max);
        view! {
            <Bar label="CPU".to_owned() value=cpu.unwrap_or(0.0)
                text=cpu.map_or("–".to_owned(), |percent| format!("{percent:.0}% of {}", hardware.cpu.logical_cores))/>
            <Bar label="RAM".to_owned()
                value=format::percent(used as f64, hardware.memory.total_bytes as f64)
                text=format!("{} / {}", format::bytes(used), format::bytes(hardware.memory.total_bytes))/>
            {gpus}
            <p class="fact">"Temperature: " {temperature.map_or("no sensor".to_owned(), |celsius| format!("{celsius:.0} °C"))}</p>
        }
    });
    let ollama = node.ollama.clone().map(|ollama| {
        let loaded: Vec<String> = ollama.loaded.iter().map(|model| model.name.clone()).collect();
        view! {
            <p class="fact">"Models: " {ollama.models.len()} " installed, loaded: "
                <span class="loaded">{if loaded.is_empty() { "none".to_owned() } else { loaded.join(", ") }}</span></p>
        }
    });
    view! {
        <article class=format!("card {status}") data-status=status data-name=node.name.clone()>
            <h3><a href=format!("#/node/{}", node.id)>{node.name.clone()}</a>
                <span class=format!("pill {status}")>{status}</span></h3>
            {bars}
            {ollama}
            <p class="fact">"In flight: " <b class="in-flight">{in_flight}</b>
                " · last seen " {format::ago(now, node.last_seen_ms)}</p>
        </article>
    }
}

#[component]
fn Bar(label: String, value: f64, text: String) -> impl IntoView {
    let level = if value >= 90.0 {
        "high"
    } else if value >= 70.0 {
        "mid"
    } else {
        "low"
    };
    view! {
        <div class="bar">
            <span class="bar-label">{label}</span>
            <span class="bar-track"><span class=format!("bar-fill {level}") style=format!("width: {value:.0}%")></span></span>
            <span class="bar-text">{text}</span>
        </div>
    }
}

#[component]
fn WindowPicker(store: Store) -> impl IntoView {
    view! {
        <select id="window" aria-label="Statistics window" on:change=move |event| {
            if let Some(window) = StatsWindow::parse(&event_target_value(&event)) {
                store.window.set(window);
                store.stats.set(None);
                load_stats(store);
            }
        }>
            {StatsWindow::ALL.into_iter().map(|window| view! {
                <option value=window.as_str() selected=move || store.window.get() == window>{window.as_str()}</option>
            }).collect_view()}
        </select>
    }
}

#[component]
fn Charts(store: Store) -> impl IntoView {
    move || match store.stats.get() {
        None => view! { <p class="state">"Loading statistics…"</p> }.into_any(),
        Some(stats) if stats.total.requests == 0 => view! {
            <p class="state" id="no-traffic">"No requests in the last " {stats.window.as_str()}
                ". Point an Ollama or OpenAI client at this coordinator's address."</p>
        }
        .into_any(),
        Some(stats) => {
            let pick = |read: fn(&sollol_shared::api::Percentiles) -> u64,
                        from: fn(
                &sollol_shared::api::SeriesPoint,
            ) -> Option<sollol_shared::api::Percentiles>| {
                stats
                    .series
                    .iter()
                    .map(|point| from(point).map(|value| read(&value) as f64))
                    .collect::<Vec<_>>()
            };
            let latency = |point: &sollol_shared::api::SeriesPoint| point.latency_ms;
            let first_token =
                |point: &sollol_shared::api::SeriesPoint| point.time_to_first_token_ms;
            let latency_lines = vec![
                ("p50", pick(|p| p.p50, latency)),
                ("p95", pick(|p| p.p95, latency)),
                ("p99", pick(|p| p.p99, latency)),
                ("ttft-p95", pick(|p| p.p95, first_token)),
            ];
            let throughput = vec![(
                "tokens",
                stats
                    .series
                    .iter()
                    .map(|point| Some(point.tokens_per_second))
                    .collect(),
            )];
            let total = stats.total.clone();
            view! {
                <div class="charts">
                    <Chart title="Latency (ms): p50, p95, p99 and time to first token p95".to_owned() lines=latency_lines/>
                    <Chart title="Throughput (generated tokens/s)".to_owned() lines=throughput/>
                </div>
                <p class="fact">{total.requests} " requests, " {total.errors} " failed · p50 "
                    {total.latency_ms.map_or("–".to_owned(), |p| format::millis(p.p50))} " · p95 "
                    {total.latency_ms.map_or("–".to_owned(), |p| format::millis(p.p95))} " · p99 "
                    {total.latency_ms.map_or("–".to_owned(), |p| format::millis(p.p99))} " · first token p95 "
                    {total.time_to_first_token_ms.map_or("–".to_owned(), |p| format::millis(p.p95))}</p>
            }
            .into_any()
        }
    }
}

/// A line chart; each line is (CSS class, values oldest first).
#[component]
fn Chart(title: String, lines: Vec<(&'static str, Vec<Option<f64>>)>) -> impl IntoView {
    const WIDTH: f64 = 600.0;
    const HEIGHT: f64 = 140.0;
    let max = lines
        .iter()
        .flat_map(|(_, values)| values.iter().flatten())
        .copied()
        .fold(0.0, f64::max);
    let top = format::nice_top(max);
    let legend = lines
        .iter()
        .map(|(class, _)| view! { <span class=format!("key {class}")>{*class}</span> })
        .collect_view();
    // A dot per point as well: a lone point draws no line.
    let paths = lines
        .iter()
        .map(|(class, values)| {
            let dots = format::points(values, WIDTH, HEIGHT, top)
                .into_iter()
                .map(|(x, y)| view! { <circle class=format!("dot {class}") cx=x cy=y r="2.5"/> })
                .collect_view();
            view! {
                <polyline class=format!("line {class}") points=format::polyline(values, WIDTH, HEIGHT, top)/>
                {dots}
            }
        })
        .collect_view();
    view! {
        <figure class="chart">
            <figcaption>{title} " · top of scale " {top}</figcaption>
            <svg viewBox=format!("0 0 {WIDTH} {HEIGHT}") preserveAspectRatio="none" role="img">
                <line class="axis" x1="0" y1=HEIGHT x2=WIDTH y2=HEIGHT/>
                {paths}
            </svg>
            <div class="legend">{legend}</div>
        </figure>
    }
}

#[component]
fn AggregateTable(
    store: Store,
    pick: fn(&Stats) -> Vec<Aggregate>,
    label: &'static str,
    id: &'static str,
) -> impl IntoView {
    move || {
        let rows = store
            .stats
            .get()
            .map(|stats| pick(&stats))
            .unwrap_or_default();
        if rows.is_empty() {
            return view! { <p class="state">"Nothing in this window yet."</p> }.into_any();
        }
        view! {
            <table id=id>
                <thead><tr><th>{label}</th><th>"Requests"</th><th>"Errors"</th><th>"p50"</th><th>"p95"</th><th>"tokens/s"</th></tr></thead>
                <tbody>
                    {rows.into_iter().map(|row| view! {
                        <tr>
                            <td>{row.key}</td>
                            <td>{row.requests}</td>
                            <td>{format!("{:.0}%", row.error_rate * 100.0)}</td>
                            <td>{row.latency_ms.map_or("–".to_owned(), |p| format::millis(p.p50))}</td>
                            <td>{row.latency_ms.map_or("–".to_owned(), |p| format::millis(p.p95))}</td>
                            <td>{row.tokens_per_second.map_or("–".to_owned(), |rate| format!("{rate:.0}"))}</td>
                        </tr>
                    }).collect_view()}
                </tbody>
            </table>
        }
        .into_any()
    }
}

#[component]
fn Feed(store: Store) -> impl IntoView {
    move || {
        let feed = store.feed.get();
        if feed.is_empty() {
            return view! { <p class="state" id="feed-empty">"Waiting for requests…"</p> }
                .into_any();
        }
        view! {
            <ol class="feed" id="feed">
                {feed.into_iter().map(|entry| view! { <FeedEntry entry=entry/> }).collect_view()}
            </ol>
        }
        .into_any()
    }
}

#[component]
fn FeedEntry(entry: RequestEntry) -> impl IntoView {
    let status = entry.status.as_str();
    let candidates = entry
        .decision
        .candidates
        .iter()
        .map(|candidate| {
            format!(
                "{} {}",
                candidate.node,
                format::millis(candidate.predicted_ms)
            )
        })
        .collect::<Vec<_>>()
        .join(" · ");
    view! {
        <li class=format!("request {status}")>
            <div class="request-line">
                <b>{entry.model}</b>" → "<b class="request-node">{entry.node}</b>
                <span class="muted">{entry.path}" · "{entry.app}</span>
                <span class="request-time">{format::millis(entry.total_ms)}
                    {entry.tokens_per_second.map(|rate| format!(" · {rate:.0} tok/s"))}</span>
                {(entry.status == RequestStatus::Failed).then(|| view! { <span class="pill down">"failed"</span> })}
            </div>
            <div class="decision">{entry.decision.strategy}": "{entry.decision.reason}
                {(!candidates.is_empty()).then(|| view! { <span class="muted">" [" {candidates} "]"</span> })}</div>
        </li>
    }
}

#[component]
fn NodePage(store: Store, id: String) -> impl IntoView {
    view! {
        <p><a href="#/">"← all nodes"</a></p>
        {move || match store.detail.get() {
            None => view! { <p class="state">"Loading node " {id.clone()} "…"</p> }.into_any(),
            Some(detail) => view! { <NodeDetailView detail=detail now=store.now_ms.get()/> }.into_any(),
        }}
    }
}

#[component]
fn NodeDetailView(detail: NodeDetail, now: f64) -> impl IntoView {
    let node = detail.node.clone();
    let memory: Vec<Option<f64>> = detail
        .samples
        .iter()
        .map(|sample| {
            Some(format::percent(
                sample.memory_used_bytes as f64,
                sample.memory_total_bytes as f64,
            ))
        })
        .collect();
    let cpu: Vec<Option<f64>> = detail
        .samples
        .iter()
        .map(|sample| sample.cpu_percent.map(f64::from))
        .collect();
    let vram: Vec<Option<f64>> = detail
        .samples
        .iter()
        .map(|sample| {
            (sample.vram_total_bytes > 0).then(|| {
                format::percent(
                    sample.vram_used_bytes as f64,
                    sample.vram_total_bytes as f64,
                )
            })
        })
        .collect();
    let samples = detail.samples.len();
    view! {
        <section class="panel" id="node-detail">
            <NodeCard node=node in_flight=detail.load.in_flight now=now/>
        </section>
        <section class="panel">
            <h2>"Hardware since the coordinator started (" {samples} " samples)"</h2>
            <Chart title="CPU, RAM and VRAM in use (%)".to_owned()
                lines=vec![("cpu", cpu), ("ram", memory), ("vram", vram)]/>
        </section>
        <section class="panel">
            <h2>"Recent requests"</h2>
            {if detail.requests.is_empty() {
                view! { <p class="state">"No requests on this node yet."</p> }.into_any()
            } else {
                view! { <ol class="feed">{detail.requests.into_iter().map(|entry| view! { <FeedEntry entry=entry/> }).collect_view()}</ol> }.into_any()
            }}
        </section>
        <section class="panel">
            <h2>"Events"</h2>
            <ul class="events">
                {detail.events.into_iter().map(|event| view! {
                    <li><span class=format!("pill {}", event.kind.as_str())>{event.kind.as_str()}</span>" "
                        {format::ago(now, event.at_ms)}" "<span class="muted">{event.detail}</span></li>
                }).collect_view()}
            </ul>
        </section>
    }
}

fn location_hash() -> String {
    web_sys::window()
        .and_then(|window| window.location().hash().ok())
        .unwrap_or_default()
}

fn load_snapshot(store: Store) {
    leptos::task::spawn_local(async move {
        let summary = get_json::<ClusterSummary>(&format!("{API_PREFIX}/cluster")).await;
        let nodes = get_json::<NodeList>(&format!("{API_PREFIX}/nodes")).await;
        let recent =
            get_json::<RequestList>(&format!("{API_PREFIX}/requests?limit={FEED_LENGTH}")).await;
        match (summary, nodes) {
            (Ok(summary), Ok(list)) => {
                store.summary.set(Some(summary));
                store.loads.set(
                    list.load
                        .into_iter()
                        .map(|(id, load)| (id, load.in_flight))
                        .collect(),
                );
                store.nodes.set(Some(list.nodes));
                store.error.set(None);
            }
            (Err(error), _) | (_, Err(error)) => store.error.set(Some(error)),
        }
        if let Ok(recent) = recent {
            store.feed.set(recent.requests.into_iter().collect());
        }
    });
}

fn load_stats(store: Store) {
    leptos::task::spawn_local(async move {
        let window = store.window.get_untracked();
        match get_json::<Stats>(&format!("{API_PREFIX}/stats?window={}", window.as_str())).await {
            Ok(stats) if stats.window == store.window.get_untracked() => {
                store.stats.set(Some(stats));
                store.error.set(None);
            }
            Ok(_) => {}
            Err(error) => store.error.set(Some(error)),
        }
        if let Ok(summary) = get_json::<ClusterSummary>(&format!("{API_PREFIX}/cluster")).await {
            store.summary.set(Some(summary));
        }
        if let Ok(list) = get_json::<DistributedList>(&format!("{API_PREFIX}/distributed")).await {
            store.distributed.set(list.models);
        }
    });
}

fn load_detail(store: Store, id: String) {
    leptos::task::spawn_local(async move {
        match get_json::<NodeDetail>(&format!("{API_PREFIX}/nodes/{id}")).await {
            Ok(detail) if store.route.get_untracked() == Route::Node(id) => {
                store.detail.set(Some(detail))
            }
            Ok(_) => {}
            Err(error) => store.error.set(Some(error)),
        }
    });
}

/// Opens the live event stream. The browser retries a dropped stream by itself; one it gave up on is
/// opened again after `RECONNECT_MS`.
fn connect_live(store: Store) {
    let Ok(source) = web_sys::EventSource::new(&format!("{API_PREFIX}/events")) else {
        store.connection.set(Connection::Lost(
            "this browser has no EventSource".to_owned(),
        ));
        return;
    };
    let on_open = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| {
        store.connection.set(Connection::Live);
        load_snapshot(store);
        load_stats(store);
    });
    source.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    on_open.forget();
    let watched = source.clone();
    let on_error = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| {
        store.connection.set(Connection::Lost(
            "the live connection to the coordinator dropped".to_owned(),
        ));
        if watched.ready_state() == web_sys::EventSource::CLOSED {
            let retry = Closure::once_into_js(move || connect_live(store));
            if let Some(window) = web_sys::window() {
                let _ = window.set_timeout_with_callback_and_timeout_and_arguments_0(
                    retry.unchecked_ref(),
                    RECONNECT_MS,
                );
            }
        }
    });
    source.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    on_error.forget();
    for name in ["node", "routed", "finished", "lagged"] {
        let listener = Closure::<dyn FnMut(web_sys::MessageEvent)>::new(
            move |message: web_sys::MessageEvent| {
                let Some(data) = message.data().as_string() else {
                    return;
                };
                if let Ok(event) = serde_json::from_str::<LiveEvent>(&data) {
                    store.apply(event);
                }
            },
        );
        let _ = source.add_event_listener_with_callback(name, listener.as_ref().unchecked_ref());
        listener.forget();
    }
}

async fn get_json<T: DeserializeOwned>(path: &str) -> Result<T, String> {
    let window = web_sys::window().ok_or("no window")?;
    let response = JsFuture::from(window.fetch_with_str(path))
        .await
        .map_err(|_| "network error".to_owned())?;
    let response: web_sys::Response = response
        .dyn_into()
        .map_err(|_| "not a response".to_owned())?;
    if !response.ok() {
        return Err(format!("HTTP {} from {path}", response.status()));
    }
    let text = JsFuture::from(response.text().map_err(|_| "unreadable body".to_owned())?)
        .await
        .map_err(|_| "unreadable body".to_owned())?;
    let text = text.as_string().ok_or("body is not text")?;
    serde_json::from_str(&text).map_err(|error| format!("unexpected JSON from {path}: {error}"))
}
