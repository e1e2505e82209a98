//! The sollol dashboard: a client-side rendered Leptos app that reads the coordinator's `/api/sollol/v1` API.
//!
//! This first version shows the cluster summary and the node table, refreshed
//! every two seconds. It uses only the `sollol-shared` types and the browser's
//! `fetch`; it has no server functions and loads nothing from other hosts.

use leptos::prelude::*;
use serde::de::DeserializeOwned;
use sollol_shared::api::{API_PREFIX, ClusterSummary, Node, NodeList};
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

const REFRESH_MS: u64 = 2000;

/// What the page shows: the latest answer from the API, or why there is none.
#[derive(Clone, Debug, PartialEq)]
enum Snapshot {
    Loading,
    Ready {
        summary: ClusterSummary,
        nodes: Vec<Node>,
    },
    Failed(String),
}

#[component]
pub fn App() -> impl IntoView {
    let (snapshot, set_snapshot) = signal(Snapshot::Loading);
    let refresh = move || {
        leptos::task::spawn_local(async move {
            set_snapshot.set(load().await);
        });
    };
    refresh();
    let _ = set_interval_with_handle(refresh, std::time::Duration::from_millis(REFRESH_MS));
    view! {
        <header>
            <h1>"sollol"</h1>
            <span class="subtitle">"cluster dashboard"</span>
        </header>
        <main>
            {move || match snapshot.get() {
                Snapshot::Loading => view! { <p class="state">"Loading…"</p> }.into_any(),
                Snapshot::Failed(reason) => view! {
                    <p class="state error">"Cannot reach the coordinator: " {reason} " (retrying)"</p>
                }.into_any(),
                Snapshot::Ready { summary, nodes } => view! {
                    <Summary summary=summary/>
                    <NodeTable nodes=nodes/>
                }.into_any(),
            }}
        </main>
    }
}

#[component]
fn Summary(summary: ClusterSummary) -> impl IntoView {
    view! {
        <section class="summary" id="summary">
            <div><b>{summary.nodes_total}</b>" nodes"</div>
            <div class="up"><b>{summary.nodes_up}</b>" up"</div>
            <div class="suspect"><b>{summary.nodes_suspect}</b>" suspect"</div>
            <div class="down"><b>{summary.nodes_down}</b>" down"</div>
            <div class="left"><b>{summary.nodes_left}</b>" left"</div>
            <div class="version">"sollol " {summary.build_version}</div>
        </section>
    }
}

#[component]
fn NodeTable(nodes: Vec<Node>) -> impl IntoView {
    if nodes.is_empty() {
        return view! {
            <p class="state">"No nodes yet. Run "<code>"sollol agent --join HOST:PORT --token TOKEN"</code>" on a machine."</p>
        }
        .into_any();
    }
    let rows = nodes
        .into_iter()
        .map(|node| {
            let hardware = node.hardware.clone();
            let cores = hardware
                .as_ref()
                .map_or("–".to_owned(), |hw| hw.cpu.logical_cores.to_string());
            let ram = hardware.as_ref().map_or("–".to_owned(), |hw| {
                let used = hw
                    .memory
                    .total_bytes
                    .saturating_sub(hw.memory.available_bytes);
                format!("{} / {}", gib(used), gib(hw.memory.total_bytes))
            });
            let gpus = hardware.as_ref().map_or("–".to_owned(), |hw| {
                if hw.gpus.is_empty() {
                    "none".to_owned()
                } else {
                    hw.gpus
                        .iter()
                        .map(|gpu| {
                            format!(
                                "{} ({} / {})",
                                gpu.name,
                                gib(gpu.vram_used_bytes),
                                gib(gpu.vram_total_bytes)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            });
            let status = node.status.as_str();
            view! {
                <tr class="node" data-status=status>
                    <td>{node.name}</td>
                    <td class=format!("status {status}")>{status}</td>
                    <td>{cores}</td>
                    <td>{ram}</td>
                    <td>{gpus}</td>
                </tr>
            }
        })
        .collect_view();
    view! {
        <table id="nodes">
            <thead><tr><th>"Node"</th><th>"Status"</th><th>"Cores"</th><th>"RAM used"</th><th>"GPUs"</th></tr></thead>
            <tbody>{rows}</tbody>
        </table>
    }
    .into_any()
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

async fn load() -> Snapshot {
    let summary = get_json::<ClusterSummary>(&format!("{API_PREFIX}/cluster")).await;
    let nodes = get_json::<NodeList>(&format!("{API_PREFIX}/nodes")).await;
    match (summary, nodes) {
        (Ok(summary), Ok(list)) => Snapshot::Ready {
            summary,
            nodes: list.nodes,
        },
        (Err(reason), _) | (_, Err(reason)) => Snapshot::Failed(reason),
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
        return Err(format!("HTTP {}", response.status()));
    }
    let text = JsFuture::from(response.text().map_err(|_| "unreadable body".to_owned())?)
        .await
        .map_err(|_| "unreadable body".to_owned())?;
    let text = text.as_string().ok_or("body is not text")?;
    serde_json::from_str(&text).map_err(|error| format!("unexpected JSON: {error}"))
}
