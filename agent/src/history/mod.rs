//! The coordinator's SQLite history: known nodes and their event log. Nothing else touches SQL.
//!
//! One writer thread owns the connection and writes batches in transactions.
//! Callers hand it records with [`History::record`], which never waits: when
//! the queue is full the record is dropped and counted. Reads happen once, at
//! start-up, before the writer exists, and through a [`HistoryReader`] for the
//! observability API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use rusqlite::{Connection, OptionalExtension, params};
use sollol_shared::api::{
    CandidateCost, Node, NodeEvent, NodeEventKind, NodeStatus, RequestEntry, RequestStatus,
    RoutingDecision,
};

use crate::gateway::learning::Outcome;
use sollol_policy::routing::PairStats;
use tokio::sync::mpsc;

/// Migrations in order; `PRAGMA user_version` records how many have run.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_nodes.sql"),
    include_str!("../../migrations/0002_routing.sql"),
    include_str!("../../migrations/0003_request_timings.sql"),
];

/// Routed requests kept in the `requests` table; older ones are deleted.
const REQUEST_RETENTION: i64 = 50_000;

const QUEUE_CAPACITY: usize = 16_384;
const MAX_BATCH: usize = 4096;
/// After a first request record the writer waits up to this long for more: one transaction per window
/// instead of per request. A crash loses at most this much of the request log; node and event records
/// are written at once; a shutdown loses nothing.
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(50);
/// How often the writer looks for more records while a batch waits.
const BATCH_POLL: std::time::Duration = std::time::Duration::from_millis(5);
/// The `requests` table is trimmed to `REQUEST_RETENTION` after this many more inserts.
const PRUNE_EVERY: u32 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot open history database {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("history database {} has schema version {found}, newer than this build knows ({known}); upgrade sollol", .path.display())]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("history database error: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// One write for the history.
#[derive(Clone, Debug)]
pub enum Record {
    /// Insert or update a node's row.
    Node(Box<Node>),
    Event {
        node_id: String,
        event: NodeEvent,
    },
    /// Insert or update what routing learned about a (node, model) pair.
    Pair(PairRow),
    /// One routed request.
    Request(Box<RequestRow>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct PairRow {
    pub node_id: String,
    pub model: String,
    pub stats: PairStats,
    pub updated_ms: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RequestRow {
    pub at_ms: u64,
    pub node_id: String,
    pub model: String,
    pub path: String,
    pub app: String,
    pub ok: bool,
    pub prompt_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub time_to_first_byte_ms: u64,
    pub total_ms: u64,
    pub load_ms: Option<u64>,
    /// Time before generation began: the gateway's total minus Ollama's generation time.
    pub time_to_first_token_ms: Option<u64>,
    pub eval_ms: Option<u64>,
    pub strategy: &'static str,
    pub reason: String,
    pub candidates: String,
}

impl RequestRow {
    pub fn of(outcome: &Outcome, at_ms: u64) -> Self {
        let millis =
            |duration: std::time::Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        Self {
            at_ms,
            node_id: outcome.node_id.clone(),
            model: outcome.model.clone(),
            path: outcome.path.clone(),
            app: outcome.app.clone(),
            ok: outcome.ok,
            prompt_tokens: outcome.timings.map(|timings| timings.prompt_tokens),
            output_tokens: outcome.timings.map(|timings| timings.eval_tokens),
            time_to_first_byte_ms: millis(outcome.total.min(outcome.time_to_first_byte)),
            total_ms: millis(outcome.total),
            load_ms: outcome.timings.map(|timings| millis(timings.load)),
            time_to_first_token_ms: outcome
                .timings
                .map(|timings| millis(outcome.total.saturating_sub(timings.eval))),
            eval_ms: outcome.timings.map(|timings| millis(timings.eval)),
            strategy: outcome.strategy,
            reason: outcome.reason.clone(),
            candidates: outcome.candidates.clone(),
        }
    }
}

/// What the history remembered at start-up.
#[derive(Debug, Default)]
pub struct Remembered {
    pub nodes: Vec<(Node, Vec<NodeEvent>)>,
    /// What routing learned: (node id, model, statistics).
    pub pairs: Vec<(String, String, PairStats)>,
}

/// Handle to the writer thread.
#[derive(Debug)]
pub struct History {
    sender: mpsc::Sender<Record>,
    dropped: Arc<AtomicU64>,
    writer: JoinHandle<()>,
}

impl History {
    /// Opens (or creates) the database, migrates it, reads what it remembers, and starts the writer.
    pub fn open(
        path: &Path,
        event_retention: u32,
        events_per_node: usize,
    ) -> Result<(Self, Remembered), HistoryError> {
        let mut connection = open_connection(path)?;
        let remembered = read_remembered(&connection, events_per_node)?;
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let writer = std::thread::Builder::new()
            .name("sollol-history".to_owned())
            .spawn(move || write_loop(&mut connection, receiver, event_retention))
            .map_err(|error| HistoryError::Open {
                path: path.to_owned(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(error)),
            })?;
        Ok((
            Self {
                sender,
                dropped: Arc::new(AtomicU64::new(0)),
                writer,
            },
            remembered,
        ))
    }

    /// Queues a record without waiting; a full queue drops it and counts the drop.
    pub fn record(&self, record: Record) {
        if self.sender.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn dropped(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.dropped)
    }

    /// Another handle for queueing records; the writer finishes once every sender is gone.
    pub fn sender(&self) -> HistorySender {
        HistorySender {
            sender: self.sender.clone(),
            dropped: Arc::clone(&self.dropped),
        }
    }

    /// Stops accepting records, writes everything queued and waits for the writer.
    pub async fn close(self) {
        let Self { sender, writer, .. } = self;
        drop(sender);
        let joined = tokio::task::spawn_blocking(move || writer.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            tracing::error!("history writer panicked; some records may be lost");
        }
    }
}

/// A cloneable way to queue records.
#[derive(Clone, Debug)]
pub struct HistorySender {
    sender: mpsc::Sender<Record>,
    dropped: Arc<AtomicU64>,
}

impl HistorySender {
    pub fn record(&self, record: Record) {
        if self.sender.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Which routed requests to read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFilter {
    pub node_id: Option<String>,
    pub model: Option<String>,
    pub app: Option<String>,
    pub status: Option<RequestStatus>,
    /// Only requests at or after this time.
    pub since_ms: Option<u64>,
    /// Leave out the routing decisions' reasons and candidates (statistics only need the figures).
    pub figures_only: bool,
}

/// A second, read-only connection for the observability API; the writer thread keeps its own.
/// WAL lets it read while the writer writes. Callers run its queries on a blocking thread.
#[derive(Debug)]
pub struct HistoryReader {
    connection: std::sync::Mutex<Connection>,
}

impl HistoryReader {
    /// Opens the database `History::open` created and migrated.
    pub fn open(path: &Path) -> Result<Self, HistoryError> {
        let open_error = |source| HistoryError::Open {
            path: path.to_owned(),
            source,
        };
        let connection = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_error)?;
        connection
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_error)?;
        Ok(Self {
            connection: std::sync::Mutex::new(connection),
        })
    }

    /// Routed requests matching `filter`, newest first, at most `limit`. `node` is the node's id here.
    pub fn requests(
        &self,
        filter: &RequestFilter,
        limit: usize,
    ) -> rusqlite::Result<Vec<RequestEntry>> {
        let connection = self
            .connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut statement = connection.prepare_cached(
            "SELECT id, at_ms, node_id, model, path, app, status, prompt_tokens, output_tokens,
                    time_to_first_byte_ms, total_ms, load_ms, strategy,
                    CASE WHEN ?7 THEN '' ELSE reason END, CASE WHEN ?7 THEN '[]' ELSE candidates END,
                    time_to_first_token_ms, eval_ms
             FROM requests
             WHERE (?1 IS NULL OR node_id = ?1) AND (?2 IS NULL OR model = ?2) AND (?3 IS NULL OR app = ?3)
               AND (?4 IS NULL OR status = ?4) AND (?5 IS NULL OR at_ms >= ?5)
             ORDER BY id DESC LIMIT ?6",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        statement
            .query_map(
                params![
                    filter.node_id,
                    filter.model,
                    filter.app,
                    filter.status.map(RequestStatus::as_str),
                    filter.since_ms.map(|ms| ms as i64),
                    limit,
                    filter.figures_only
                ],
                |row| {
                    let unsigned = |index: usize| -> rusqlite::Result<u64> {
                        Ok(row.get::<_, i64>(index)?.max(0) as u64)
                    };
                    let optional = |index: usize| -> rusqlite::Result<Option<u64>> {
                        Ok(row
                            .get::<_, Option<i64>>(index)?
                            .map(|value| value.max(0) as u64))
                    };
                    let node_id: String = row.get(2)?;
                    let output_tokens = optional(8)?;
                    let eval_ms = optional(16)?;
                    let candidates: String = row.get(14)?;
                    Ok(RequestEntry {
                        id: unsigned(0)?,
                        at_ms: unsigned(1)?,
                        node: node_id.clone(),
                        node_id,
                        model: row.get(3)?,
                        path: row.get(4)?,
                        app: row.get(5)?,
                        status: RequestStatus::parse(&row.get::<_, String>(6)?)
                            .unwrap_or(RequestStatus::Failed),
                        prompt_tokens: optional(7)?,
                        output_tokens,
                        time_to_first_byte_ms: unsigned(9)?,
                        time_to_first_token_ms: optional(15)?,
                        total_ms: unsigned(10)?,
                        load_ms: optional(11)?,
                        tokens_per_second: tokens_per_second(output_tokens, eval_ms),
                        decision: RoutingDecision {
                            strategy: row.get(12)?,
                            reason: row.get(13)?,
                            candidates: candidates_of(&candidates),
                        },
                    })
                },
            )?
            .collect()
    }
}

/// The candidates of a decision from the `candidates` column's JSON (`[{"node", "predicted_ms"}]`).
pub fn candidates_of(json: &str) -> Vec<CandidateCost> {
    serde_json::from_str(json).unwrap_or_default()
}

/// Generated tokens per second of generation time.
pub fn tokens_per_second(tokens: Option<u64>, eval_ms: Option<u64>) -> Option<f64> {
    match (tokens, eval_ms) {
        (Some(tokens), Some(ms)) if tokens > 0 && ms > 0 => {
            Some(tokens as f64 * 1000.0 / ms as f64)
        }
        _ => None,
    }
}

fn open_connection(path: &Path) -> Result<Connection, HistoryError> {
    let open_error = |source| HistoryError::Open {
        path: path.to_owned(),
        source,
    };
    let mut connection = Connection::open(path).map_err(open_error)?;
    connection
        .pragma_update(None, "journal_mode", "WAL")
        .map_err(open_error)?;
    connection
        .pragma_update(None, "synchronous", "NORMAL")
        .map_err(open_error)?;
    connection
        .busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_error)?;
    migrate(&mut connection, path)?;
    Ok(connection)
}

fn migrate(connection: &mut Connection, path: &Path) -> Result<(), HistoryError> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let applied = usize::try_from(version).unwrap_or(usize::MAX);
    if applied > MIGRATIONS.len() {
        return Err(HistoryError::TooNew {
            path: path.to_owned(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        let transaction = connection.transaction()?;
        transaction.execute_batch(migration)?;
        transaction.pragma_update(None, "user_version", (index + 1) as i64)?;
        transaction.commit()?;
        tracing::info!(version = index + 1, "history database migrated");
    }
    Ok(())
}

fn read_remembered(
    connection: &Connection,
    events_per_node: usize,
) -> Result<Remembered, HistoryError> {
    let mut statement = connection.prepare(
        "SELECT id, name, addresses, build_version, protocol_version, heartbeat_interval_ms,
                first_seen_ms, last_seen_ms, last_status, hardware, ollama
         FROM nodes ORDER BY name, id",
    )?;
    let rows = statement.query_map([], |row| {
        let addresses: String = row.get(2)?;
        let status: String = row.get(8)?;
        let hardware: Option<String> = row.get(9)?;
        let ollama: Option<String> = row.get(10)?;
        Ok(Node {
            id: row.get(0)?,
            name: row.get(1)?,
            addresses: serde_json::from_str(&addresses).unwrap_or_default(),
            build_version: row.get(3)?,
            protocol_version: row.get(4)?,
            heartbeat_interval_ms: row.get::<_, i64>(5)?.max(1) as u64,
            first_seen_ms: row.get::<_, i64>(6)?.max(0) as u64,
            last_seen_ms: row.get::<_, i64>(7)?.max(0) as u64,
            status: if status == NodeStatus::Left.as_str() {
                NodeStatus::Left
            } else {
                NodeStatus::Down
            },
            connected: false,
            hardware: hardware.and_then(|json| serde_json::from_str(&json).ok()),
            ollama: ollama.and_then(|json| serde_json::from_str(&json).ok()),
            stage_address: None,
            memory_limit_bytes: None,
        })
    })?;
    let nodes: Vec<Node> = rows.collect::<Result<_, _>>()?;
    let mut events_statement = connection.prepare(
        "SELECT at_ms, kind, detail FROM node_events WHERE node_id = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let mut remembered = Remembered::default();
    for node in nodes {
        let events = events_statement
            .query_map(params![node.id, events_per_node as i64], |row| {
                let kind: String = row.get(1)?;
                let at_ms = row.get::<_, i64>(0)?.max(0) as u64;
                let detail: String = row.get(2)?;
                Ok(NodeEventKind::parse(&kind).map(|kind| NodeEvent {
                    at_ms,
                    kind,
                    detail,
                }))
            })?
            .filter_map(|event| event.transpose())
            .collect::<Result<Vec<_>, _>>()?;
        remembered.nodes.push((node, events));
    }
    let mut pairs_statement = connection.prepare(
        "SELECT node_id, model, decode_tokens_per_second, prompt_tokens_per_second, cold_load_ms,
                time_to_first_token_ms, samples FROM node_model_stats",
    )?;
    remembered.pairs = pairs_statement
        .query_map([], |row| {
            let cold_load_ms: Option<i64> = row.get(4)?;
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                PairStats {
                    decode_tokens_per_second: row.get(2)?,
                    prompt_tokens_per_second: row.get(3)?,
                    cold_load: cold_load_ms
                        .map(|ms| std::time::Duration::from_millis(ms.max(0) as u64)),
                    time_to_first_token: std::time::Duration::from_millis(
                        row.get::<_, i64>(5)?.max(0) as u64,
                    ),
                    samples: row.get::<_, i64>(6)?.clamp(0, i64::from(u32::MAX)) as u32,
                },
            ))
        })?
        .collect::<Result<_, _>>()?;
    Ok(remembered)
}

fn write_loop(
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
                        row.strategy,
                        row.reason,
                        row.candidates,
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

    fn node(id: &str, status: NodeStatus) -> Node {
        Node {
            id: id.to_owned(),
            name: format!("name-{id}"),
            status,
            addresses: vec!["127.0.0.1:1".to_owned()],
            build_version: "0.1.0".to_owned(),
            protocol_version: 1,
            first_seen_ms: 10,
            last_seen_ms: 20,
            heartbeat_interval_ms: 2000,
            connected: true,
            hardware: Some(Default::default()),
            ollama: None,
            stage_address: None,
            memory_limit_bytes: None,
        }
    }

    fn event(at_ms: u64, kind: NodeEventKind) -> Record {
        Record::Event {
            node_id: "a".to_owned(),
            event: NodeEvent {
                at_ms,
                kind,
                detail: String::new(),
            },
        }
    }

    #[tokio::test]
    async fn survives_a_reopen_and_keeps_bounded_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("history.db");
        let (history, remembered) = History::open(&path, 3, 10).expect("open");
        assert!(remembered.nodes.is_empty());
        history.record(Record::Node(Box::new(node("a", NodeStatus::Up))));
        history.record(Record::Node(Box::new(node("b", NodeStatus::Left))));
        for at_ms in 1..=5 {
            history.record(event(at_ms, NodeEventKind::Up));
        }
        history.close().await;

        let (history, remembered) = History::open(&path, 3, 10).expect("reopen");
        let summary: Vec<(String, NodeStatus, bool, usize)> = remembered
            .nodes
            .iter()
            .map(|(node, events)| (node.id.clone(), node.status, node.connected, events.len()))
            .collect();
        // Up nodes come back as down until they reconnect; left ones stay left. Only 3 events are kept.
        assert_eq!(
            summary,
            vec![
                ("a".to_owned(), NodeStatus::Down, false, 3),
                ("b".to_owned(), NodeStatus::Left, false, 0)
            ]
        );
        let newest_first: Vec<u64> = remembered.nodes[0]
            .1
            .iter()
            .map(|event| event.at_ms)
            .collect();
        assert_eq!(newest_first, vec![5, 4, 3]);
        assert!(remembered.nodes[0].0.hardware.is_some());
        history.close().await;
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("history.db");
        let connection = Connection::open(&path).expect("open");
        connection
            .pragma_update(None, "user_version", 99)
            .expect("pragma");
        drop(connection);
        let error = History::open(&path, 10, 10).expect_err("too new");
        assert!(error.to_string().contains("upgrade sollol"), "{error}");
    }
}
