//! The opt-in response cache: answers to embeddings and to deterministic, non-streaming generations,
//! kept in memory within a byte budget, least recently used out first, each for a time to live.
//!
//! The key is a SHA-256 over the route, the model's content digest as the nodes report it and the
//! whole request body, parsed and written out canonically (object keys sorted at every depth), with
//! only what cannot change the answer left out: `stream: false`, `keep_alive`, and the model's
//! spelling (`m` is `m:latest`). Every option is in the key, so any change of any option misses
//! (SOLLOL's cache ignored options and answered wrongly).
//!
//! What it must not do: hold its lock across an await (every method is synchronous and short), parse
//! a body when it is off, on a route it does not cache, or for a body over its bound (routing itself
//! never builds the JSON tree: `fields`), or keep anything but a whole HTTP 200 answer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::body::{Body as _, Bytes};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::DECISION_HEADER;
use super::request::ParsedRequest;
use crate::gateway::ApiError;
use crate::observability::CacheFigures;

/// Response header saying whether a cacheable request was answered from the cache: `hit` or `miss`.
pub const CACHE_HEADER: &str = "x-sollol-cache";

/// Bytes counted per entry beyond its answer: the key, the entry and its places in both orders.
const ENTRY_OVERHEAD: u64 = 128;
/// Generation requests larger than this are not parsed for a key (a long conversation is rarely
/// repeated word for word, and parsing it whole would cost more than the cache saves).
const GENERATION_BODY_LIMIT: usize = 1 << 20;
/// Answers and embedding request bodies may take at most this fraction of the budget, so that one
/// large batch cannot empty the cache.
const LARGEST_FRACTION: u64 = 8;

/// The cache's budget and how long an answer stays (`cache.max_bytes`, `cache.ttl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSettings {
    pub max_bytes: u64,
    pub ttl: Duration,
}

/// An answer as it was given: status, content type and body.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct CachedAnswer {
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

impl IntoResponse for CachedAnswer {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        if let Some(content_type) = self.content_type {
            headers.insert(header::CONTENT_TYPE, content_type);
        }
        headers.insert(CACHE_HEADER, HeaderValue::from_static("hit"));
        headers.insert(DECISION_HEADER, HeaderValue::from_static("cache hit"));
        response
    }
}

/// SHA-256 of a request's route, model digest and canonical body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct CacheKey([u8; 32]);

/// The gateway's response cache: the store under a mutex, its figures in atomics so that `/metrics`
/// never takes the lock.
#[derive(Debug)]
pub(super) struct ResponseCache {
    /// The largest answer (with its overhead) or embedding request body the cache takes.
    largest: u64,
    store: Mutex<Store>,
    hits: AtomicU64,
    misses: AtomicU64,
    bytes: AtomicU64,
    entries: AtomicU64,
}

