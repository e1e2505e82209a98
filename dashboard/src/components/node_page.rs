//! A node's page: its card, hardware history, recent requests and events.

use leptos::prelude::*;
use sollol_shared::api::NodeDetail;

use super::charts::Chart;
use super::feed::FeedEntry;
use super::nodes::NodeCard;
use crate::format;
use crate::store::Store;

#[component]
pub(crate) fn NodePage(store: Store, id: String) -> impl IntoView {
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
