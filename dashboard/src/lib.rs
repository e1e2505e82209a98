//! The sollol dashboard: a client-side rendered Leptos app over the coordinator's `/api/sollol/v1` API.
//!
//! Snapshots come from the JSON API; changes arrive live over Server-Sent
//! Events (`/api/sollol/v1/events`): node status, hardware samples and load,
//! and every finished request with its routing decision. Window statistics
//! are re-read every few seconds. Everything is served by the coordinator;
//! the page loads nothing from other hosts.
//!
//! `store` holds the signals and feeds them (JSON reads, the live event stream), `components` draws
//! the pages from them (the overview, a node's page, the models matrix), and `format` formats figures and chart geometry.

mod components;
mod format;
mod store;

use leptos::prelude::*;

use components::{ConnectionBadge, ModelsPage, NodePage, Overview, SignInForm};
use store::{
    Access, DETAIL_EVERY_MS, Route, STATS_EVERY_MS, Store, check_access, connect_live, load_detail,
    load_snapshot, load_stats, location_hash,
};

#[component]
pub fn App() -> impl IntoView {
    let store = Store::new();
    // With API keys on, nothing is read until this browser has signed in.
    check_access(store, move || start(store));
    view! {
        <header>
            <a class="brand" href="#/">"sollol"</a>
            <span class="subtitle">"cluster dashboard"</span>
            <nav>
                <a href="#/" id="nodes-link" aria-current=move || (store.route.get() == Route::Overview).then_some("page")>"Nodes"</a>
                <a href="#/models" id="models-link" aria-current=move || (store.route.get() == Route::Models).then_some("page")>"Models"</a>
            </nav>
            <ConnectionBadge store=store/>
        </header>
        {move || store.error.get().map(|error| view! {
            <p class="banner error" role="alert">"Cannot read the coordinator's API: " {error} " — retrying."</p>
        })}
        <main>
            {move || match (store.access.get(), store.route.get()) {
                (Access::SignInNeeded, _) => view! { <SignInForm/> }.into_any(),
                (Access::Checking, _) => view! { <p>"Connecting…"</p> }.into_any(),
                (Access::Granted(_), Route::Overview) => view! { <Overview store=store/> }.into_any(),
                (Access::Granted(_), Route::Models) => view! { <ModelsPage store=store/> }.into_any(),
                (Access::Granted(_), Route::Node(id)) => view! { <NodePage store=store id=id/> }.into_any(),
            }}
        </main>
    }
}

/// Reads the snapshots, follows the live stream and refreshes the statistics.
fn start(store: Store) {
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
}