impl ResponseCache {
    pub(super) fn new(settings: CacheSettings) -> Self {
        Self {
            largest: settings.max_bytes / LARGEST_FRACTION,
            store: Mutex::new(Store::new(settings)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
        }
    }

    /// The key of a request whose answer may be cached; `None` (the cache is bypassed) for a route it
    /// does not cache, a streamed or pinned request (`X-Sollol-Node`), a model whose digest the nodes
    /// do not agree on, a body over its bound, or a generation that is not deterministic.
    pub(super) fn key_of(
        &self,
        path: &str,
        request: &ParsedRequest,
        digest: Option<&str>,
    ) -> Option<CacheKey> {
        let route = Route::of(path)?;
        // A request that unloads its model (`keep_alive: 0`) must reach a node to have that effect.
        if request.stream || request.wanted_node.is_some() || request.unloads {
            return None;
        }
        let limit = match route {
            Route::Embedding => usize::try_from(self.largest).unwrap_or(usize::MAX),
            Route::Generation { .. } => GENERATION_BODY_LIMIT,
        };
        if request.body.len() > limit {
            return None;
        }
        let Some(digest) = digest else {
            tracing::debug!(model = %request.model, "not cached: the nodes report no common digest for the model");
            return None;
        };
        let body = serde_json::from_slice::<Value>(&request.body).ok()?;
        key(path, route, &request.model, digest, body)
    }

    /// The stored answer for `key`, counted as a hit or a miss.
    pub(super) fn lookup(&self, key: &CacheKey, now: Instant) -> Option<CachedAnswer> {
        let found = {
            let mut store = self.lock();
            let found = store.get(key, now);
            self.publish(&store);
            found
        };
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Marks a routed answer as a miss and keeps it when it is a whole HTTP 200 answer within the
    /// size limit. The answer is already in memory (non-streamed answers are buffered), so reading
    /// it here waits for nothing.
    pub(super) async fn keep(&self, key: CacheKey, response: Response) -> Response {
        let mut response = response;
        response
            .headers_mut()
            .insert(CACHE_HEADER, HeaderValue::from_static("miss"));
        let largest = self.largest;
        let fits = response
            .body()
            .size_hint()
            .exact()
            .is_some_and(|size| size + ENTRY_OVERHEAD <= largest);
        if response.status() != StatusCode::OK || !fits {
            return response;
        }
        let (parts, body) = response.into_parts();
        let limit = usize::try_from(largest).unwrap_or(usize::MAX);
        let body = match axum::body::to_bytes(body, limit).await {
            Ok(body) => body,
            Err(error) => {
                return ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("the node's answer could not be read: {error}"),
                )
                .into_response();
            }
        };
        let answer = CachedAnswer {
            status: parts.status,
            content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
            body: body.clone(),
        };
        {
            let mut store = self.lock();
            store.insert(key, answer, Instant::now());
            self.publish(&store);
        }
        Response::from_parts(parts, Body::from(body))
    }

    /// Hits, misses and what the cache holds, read without the lock.
    pub(super) fn figures(&self) -> CacheFigures {
        CacheFigures {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
        }
    }

    fn publish(&self, store: &Store) {
        self.bytes.store(store.bytes, Ordering::Relaxed);
        self.entries
            .store(store.entries.len() as u64, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        super::lock(&self.store)
    }
}

/// What a cacheable route answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Embeddings: the same input gives the same vector; always cacheable.
    Embedding,
    /// Text: cacheable only when deterministic; OpenAI's routes set temperature and seed at the top
    /// level, Ollama's in `options`.
    Generation { openai: bool },
}

impl Route {
    fn of(path: &str) -> Option<Self> {
        Some(match path {
            "/api/embed" | "/api/embeddings" | "/v1/embeddings" => Self::Embedding,
            "/api/generate" | "/api/chat" => Self::Generation { openai: false },
            "/v1/chat/completions" | "/v1/completions" => Self::Generation { openai: true },
            _ => return None,
        })
    }
}

/// The key of a parsed request body, or `None` when its answer must not be cached.
fn key(path: &str, route: Route, model: &str, digest: &str, body: Value) -> Option<CacheKey> {
    let Value::Object(mut body) = body else {
        return None;
    };
    if !asks_for_work(path, &body) {
        return None;
    }
    if let Route::Generation { openai } = route {
        let settings = if openai {
            Some(&body)
        } else {
            body.get("options").and_then(Value::as_object)
        };
        if !settings.is_some_and(deterministic) {
            return None;
        }
    }
    normalise(&mut body, model);
    let mut hasher = Sha256::new();
    hasher.update(b"sollol response cache 1\0");
    write_text(&mut hasher, path);
    write_text(&mut hasher, digest);
    write_object(&mut hasher, &body);
    Some(CacheKey(hasher.finalize().into()))
}

/// Whether the request asks the model for something: a request without a prompt, messages or input
/// only loads the model, which a cached answer would not do.
fn asks_for_work(path: &str, body: &Map<String, Value>) -> bool {
    let field = match path {
        "/api/chat" | "/v1/chat/completions" => "messages",
        "/api/embed" | "/v1/embeddings" => "input",
        _ => "prompt",
    };
    match body.get(field) {
        Some(Value::String(text)) => !text.is_empty(),
        Some(Value::Array(items)) => !items.is_empty(),
        _ => false,
    }
}

/// Temperature exactly 0 (greedy decoding), or a fixed seed (a negative seed is Ollama's "random").
fn deterministic(settings: &Map<String, Value>) -> bool {
    let greedy = settings
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|temperature| temperature == 0.0);
    let seeded = settings
        .get("seed")
        .is_some_and(|seed| seed.as_u64().is_some());
    greedy || seeded
}

/// Leaves out what cannot change the answer: `stream: false` (a cached request is never streamed),
/// `keep_alive` (how long the node keeps the model), and the model's spelling.
fn normalise(body: &mut Map<String, Value>, model: &str) {
    body.remove("keep_alive");
    if body.get("stream") == Some(&Value::Bool(false)) {
        body.remove("stream");
    }
    let name_field = if body.contains_key("model") {
        "model"
    } else {
        "name"
    };
    body.insert(name_field.to_owned(), Value::String(model.to_owned()));
}

