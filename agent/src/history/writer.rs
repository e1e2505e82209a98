//! The writer thread: the one owner of the writing connection, storing records in batched transactions
//! and keeping the event log and the request log bounded.

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::mpsc;

use super::Record;
use super::reader::candidates_json;

/// Routed requests kept in the `requests` table; older ones are deleted.
const REQUEST_RETENTION: i64 = 50_000;

const MAX_BATCH: usize = 4096;
/// After a first request record the writer waits up to this long for more: one transaction per window
/// instead of per request. A crash loses at most this much of the request log; node and event records
/// are written at once; a shutdown loses nothing.
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(50);
/// How often the writer looks for more records while a batch waits.
const BATCH_POLL: std::time::Duration = std::time::Duration::from_millis(5);
/// The `requests` table is trimmed to `REQUEST_RETENTION` after this many more inserts.
const PRUNE_EVERY: u32 = 2048;

pub(super) fn write_loop(
    connection: &mut Connection,
    mut receiver: mpsc::Receiver<Record>,
    event_retention: u32,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut requests_since_prune = 0;
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        // Requests and learned figures wait up to a window to share a transaction; a node or event
        // record (a join, a status change) is written at once, so a crash does not forget it.
        let deadline = std::time::Instant::now() + BATCH_WINDOW;
        loop {
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(record) => batch.push(record),
                    Err(_) => break,
                }
            }
            let urgent = batch
                .iter()
                .any(|record| matches!(record, Record::Node(_) | Record::Event { .. }));
            if urgent
                || batch.len() >= MAX_BATCH
                || receiver.is_closed()
                || std::time::Instant::now() >= deadline
            {
                break;
            }
            std::thread::sleep(BATCH_POLL);
        }
        requests_since_prune += batch
            .iter()
            .filter(|record| matches!(record, Record::Request(_)))
            .count() as u32;
        let prune = requests_since_prune >= PRUNE_EVERY;
        if prune {
            requests_since_prune = 0;
        }
        if let Err(error) = write_batch(connection, &batch, event_retention, prune) {
            tracing::error!(%error, records = batch.len(), "history write failed; batch lost");
        }
        batch.clear();
    }
    tracing::debug!("history writer drained");
}

