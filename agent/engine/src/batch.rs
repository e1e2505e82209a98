//! Batched decoding: the next token of every sequence generating on one model at once, computed in one
//! forward pass. Generation is bound by reading the weights; a batch reads each matrix once for all its
//! sequences, while each sequence attends to its own cache ([`Model::layers_batch`]). The rows of such a
//! batch are computed as each token alone would be, so an answer does not depend on what ran beside it.
//!
//! There is no scheduler thread: each generating thread hands its step in and waits; the first that
//! finds no batch running and every decoding sequence's step waiting (or has waited
//! [`GATHER`]) runs the batch for all of them and hands each its logits and cache back.

use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::model::{KvCache, Model, ModelError, Segment};

/// How long a step waits for the other decoding sequences' steps before running without them (they are
/// usually microseconds apart: sampling and streaming a token).
const GATHER: Duration = Duration::from_millis(2);

type Reply = Result<(Vec<f32>, KvCache), String>;

/// One sequence's next token, its cache, and where its logits go.
struct Step {
    id: u64,
    token: u32,
    cache: KvCache,
    reply: Sender<Reply>,
}

#[derive(Default)]
struct State {
    /// Sequences between their prompt and their end: they step together.
    decoding: usize,
    waiting: Vec<Step>,
    running: bool,
    next_id: u64,
    /// Steps that ran in a batch with at least one other sequence's.
    shared: u64,
}

/// The decoding steps of one model's sequences, batched.
#[derive(Default)]
pub struct Batcher {
    state: Mutex<State>,
    changed: Condvar,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Batcher").finish_non_exhaustive()
    }
}

/// A sequence counted as decoding until dropped.
#[derive(Debug)]
pub struct Decoding<'a>(&'a Batcher);

impl Drop for Decoding<'_> {
    fn drop(&mut self) {
        self.0.lock().decoding -= 1;
        self.0.changed.notify_all();
    }
}

/// A batch running; when it ends, the others may run the next.
struct Running<'a>(&'a Batcher);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.lock().running = false;
        self.0.changed.notify_all();
    }
}

impl Batcher {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters and queued steps: still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a sequence as decoding (its steps are waited for) until the guard drops.
    pub fn decoding(&self) -> Decoding<'_> {
        self.lock().decoding += 1;
        Decoding(self)
    }

    /// How many steps have run in a batch with another sequence's.
    pub fn shared_steps(&self) -> u64 {
        self.lock().shared
    }

    /// Logits after `token`, the sequence's next input at `cache.length`; the cache is extended. Blocks
    /// until the batch holding this step has run.
    pub fn step(
        &self,
        model: &Model,
        token: u32,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, ModelError> {
        let (reply, replies) = channel();
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.waiting.push(Step {
            id,
            token,
            cache: std::mem::take(cache),
            reply,
        });
        self.changed.notify_all();
        let deadline = Instant::now() + GATHER;
        loop {
            if let Some(result) = Self::received(&replies) {
                drop(state);
                let (logits, returned) = result.map_err(ModelError::Batch)?;
                *cache = returned;
                return Ok(logits);
            }
            let queued = state.waiting.iter().any(|step| step.id == id);
            let everyone = state.waiting.len() >= state.decoding.max(1);
            if queued && !state.running && (everyone || Instant::now() >= deadline) {
                let batch = std::mem::take(&mut state.waiting);
                if batch.len() > 1 {
                    state.shared += batch.len() as u64;
                }
                state.running = true;
                drop(state);
                {
                    // Cleared however `run` ends (a panic too): the others would wait for ever.
                    let _running = Running(self);
                    run(model, batch);
                }
                state = self.lock();
                continue;
            }
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_micros(200));
            state = self
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn received(replies: &Receiver<Reply>) -> Option<Reply> {
        match replies.try_recv() {
            Ok(reply) => Some(reply),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err("the batch was dropped".to_owned())),
        }
    }
}

/// One forward pass for every step of `batch`; each step's logits and cache go back to its sequence.
fn run(model: &Model, mut batch: Vec<Step>) {
    let tokens: Vec<u32> = batch.iter().map(|step| step.token).collect();
    let computed = (|| -> Result<Vec<f32>, ModelError> {
        let hidden = model.embed(&tokens)?.flatten_all()?.to_vec1::<f32>()?;
        let mut segments: Vec<Segment<'_>> = batch
            .iter_mut()
            .map(|step| Segment {
                tokens: 1,
                cache: &mut step.cache,
            })
            .collect();
        let hidden = model.layers_batch(hidden, &mut segments)?;
        model.logits_rows(&hidden, tokens.len())
    })();
    match computed {
        Ok(logits) => {
            let vocabulary = logits.len() / tokens.len().max(1);
            for (step, logits) in batch.into_iter().zip(logits.chunks_exact(vocabulary)) {
                let mut cache = step.cache;
                cache.length += 1;
                // A sequence that went away no longer listens.
                let _ = step.reply.send(Ok((logits.to_vec(), cache)));
            }
        }
        Err(error) => {
            for step in batch {
                let _ = step.reply.send(Err(error.to_string()));
            }
        }
    }
}