/// Writes a value to the hash unambiguously: a tag per type, lengths before contents, object keys
/// sorted (whatever order `serde_json`'s map keeps).
fn write_value(hasher: &mut Sha256, value: &Value) {
    match value {
        Value::Null => hasher.update(b"n"),
        Value::Bool(flag) => hasher.update(if *flag { b"t" } else { b"f" }),
        Value::Number(number) => {
            hasher.update(b"#");
            write_text(hasher, &number.to_string());
        }
        Value::String(text) => {
            hasher.update(b"s");
            write_text(hasher, text);
        }
        Value::Array(items) => {
            hasher.update(b"[");
            hasher.update((items.len() as u64).to_le_bytes());
            for item in items {
                write_value(hasher, item);
            }
        }
        Value::Object(object) => write_object(hasher, object),
    }
}

fn write_object(hasher: &mut Sha256, object: &Map<String, Value>) {
    let mut fields: Vec<(&String, &Value)> = object.iter().collect();
    fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
    hasher.update(b"{");
    hasher.update((fields.len() as u64).to_le_bytes());
    for (name, value) in fields {
        write_text(hasher, name);
        write_value(hasher, value);
    }
}

fn write_text(hasher: &mut Sha256, text: &str) {
    hasher.update((text.len() as u64).to_le_bytes());
    hasher.update(text.as_bytes());
}

/// The entries, least recently used first out when the budget is full, and each dropped once its
/// time to live is over. Pure bookkeeping: the caller passes the time.
#[derive(Debug)]
struct Store {
    max_bytes: u64,
    ttl: Duration,
    entries: HashMap<CacheKey, Entry>,
    /// Keys by their last use (a counter), oldest first.
    by_use: BTreeMap<u64, CacheKey>,
    /// Keys by expiry (and the counter at insertion, to tell apart entries stored at the same instant).
    by_expiry: BTreeMap<(Instant, u64), CacheKey>,
    counter: u64,
    /// Bytes counted for every entry: its answer's bytes and `ENTRY_OVERHEAD`.
    bytes: u64,
}

#[derive(Debug)]
struct Entry {
    answer: CachedAnswer,
    size: u64,
    last_use: u64,
    expiry: (Instant, u64),
}

impl Store {
    fn new(settings: CacheSettings) -> Self {
        Self {
            max_bytes: settings.max_bytes,
            ttl: settings.ttl,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            by_expiry: BTreeMap::new(),
            counter: 0,
            bytes: 0,
        }
    }

    fn get(&mut self, key: &CacheKey, now: Instant) -> Option<CachedAnswer> {
        self.expire(now);
        self.counter += 1;
        let entry = self.entries.get_mut(key)?;
        self.by_use.remove(&entry.last_use);
        entry.last_use = self.counter;
        self.by_use.insert(entry.last_use, *key);
        Some(entry.answer.clone())
    }

    /// Stores an answer, dropping the least recently used ones to make room; one larger than
    /// `LARGEST_FRACTION` of the budget is not stored.
    fn insert(&mut self, key: CacheKey, answer: CachedAnswer, now: Instant) {
        let size = answer.body.len() as u64
            + answer.content_type.as_ref().map_or(0, |value| value.len()) as u64
            + ENTRY_OVERHEAD;
        if size > self.max_bytes / LARGEST_FRACTION {
            return;
        }
        self.expire(now);
        self.remove(&key);
        while self.bytes + size > self.max_bytes {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.remove(&oldest);
        }
        self.counter += 1;
        // A time to live beyond the clock's range cannot be configured (`cache.ttl` ≤ 365 days); were
        // it to happen, the entry would expire at once rather than live forever.
        let expiry = (now.checked_add(self.ttl).unwrap_or(now), self.counter);
        self.by_use.insert(self.counter, key);
        self.by_expiry.insert(expiry, key);
        self.bytes += size;
        self.entries.insert(
            key,
            Entry {
                answer,
                size,
                last_use: self.counter,
                expiry,
            },
        );
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(entry) = self.entries.remove(key) {
            self.by_use.remove(&entry.last_use);
            self.by_expiry.remove(&entry.expiry);
            self.bytes -= entry.size;
        }
    }

