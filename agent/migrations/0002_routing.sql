-- What routing learned per (node, model), and a bounded log of routed requests.
CREATE TABLE node_model_stats (
    node_id TEXT NOT NULL,
    model TEXT NOT NULL,
    decode_tokens_per_second REAL NOT NULL,
    prompt_tokens_per_second REAL NOT NULL,
    cold_load_ms INTEGER,             -- NULL until a cold load was observed
    time_to_first_token_ms INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (node_id, model)
) STRICT;

CREATE TABLE requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    model TEXT NOT NULL,
    path TEXT NOT NULL,
    app TEXT NOT NULL,                -- X-Sollol-App, else the API key's name, else the User-Agent
    status TEXT NOT NULL,             -- ok, failed
    prompt_tokens INTEGER,
    output_tokens INTEGER,
    time_to_first_byte_ms INTEGER NOT NULL,
    total_ms INTEGER NOT NULL,
    load_ms INTEGER,
    strategy TEXT NOT NULL,
    reason TEXT NOT NULL,
    candidates TEXT NOT NULL          -- JSON: [{"node": name, "predicted_ms": n}], best first
) STRICT;

CREATE INDEX requests_by_time ON requests (at_ms);
