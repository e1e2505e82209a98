//! Statistics over a window of routed requests: pure functions over rows read back from SQLite.

use std::collections::BTreeMap;

use sollol_shared::api::{
    Aggregate, Percentiles, RequestEntry, RequestStatus, SeriesPoint, Stats, StatsWindow,
};

/// Statistics of `entries` (any order) for `window` ending at `until_ms`; `node_name` names node ids.
pub fn aggregate(
    entries: &[RequestEntry],
    window: StatsWindow,
    until_ms: u64,
    node_name: impl Fn(&str) -> String,
) -> Stats {
    let since_ms = until_ms.saturating_sub(window.millis());
    let bucket_ms = window.bucket_millis();
    let in_window: Vec<&RequestEntry> = entries
        .iter()
        .filter(|entry| entry.at_ms >= since_ms && entry.at_ms <= until_ms)
        .collect();
    let group = |key: &dyn Fn(&RequestEntry) -> String| -> Vec<Aggregate> {
        let mut groups: BTreeMap<String, Vec<&RequestEntry>> = BTreeMap::new();
        for entry in &in_window {
            groups.entry(key(entry)).or_default().push(entry);
        }
        let mut aggregates: Vec<Aggregate> = groups
            .into_iter()
            .map(|(key, entries)| summarize(key, &entries))
            .collect();
        aggregates.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.key.cmp(&b.key)));
        aggregates
    };
    let buckets = (window.millis() / bucket_ms) as usize;
    let mut series: Vec<Vec<&RequestEntry>> = vec![Vec::new(); buckets];
    for entry in &in_window {
        let index = ((entry.at_ms - since_ms) / bucket_ms) as usize;
        series[index.min(buckets - 1)].push(entry);
    }
    Stats {
        window,
        since_ms,
        until_ms,
        bucket_ms,
        total: summarize("all".to_owned(), &in_window),
        by_node: group(&|entry| node_name(&entry.node_id)),
        by_model: group(&|entry| entry.model.clone()),
        by_app: group(&|entry| entry.app.clone()),
        series: series
            .iter()
            .enumerate()
            .map(|(index, entries)| {
                let summary = summarize(String::new(), entries);
                SeriesPoint {
                    at_ms: since_ms + index as u64 * bucket_ms,
                    requests: summary.requests,
                    errors: summary.errors,
                    latency_ms: summary.latency_ms,
                    time_to_first_token_ms: summary.time_to_first_token_ms,
                    tokens_per_second: summary.output_tokens as f64 * 1000.0 / bucket_ms as f64,
                }
            })
            .collect(),
    }
}

fn summarize(key: String, entries: &[&RequestEntry]) -> Aggregate {
    let requests = entries.len() as u64;
    let ok: Vec<&&RequestEntry> = entries
        .iter()
        .filter(|entry| entry.status == RequestStatus::Ok)
        .collect();
    let errors = requests - ok.len() as u64;
    let latency: Vec<u64> = ok.iter().map(|entry| entry.total_ms).collect();
    let first_token: Vec<u64> = ok
        .iter()
        .filter_map(|entry| entry.time_to_first_token_ms)
        .collect();
    let output_tokens: u64 = ok.iter().filter_map(|entry| entry.output_tokens).sum();
    // Tokens over generation time: sum of tokens / sum of (tokens / rate) for requests with a rate.
    let (rated_tokens, generation_seconds) = ok
        .iter()
        .filter_map(|entry| Some((entry.output_tokens?, entry.tokens_per_second?)))
        .fold((0.0, 0.0), |(tokens, seconds), (count, rate)| {
            (tokens + count as f64, seconds + count as f64 / rate)
        });
    Aggregate {
        key,
        requests,
        errors,
        error_rate: if requests == 0 {
            0.0
        } else {
            errors as f64 / requests as f64
        },
        latency_ms: percentiles(latency),
        time_to_first_token_ms: percentiles(first_token),
        output_tokens,
        tokens_per_second: (generation_seconds > 0.0).then(|| rated_tokens / generation_seconds),
        last_at_ms: entries.iter().map(|entry| entry.at_ms).max().unwrap_or(0),
    }
}

/// Nearest-rank percentiles; `None` for no values.
fn percentiles(mut values: Vec<u64>) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = |fraction: f64| {
        let index = (fraction * values.len() as f64).ceil() as usize;
        values[index.clamp(1, values.len()) - 1]
    };
    Some(Percentiles {
        p50: rank(0.50),
        p95: rank(0.95),
        p99: rank(0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sollol_shared::api::RoutingDecision;

    fn entry(at_ms: u64, node: &str, model: &str, ok: bool, total_ms: u64) -> RequestEntry {
        RequestEntry {
            id: at_ms,
            at_ms,
            node_id: node.to_owned(),
            node: node.to_owned(),
            model: model.to_owned(),
            path: "/api/chat".to_owned(),
            app: "test".to_owned(),
            status: if ok {
                RequestStatus::Ok
            } else {
                RequestStatus::Failed
            },
            prompt_tokens: Some(10),
            output_tokens: Some(20),
            time_to_first_byte_ms: total_ms,
            time_to_first_token_ms: Some(total_ms / 2),
            total_ms,
            load_ms: None,
            tokens_per_second: Some(40.0),
            decision: RoutingDecision {
                strategy: "intelligent".to_owned(),
                reason: "lowest predicted time".to_owned(),
                candidates: Vec::new(),
            },
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(
            percentiles(values),
            Some(Percentiles {
                p50: 50,
                p95: 95,
                p99: 99
            })
        );
        assert_eq!(percentiles(vec![7]).map(|p| (p.p50, p.p99)), Some((7, 7)));
        assert_eq!(percentiles(Vec::new()), None);
    }

    #[test]
    fn aggregates_group_count_and_window() {
        let until = 1_000_000;
        let entries = vec![
            entry(until - 1_000, "a", "m1", true, 100),
            entry(until - 2_000, "a", "m2", true, 300),
            entry(until - 3_000, "b", "m1", false, 50),
            // Outside a 5-minute window.
            entry(until - 400_000, "b", "m1", true, 10),
        ];
        let stats = aggregate(&entries, StatsWindow::FiveMinutes, until, |id| {
            format!("node-{id}")
        });
        assert_eq!(stats.total.requests, 3);
        assert_eq!(stats.total.errors, 1);
        assert_eq!(
            stats
                .by_node
                .iter()
                .map(|a| (a.key.as_str(), a.requests))
                .collect::<Vec<_>>(),
            [("node-a", 2), ("node-b", 1)]
        );
        assert_eq!(stats.by_node[1].error_rate, 1.0);
        assert_eq!(stats.by_node[1].latency_ms, None);
        assert_eq!(stats.by_model[0].key, "m1");
        assert_eq!(stats.total.latency_ms.map(|p| p.p99), Some(300));
        assert_eq!(stats.total.output_tokens, 40);
        assert_eq!(stats.total.tokens_per_second, Some(40.0));
        assert_eq!(stats.series.len(), 60);
        assert_eq!(
            stats.series.iter().map(|point| point.requests).sum::<u64>(),
            3
        );
        assert_eq!(stats.series.last().map(|point| point.requests), Some(3));
    }
}