    /// Drops every entry whose time to live is over.
    fn expire(&mut self, now: Instant) {
        while let Some((&(at, _), &key)) = self.by_expiry.first_key_value() {
            if at > now {
                break;
            }
            self.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DIGEST: &str = "a80c4f17acd5";

    fn key_of(path: &str, body: Value) -> Option<CacheKey> {
        key(
            path,
            Route::of(path).expect("cacheable route"),
            "m:1",
            DIGEST,
            body,
        )
    }

    /// A deterministic generation, the base every variation below starts from.
    fn generation() -> Value {
        json!({
            "model": "m:1",
            "prompt": "Why is the sky blue?",
            "stream": false,
            "system": "Be brief.",
            "format": "json",
            "options": {"temperature": 0, "seed": 42, "num_predict": 64, "top_k": 40, "top_p": 0.9,
                "stop": ["\n\n"], "num_ctx": 2048, "repeat_penalty": 1.1},
            "keep_alive": "5m",
        })
    }

    /// Any change of anything in the body but `keep_alive`, `stream: false` and the model's spelling
    /// is another key: SOLLOL's cache ignored options and answered wrongly.
    #[test]
    fn every_option_is_in_the_key() {
        let base = key_of("/api/generate", generation()).expect("cacheable");
        let changes: &[(&str, Value)] = &[
            ("/options/temperature", json!(0.0001)),
            ("/options/seed", json!(43)),
            ("/options/num_predict", json!(65)),
            ("/options/top_k", json!(41)),
            ("/options/top_p", json!(0.91)),
            ("/options/stop", json!(["\n"])),
            ("/options/stop/0", json!("\n\n\n")),
            ("/options/num_ctx", json!(4096)),
            ("/options/repeat_penalty", json!(1.0)),
            ("/options/mirostat", json!(1)),
            ("/prompt", json!("Why is the sky blue? ")),
            ("/system", json!("Be brief")),
            ("/format", json!({"type": "object"})),
            ("/raw", json!(true)),
            ("/images", json!(["iVBORw0KGgo="])),
            ("/think", json!(false)),
        ];
        for (pointer, value) in changes {
            let mut changed = generation();
            let (parent, field) = pointer.rsplit_once('/').expect("pointer");
            let target = if parent.is_empty() {
                &mut changed
            } else {
                changed.pointer_mut(parent).expect("parent")
            };
            match target {
                Value::Object(object) => {
                    object.insert(field.to_owned(), value.clone());
                }
                Value::Array(items) => {
                    items[field.parse::<usize>().expect("index")] = value.clone();
                }
                _ => panic!("{pointer}"),
            }
            let changed_key = key_of("/api/generate", changed).expect("still cacheable");
            assert_ne!(changed_key, base, "{pointer} = {value} gave the same key");
        }
        // The same body on another route, or another model digest, is another key too.
        assert_ne!(key_of("/api/chat", generation()), Some(base));
        let other_digest = key(
            "/api/generate",
            Route::Generation { openai: false },
            "m:1",
            "b1d2",
            generation(),
        );
        assert_ne!(other_digest, Some(base));
        let other_model = key(
            "/api/generate",
            Route::Generation { openai: false },
            "m:2",
            DIGEST,
            generation(),
        );
        assert_ne!(other_model, Some(base));
    }

    /// Key order, `keep_alive`, `stream: false` and the model's spelling do not change the key.
    #[test]
    fn what_cannot_change_the_answer_is_left_out() {
        let base = key_of("/api/generate", generation());
        let reordered: Value = serde_json::from_str(
            r#"{"options": {"repeat_penalty": 1.1, "num_ctx": 2048, "stop": ["\n\n"], "top_p": 0.9,
                "top_k": 40, "num_predict": 64, "seed": 42, "temperature": 0},
                "format": "json", "system": "Be brief.", "prompt": "Why is the sky blue?", "model": "m:1"}"#,
        )
        .expect("json");
        assert_eq!(key_of("/api/generate", reordered), base);
        let mut respelled = generation();
        respelled["model"] = json!("m");
        respelled["keep_alive"] = json!(0);
        assert_eq!(key_of("/api/generate", respelled), base);
    }

