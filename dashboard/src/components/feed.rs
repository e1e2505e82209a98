//! The live request feed: finished requests with their routing decisions.

use leptos::prelude::*;
use sollol_shared::api::{RequestEntry, RequestStatus};

use crate::format;
use crate::store::Store;

#[component]
pub(super) fn Feed(store: Store) -> impl IntoView {
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
pub(super) fn FeedEntry(entry: RequestEntry) -> impl IntoView {
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
