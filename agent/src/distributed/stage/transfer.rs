//! Whole model files copied between agents, over the same authenticated stage link as the tensors of a
//! distributed model: a node offers its copy of a model (`Offer`: the file's content digest and length)
//! and sends its bytes from any offset (`Blob`); a node told to `Receive` a model fetches it from the first
//! source that offers it into a partial file (`.partial/sha256-….blob` in the models dir, never listed as
//! a model), resumes from the next source when one breaks off, checks the digest, and installs it in one
//! step: renamed into the models dir (a node served by the built-in engine), or handed to the node's
//! Ollama (`POST /api/blobs/:digest`, then `/api/create`). A model is either complete and listed, or
//! invisible.

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use sollol_shared::digest::Sha256Digest;
use sollol_shared::layers::{MAX_LAYER_FRAME_BYTES, StageReply, StageRequest};
use sollol_shared::model_name;
use sollol_shared::protocol::RefusalCode;
use tokio::sync::mpsc;

use super::{Stage, dial, refusal};
use crate::cluster::wire;
use sollol_engine::engine::{self, ModelFile};

/// Bytes per [`StageReply::BlobChunk`]: the connection's reply queue holds at most 64 of them.
const CHUNK: usize = 512 << 10;
/// Bytes between two [`StageReply::Receiving`] reports.
const REPORT_EVERY: u64 = 16 << 20;
/// Bytes written between two flushes started in the background, so the disk writes while the copy goes
/// on and the final flush before the rename is short.
const FLUSH_EVERY: u64 = 64 << 20;
/// A source that sends nothing for this long is given up for the next one.
const IDLE_LIMIT: Duration = Duration::from_secs(30);

/// The receives in progress on this node, one per model: a second request for the same model waits for
/// the first, then finds the model installed.
pub(super) type Receiving = std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// Why one source did not give the model.
enum Failure {
    /// Try the next source (the bytes received so far are kept, unless they were found corrupt).
    Source(String),
    /// Stop: the answer to the whole request.
    Final(StageReply),
}

/// A partial copy being written: the file, the hash of its bytes so far, how many there are.
struct Partial {
    digest: Sha256Digest,
    total: u64,
    path: PathBuf,
    file: std::fs::File,
    hasher: Sha256,
    written: u64,
    /// The background flush under way, and where the last one started.
    flushing: Option<std::thread::JoinHandle<()>>,
    flushed_at: u64,
}

