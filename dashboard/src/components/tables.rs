//! The per-model and per-application statistics tables.

use leptos::prelude::*;
use sollol_shared::api::{Aggregate, Stats};

use crate::format;
use crate::store::Store;

#[component]
pub(super) fn AggregateTable(
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
