//! The page's components: the header's connection badge and the overview with its summary and window
//! picker; the child modules hold the coordinators, the node cards, the pipelines, the charts, the tables, the request
//! feed, the node page, the models page and the sign-in form.

mod charts;
mod coordinators;
mod feed;
mod models;
mod node_page;
mod nodes;
mod pipeline;
mod sign_in;
mod tables;

use leptos::prelude::*;
use sollol_shared::api::{NodeStatus, Stats, StatsWindow};

use crate::store::{Connection, Store, load_stats};
use charts::Charts;
use coordinators::Coordinators;
use feed::Feed;
pub(crate) use models::ModelsPage;
pub(crate) use node_page::NodePage;
use nodes::NodeCards;
use pipeline::Pipelines;
pub(crate) use sign_in::SignInForm;
use tables::AggregateTable;

#[component]
pub(crate) fn ConnectionBadge(store: Store) -> impl IntoView {
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
pub(crate) fn Overview(store: Store) -> impl IntoView {
    view! {
        <Summary store=store/>
        <Coordinators store=store/>
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
