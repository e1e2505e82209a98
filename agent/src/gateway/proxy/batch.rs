//! Embedding batches split across every node that has the model, with work stealing.
//!
//! An `/api/embed` or `/v1/embeddings` request with many inputs is cut into
//! chunks that go into one shared queue; each node runs as many workers as it
//! has slots, and every worker takes the next chunk when it finishes one, so
//! faster nodes take more of the batch. A chunk that fails goes back into the
//! queue for another node and its node stops taking work. When the queue is
//! empty but chunks are still out on slow nodes, idle workers take a copy of
//! the oldest outstanding chunk (the first answer wins), so one slow node
//! cannot hold the whole batch back. Results are put back in input order.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::fields::Fields;
use super::{InFlight, Proxy, post_json};
use crate::cluster::Backend;

/// Chunks per worker the batch is cut into, so work can move between nodes.
const CHUNKS_PER_WORKER: usize = 4;
const MAX_CHUNK: usize = 256;

/// The API a batch arrived on, which fixes the request and answer shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Ollama,
    OpenAi,
}

/// A finished batch.
#[derive(Debug)]
pub struct BatchAnswer {
    pub body: Value,
    /// Nodes that answered at least one chunk, in the order of first answer.
    pub nodes: Vec<String>,
    pub chunks: usize,
}

/// Inputs `start..end` of the batch.
#[derive(Debug)]
struct Chunk {
    start: usize,
    end: usize,
}

impl Chunk {
    fn len(&self) -> usize {
        self.end - self.start
    }
}

#[derive(Debug, Default)]
struct Work {
    queue: VecDeque<Arc<Chunk>>,
    /// Chunks handed out and not yet answered, oldest first.
    outstanding: Vec<Arc<Chunk>>,
    results: Vec<Option<Value>>,
    done: usize,
    prompt_tokens: u64,
    nodes: Vec<String>,
    failures: Vec<String>,
    workers_alive: usize,
}

/// The batch flavour of an embedding route; `None` for a route that is not one.
pub fn flavour(path: &str) -> Option<Flavour> {
    match path {
        "/api/embed" => Some(Flavour::Ollama),
        "/v1/embeddings" => Some(Flavour::OpenAi),
        _ => None,
    }
}

/// Embeds every input of `request` over `backends`; `Err` names each failure when no node could finish it.
pub async fn run(
    proxy: &Proxy,
    backends: &[&Arc<Backend>],
    path: &str,
    body: &[u8],
    flavour: Flavour,
    origin: Option<&HeaderValue>,
) -> Result<BatchAnswer, String> {
    // The inputs and the other fields stay the client's raw JSON, borrowed from its body: every chunk
    // sends the other fields with its own slice of the inputs.
    let request = Fields::parse(body)?;
    let inputs = request.list("input").unwrap_or_default();
    let shared = Shared {
        path,
        fields: request.without("input"),
        inputs: &inputs,
        origin,
    };
    let started = Instant::now();
    let slots = proxy.settings.node_slots.max(1) as usize;
    let workers = backends.len() * slots;
    let chunk_size = inputs
        .len()
        .div_ceil(workers * CHUNKS_PER_WORKER)
        .clamp(1, MAX_CHUNK);
    let mut work = Work {
        results: vec![None; inputs.len()],
        workers_alive: workers,
        ..Work::default()
    };
    for start in (0..inputs.len()).step_by(chunk_size) {
        work.queue.push_back(Arc::new(Chunk {
            start,
            end: (start + chunk_size).min(inputs.len()),
        }));
    }
    let chunks = work.queue.len();
    let work = Arc::new(Mutex::new(work));
    let finished = CancellationToken::new();
    let runs = backends.iter().flat_map(|backend| {
        (0..slots).map(|_| worker(proxy, backend, &shared, Arc::clone(&work), finished.clone()))
    });
    futures_util::future::join_all(runs).await;
    let work = Arc::try_unwrap(work)
        .map(|mutex| {
            mutex
                .into_inner()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        })
        .map_err(|_| "batch workers still running".to_owned())?;
    if work.done < work.results.len() {
        return Err(format!(
            "{} of {} inputs could not be embedded: {}",
            work.results.len() - work.done,
            work.results.len(),
            work.failures.join("; ")
        ));
    }
    let embeddings: Vec<Value> = work
        .results
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect();
    let model = request
        .text("model")
        .map_or(Value::Null, |model| Value::from(model.as_ref()));
    let body = match flavour {
        Flavour::Ollama => json!({
            "model": model,
            "embeddings": embeddings,
            "total_duration": u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            "load_duration": 0,
            "prompt_eval_count": work.prompt_tokens,
        }),
        Flavour::OpenAi => json!({
            "object": "list",
            "data": embeddings
                .into_iter()
                .enumerate()
                .map(|(index, embedding)| json!({"object": "embedding", "embedding": embedding, "index": index}))
                .collect::<Vec<_>>(),
            "model": model,
            "usage": {"prompt_tokens": work.prompt_tokens, "total_tokens": work.prompt_tokens},
        }),
    };
    Ok(BatchAnswer {
        body,
        nodes: work.nodes,
        chunks,
    })
}

