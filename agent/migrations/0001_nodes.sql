-- Nodes the coordinator has seen, and what happened to them.
CREATE TABLE nodes (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    addresses TEXT NOT NULL,          -- JSON array of strings, newest first
    build_version TEXT NOT NULL,
    protocol_version INTEGER NOT NULL,
    heartbeat_interval_ms INTEGER NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    last_status TEXT NOT NULL,
    hardware TEXT,                    -- JSON of sollol_shared::hardware::HardwareReport
    ollama TEXT                       -- JSON of sollol_shared::hardware::OllamaState
) STRICT;

CREATE TABLE node_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
) STRICT;

CREATE INDEX node_events_by_node ON node_events (node_id, id);
