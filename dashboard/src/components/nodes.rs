//! The node cards: one card per node with its status, hardware bars, models and load.

use leptos::prelude::*;
use sollol_shared::api::Node;

use crate::format;
use crate::store::Store;

#[component]
pub(super) fn NodeCards(store: Store) -> impl IntoView {
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
pub(super) fn NodeCard(node: Node, in_flight: u32, now: f64) -> impl IntoView {
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