fn write_batch(
    connection: &mut Connection,
    batch: &[Record],
    event_retention: u32,
    prune_requests: bool,
) -> rusqlite::Result<()> {
    let transaction = connection.transaction()?;
    let mut wrote_events = false;
    {
        let mut upsert = transaction.prepare_cached(
            "INSERT INTO nodes (id, name, addresses, build_version, protocol_version, heartbeat_interval_ms,
                                first_seen_ms, last_seen_ms, last_status, hardware, ollama)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (id) DO UPDATE SET
                name = excluded.name, addresses = excluded.addresses, build_version = excluded.build_version,
                protocol_version = excluded.protocol_version, heartbeat_interval_ms = excluded.heartbeat_interval_ms,
                last_seen_ms = excluded.last_seen_ms, last_status = excluded.last_status,
                hardware = COALESCE(excluded.hardware, nodes.hardware), ollama = COALESCE(excluded.ollama, nodes.ollama)",
        )?;
        let mut insert_event = transaction.prepare_cached(
            "INSERT INTO node_events (node_id, at_ms, kind, detail) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut upsert_pair = transaction.prepare_cached(
            "INSERT INTO node_model_stats (node_id, model, decode_tokens_per_second, prompt_tokens_per_second,
                                           cold_load_ms, time_to_first_token_ms, samples, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (node_id, model) DO UPDATE SET
                decode_tokens_per_second = excluded.decode_tokens_per_second,
                prompt_tokens_per_second = excluded.prompt_tokens_per_second,
                cold_load_ms = excluded.cold_load_ms, time_to_first_token_ms = excluded.time_to_first_token_ms,
                samples = excluded.samples, updated_ms = excluded.updated_ms",
        )?;
        let mut insert_request = transaction.prepare_cached(
            "INSERT INTO requests (at_ms, node_id, model, path, app, status, prompt_tokens, output_tokens,
                                   time_to_first_byte_ms, total_ms, load_ms, strategy, reason, candidates,
                                   time_to_first_token_ms, eval_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?;
        let superseded = superseded_pairs(batch);
        for (index, record) in batch.iter().enumerate() {
            match record {
                Record::Node(node) => {
                    upsert.execute(params![
                        node.id,
                        node.name,
                        serde_json::to_string(&node.addresses).unwrap_or_else(|_| "[]".to_owned()),
                        node.build_version,
                        node.protocol_version,
                        node.heartbeat_interval_ms as i64,
                        node.first_seen_ms as i64,
                        node.last_seen_ms as i64,
                        node.status.as_str(),
                        node.hardware
                            .as_ref()
                            .and_then(|hardware| serde_json::to_string(hardware).ok()),
                        node.ollama
                            .as_ref()
                            .and_then(|ollama| serde_json::to_string(ollama).ok()),
                    ])?;
                }
                Record::Event { node_id, event } => {
                    insert_event.execute(params![
                        node_id,
                        event.at_ms as i64,
                        event.kind.as_str(),
                        event.detail
                    ])?;
                    wrote_events = true;
                }
                Record::Pair(row) => {
                    if superseded[index] {
                        continue;
                    }
                    upsert_pair.execute(params![
                        row.node_id,
                        row.model,
                        row.stats.decode_tokens_per_second,
                        row.stats.prompt_tokens_per_second,
                        row.stats.cold_load.map(|load| load.as_millis() as i64),
                        row.stats.time_to_first_token.as_millis() as i64,
                        i64::from(row.stats.samples),
                        row.updated_ms as i64,
                    ])?;
                }
                Record::Request(row) => {
                    insert_request.execute(params![
                        row.at_ms as i64,
                        row.node_id,
                        row.model,
                        row.path,
                        row.app,
                        if row.ok { "ok" } else { "failed" },
                        row.prompt_tokens.map(|tokens| tokens as i64),
                        row.output_tokens.map(|tokens| tokens as i64),
                        row.time_to_first_byte_ms as i64,
                        row.total_ms as i64,
                        row.load_ms.map(|load| load as i64),
                        row.choice.strategy_label(),
                        row.reason,
                        candidates_json(&row.candidates),
                        row.time_to_first_token_ms.map(|ms| ms as i64),
                        row.eval_ms.map(|ms| ms as i64),
                    ])?;
                }
            }
        }
    }
    if wrote_events {
        let newest: Option<i64> = transaction
            .query_row("SELECT MAX(id) FROM node_events", [], |row| row.get(0))
            .optional()?
            .flatten();
        if let Some(newest) = newest {
            transaction.execute(
                "DELETE FROM node_events WHERE id <= ?1",
                params![newest - i64::from(event_retention)],
            )?;
        }
    }
    if prune_requests {
        transaction.execute(
            "DELETE FROM requests WHERE id <= (SELECT MAX(id) FROM requests) - ?1",
            params![REQUEST_RETENTION],
        )?;
    }
    transaction.commit()
}

/// For each record, whether a later pair update in the batch replaces it (each carries the pair's whole state).
fn superseded_pairs(batch: &[Record]) -> Vec<bool> {
    let mut seen = std::collections::HashSet::new();
    let mut superseded = vec![false; batch.len()];
    for (index, record) in batch.iter().enumerate().rev() {
        if let Record::Pair(row) = record {
            superseded[index] = !seen.insert((row.node_id.as_str(), row.model.as_str()));
        }
    }
    superseded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::PairRow;
    use sollol_policy::routing::PairStats;

    #[test]
    fn only_the_last_update_of_a_pair_in_a_batch_is_written() {
        let pair = |node: &str, model: &str, samples: u32| {
            Record::Pair(PairRow {
                node_id: node.to_owned(),
                model: model.to_owned(),
                stats: PairStats {
                    decode_tokens_per_second: 1.0,
                    prompt_tokens_per_second: 1.0,
                    cold_load: None,
                    time_to_first_token: std::time::Duration::ZERO,
                    samples,
                },
                updated_ms: 0,
            })
        };
        let batch = [
            pair("a", "m", 1),
            pair("b", "m", 1),
            pair("a", "m", 2),
            pair("a", "n", 1),
        ];
        assert_eq!(superseded_pairs(&batch), [true, false, false, false]);
    }
}
