//! The key table: every configuration key with its environment variable, default and meaning.
//!
//! `scripts/gen-config-docs` reads [`KEYS`] from this file to write the table in
//! `docs/configuration.md`, so each entry keeps the `KeySpec { key, env, default, doc }` layout.

/// One configuration key.
#[derive(Debug)]
pub struct KeySpec {
    /// Dotted name, as written in the TOML file (`section.key`).
    pub key: &'static str,
    pub env: &'static str,
    /// The default as text; `None` means unset unless derived (see `doc`).
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

/// Every key sollol accepts.
pub const KEYS: &[KeySpec] = &[
    KeySpec {
        key: "data_dir",
        env: "SOLLOL_DATA_DIR",
        default: None,
        doc: "Directory for the cluster token, the node id and the coordinator's SQLite history. Default: the platform data directory plus `sollol` (`~/.local/share/sollol` on Linux).",
    },
    KeySpec {
        key: "log_level",
        env: "SOLLOL_LOG",
        default: Some("info"),
        doc: "Log filter in `tracing` syntax, e.g. `info` or `sollol=debug,info`. Logs go to standard error.",
    },
    KeySpec {
        key: "shutdown_grace",
        env: "SOLLOL_SHUTDOWN_GRACE",
        default: Some("5s"),
        doc: "How long a shutdown waits for connections and the history writer to finish before it is forced.",
    },
    KeySpec {
        key: "model_sharding_enabled",
        env: "SOLLOL_MODEL_SHARDING_ENABLED",
        default: Some("false"),
        doc: "Distributed inference (experimental): when true, the coordinator serves the models in `distributed.models` through a pipeline of agents' stages, each holding a contiguous range of the model's layers. The name is SOLLOL's.",
    },
    KeySpec {
        key: "coordinator_url",
        env: "SOLLOL_COORDINATOR_URL",
        default: None,
        doc: "Where `sollol status` and `sollol nodes` find the coordinator's HTTP API. Default: `http://` plus `coordinator.gateway_bind`, with an unspecified address replaced by 127.0.0.1.",
    },
    KeySpec {
        key: "api_key",
        env: "SOLLOL_API_KEY",
        default: None,
        doc: "The key the client commands (`sollol status`, `nodes`, `models`, `pull`, `rm`, `distribute`) send as `Authorization: Bearer KEY` when the coordinator has `coordinator.api_keys` or `coordinator.admin_keys`; `pull` and `rm` need an admin key. Unset: no key is sent.",
    },
    KeySpec {
        key: "coordinator.gateway_bind",
        env: "SOLLOL_GATEWAY_BIND",
        default: Some("127.0.0.1:11435"),
        doc: "Address of the HTTP gateway (Ollama-compatible API, sollol API, health). Loopback by default: exposing it is an explicit choice.",
    },
    KeySpec {
        key: "coordinator.cluster_bind",
        env: "SOLLOL_CLUSTER_BIND",
        default: Some("0.0.0.0:11436"),
        doc: "Address agents join on. Every connection must prove it holds the cluster token before it is accepted. Other coordinators of the cluster connect here too.",
    },
    KeySpec {
        key: "coordinator.peers",
        env: "SOLLOL_PEERS",
        default: None,
        doc: "Other coordinators of the same cluster (their cluster addresses, `HOST:PORT`, comma-separated or a TOML list; names resolved again every minute). Coordinators that find each other here or over mDNS form a group: each routes every request itself, and they share what routing learned, their requests in flight per node, open breakers and running loads, gossiped every 100 ms over the cluster port (token proved both ways, then encrypted). Coordinators whose shared configuration differs (`coordinator.api_keys`/`admin_keys`, `coordinator.nodes`, `discovery.scan`, `models.replicas`, `model_sharding_enabled` and `distributed.*`) refuse each other and say which. Listing a coordinator's own address is harmless, so every coordinator can have the same list. Default: none.",
    },
    KeySpec {
        key: "coordinator.advertise",
        env: "SOLLOL_ADVERTISE",
        default: None,
        doc: "The cluster address other coordinators reach this one at, `HOST:PORT` (an IP address). Default: `coordinator.cluster_bind`, with an unspecified address replaced by the address this machine uses to reach the first of `coordinator.peers` (loopback when there is none).",
    },
    KeySpec {
        key: "coordinator.down_after_missed",
        env: "SOLLOL_DOWN_AFTER_MISSED",
        default: Some("3"),
        doc: "A node is `down` after this many heartbeat intervals without a report (it is `suspect` after one and a half).",
    },
    KeySpec {
        key: "coordinator.handshake_timeout",
        env: "SOLLOL_HANDSHAKE_TIMEOUT",
        default: Some("5s"),
        doc: "A connection on the cluster port that has not finished the handshake by then is refused and closed.",
    },
    KeySpec {
        key: "coordinator.max_cluster_connections",
        env: "SOLLOL_MAX_CLUSTER_CONNECTIONS",
        default: Some("1024"),
        doc: "Connections on the cluster port beyond this many are closed at once.",
    },
    KeySpec {
        key: "coordinator.event_retention",
        env: "SOLLOL_EVENT_RETENTION",
        default: Some("10000"),
        doc: "How many node events (joined, up, suspect, down, left) the SQLite history keeps; older ones are deleted.",
    },
    KeySpec {
        key: "coordinator.nodes",
        env: "SOLLOL_NODES",
        default: None,
        doc: "Plain Ollama servers without an agent, comma-separated (or a TOML list) `http://HOST:PORT` URLs. The coordinator probes each (`/api/version`, `/api/tags`, `/api/ps`) every `coordinator.probe_interval` and routes to it like any node. Default: none.",
    },
    KeySpec {
        key: "coordinator.probe_interval",
        env: "SOLLOL_PROBE_INTERVAL",
        default: Some("2s"),
        doc: "How often the coordinator probes the static `coordinator.nodes`; they are `down` after `down_after_missed` failed probes.",
    },
    KeySpec {
        key: "coordinator.strategy",
        env: "SOLLOL_STRATEGY",
        default: Some("intelligent"),
        doc: "Default routing strategy: `intelligent`, `round_robin`, `least_loaded`, `latency_first`, `fairness` or `random`. A request can pick another with the `X-Sollol-Strategy` header.",
    },
    KeySpec {
        key: "coordinator.node_slots",
        env: "SOLLOL_NODE_SLOTS",
        default: Some("1"),
        doc: "Requests routing assumes each node runs at once (match Ollama's `OLLAMA_NUM_PARALLEL`); more wait in the node's queue.",
    },
    KeySpec {
        key: "coordinator.node_queue_depth",
        env: "SOLLOL_NODE_QUEUE_DEPTH",
        default: Some("2"),
        doc: "Requests the gateway lets wait in a node's own queue beyond its slots. When every node with the model has `node_slots + node_queue_depth` in flight, new requests wait in the gateway's priority queue instead.",
    },
    KeySpec {
        key: "coordinator.queue_capacity",
        env: "SOLLOL_QUEUE_CAPACITY",
        default: Some("256"),
        doc: "Requests that may wait in the gateway's priority queue; beyond it requests get HTTP 429 with `Retry-After`.",
    },
    KeySpec {
        key: "coordinator.queue_timeout",
        env: "SOLLOL_QUEUE_TIMEOUT",
        default: Some("30s"),
        doc: "How long a request may wait in the priority queue before it gets HTTP 503.",
    },
    KeySpec {
        key: "coordinator.queue_aging",
        env: "SOLLOL_QUEUE_AGING",
        default: Some("3s"),
        doc: "Waiting this long raises a queued request's priority by one level (priorities are 1–10 from `X-Sollol-Priority`, default 5), so low priorities never starve.",
    },
    KeySpec {
        key: "coordinator.hedging",
        env: "SOLLOL_HEDGING",
        default: Some("true"),
        doc: "Hedge slow requests: when the chosen node has not answered after three times its learned time to first token (streaming) or twice its predicted time (non-streaming), and the next node has a free slot, send the same request there too; the first answer wins and the other is cancelled.",
    },
    KeySpec {
        key: "coordinator.calibration",
        env: "SOLLOL_CALIBRATION",
        default: Some("true"),
        doc: "Measure idle nodes that were never measured with a model by sending them a short generation of the gateway's own (8 tokens, `/api/generate`), at most once per node and model every 10 minutes, so no client request pays for trying an unknown node. It loads the model on that node.",
    },
    KeySpec {
        key: "coordinator.warmup",
        env: "SOLLOL_WARMUP",
        default: Some("true"),
        doc: "Load models before requests need them: the models the history says are asked for (within `coordinator.warmup_window`) are loaded, with Ollama's load-only request, on the nodes the router would pick for them (not over four times slower than the model's fastest node), within the most models each node was seen holding — when the coordinator starts, when a node joins, and when a node's Ollama restarted (every model it held gone before the time Ollama said it would unload them). Only idle nodes are warmed, one load at a time per node; a request that finds a node's queue full loads its model on an idle node the same way. Warm-ups show in the request feed (strategy `warmup`) and the metrics.",
    },
    KeySpec {
        key: "coordinator.warmup_window",
        env: "SOLLOL_WARMUP_WINDOW",
        default: Some("24h"),
        doc: "How far back the history is read for the demand that warm-up follows.",
    },
    KeySpec {
        key: "coordinator.warmup_models",
        env: "SOLLOL_WARMUP_MODELS",
        default: Some("4"),
        doc: "The most models warmed, the most asked-for first; a model is warmed only with at least 3 requests and 5% of all requests in the window.",
    },
    KeySpec {
        key: "coordinator.max_attempts",
        env: "SOLLOL_MAX_ATTEMPTS",
        default: Some("3"),
        doc: "Different nodes a request is tried on at most when nodes fail before answering.",
    },
    KeySpec {
        key: "coordinator.response_timeout",
        env: "SOLLOL_RESPONSE_TIMEOUT",
        default: Some("300s"),
        doc: "How long a node may take to start answering (its response headers, which include a cold model load) before the next node is tried.",
    },
    KeySpec {
        key: "coordinator.header_read_timeout",
        env: "SOLLOL_HEADER_READ_TIMEOUT",
        default: Some("30s"),
        doc: "A client that takes longer than this to send a request's headers (an idle or slowloris connection) is disconnected, on the gateway and on the engine's port (idle kept-alive connections too). Keep it above 20 s: the gateway drops its idle connections to nodes after 20 s, before a node's engine would.",
    },
    KeySpec {
        key: "coordinator.body_read_timeout",
        env: "SOLLOL_BODY_READ_TIMEOUT",
        default: Some("30s"),
        doc: "A request body that stops arriving for this long (a stalled or trickling upload) is abandoned with HTTP 408.",
    },
    KeySpec {
        key: "coordinator.body_deadline",
        env: "SOLLOL_BODY_DEADLINE",
        default: Some("5m"),
        doc: "A request body still arriving after this long is abandoned with HTTP 408, however steadily it trickles (32 MiB at 1 Mbit/s takes about 4.5 minutes).",
    },
    KeySpec {
        key: "coordinator.body_memory",
        env: "SOLLOL_BODY_MEMORY",
        default: Some("1GiB"),
        doc: "Memory the gateway lets request bodies in flight take, counted at worst, as 17 bytes per byte of body (the bytes and the raw slices routing reads: a list of one-digit numbers takes a 16-byte slice per 2 bytes of text, and its vector may hold twice that while it grows; a body that costs more than the whole budget still passes, alone). A request that finds no room waits up to `coordinator.body_read_timeout`, then gets HTTP 503 with `Retry-After`.",
    },
    KeySpec {
        key: "coordinator.max_request_body",
        env: "SOLLOL_MAX_REQUEST_BODY",
        default: Some("33554432"),
        doc: "Largest request body in bytes (default 32 MiB); larger ones get HTTP 413.",
    },
    KeySpec {
        key: "coordinator.max_response_body",
        env: "SOLLOL_MAX_RESPONSE_BODY",
        default: Some("256MiB"),
        doc: "Largest answer the gateway reads whole from a node (answers that are not streamed, embedding batches); a larger one is answered with HTTP 502 instead of filling the coordinator's memory. Streamed answers pass through and are not limited.",
    },
    KeySpec {
        key: "coordinator.api_keys",
        env: "SOLLOL_API_KEYS",
        default: None,
        doc: "API keys for the gateway with the inference scope, comma-separated (or a TOML list), each `NAME=KEY` or a bare `KEY` (at least 16 characters). When keys are set (here or in `coordinator.admin_keys`), every route except `GET /`, `/healthz`, `/readyz` and the dashboard's files needs `Authorization: Bearer KEY` or `X-API-Key: KEY`; the key's name attributes requests to an application. An inference key generates, embeds and reads the cluster's state; it gets HTTP 403 on what changes the cluster (see `coordinator.admin_keys`). Default: none (open).",
    },
    KeySpec {
        key: "coordinator.admin_keys",
        env: "SOLLOL_ADMIN_KEYS",
        default: None,
        doc: "API keys with the admin scope, as `coordinator.api_keys`: everything an inference key may do, and what changes the cluster (`/api/pull`, `/api/delete`, `/api/copy`, `/api/create`, `/api/push`, `/api/blobs/…`, planning a distributed model).",
    },
    KeySpec {
        key: "coordinator.requests_per_minute",
        env: "SOLLOL_REQUESTS_PER_MINUTE",
        default: Some("0"),
        doc: "Requests per minute each API key (when keys are set) and each application (`X-Sollol-App`, else the key's name, else the User-Agent) may send to the forwarded routes (generate, chat, embed, …), with a burst of one minute's worth; past it, HTTP 429 with `Retry-After`. 0: no limit.",
    },
    KeySpec {
        key: "coordinator.tokens_per_minute",
        env: "SOLLOL_TOKENS_PER_MINUTE",
        default: Some("0"),
        doc: "Generated tokens per minute for each API key and each application, counted from the answers' `eval_count`: a client past it gets HTTP 429 with `Retry-After` until its minute's budget is back above zero. 0: no limit.",
    },
    KeySpec {
        key: "http.allowed_origins",
        env: "SOLLOL_ALLOWED_ORIGINS",
        default: None,
        doc: "Web page origins allowed to call the gateway and the engine's port from a browser, besides Ollama's defaults (`http(s)://localhost`, `127.0.0.1`, `0.0.0.0` and `[::1]` on any port, and `app://`, `file://`, `tauri://`, `vscode-webview://`, `vscode-file://`) and the server's own pages; comma-separated or a TOML list, `*` matches any run of characters (`https://*.example.org`; `*` alone allows every page), as `OLLAMA_ORIGINS` does for Ollama. A request from any other page gets HTTP 403 before it runs; requests without an `Origin` (curl, SDKs) are not affected.",
    },
    KeySpec {
        key: "http.allowed_hosts",
        env: "SOLLOL_ALLOWED_HOSTS",
        default: None,
        doc: "Host names clients may use to reach the gateway and the engine's port (`*` matches any run of characters). On a server bound to loopback, local names (`localhost`, `*.localhost`, `*.local`, `*.internal`, this machine's name, loopback and private addresses) are always accepted and others get HTTP 403, which stops DNS rebinding; bound beyond loopback, any name is accepted unless this list is set, and then only these names and IP addresses.",
    },
    KeySpec {
        key: "http.max_connections",
        env: "SOLLOL_MAX_CONNECTIONS",
        default: Some("4096"),
        doc: "Open HTTP connections each server (the gateway, the engine's port) holds at once; past it, new connections wait until one closes. Idle connections close after `coordinator.header_read_timeout`.",
    },
    KeySpec {
        key: "http.max_connections_per_address",
        env: "SOLLOL_MAX_CONNECTIONS_PER_ADDRESS",
        default: Some("256"),
        doc: "Open HTTP connections one remote address may hold on each server; past it, that address's new connections are closed at once. Loopback clients (this machine) are not limited.",
    },
    KeySpec {
        key: "agent.join",
        env: "SOLLOL_JOIN",
        default: None,
        doc: "The coordinators' cluster addresses, `HOST:PORT`, comma-separated or a TOML list: the agent joins every one (several coordinators of one cluster, see `coordinator.peers`). Given one address, the agent also joins the other coordinators that one names; given several, exactly those. Without it `sollol agent` joins the coordinator it finds over mDNS (`discovery.mdns`) or through `discovery.seeds` that proves it holds the same token, and the others it names; `sollol up` joins its own coordinator.",
    },
    KeySpec {
        key: "agent.token",
        env: "SOLLOL_TOKEN",
        default: None,
        doc: "The cluster token printed by `sollol up` and `sollol token` (at least 32 characters: 128 bits as hex). Required by `sollol agent` to join; without it (and with `discovery.mdns` on) the agent only announces itself and waits, listed by the coordinator as discovered, not joined. Prefer `agent.token_file`: `--token` on a command line is visible to every user of the machine. Never printed by `print-config`.",
    },
    KeySpec {
        key: "agent.token_file",
        env: "SOLLOL_TOKEN_FILE",
        default: None,
        doc: "A file holding the cluster token (e.g. a copy of the coordinator's `DATA_DIR/cluster-token`, readable only by the agent's user); takes precedence over `agent.token`.",
    },
    KeySpec {
        key: "agent.name",
        env: "SOLLOL_NODE_NAME",
        default: None,
        doc: "Name shown for this node. Default: the host name.",
    },
    KeySpec {
        key: "agent.heartbeat_interval",
        env: "SOLLOL_HEARTBEAT_INTERVAL",
        default: Some("2s"),
        doc: "How often the agent samples its hardware and Ollama state and reports to the coordinator (100ms to 10m).",
    },
    KeySpec {
        key: "agent.ollama_url",
        env: "SOLLOL_OLLAMA_URL",
        default: None,
        doc: "The node's Ollama server (`http://HOST:PORT`). Default: http://127.0.0.1:11434, reported only when it answers.",
    },
    KeySpec {
        key: "agent.models_dir",
        env: "SOLLOL_MODELS_DIR",
        default: None,
        doc: "Directory for GGUF models; its file system's free space is reported. Default: `models` inside `data_dir`.",
    },
    KeySpec {
        key: "agent.reconnect_initial_backoff",
        env: "SOLLOL_RECONNECT_INITIAL_BACKOFF",
        default: Some("500ms"),
        doc: "First delay before the agent reconnects to a lost coordinator; it doubles on every failure.",
    },
    KeySpec {
        key: "agent.reconnect_max_backoff",
        env: "SOLLOL_RECONNECT_MAX_BACKOFF",
        default: Some("30s"),
        doc: "Cap of the reconnect delay. Each delay is drawn between half the current step and the step (jitter).",
    },
    KeySpec {
        key: "engine.mode",
        env: "SOLLOL_ENGINE",
        default: Some("auto"),
        doc: "The built-in engine: `auto` serves the GGUF models found when no Ollama answers at `agent.ollama_url`; `on` always serves them (instead of Ollama); `off` never.",
    },
    KeySpec {
        key: "engine.bind",
        env: "SOLLOL_ENGINE_BIND",
        default: Some("127.0.0.1:0"),
        doc: "Address of the engine's Ollama-compatible API (port 0: any free port). Use e.g. `0.0.0.0:11437` when the coordinator runs on another machine.",
    },
    KeySpec {
        key: "engine.parallel",
        env: "SOLLOL_ENGINE_PARALLEL",
        default: Some("1"),
        doc: "Sequences the engine generates at once; more requests wait (Ollama's `OLLAMA_NUM_PARALLEL`).",
    },
    KeySpec {
        key: "engine.keep_alive",
        env: "SOLLOL_ENGINE_KEEP_ALIVE",
        default: Some("5m"),
        doc: "How long a model stays loaded after its last request, unless the request's `keep_alive` says otherwise.",
    },
    KeySpec {
        key: "engine.ollama_models",
        env: "SOLLOL_OLLAMA_MODELS",
        default: None,
        doc: "Ollama's model store, whose downloaded GGUF models the engine can serve too. Default: `~/.ollama/models` when it exists.",
    },
    KeySpec {
        key: "engine.stage_bind",
        env: "SOLLOL_STAGE_BIND",
        default: Some("127.0.0.1:0"),
        doc: "Address of the agent's stage port, where the coordinator and other stages reach it for distributed inference (layer protocol, cluster token required; port 0: any free port). Use e.g. `0.0.0.0:7703` when other machines take part.",
    },
    KeySpec {
        key: "engine.max_memory",
        env: "SOLLOL_ENGINE_MAX_MEMORY",
        default: None,
        doc: "Most memory the agent offers to models (bytes, or with a unit: `512MiB`, `6GiB`, `8GB`): the engine does not load a model larger than this whole and unloads the least recently used models to keep the ones it loads within it, a stage plans its layers within it, and the coordinator counts only this much of the node when deciding whether a model fits on one node. Default: whatever the node has available (for the engine: when it starts).",
    },
    KeySpec {
        key: "engine.max_disk",
        env: "SOLLOL_ENGINE_MAX_DISK",
        default: None,
        doc: "Most disk the model files in `agent.models_dir` may take together (bytes, or with a unit: `20GiB`): a model copied to this node from another agent is refused before any byte is written when it would pass this, or the free space of the disk, with both numbers in the error. Default: the free space of the disk only.",
    },
    KeySpec {
        key: "models.replicas",
        env: "SOLLOL_MODELS_REPLICAS",
        default: None,
        doc: "Copies of models the coordinator keeps on the cluster: in the file a table, `replicas = { \"llama3.2:3b\" = 2, \"nomic-embed-text\" = \"all\" }`; in the environment `llama3.2:3b=2,nomic-embed-text=all`. The coordinator adds copies (node to node when a node has the model, else one registry pull) on the roomiest nodes that lack it until the count is met, and again when a node holding it goes away; it never removes a copy. Also set at run time with `PUT /api/sollol/v1/replicas/MODEL` (admin scope). Default: none.",
    },
    KeySpec {
        key: "distributed.models",
        env: "SOLLOL_DISTRIBUTED_MODELS",
        default: None,
        doc: "Models (`name:tag`, comma-separated or a TOML list) the coordinator serves split across agents when `model_sharding_enabled` is true. At least one agent needs a copy of the GGUF; the others fetch just their part's tensors from it (every copy must be the same file). Default: none.",
    },
    KeySpec {
        key: "distributed.auto",
        env: "SOLLOL_DISTRIBUTED_AUTO",
        default: Some("true"),
        doc: "With `model_sharding_enabled`: also distribute, automatically, every model an agent holds that no single up node has the memory for (its file size plus 10%, against the node's available memory or `engine.max_memory`), as long as the agents with stage ports have enough between them. Such a model is served only through its stages.",
    },
    KeySpec {
        key: "distributed.max_stages",
        env: "SOLLOL_DISTRIBUTED_MAX_STAGES",
        default: Some("2"),
        doc: "Most agents one distributed model is split over (those with the most free memory that hold the model).",
    },
    KeySpec {
        key: "discovery.scan",
        env: "SOLLOL_DISCOVERY_SCAN",
        default: None,
        doc: "IPv4 ranges (CIDR, comma-separated or a TOML list, each /16 or smaller) the coordinator scans for plain Ollama servers: every address on `discovery.scan_port`, 64 at a time, 0.4 s to connect; what answers `/api/version` as Ollama joins the routing like `coordinator.nodes`, the rest is listed by `sollol discover`. Off by default: scan only networks you run.",
    },
    KeySpec {
        key: "discovery.scan_port",
        env: "SOLLOL_DISCOVERY_SCAN_PORT",
        default: Some("11434"),
        doc: "The port `discovery.scan` tries on every address.",
    },
    KeySpec {
        key: "discovery.scan_interval",
        env: "SOLLOL_DISCOVERY_SCAN_INTERVAL",
        default: Some("5m"),
        doc: "How often `discovery.scan` scans its ranges again (servers found are probed every `coordinator.probe_interval` in between).",
    },
    KeySpec {
        key: "discovery.mdns",
        env: "SOLLOL_MDNS",
        default: Some("true"),
        doc: "Announce this process over multicast DNS as a DNS-SD service `_sollol._tcp` (TXT: node id, name, role and roles, version) on every IPv4 interface but loopback, and browse for the others: the coordinator lists the agents it sees (`sollol discover`), and an agent without `agent.join` joins the coordinator it finds, if the coordinator proves it holds the same token. Turn off on networks where announcing is unwelcome.",
    },
    KeySpec {
        key: "discovery.seeds",
        env: "SOLLOL_SEEDS",
        default: None,
        doc: "Coordinator cluster addresses (`HOST:PORT`, comma-separated or a TOML list; names are resolved again at every attempt) that an agent without `agent.join` tries besides what mDNS finds: for routed networks, VPNs and VLANs where multicast does not pass.",
    },
    KeySpec {
        key: "cache.enabled",
        env: "SOLLOL_CACHE_ENABLED",
        default: Some("false"),
        doc: "Answer repeated requests from the gateway's response cache, in memory, without touching a node: embeddings (`/api/embed`, `/api/embeddings`, `/v1/embeddings`) and non-streaming deterministic generations (`/api/generate`, `/api/chat`, `/v1/chat/completions`, `/v1/completions` with temperature 0 or a fixed non-negative seed). The key is the route, the model's digest as every node that has the model reports it (no agreement: no caching) and the whole request body with every option; only `stream: false` and `keep_alive` are left out. Only HTTP 200 answers are kept. Answers say `X-Sollol-Cache: hit` or `miss`. See docs/gateway.md.",
    },
    KeySpec {
        key: "cache.max_bytes",
        env: "SOLLOL_CACHE_MAX_BYTES",
        default: Some("256MiB"),
        doc: "Memory the response cache may hold (bytes, or with a unit: `64MiB`, `1GiB`; at least 1MiB), counted as each answer's bytes plus 128 bytes for its key and bookkeeping; the least recently used answers are dropped to make room. An answer or an embedding request body larger than an eighth of it is not cached; generation request bodies over 1 MiB are not either.",
    },
    KeySpec {
        key: "cache.ttl",
        env: "SOLLOL_CACHE_TTL",
        default: Some("1h"),
        doc: "How long a cached answer is served after it was stored; then the next such request goes to a node again.",
    },
];

/// The spec of a key the code itself names; a key missing from [`KEYS`] is a programming error.
pub(super) fn spec_of(key: &str) -> &'static KeySpec {
    KEYS.iter()
        .find(|spec| spec.key == key)
        .unwrap_or_else(|| panic!("configuration key `{key}` is not in KEYS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_documented() {
        let docs = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/configuration.md"
        ))
        .expect("docs/configuration.md");
        for spec in KEYS {
            assert!(
                docs.contains(&format!("`{}`", spec.key)),
                "docs/configuration.md lacks `{}`",
                spec.key
            );
            assert!(
                docs.contains(spec.env),
                "docs/configuration.md lacks {}",
                spec.env
            );
        }
    }
}
