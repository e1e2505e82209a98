//! The coordinator's SQLite history: known nodes and their event log, what routing learned per (node,
//! model), and every routed request. Nothing else touches SQL.
//!
//! One writer thread (`writer`) owns the connection and writes batches in
//! transactions. Callers hand it records through a [`HistorySender`], which
//! never waits: when the queue is full the record is dropped and counted. Reads happen at start-up, before the writer exists
//! (the nodes, their events and the learned figures come back as
//! [`Remembered`]), and through a [`HistoryReader`] (a second, read-only
//! connection) for the observability API. The history depends on nothing
//! above it: the gateway's finished attempts arrive as [`Outcome`]s, a type
//! of its own.

mod outcome;
mod reader;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use rusqlite::{Connection, params};
use sollol_policy::routing::{Choice, PairStats};
use sollol_shared::api::{CandidateCost, Node, NodeEvent, NodeEventKind, NodeStatus};
use tokio::sync::mpsc;

pub use outcome::{OllamaTimings, Outcome};
pub use reader::{HistoryReader, RequestFilter, candidates_json, tokens_per_second};

/// Migrations in order; `PRAGMA user_version` records how many have run.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_nodes.sql"),
    include_str!("../../migrations/0002_routing.sql"),
    include_str!("../../migrations/0003_request_timings.sql"),
];

const QUEUE_CAPACITY: usize = 16_384;

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
    #[error("history database {} is corrupt and could not be moved aside: {source}", .path.display())]
    MoveAside {
        path: PathBuf,
        source: std::io::Error,
    },
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
    /// How the node was chosen; the `strategy` column holds its [`Choice::strategy_label`].
    pub choice: Choice,
    pub reason: String,
    /// The best candidates, best first; the `candidates` column holds them as JSON.
    pub candidates: Arc<[CandidateCost]>,
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
            choice: outcome.choice,
            reason: outcome.reason.clone(),
            candidates: Arc::clone(&outcome.candidates),
        }
    }
}

/// What the history remembered at start-up.
#[derive(Debug, Default)]
pub struct Remembered {
    pub nodes: Vec<(Node, Vec<NodeEvent>)>,
    /// What routing learned: (node id, model, statistics).
    pub pairs: Vec<(String, String, PairStats)>,
    /// Where a corrupt database was moved before a new one was created.
    pub moved_aside: Option<PathBuf>,
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
        let (mut connection, remembered) = open_or_replace(path, events_per_node)?;
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let writer = std::thread::Builder::new()
            .name("sollol-history".to_owned())
            .spawn(move || writer::write_loop(&mut connection, receiver, event_retention))
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
    /// Queues a record without waiting; a full queue drops it and counts the drop.
    pub fn record(&self, record: Record) {
        if self.sender.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Opens the database and reads what it remembers; a corrupt one is moved aside (with its WAL files,
/// named after the time) and a new one created, so a damaged disk costs history, not the coordinator.
fn open_or_replace(
    path: &Path,
    events_per_node: usize,
) -> Result<(Connection, Remembered), HistoryError> {
    let opened = open_connection(path)
        .and_then(|connection| Ok((read_remembered(&connection, events_per_node)?, connection)));
    match opened {
        Ok((remembered, connection)) => Ok((connection, remembered)),
        Err(error) if error.is_corruption() => {
            let seconds = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            let aside = path.with_extension(format!("db.corrupt-{seconds}"));
            std::fs::rename(path, &aside).map_err(|source| HistoryError::MoveAside {
                path: path.to_owned(),
                source,
            })?;
            for suffix in ["-wal", "-shm"] {
                let mut companion = path.as_os_str().to_owned();
                companion.push(suffix);
                let mut moved = aside.as_os_str().to_owned();
                moved.push(suffix);
                let _ = std::fs::rename(&companion, &moved);
            }
            tracing::error!(%error, moved_to = %aside.display(), "THE HISTORY DATABASE IS CORRUPT: moved aside, starting with an empty history (learned routing figures and remembered nodes are lost; the old file is kept for inspection)");
            let connection = open_connection(path)?;
            let mut remembered = read_remembered(&connection, events_per_node)?;
            remembered.moved_aside = Some(aside);
            Ok((connection, remembered))
        }
        Err(error) => Err(error),
    }
}

impl HistoryError {
    /// SQLite says the file is damaged or not a database at all.
    fn is_corruption(&self) -> bool {
        let source = match self {
            Self::Open { source, .. } | Self::Sql(source) => source,
            Self::TooNew { .. } | Self::MoveAside { .. } => return false,
        };
        matches!(
            source.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        )
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let sender = history.sender();
        sender.record(Record::Node(Box::new(node("a", NodeStatus::Up))));
        sender.record(Record::Node(Box::new(node("b", NodeStatus::Left))));
        for at_ms in 1..=5 {
            sender.record(event(at_ms, NodeEventKind::Up));
        }
        drop(sender);
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

    #[tokio::test]
    async fn a_corrupt_database_is_moved_aside_and_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("history.db");
        let garbage = b"this was a history database before the disk failed".repeat(200);
        std::fs::write(&path, &garbage).expect("write");
        let (history, remembered) = History::open(&path, 10, 10).expect("a new database");
        let aside = remembered.moved_aside.expect("moved aside");
        assert_eq!(std::fs::read(&aside).expect("kept"), garbage);
        assert!(
            aside.display().to_string().contains("history.db.corrupt-"),
            "{}",
            aside.display()
        );
        assert!(remembered.nodes.is_empty());
        history.close().await;
        // The new one works and is not moved again.
        let (history, remembered) = History::open(&path, 10, 10).expect("reopen");
        assert!(remembered.moved_aside.is_none());
        history.close().await;
    }
}