/// What every chunk's request shares: the route, the client's fields but `input`, every input (a chunk
/// sends its slice), the page's Origin.
struct Shared<'a> {
    path: &'a str,
    fields: BTreeMap<Cow<'a, str>, &'a RawValue>,
    inputs: &'a [&'a RawValue],
    origin: Option<&'a HeaderValue>,
}

/// One chunk's request body: the client's other fields as they came, and the chunk's inputs.
#[derive(serde::Serialize)]
struct ChunkBody<'a> {
    #[serde(flatten)]
    fields: &'a BTreeMap<Cow<'a, str>, &'a RawValue>,
    input: &'a [&'a RawValue],
}

async fn worker(
    proxy: &Proxy,
    backend: &Backend,
    shared: &Shared<'_>,
    work: Arc<Mutex<Work>>,
    finished: CancellationToken,
) {
    loop {
        let chunk = {
            let mut work = lock(&work);
            if work.done == work.results.len() {
                break;
            }
            match work.queue.pop_front() {
                Some(chunk) => {
                    work.outstanding.push(Arc::clone(&chunk));
                    chunk
                }
                // Nothing queued: help with the oldest chunk still out on another node.
                None => match work.outstanding.first() {
                    Some(chunk) => Arc::clone(chunk),
                    None => break,
                },
            }
        };
        // Once every input is embedded, a worker still waiting on a slow node stops (its connection is dropped).
        let result = tokio::select! {
            result = embed_chunk(proxy, backend, shared, &chunk) => result,
            () = finished.cancelled() => break,
        };
        match result {
            Ok((embeddings, prompt_tokens)) => {
                let mut work = lock(&work);
                if work.results[chunk.start].is_some() {
                    // Another node finished this chunk first.
                    continue;
                }
                for (offset, embedding) in embeddings.into_iter().enumerate() {
                    work.results[chunk.start + offset] = Some(embedding);
                }
                work.done += chunk.len();
                work.prompt_tokens += prompt_tokens;
                work.outstanding
                    .retain(|outstanding| !Arc::ptr_eq(outstanding, &chunk));
                if !work.nodes.contains(&backend.name) {
                    work.nodes.push(backend.name.clone());
                }
                if work.done == work.results.len() {
                    finished.cancel();
                }
            }
            Err(failure) => {
                tracing::warn!(node = %backend.name, %failure, "embedding chunk failed; another node takes it");
                let mut work = lock(&work);
                work.failures.push(format!("{}: {failure}", backend.name));
                if work.results[chunk.start].is_none() {
                    work.outstanding
                        .retain(|outstanding| !Arc::ptr_eq(outstanding, &chunk));
                    if work.workers_alive > 1 {
                        work.queue.push_front(chunk);
                    }
                }
                work.workers_alive -= 1;
                break;
            }
        }
    }
}

/// Sends one chunk to one node; returns its embeddings in order and the prompt tokens it counted.
async fn embed_chunk(
    proxy: &Proxy,
    backend: &Backend,
    shared: &Shared<'_>,
    chunk: &Chunk,
) -> Result<(Vec<Value>, u64), String> {
    let _in_flight = InFlight::new(proxy.load_of(&backend.node_id), proxy.admission());
    let body = serde_json::to_vec(&ChunkBody {
        fields: &shared.fields,
        input: &shared.inputs[chunk.start..chunk.end],
    })
    .map_err(|error| error.to_string())?;
    let request = post_json(
        format!("{}{}", backend.base_url, shared.path),
        Bytes::from(body),
        shared.origin,
    )?;
    let response = tokio::time::timeout(
        proxy.settings.response_timeout,
        proxy.client().request(request),
    )
    .await
    .map_err(|_| "no response in time".to_owned())?
    .map_err(|error| error.to_string())?;
    let status = response.status();
    let limited =
        http_body_util::Limited::new(response.into_body(), proxy.settings.max_response_body);
    let bytes = tokio::time::timeout(Duration::from_secs(300), limited.collect())
        .await
        .map_err(|_| "answer too slow".to_owned())?
        .map_err(|error| error.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "HTTP {}: {}",
            status.as_u16(),
            String::from_utf8_lossy(&bytes).trim()
        ));
    }
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|error| format!("bad JSON: {error}"))?;
    let (embeddings, prompt_tokens) = match value.get("embeddings") {
        Some(Value::Array(embeddings)) => (
            embeddings.clone(),
            value
                .get("prompt_eval_count")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        ),
        _ => {
            let mut data = value
                .get("data")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            data.sort_by_key(|item| item.get("index").and_then(Value::as_u64).unwrap_or(0));
            let prompt_tokens = value
                .get("usage")
                .and_then(|usage| usage.get("prompt_tokens"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            (
                data.into_iter()
                    .map(|mut item| item["embedding"].take())
                    .collect(),
                prompt_tokens,
            )
        }
    };
    if embeddings.len() != chunk.len() {
        return Err(format!(
            "{} embeddings for {} inputs",
            embeddings.len(),
            chunk.len()
        ));
    }
    Ok((embeddings, prompt_tokens))
}

fn lock(work: &Mutex<Work>) -> std::sync::MutexGuard<'_, Work> {
    work.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