    #[test]
    fn only_deterministic_generations_with_work_are_cached() {
        fn check(path: &str, body: Value, cacheable: bool) {
            assert_eq!(
                key_of(path, body.clone()).is_some(),
                cacheable,
                "{path} {body}"
            );
        }
        let chat = json!([{"role": "user", "content": "hi"}]);
        check(
            "/api/chat",
            json!({"messages": chat, "options": {"temperature": 0}}),
            true,
        );
        check(
            "/api/chat",
            json!({"messages": chat, "options": {"temperature": 0.0}}),
            true,
        );
        check(
            "/api/chat",
            json!({"messages": chat, "options": {"temperature": 0.8, "seed": 7}}),
            true,
        );
        check(
            "/api/chat",
            json!({"messages": chat, "options": {"temperature": 0.8}}),
            false,
        );
        check(
            "/api/chat",
            json!({"messages": chat, "options": {"seed": -1}}),
            false,
        );
        check(
            "/api/chat",
            json!({"messages": chat, "options": {"seed": "7"}}),
            false,
        );
        check("/api/chat", json!({"messages": chat}), false);
        // Ollama's temperature belongs in `options`; at the top level it is not Ollama's setting.
        check(
            "/api/chat",
            json!({"messages": chat, "temperature": 0}),
            false,
        );
        check(
            "/v1/chat/completions",
            json!({"messages": chat, "temperature": 0}),
            true,
        );
        check(
            "/v1/completions",
            json!({"prompt": "hi", "seed": 3, "temperature": 1.2}),
            true,
        );
        check(
            "/v1/chat/completions",
            json!({"messages": chat, "options": {"temperature": 0}}),
            false,
        );
        // Requests that only load a model.
        check(
            "/api/generate",
            json!({"prompt": "", "options": {"temperature": 0}}),
            false,
        );
        check(
            "/api/chat",
            json!({"messages": [], "options": {"seed": 1}}),
            false,
        );
        check("/api/embed", json!({"input": []}), false);
        check("/api/embed", json!({"input": ["a", "b"]}), true);
        check("/api/embed", json!({"input": "a"}), true);
        check("/api/embeddings", json!({"prompt": "a"}), true);
        check("/v1/embeddings", json!({"input": ["a"]}), true);
        check("/api/embed", json!(["not an object"]), false);
    }

    fn answer(bytes: usize) -> CachedAnswer {
        CachedAnswer {
            status: StatusCode::OK,
            content_type: None,
            body: Bytes::from(vec![b'x'; bytes]),
        }
    }

    fn key_number(number: u8) -> CacheKey {
        CacheKey([number; 32])
    }

    /// The budget counts answers and their overhead; the least recently used go first.
    #[test]
    fn the_least_recently_used_answers_leave_first() {
        // Entries of 500 bytes with their overhead, in a budget of 16 of them (so at most 1000 each).
        let small = 500 - ENTRY_OVERHEAD as usize;
        let mut store = Store::new(CacheSettings {
            max_bytes: 8000,
            ttl: Duration::from_secs(60),
        });
        let now = Instant::now();
        for number in 0..16 {
            store.insert(key_number(number), answer(small), now);
        }
        assert_eq!((store.entries.len(), store.bytes), (16, 8000));
        // 0 is used again, so 1 is now the least recently used.
        assert!(store.get(&key_number(0), now).is_some());
        store.insert(key_number(16), answer(small), now);
        assert_eq!((store.entries.len(), store.bytes), (16, 8000));
        assert!(store.get(&key_number(1), now).is_none());
        for kept in (0..=16).filter(|number| *number != 1) {
            assert!(store.get(&key_number(kept), now).is_some(), "{kept}");
        }
        // An answer twice as large makes room by dropping the two least recently used (0 and 2).
        store.insert(
            key_number(17),
            answer(2 * small + ENTRY_OVERHEAD as usize),
            now,
        );
        assert_eq!((store.entries.len(), store.bytes), (15, 8000));
        assert!(store.get(&key_number(0), now).is_none());
        assert!(store.get(&key_number(2), now).is_none());
        assert!(store.get(&key_number(17), now).is_some());
        // An answer over an eighth of the budget is not kept, and drops nothing.
        store.insert(key_number(18), answer(1001 - ENTRY_OVERHEAD as usize), now);
        assert!(store.get(&key_number(18), now).is_none());
        assert_eq!((store.entries.len(), store.bytes), (15, 8000));
        // Storing a key again replaces its answer without counting it twice.
        store.insert(key_number(17), answer(small), now);
        assert_eq!((store.entries.len(), store.bytes), (15, 7500));
        assert_eq!(store.by_use.len(), store.entries.len());
        assert_eq!(store.by_expiry.len(), store.entries.len());
    }

    #[test]
    fn answers_expire_after_their_time_to_live() {
        let ttl = Duration::from_secs(60);
        let mut store = Store::new(CacheSettings {
            max_bytes: 1 << 20,
            ttl,
        });
        let start = Instant::now();
        store.insert(key_number(1), answer(10), start);
        store.insert(key_number(2), answer(10), start + Duration::from_secs(30));
        // Using an answer does not extend its life.
        assert!(
            store
                .get(&key_number(1), start + ttl - Duration::from_millis(1))
                .is_some()
        );
        assert!(store.get(&key_number(1), start + ttl).is_none());
        assert_eq!(store.entries.len(), 1);
        assert!(
            store
                .get(&key_number(2), start + Duration::from_secs(89))
                .is_some()
        );
        assert!(
            store
                .get(&key_number(2), start + Duration::from_secs(90))
                .is_none()
        );
        assert_eq!((store.entries.len(), store.bytes), (0, 0));
        assert!(store.by_use.is_empty() && store.by_expiry.is_empty());
    }
}