impl Partial {
    /// The partial copy of `digest` under `models_dir`, created, or reopened and hashed so far (a
    /// receive broken off earlier, even by a restart, goes on where it stopped).
    fn open(models_dir: &Path, digest: Sha256Digest, total: u64) -> std::io::Result<Self> {
        let directory = models_dir.join(".partial");
        std::fs::create_dir_all(&directory)?;
        let path = directory.join(format!("{}.blob", digest.file_stem()));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut written = file.metadata()?.len();
        if written > total {
            file.set_len(0)?;
            written = 0;
        }
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut left = written;
        file.rewind()?;
        while left > 0 {
            let take = buffer.len().min(left as usize);
            file.read_exact(&mut buffer[..take])?;
            hasher.update(&buffer[..take]);
            left -= take as u64;
        }
        Ok(Self {
            digest,
            total,
            path,
            file,
            hasher,
            written,
            flushing: None,
            flushed_at: written,
        })
    }

    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        if self.written - self.flushed_at >= FLUSH_EVERY
            && self
                .flushing
                .as_ref()
                .is_none_or(std::thread::JoinHandle::is_finished)
        {
            // The page cache would hold the whole file dirty until the final flush: start writing it
            // out now, on another thread, and go on receiving.
            self.flushed_at = self.written;
            let file = self.file.try_clone()?;
            self.flushing = Some(std::thread::spawn(move || {
                let _ = file.sync_data();
            }));
        }
        Ok(())
    }

    /// Everything on disk: the background flush ended, then a last one.
    fn sync(&mut self) -> std::io::Result<()> {
        if let Some(flushing) = self.flushing.take() {
            let _ = flushing.join();
        }
        self.file.sync_all()
    }

    /// Starts over: the bytes so far were not the file's.
    fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Stage {
    /// Answers [`StageRequest::Offer`].
    pub(super) async fn offer(&self, model: &str) -> StageReply {
        let wanted = model_name::normalize(model);
        let Some(file) = self
            .files()
            .await
            .into_iter()
            .find(|file| file.name == wanted)
        else {
            return refusal(
                RefusalCode::ModelMissing,
                format!("node {} has no copy of {wanted}", self.settings.node_name),
            );
        };
        match self.content_digest(&file).await {
            Ok(digest) => StageReply::Offered {
                digest,
                bytes: file.size_bytes,
            },
            Err(message) => refusal(RefusalCode::BadRequest, message),
        }
    }

    /// `file`'s content digest: an Ollama blob's name (Ollama stores blobs under their digest; the
    /// receiver checks it anyway), else the SHA-256 of its bytes, computed once per path, length and
    /// modification time.
    async fn content_digest(&self, file: &ModelFile) -> Result<String, String> {
        if let Ok(digest) = Sha256Digest::parse(&file.digest)
            && file.path.file_name().and_then(|name| name.to_str()) == Some(&digest.file_stem())
        {
            return Ok(digest.to_string());
        }
        let key = (file.path.clone(), file.size_bytes, file.modified);
        if let Some((digest, _)) = self
            .digests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(digest.clone());
        }
        if let Some(digest) = self
            .contents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(digest.clone());
        }
        let path = file.path.clone();
        let digest = tokio::task::spawn_blocking(move || engine::content_digest(&path))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| format!("cannot read {}: {error}", file.path.display()))?;
        self.contents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, digest.clone());
        Ok(digest)
    }

    /// Answers [`StageRequest::Blob`]: the file's bytes from `offset`, read on a blocking thread.
    pub(super) async fn send_blob(
        &self,
        digest: &str,
        offset: u64,
        replies: &mpsc::Sender<StageReply>,
    ) {
        let mut path = None;
        for file in self.files().await {
            if self.content_digest(&file).await.as_deref() == Ok(digest) {
                path = Some(file.path);
                break;
            }
        }
        let Some(path) = path else {
            let message = format!(
                "node {} has no file with digest {digest}",
                self.settings.node_name
            );
            let _ = replies
                .send(refusal(RefusalCode::ModelMissing, message))
                .await;
            return;
        };
        let (sender, mut chunks) = mpsc::channel::<Result<Vec<u8>, String>>(2);
        tokio::task::spawn_blocking(move || {
            let read = || -> Result<(), String> {
                let mut file = std::fs::File::open(&path).map_err(|error| error.to_string())?;
                let length = file.metadata().map_err(|error| error.to_string())?.len();
                if offset > length {
                    return Err(format!("offset {offset} is past the file's {length} bytes"));
                }
                file.seek(std::io::SeekFrom::Start(offset))
                    .map_err(|error| error.to_string())?;
                let mut left = length - offset;
                while left > 0 {
                    // Read into spare capacity: no zeroing of a buffer about to be overwritten.
                    let take = CHUNK.min(left as usize);
                    let mut bytes = Vec::with_capacity(take);
                    (&mut file)
                        .take(take as u64)
                        .read_to_end(&mut bytes)
                        .map_err(|error| error.to_string())?;
                    if bytes.len() < take {
                        return Err("the file shrank while it was being sent".to_owned());
                    }
                    left -= bytes.len() as u64;
                    if sender.blocking_send(Ok(bytes)).is_err() {
                        return Ok(());
                    }
                }
                Ok(())
            };
            if let Err(message) = read() {
                let _ = sender.blocking_send(Err(message));
            }
        });
        while let Some(chunk) = chunks.recv().await {
            let reply = match chunk {
                Ok(bytes) => StageReply::BlobChunk { bytes },
                Err(message) => refusal(RefusalCode::BadRequest, message),
            };
            if replies.send(reply).await.is_err() {
                return;
            }
        }
        let _ = replies.send(StageReply::BlobSent).await;
    }

    /// Answers [`StageRequest::Receive`], reporting progress on `replies` as it goes.
    pub(super) async fn receive(
        &self,
        model: &str,
        sources: &[String],
        replies: &mpsc::Sender<StageReply>,
    ) -> StageReply {
        let started = Instant::now();
        if let Err(why) = model_name::validate(model) {
            return refusal(RefusalCode::BadRequest, why);
        }
        let model = model_name::normalize(model);
        if self.settings.ollama_url.is_none() && model.contains('/') {
            // The engine names a model after its file: `name:tag.gguf`, directly in the models dir.
            return refusal(
                RefusalCode::BadRequest,
                format!(
                    "node {} is served by the built-in engine, whose models dir holds models named name:tag; {model} has a namespace or registry",
                    self.settings.node_name
                ),
            );
        }
        let turn = Arc::clone(
            self.receiving
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(model.clone())
                .or_default(),
        );
        let _turn = turn.lock().await;
        if let Some((digest, bytes)) = self.installed(&model).await {
            return StageReply::Received {
                digest,
                bytes,
                fetched_bytes: 0,
                millis: 0,
                source: String::new(),
            };
        }
        let mut partial = None;
        let mut failures = Vec::new();
        let mut fetched = 0;
        for source in sources {
            match self
                .fetch_copy(&model, source, &mut partial, &mut fetched, replies)
                .await
            {
                Ok(done) => {
                    let digest = done.digest.to_string();
                    let bytes = done.total;
                    if let Err(message) = self.install(&model, done).await {
                        return refusal(RefusalCode::BadRequest, message);
                    }
                    return StageReply::Received {
                        digest,
                        bytes,
                        fetched_bytes: fetched,
                        millis: started.elapsed().as_millis() as u64,
                        source: source.clone(),
                    };
                }
                Err(Failure::Final(reply)) => return reply,
                Err(Failure::Source(message)) => {
                    tracing::warn!(%source, %message, %model, "copying a model from a peer failed");
                    let _ = replies
                        .send(StageReply::SourceFailed {
                            source: source.clone(),
                            message: message.clone(),
                        })
                        .await;
                    failures.push(format!("{source}: {message}"));
                }
            }
        }
        refusal(
            RefusalCode::ModelMissing,
            if failures.is_empty() {
                format!("no node holding {model} was named to copy it from")
            } else {
                format!("no node could give {model}: {}", failures.join("; "))
            },
        )
    }

    /// Whether this node has `model` installed already (a node served by the built-in engine: the file
    /// in its models dir): its digest and length.
    async fn installed(&self, model: &str) -> Option<(String, u64)> {
        if let Some(url) = &self.settings.ollama_url {
            // The node's Ollama decides (the store this agent reads may not be that Ollama's): a model it
            // shows arrived since the coordinator's view was taken. Its digest is not needed to say so.
            return super::ollama::has(url, model)
                .await
                .then(|| (String::new(), 0));
        }
        let file = self
            .files()
            .await
            .into_iter()
            .find(|file| file.name == model)?;
        let digest = self.content_digest(&file).await.ok()?;
        Some((digest, file.size_bytes))
    }

    /// Fetches `model` from `source` into `partial` (started here when it is `None`, kept there when the
    /// source breaks off); the complete copy once every byte is in and the digest matched. `fetched`
    /// counts the bytes received.
    async fn fetch_copy(
        &self,
        model: &str,
        source: &str,
        partial: &mut Option<Partial>,
        fetched: &mut u64,
        replies: &mpsc::Sender<StageReply>,
    ) -> Result<Partial, Failure> {
        let failed = |error: &dyn std::fmt::Display| Failure::Source(error.to_string());
        let (mut stream, _) = dial(
            source,
            &self.settings.token,
            self.settings.handshake_timeout,
        )
        .await
        .map_err(|error| failed(&error))?;
        let offer = StageRequest::Offer {
            model: model.to_owned(),
        };
        wire::write_message(&mut stream, &offer)
            .await
            .map_err(|error| failed(&error))?;
        let (digest, total) = match next_reply(&mut stream).await? {
            StageReply::Offered { digest, bytes } => (digest, bytes),
            StageReply::Refused(refusal) => return Err(Failure::Source(refusal.message)),
            other => return Err(Failure::Source(format!("unexpected answer {other:?}"))),
        };
        let digest = Sha256Digest::parse(&digest).map_err(Failure::Source)?;
        let mut sink = match partial.take() {
            Some(started) if started.digest == digest && started.total == total => started,
            Some(started) => {
                let message = format!(
                    "its copy is {digest} ({total} bytes), the one being copied {}",
                    started.digest
                );
                *partial = Some(started);
                return Err(Failure::Source(message));
            }
            None => self.start_partial(model, digest.clone(), total).await?,
        };
        let offset = sink.written;
        let request = StageRequest::Blob {
            digest: digest.to_string(),
            offset,
        };
        if let Err(error) = wire::write_message(&mut stream, &request).await {
            *partial = Some(sink);
            return Err(failed(&error));
        }
        // Bytes are written and hashed on a blocking thread while the next chunk arrives.
        let (chunks, mut incoming) = mpsc::channel::<Vec<u8>>(4);
        let writer = tokio::task::spawn_blocking(move || {
            while let Some(bytes) = incoming.blocking_recv() {
                if let Err(error) = sink.append(&bytes) {
                    return (sink, Some(error));
                }
            }
            (sink, None)
        });
        let mut received = offset;
        let mut reported = offset;
        let outcome = loop {
            match next_reply(&mut stream).await {
                Ok(StageReply::BlobChunk { bytes }) => {
                    received += bytes.len() as u64;
                    *fetched += bytes.len() as u64;
                    if received > total {
                        break Err(Failure::Source(format!(
                            "sent more than the file's {total} bytes"
                        )));
                    }
                    if chunks.send(bytes).await.is_err() {
                        break Ok(());
                    }
                    if received - reported >= REPORT_EVERY || received == total {
                        reported = received;
                        let _ = replies
                            .send(StageReply::Receiving {
                                source: source.to_owned(),
                                digest: digest.to_string(),
                                done_bytes: received,
                                total_bytes: total,
                            })
                            .await;
                    }
                }
                Ok(StageReply::BlobSent) => break Ok(()),
                Ok(StageReply::Refused(refusal)) => break Err(Failure::Source(refusal.message)),
                Ok(other) => break Err(Failure::Source(format!("unexpected answer {other:?}"))),
                Err(failure) => break Err(failure),
            }
        };
        drop(chunks);
        let (sink, write_error) = writer.await.map_err(|error| failed(&error))?;
        if let Some(error) = write_error {
            sink.discard();
            return Err(Failure::Final(refusal(
                RefusalCode::BadRequest,
                format!(
                    "node {} could not write the copy: {error}",
                    self.settings.node_name
                ),
            )));
        }
        if let Err(failure) = outcome {
            *partial = Some(sink);
            return Err(failure);
        }
        if sink.written != total {
            let message = format!("stopped at {} of {total} bytes", sink.written);
            *partial = Some(sink);
            return Err(Failure::Source(message));
        }
        let actual = format!("sha256:{}", hex::encode(sink.hasher.clone().finalize()));
        if actual != digest.as_str() {
            sink.discard();
            return Err(Failure::Source(format!(
                "sent bytes whose digest is {actual}, not {digest}: discarded"
            )));
        }
        Ok(sink)
    }

    /// The partial copy of `digest` opened (or resumed), once the disk has room for the rest of it.
    async fn start_partial(
        &self,
        model: &str,
        digest: Sha256Digest,
        total: u64,
    ) -> Result<Partial, Failure> {
        let models_dir = self.settings.models_dir.clone();
        let opened = tokio::task::spawn_blocking(move || Partial::open(&models_dir, digest, total))
            .await
            .map_err(|error| Failure::Source(error.to_string()))?
            .map_err(|error| {
                Failure::Final(refusal(
                    RefusalCode::BadRequest,
                    format!(
                        "node {} cannot write into {}: {error}",
                        self.settings.node_name,
                        self.settings.models_dir.display()
                    ),
                ))
            })?;
        if let Err(message) = self.room_for(model, total - opened.written, opened.written) {
            opened.discard();
            return Err(Failure::Final(refusal(RefusalCode::BadRequest, message)));
        }
        Ok(opened)
    }

    /// Whether the models dir has room for `needed` more bytes of `model` (`have` bytes of it are there
    /// already): within the disk's free space and `engine.max_disk`; else the reason, with the numbers.
    fn room_for(&self, model: &str, needed: u64, have: u64) -> Result<(), String> {
        let node = &self.settings.node_name;
        let directory = &self.settings.models_dir;
        if let Some(disk) = crate::telemetry::procfs::disk(directory)
            && disk.available_bytes < needed
        {
            return Err(format!(
                "not enough disk on node {node} for {model}: it needs {} more, {} is free at {}",
                bytes(needed),
                bytes(disk.available_bytes),
                directory.display()
            ));
        }
        if let Some(limit) = self.settings.max_disk {
            let used = models_dir_bytes(directory).saturating_sub(have);
            if used + have + needed > limit {
                return Err(format!(
                    "not enough disk on node {node} for {model}: it needs {}, the models there take {} of engine.max_disk = {}",
                    bytes(have + needed),
                    bytes(used),
                    bytes(limit)
                ));
            }
        }
        Ok(())
    }

    /// Puts a complete, checked copy where the node serves it from: the models dir (renamed in one
    /// step), or the node's Ollama (the blob uploaded, the model created from it).
    async fn install(&self, model: &str, done: Partial) -> Result<(), String> {
        let node = &self.settings.node_name;
        match &self.settings.ollama_url {
            None => {
                let target = self.settings.models_dir.join(format!("{model}.gguf"));
                let mut done = done;
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    done.sync()?;
                    std::fs::rename(&done.path, &target)?;
                    // The rename itself on disk, too.
                    if let Some(directory) = target.parent() {
                        std::fs::File::open(directory)?.sync_all()?;
                    }
                    Ok(())
                })
                .await
                .map_err(|error| error.to_string())?
                .map_err(|error| format!("node {node} could not install the copy: {error}"))
            }
            Some(url) => {
                let result = super::ollama::install(url, model, &done.digest, &done.path).await;
                done.discard();
                result
                    .map_err(|error| format!("node {node}'s Ollama did not take the copy: {error}"))
            }
        }
    }
}

/// Bytes of the files directly in `directory` and in its `.partial` folder.
fn models_dir_bytes(directory: &Path) -> u64 {
    let sum = |directory: &Path| -> u64 {
        std::fs::read_dir(directory)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|entry| entry.metadata().ok())
                    .filter(|metadata| metadata.is_file())
                    .map(|metadata| metadata.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    sum(directory) + sum(&directory.join(".partial"))
}

/// `bytes` for people: MB with one decimal (the unit Ollama's progress shows).
fn bytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// The next reply of a source, within [`IDLE_LIMIT`].
async fn next_reply(stream: &mut crate::cluster::secure::SecureTcp) -> Result<StageReply, Failure> {
    match tokio::time::timeout(
        IDLE_LIMIT,
        wire::read_message_within::<StageReply, _>(stream, MAX_LAYER_FRAME_BYTES),
    )
    .await
    {
        Err(_) => Err(Failure::Source(format!(
            "sent nothing for {} s",
            IDLE_LIMIT.as_secs()
        ))),
        Ok(Err(error)) => Err(Failure::Source(format!("the link broke off: {error}"))),
        Ok(Ok(reply)) => Ok(reply),
    }
}
