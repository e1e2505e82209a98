//! Reading routed requests back for the API: a second, read-only connection beside the writer's.

use std::path::Path;

use rusqlite::{Connection, params};
use sollol_shared::api::{CandidateCost, RequestEntry, RequestStatus, RoutingDecision};

use super::HistoryError;

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

impl HistoryReader {
    /// How often each model was asked for by clients on the generation routes since `since_ms` (the
    /// gateway's own calibrations and warm-ups left out), most asked-for first.
    pub fn demand(&self, since_ms: u64) -> rusqlite::Result<Vec<(String, u64)>> {
        let connection = self
            .connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut statement = connection.prepare_cached(
            "SELECT model, COUNT(*) FROM requests
             WHERE at_ms >= ?1 AND status = 'ok' AND strategy NOT IN ('calibration', 'warmup')
               AND path IN ('/api/chat', '/api/generate', '/v1/chat/completions', '/v1/completions')
             GROUP BY model ORDER BY 2 DESC, model",
        )?;
        statement
            .query_map(
                params![i64::try_from(since_ms).unwrap_or(i64::MAX)],
                |row| Ok((row.get(0)?, row.get::<_, i64>(1)?.max(0) as u64)),
            )?
            .collect()
    }
}

/// The candidates of a decision from the `candidates` column's JSON (`[{"node", "predicted_ms"}]`).
pub fn candidates_of(json: &str) -> Vec<CandidateCost> {
    serde_json::from_str(json).unwrap_or_default()
}

/// The `candidates` column's JSON of a decision's candidates (`[{"node", "predicted_ms"}]`); the inverse of [`candidates_of`].
pub fn candidates_json(candidates: &[CandidateCost]) -> String {
    serde_json::to_string(candidates).unwrap_or_else(|_| "[]".to_owned())
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
