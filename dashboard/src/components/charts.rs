//! The traffic charts: latency and throughput over the statistics window, and the SVG line chart.

use leptos::prelude::*;

use crate::format;
use crate::store::Store;

#[component]
pub(super) fn Charts(store: Store) -> impl IntoView {
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
pub(super) fn Chart(title: String, lines: Vec<(&'static str, Vec<Option<f64>>)>) -> impl IntoView {
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
