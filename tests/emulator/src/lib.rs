//! An Ollama server emulator for sollol's tests and benchmarks.
//!
//! It answers Ollama's API (`/api/chat`, `/api/generate`, `/api/embed`,
//! `/api/embeddings`, `/api/tags`, `/api/ps`, `/api/show`, `/api/version`,
//! `/api/pull`, the model store: `/api/delete`, `/api/copy`, `/api/create`,
//! `/api/push`, `/api/blobs/:digest`; `GET /`) and the OpenAI-compatible routes Ollama serves
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/models`), with Ollama's field names and timing fields, NDJSON and SSE
//! streaming. Behaviour is emulated, not computed: a node has a decode and a
//! prompt speed, a number of parallel slots (requests beyond them queue), a
//! cold-load time, a limit of loaded models (least recently used is evicted)
//! and keep-alive expiry. Faults can be switched on at run time.
//!
//! Generated text is deterministic (`tok0 tok1 …`) and so are embeddings (a
//! function of the model and the input), so tests can check order and content.

mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

/// How one emulated node behaves.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    pub name: String,
    /// Installed models, `name:tag`.
    pub models: Vec<String>,
    /// Generated tokens per second per request; `f64::INFINITY` answers at once.
    pub decode_tokens_per_second: f64,
    pub prompt_tokens_per_second: f64,
    /// Requests processed at once (Ollama's `OLLAMA_NUM_PARALLEL`); the rest queue.
    pub parallel: usize,
    /// Time to load a model that is not loaded.
    pub load_time: Duration,
    /// Models kept loaded at once (Ollama's `OLLAMA_MAX_LOADED_MODELS`).
    pub max_loaded_models: usize,
    /// How long a model stays loaded after its last request, unless the request says otherwise.
    pub keep_alive: Duration,
    /// Tokens generated when a request sets no `num_predict`.
    pub default_num_predict: u32,
    pub embedding_dimensions: usize,
    pub version: String,
    /// Names the emulated registry does not have: pulling one fails as Ollama's does (HTTP 500,
    /// "pull model manifest: file does not exist").
    pub not_in_registry: Vec<String>,
    /// Ollama's model store on disk (`manifests/…` and `blobs/sha256-…`, as Ollama lays them out), so an
    /// agent reading it (`engine.ollama_models`) can copy models to other nodes: a pull writes the
    /// model's blob (`blob_bytes` bytes made from its name) and manifest; an uploaded blob and a model
    /// created from it are written too. `None`: models are names only.
    pub store: Option<std::path::PathBuf>,
    /// The size of a pulled model's blob in `store`.
    pub blob_bytes: u64,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            name: "emulated".to_owned(),
            models: vec![
                "smollm2:135m".to_owned(),
                "nomic-embed-text:latest".to_owned(),
            ],
            decode_tokens_per_second: f64::INFINITY,
            prompt_tokens_per_second: f64::INFINITY,
            parallel: 4,
            load_time: Duration::ZERO,
            max_loaded_models: 3,
            keep_alive: Duration::from_secs(300),
            default_num_predict: 16,
            embedding_dimensions: 8,
            version: "0.12.3".to_owned(),
            not_in_registry: Vec::new(),
            store: None,
            blob_bytes: 4 << 20,
        }
    }
}

/// A fault to inject; applies to requests that generate or embed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    None,
    /// Answer HTTP 500 with Ollama's error shape.
    InternalError,
    /// Accept the request and never answer.
    HangBeforeFirstByte,
    /// Stop the response (streaming or not) after this many tokens by dropping the connection.
    DropMidStream {
        after_tokens: u32,
    },
    /// Everything takes this many times longer.
    Slow {
        factor: f64,
    },
}

/// A running emulator on 127.0.0.1.
#[derive(Debug)]
pub struct Emulator {
    address: SocketAddr,
    state: Arc<EmulatorState>,
    server: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct EmulatorState {
    config: EmulatorConfig,
    fault: Mutex<Fault>,
    slots: Semaphore,
    /// Serialises model loads, as Ollama's scheduler does.
    load_lock: tokio::sync::Mutex<()>,
    models: Mutex<Vec<String>>,
    loaded: Mutex<Vec<LoadedModel>>,
    served: AtomicU64,
    started: AtomicU64,
    /// Pulls that reached the (emulated) registry.
    pulls: AtomicU64,
    /// Bytes those pulls downloaded.
    pulled_bytes: AtomicU64,
    /// Pushes to the (emulated) registry.
    pushes: AtomicU64,
    /// Uploaded blobs: digest and size.
    blobs: Mutex<HashMap<String, u64>>,
}

#[derive(Clone, Debug)]
struct LoadedModel {
    name: String,
    last_used: Instant,
    expires_at: Instant,
    expires_at_wall: SystemTime,
}

impl Emulator {
    /// Starts on a free loopback port.
    pub async fn start(config: EmulatorConfig) -> std::io::Result<Self> {
        Self::start_on(config, "127.0.0.1:0".parse().expect("literal address")).await
    }

    pub async fn start_on(config: EmulatorConfig, address: SocketAddr) -> std::io::Result<Self> {
        if let Some(root) = &config.store {
            for model in &config.models {
                store::write_pulled(root, &normalize(model), config.blob_bytes)?;
            }
        }
        let state = Arc::new(EmulatorState {
            slots: Semaphore::new(config.parallel.max(1)),
            models: Mutex::new(config.models.iter().map(|name| normalize(name)).collect()),
            config,
            fault: Mutex::new(Fault::None),
            load_lock: tokio::sync::Mutex::new(()),
            loaded: Mutex::new(Vec::new()),
            served: AtomicU64::new(0),
            started: AtomicU64::new(0),
            pulls: AtomicU64::new(0),
            pulled_bytes: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
            blobs: Mutex::new(HashMap::new()),
        });
        let listener = TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let server = tokio::spawn(serve(listener, Arc::clone(&state)));
        Ok(Self {
            address,
            state,
            server: Mutex::new(Some(server)),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn name(&self) -> &str {
        &self.state.config.name
    }

    /// Ollama's store on disk, when it keeps one (`EmulatorConfig::store`).
    pub fn store(&self) -> Option<&std::path::Path> {
        self.state.config.store.as_deref()
    }

    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.state.fault) = fault;
    }

    /// Requests that finished generating or embedding.
    pub fn served(&self) -> u64 {
        self.state.served.load(Ordering::Relaxed)
    }

    /// Requests that reached a generate or embed handler, finished or not.
    pub fn started(&self) -> u64 {
        self.state.started.load(Ordering::Relaxed)
    }

    /// Pulls that went to the (emulated) registry.
    pub fn registry_pulls(&self) -> u64 {
        self.state.pulls.load(Ordering::Relaxed)
    }

    /// Bytes the pulls downloaded from the (emulated) registry.
    pub fn registry_bytes(&self) -> u64 {
        self.state.pulled_bytes.load(Ordering::Relaxed)
    }

    /// Pushes to the (emulated) registry.
    pub fn registry_pushes(&self) -> u64 {
        self.state.pushes.load(Ordering::Relaxed)
    }

    /// Installed models, `name:tag`, in the order they arrived.
    pub fn models(&self) -> Vec<String> {
        lock(&self.state.models).clone()
    }

    /// Models loaded now (not expired), most recently used first.
    pub fn loaded_models(&self) -> Vec<String> {
        self.state
            .live_loaded()
            .into_iter()
            .map(|model| model.name)
            .collect()
    }

    /// Stops serving as a killed process would: the port refuses connections and open ones drop.
    pub fn kill(&self) {
        if let Some(server) = lock(&self.server).take() {
            server.abort();
        }
        lock(&self.state.loaded).clear();
    }

    /// Serves again on the same port after [`Emulator::kill`], with nothing loaded.
    pub async fn restart(&self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.address).await?;
        let server = tokio::spawn(serve(listener, Arc::clone(&self.state)));
        *lock(&self.server) = Some(server);
        Ok(())
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(server) = lock(&self.server).take() {
            server.abort();
        }
    }
}

async fn serve(listener: TcpListener, state: Arc<EmulatorState>) {
    let app = Router::new()
        .route("/", get(|| async { "Ollama is running" }))
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route("/api/pull", post(pull))
        .route("/api/delete", axum::routing::delete(store::delete))
        .route("/api/copy", post(store::copy))
        .route("/api/create", post(store::create))
        .route("/api/push", post(store::push))
        .route(
            "/api/blobs/{digest}",
            // Ollama takes blobs of any size (a model is gigabytes).
            post(store::blob_upload)
                .head(store::blob_exists)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
        .route("/api/embed", post(embed))
        .route("/api/embeddings", post(embeddings))
        .route("/v1/models", get(openai_models))
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/completions", post(openai_completions))
        .route("/v1/embeddings", post(openai_embeddings))
        .with_state(state);
    // TCP_NODELAY matters: without it every keep-alive proxy in front shows a delayed-ACK stall.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    let _ = axum::serve(listener, app).await;
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `llama3` means `llama3:latest`, as in Ollama.
pub fn normalize(name: &str) -> String {
    if name.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// UTC time as RFC 3339 with nanoseconds, as Ollama writes it.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_nanos()
    )
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl EmulatorState {
    fn fault(&self) -> Fault {
        *lock(&self.fault)
    }

    fn slow_factor(&self) -> f64 {
        match self.fault() {
            Fault::Slow { factor } => factor.max(0.0),
            _ => 1.0,
        }
    }

    fn has_model(&self, model: &str) -> bool {
        lock(&self.models).iter().any(|name| name == model)
    }

    fn live_loaded(&self) -> Vec<LoadedModel> {
        let now = Instant::now();
        let mut loaded = lock(&self.loaded);
        loaded.retain(|model| model.expires_at > now);
        loaded.sort_by_key(|model| std::cmp::Reverse(model.last_used));
        loaded.clone()
    }

    /// Loads `model` if needed; returns the time spent loading.
    async fn ensure_loaded(&self, model: &str) -> Duration {
        let started = Instant::now();
        let _load = self.load_lock.lock().await;
        if self.live_loaded().iter().any(|loaded| loaded.name == model) {
            return started.elapsed().min(Duration::from_millis(1));
        }
        let load_time = self.config.load_time.mul_f64(self.slow_factor());
        if !load_time.is_zero() {
            tokio::time::sleep(load_time).await;
        }
        let mut loaded = lock(&self.loaded);
        loaded.sort_by_key(|model| std::cmp::Reverse(model.last_used));
        loaded.truncate(self.config.max_loaded_models.max(1) - 1);
        let now = Instant::now();
        loaded.push(LoadedModel {
            name: model.to_owned(),
            last_used: now,
            expires_at: now + self.config.keep_alive,
            expires_at_wall: SystemTime::now() + self.config.keep_alive,
        });
        started.elapsed()
    }

    fn touch(&self, model: &str, keep_alive: Duration) {
        let now = Instant::now();
        let mut loaded = lock(&self.loaded);
        if keep_alive.is_zero() {
            loaded.retain(|loaded| loaded.name != model);
            return;
        }
        if let Some(entry) = loaded.iter_mut().find(|loaded| loaded.name == model) {
            entry.last_used = now;
            entry.expires_at = now + keep_alive;
            entry.expires_at_wall = SystemTime::now() + keep_alive;
        }
    }

    fn token_interval(&self) -> Duration {
        per_token(self.config.decode_tokens_per_second).mul_f64(self.slow_factor())
    }

    fn prompt_time(&self, prompt_tokens: u64) -> Duration {
        per_token(self.config.prompt_tokens_per_second)
            .mul_f64(prompt_tokens as f64 * self.slow_factor())
    }
}

fn per_token(rate: f64) -> Duration {
    if rate.is_finite() && rate > 0.0 {
        Duration::from_secs_f64(1.0 / rate)
    } else {
        Duration::ZERO
    }
}

async fn version(State(state): State<Arc<EmulatorState>>) -> Response {
    axum::Json(json!({ "version": state.config.version })).into_response()
}

fn digest_of(name: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!(
        "{hash:016x}{:016x}{hash:016x}{:016x}",
        hash.rotate_left(17),
        hash.rotate_left(29)
    )
}

fn is_embedding_model(name: &str) -> bool {
    name.contains("embed")
}

fn details(name: &str) -> Value {
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": if is_embedding_model(name) { "nomic-bert" } else { "llama" },
        "families": [if is_embedding_model(name) { "nomic-bert" } else { "llama" }],
        "parameter_size": if is_embedding_model(name) { "137M" } else { "134.52M" },
        "quantization_level": "Q4_1"
    })
}

async fn tags(State(state): State<Arc<EmulatorState>>) -> Response {
    let models: Vec<Value> = lock(&state.models)
        .iter()
        .map(|name| {
            json!({
                "name": name,
                "model": name,
                "modified_at": "2026-11-01T10:00:00.000000000Z",
                "size": 98_362_432u64,
                "digest": digest_of(name),
                "details": details(name),
            })
        })
        .collect();
    axum::Json(json!({ "models": models })).into_response()
}

async fn ps(State(state): State<Arc<EmulatorState>>) -> Response {
    let models: Vec<Value> = state
        .live_loaded()
        .iter()
        .map(|loaded| {
            json!({
                "name": loaded.name,
                "model": loaded.name,
                "size": 150_000_000u64,
                "digest": digest_of(&loaded.name),
                "details": details(&loaded.name),
                "expires_at": rfc3339(loaded.expires_at_wall),
                "size_vram": 150_000_000u64,
                "context_length": 4096,
            })
        })
        .collect();
    axum::Json(json!({ "models": models })).into_response()
}

/// Parses a JSON body; Ollama answers 400 with the decoder's message.
fn parse_body(body: &Bytes) -> Result<Value, Box<Response>> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|error| Box::new(error_response_bad_request(&error.to_string())))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(Box::new(error_response_bad_request(
            "request body must be a JSON object",
        )))
    }
}

fn error_response_bad_request(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

/// The request's JSON and its installed model, or the error Ollama would answer.
fn model_request(state: &EmulatorState, body: &Bytes) -> Result<(Value, String), Box<Response>> {
    let request = parse_body(body)?;
    let model = requested_model(state, &request)?;
    Ok((request, model))
}

/// The model a request names, checked against the installed ones.
fn requested_model(state: &EmulatorState, request: &Value) -> Result<String, Box<Response>> {
    let name = request
        .get("model")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .ok_or_else(|| Box::new(error(StatusCode::BAD_REQUEST, "model is required")))?;
    let model = normalize(name);
    if state.has_model(&model) {
        Ok(model)
    } else {
        Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!("model \"{name}\" not found, try pulling it first"),
        )))
    }
}

async fn show(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    let (_request, model) = match model_request(&state, &body) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    let capabilities = if is_embedding_model(&model) {
        json!(["embedding"])
    } else {
        json!(["completion"])
    };
    axum::Json(json!({
        "license": "Apache-2.0",
        "modelfile": format!("FROM {model}\n"),
        "parameters": "stop \"<|im_end|>\"",
        "template": "{{ .Prompt }}",
        "details": details(&model),
        "model_info": { "general.architecture": if is_embedding_model(&model) { "nomic-bert" } else { "llama" }, "general.parameter_count": 134_515_008u64 },
        "capabilities": capabilities,
        "modified_at": "2026-11-01T10:00:00.000000000Z",
    }))
    .into_response()
}

async fn pull(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    let request = match parse_body(&body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let Some(name) = request
        .get("model")
        .or_else(|| request.get("name"))
        .and_then(Value::as_str)
    else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    let model = normalize(name);
    state.pulls.fetch_add(1, Ordering::Relaxed);
    if state
        .config
        .not_in_registry
        .iter()
        .any(|missing| normalize(missing) == model)
    {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "pull model manifest: file does not exist",
        );
    }
    let (digest, total) = match &state.config.store {
        Some(root) => match store::write_pulled(root, &model, state.config.blob_bytes) {
            Ok(layer) => layer,
            Err(why) => return error(StatusCode::INTERNAL_SERVER_ERROR, why.to_string()),
        },
        None => (format!("sha256:{}", digest_of(&model)), 98_362_432u64),
    };
    state.pulled_bytes.fetch_add(total, Ordering::Relaxed);
    {
        let mut models = lock(&state.models);
        if !models.contains(&model) {
            models.push(model.clone());
        }
    }
    let lines = vec![
        json!({"status": "pulling manifest"}),
        json!({"status": format!("pulling {}", &digest[7..19]), "digest": digest, "total": total, "completed": total / 2}),
        json!({"status": format!("pulling {}", &digest[7..19]), "digest": digest, "total": total, "completed": total}),
        json!({"status": "verifying sha256 digest"}),
        json!({"status": "writing manifest"}),
        json!({"status": "success"}),
    ];
    if request.get("stream").and_then(Value::as_bool) == Some(false) {
        return axum::Json(json!({"status": "success"})).into_response();
    }
    let (sender, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::spawn(async move {
        for line in lines {
            let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
            bytes.push(b'\n');
            if sender.send(Ok(Bytes::from(bytes))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    stream_response(receiver, "application/x-ndjson")
}

fn stream_response(
    receiver: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    content_type: &'static str,
) -> Response {
    let mut receiver = receiver;
    let stream = futures_util::stream::poll_fn(move |context| receiver.poll_recv(context));
    (
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response()
}

/// What the generation handlers share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    Chat,
    Generate,
    OpenAiChat,
    OpenAiCompletion,
}

fn prompt_chars(request: &Value, flavour: Flavour) -> usize {
    match flavour {
        Flavour::Chat | Flavour::OpenAiChat => request
            .get("messages")
            .and_then(Value::as_array)
            .map(|messages| {
                messages
                    .iter()
                    .filter_map(|message| message.get("content").and_then(Value::as_str))
                    .map(str::len)
                    .sum()
            })
            .unwrap_or(0),
        Flavour::Generate | Flavour::OpenAiCompletion => {
            request
                .get("prompt")
                .and_then(Value::as_str)
                .map_or(0, str::len)
                + request
                    .get("system")
                    .and_then(Value::as_str)
                    .map_or(0, str::len)
        }
    }
}

fn num_predict(state: &EmulatorState, request: &Value, flavour: Flavour) -> u32 {
    let requested = match flavour {
        Flavour::OpenAiChat | Flavour::OpenAiCompletion => request
            .get("max_tokens")
            .or_else(|| request.get("max_completion_tokens"))
            .and_then(Value::as_i64),
        _ => request
            .get("options")
            .and_then(|options| options.get("num_predict"))
            .and_then(Value::as_i64),
    };
    match requested {
        Some(count) if count >= 0 => u32::try_from(count).unwrap_or(u32::MAX).min(100_000),
        _ => state.config.default_num_predict,
    }
}

/// Ollama's `keep_alive`: a duration string (`5m`, `30s`), a number of seconds, or a negative number for forever.
fn keep_alive(state: &EmulatorState, request: &Value) -> Duration {
    match request.get("keep_alive") {
        Some(Value::Number(number)) => match number.as_f64() {
            Some(seconds) if seconds < 0.0 => Duration::from_secs(u64::from(u32::MAX)),
            Some(seconds) => Duration::from_secs_f64(seconds),
            None => state.config.keep_alive,
        },
        Some(Value::String(text)) => parse_go_duration(text).unwrap_or(state.config.keep_alive),
        _ => state.config.keep_alive,
    }
}

fn parse_go_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    (seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

async fn chat(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    generation(state, body, Flavour::Chat).await
}

async fn generate(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    generation(state, body, Flavour::Generate).await
}

async fn openai_chat(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    generation(state, body, Flavour::OpenAiChat).await
}

async fn openai_completions(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    generation(state, body, Flavour::OpenAiCompletion).await
}

/// Timings of one generation, in Ollama's terms.
#[derive(Clone, Copy, Debug, Default)]
struct Timings {
    load: Duration,
    prompt_tokens: u64,
    prompt: Duration,
    eval_tokens: u64,
    eval: Duration,
    total: Duration,
}

impl Timings {
    fn ollama_fields(&self) -> Value {
        json!({
            "total_duration": nanos(self.total),
            "load_duration": nanos(self.load),
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": nanos(self.prompt),
            "eval_count": self.eval_tokens,
            "eval_duration": nanos(self.eval),
        })
    }
}

fn token_text(index: u32) -> String {
    format!("tok{index} ")
}

async fn generation(state: Arc<EmulatorState>, body: Bytes, flavour: Flavour) -> Response {
    let (request, model) = match model_request(&state, &body) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    if is_embedding_model(&model) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "\"{model}\" does not support {}",
                if flavour == Flavour::Generate {
                    "generate"
                } else {
                    "chat"
                }
            ),
        );
    }
    // Ollama's load-only request: `/api/generate` without a prompt (or `/api/chat` without messages)
    // loads the model and answers at once, without a slot. It is not a generation (`started`).
    let load_only = match flavour {
        Flavour::Generate => request
            .get("prompt")
            .is_none_or(|prompt| prompt.is_null() || prompt == ""),
        // Ollama also reads an empty `messages` list as load-only; the tests send `[]` for the
        // shortest chat, so here only a missing list is.
        Flavour::Chat => request.get("messages").is_none_or(Value::is_null),
        Flavour::OpenAiChat | Flavour::OpenAiCompletion => false,
    };
    if !load_only {
        state.started.fetch_add(1, Ordering::Relaxed);
    }
    match state.fault() {
        Fault::InternalError => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "llama runner process has terminated: exit status 2",
            );
        }
        Fault::HangBeforeFirstByte => return std::future::pending().await,
        _ => {}
    }
    if load_only {
        let keep_alive = keep_alive(&state, &request);
        state.ensure_loaded(&model).await;
        state.touch(&model, keep_alive);
        let field = if flavour == Flavour::Chat {
            ("message", json!({"role": "assistant", "content": ""}))
        } else {
            ("response", json!(""))
        };
        let mut answer = serde_json::Map::new();
        answer.insert("model".into(), json!(model));
        answer.insert("created_at".into(), json!("2026-01-01T00:00:00Z"));
        answer.insert(field.0.into(), field.1);
        answer.insert("done_reason".into(), json!("load"));
        answer.insert("done".into(), json!(true));
        return axum::Json(Value::Object(answer)).into_response();
    }
    let stream = match flavour {
        Flavour::Chat | Flavour::Generate => request
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        Flavour::OpenAiChat | Flavour::OpenAiCompletion => request
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    let prompt_tokens = (prompt_chars(&request, flavour) as u64 / 4).max(1);
    let tokens = num_predict(&state, &request, flavour);
    let keep_alive = keep_alive(&state, &request);
    let include_usage = request
        .get("stream_options")
        .and_then(|options| options.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let (sender, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let worker_state = Arc::clone(&state);
    let worker_model = model.clone();
    // The work runs in its own task so that a queued or loading request is not lost when polled lazily;
    // it stops as soon as the client goes away (every send fails).
    let worker = tokio::spawn(async move {
        let state = worker_state;
        let model = worker_model;
        let started = Instant::now();
        let Ok(_slot) = state.slots.acquire().await else {
            return;
        };
        let mut timings = Timings {
            load: state.ensure_loaded(&model).await,
            prompt_tokens,
            ..Timings::default()
        };
        let prompt_started = Instant::now();
        let prompt_time = state.prompt_time(prompt_tokens);
        if !prompt_time.is_zero() {
            tokio::time::sleep(prompt_time).await;
        }
        timings.prompt = prompt_started.elapsed();
        let drop_after = match state.fault() {
            Fault::DropMidStream { after_tokens } => Some(after_tokens),
            _ => None,
        };
        let interval = state.token_interval();
        let eval_started = Instant::now();
        let mut text = String::new();
        for index in 0..tokens {
            if drop_after == Some(index) {
                let _ = sender
                    .send(Err(std::io::Error::other("emulated crash mid-stream")))
                    .await;
                return;
            }
            if !interval.is_zero() {
                tokio::time::sleep_until((eval_started + interval * (index + 1)).into()).await;
            }
            let piece = token_text(index);
            if stream {
                let chunk = stream_chunk(flavour, &model, &piece);
                if sender.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            text.push_str(&piece);
        }
        timings.eval_tokens = u64::from(tokens);
        timings.eval = eval_started.elapsed();
        timings.total = started.elapsed();
        state.touch(&model, keep_alive);
        state.served.fetch_add(1, Ordering::Relaxed);
        let done_reason = if tokens == 0 { "stop" } else { "length" };
        for chunk in final_chunks(
            flavour,
            &model,
            &text,
            stream,
            done_reason,
            &timings,
            include_usage,
        ) {
            if sender.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    });
    if stream {
        let content_type = match flavour {
            Flavour::OpenAiChat | Flavour::OpenAiCompletion => "text/event-stream",
            _ => "application/x-ndjson",
        };
        let response = stream_response(receiver, content_type);
        drop(worker);
        response
    } else {
        // Non-streaming: the whole answer or, on an injected crash, a dropped connection after the headers.
        let mut receiver = receiver;
        let mut collected = Vec::new();
        while let Some(item) = receiver.recv().await {
            match item {
                Ok(bytes) => collected.extend_from_slice(&bytes),
                Err(error) => {
                    let failing = futures_util::stream::iter(vec![Err::<Bytes, _>(error)]);
                    return Response::new(Body::from_stream(failing));
                }
            }
        }
        if collected.is_empty() {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "generation stopped");
        }
        (
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            collected,
        )
            .into_response()
    }
}

fn line(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\n",
        serde_json::to_string(value).unwrap_or_default()
    ))
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or(0)
}

fn stream_chunk(flavour: Flavour, model: &str, piece: &str) -> Bytes {
    match flavour {
        Flavour::Chat => line(&json!({
            "model": model, "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": piece}, "done": false
        })),
        Flavour::Generate => line(&json!({
            "model": model, "created_at": now_rfc3339(), "response": piece, "done": false
        })),
        Flavour::OpenAiChat => sse(&json!({
            "id": "chatcmpl-emulated", "object": "chat.completion.chunk", "created": unix_seconds(),
            "model": model, "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": null}]
        })),
        Flavour::OpenAiCompletion => sse(&json!({
            "id": "cmpl-emulated", "object": "text_completion", "created": unix_seconds(),
            "model": model, "system_fingerprint": "fp_ollama",
            "choices": [{"text": piece, "index": 0, "finish_reason": null}]
        })),
    }
}

fn final_chunks(
    flavour: Flavour,
    model: &str,
    text: &str,
    stream: bool,
    done_reason: &str,
    timings: &Timings,
    include_usage: bool,
) -> Vec<Bytes> {
    let usage = json!({
        "prompt_tokens": timings.prompt_tokens,
        "completion_tokens": timings.eval_tokens,
        "total_tokens": timings.prompt_tokens + timings.eval_tokens
    });
    let content = if stream { "" } else { text };
    match flavour {
        Flavour::Chat | Flavour::Generate => {
            let mut value = if flavour == Flavour::Chat {
                json!({"model": model, "created_at": now_rfc3339(), "message": {"role": "assistant", "content": content}})
            } else {
                json!({"model": model, "created_at": now_rfc3339(), "response": content, "context": [1, 2, 3]})
            };
            let fields = value.as_object_mut().expect("object literal");
            fields.insert("done_reason".into(), json!(done_reason));
            fields.insert("done".into(), json!(true));
            if let Value::Object(timing_fields) = timings.ollama_fields() {
                fields.extend(timing_fields);
            }
            if stream { vec![line(&value)] } else { vec![Bytes::from(serde_json::to_vec(&value).unwrap_or_default())] }
        }
        Flavour::OpenAiChat if stream => {
            let mut chunks = vec![sse(&json!({
                "id": "chatcmpl-emulated", "object": "chat.completion.chunk", "created": unix_seconds(),
                "model": model, "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": done_reason}]
            }))];
            if include_usage {
                chunks.push(sse(&json!({
                    "id": "chatcmpl-emulated", "object": "chat.completion.chunk", "created": unix_seconds(),
                    "model": model, "system_fingerprint": "fp_ollama", "choices": [], "usage": usage
                })));
            }
            chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
            chunks
        }
        Flavour::OpenAiChat => vec![Bytes::from(serde_json::to_vec(&json!({
            "id": "chatcmpl-emulated", "object": "chat.completion", "created": unix_seconds(),
            "model": model, "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": done_reason}],
            "usage": usage
        })).unwrap_or_default())],
        Flavour::OpenAiCompletion if stream => vec![
            sse(&json!({
                "id": "cmpl-emulated", "object": "text_completion", "created": unix_seconds(),
                "model": model, "system_fingerprint": "fp_ollama",
                "choices": [{"text": "", "index": 0, "finish_reason": done_reason}]
            })),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ],
        Flavour::OpenAiCompletion => vec![Bytes::from(serde_json::to_vec(&json!({
            "id": "cmpl-emulated", "object": "text_completion", "created": unix_seconds(),
            "model": model, "system_fingerprint": "fp_ollama",
            "choices": [{"text": text, "index": 0, "finish_reason": done_reason}],
            "usage": usage
        })).unwrap_or_default())],
    }
}

/// A deterministic unit vector for `input`: the same input always embeds the same way on every node.
pub fn embedding_of(model: &str, input: &str, dimensions: usize) -> Vec<f32> {
    let mut seed: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in model.bytes().chain([0]).chain(input.bytes()) {
        seed ^= u64::from(byte);
        seed = seed.wrapping_mul(0x0100_0000_01b3);
    }
    let mut values: Vec<f32> = (0..dimensions.max(1))
        .map(|_| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = values
        .iter()
        .map(|value| value * value)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    for value in &mut values {
        *value /= norm;
    }
    values
}

/// Runs an embedding job through a slot; `None` when the fault says to fail.
async fn embed_inputs(
    state: &EmulatorState,
    model: &str,
    inputs: &[String],
) -> Result<(Vec<Vec<f32>>, Timings), Box<Response>> {
    state.started.fetch_add(1, Ordering::Relaxed);
    match state.fault() {
        Fault::InternalError | Fault::DropMidStream { .. } => {
            return Err(Box::new(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "llama runner process has terminated: exit status 2",
            )));
        }
        Fault::HangBeforeFirstByte => return std::future::pending().await,
        _ => {}
    }
    let started = Instant::now();
    let Ok(_slot) = state.slots.acquire().await else {
        return Err(Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down",
        )));
    };
    let load = state.ensure_loaded(model).await;
    let prompt_tokens: u64 = inputs
        .iter()
        .map(|input| (input.len() as u64 / 4).max(1))
        .sum();
    let prompt_time = state.prompt_time(prompt_tokens);
    if !prompt_time.is_zero() {
        tokio::time::sleep(prompt_time).await;
    }
    let embeddings = inputs
        .iter()
        .map(|input| embedding_of(model, input, state.config.embedding_dimensions))
        .collect();
    state.touch(model, state.config.keep_alive);
    state.served.fetch_add(1, Ordering::Relaxed);
    Ok((
        embeddings,
        Timings {
            load,
            prompt_tokens,
            prompt: prompt_time,
            total: started.elapsed(),
            ..Timings::default()
        },
    ))
}

fn inputs_of(value: Option<&Value>) -> Result<Vec<String>, Box<Response>> {
    match value {
        Some(Value::String(text)) => Ok(vec![text.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str().map(str::to_owned).ok_or_else(|| {
                    Box::new(error(
                        StatusCode::BAD_REQUEST,
                        "input must be a string or a list of strings",
                    ))
                })
            })
            .collect(),
        None => Ok(Vec::new()),
        Some(_) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "input must be a string or a list of strings",
        ))),
    }
}

/// The model and inputs of an `/api/embed` or `/v1/embeddings` request.
fn embed_request(
    state: &EmulatorState,
    body: &Bytes,
) -> Result<(String, Vec<String>), Box<Response>> {
    let (request, model) = model_request(state, body)?;
    let inputs = inputs_of(request.get("input"))?;
    Ok((model, inputs))
}

async fn embed(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    let (model, inputs) = match embed_request(&state, &body) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    match embed_inputs(&state, &model, &inputs).await {
        Ok((embeddings, timings)) => axum::Json(json!({
            "model": model,
            "embeddings": embeddings,
            "total_duration": nanos(timings.total),
            "load_duration": nanos(timings.load),
            "prompt_eval_count": timings.prompt_tokens,
        }))
        .into_response(),
        Err(response) => *response,
    }
}

async fn embeddings(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    let (request, model) = match model_request(&state, &body) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    let prompt = request
        .get("prompt")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    match embed_inputs(&state, &model, &[prompt]).await {
        Ok((mut embeddings, _)) => {
            axum::Json(json!({ "embedding": embeddings.pop().unwrap_or_default() })).into_response()
        }
        Err(response) => *response,
    }
}

async fn openai_embeddings(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    let (model, inputs) = match embed_request(&state, &body) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    match embed_inputs(&state, &model, &inputs).await {
        Ok((embeddings, timings)) => {
            let data: Vec<Value> = embeddings
                .into_iter()
                .enumerate()
                .map(|(index, embedding)| json!({"object": "embedding", "embedding": embedding, "index": index}))
                .collect();
            axum::Json(json!({
                "object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": timings.prompt_tokens, "total_tokens": timings.prompt_tokens}
            }))
            .into_response()
        }
        Err(response) => *response,
    }
}

async fn openai_models(State(state): State<Arc<EmulatorState>>) -> Response {
    let data: Vec<Value> = lock(&state.models)
        .iter()
        .map(|name| json!({"id": name, "object": "model", "created": 1_793_000_000u64, "owned_by": "library"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Per-model counters, for tests that check where requests went.
pub fn summarize(emulators: &[&Emulator]) -> HashMap<String, u64> {
    emulators
        .iter()
        .map(|emulator| (emulator.name().to_owned(), emulator.served()))
        .collect()
}
