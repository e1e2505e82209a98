//! The engine: the models it knows (on disk, or computed elsewhere) and the ones in memory with their
//! expiry. A model loads on its first request and unloads when its keep-alive runs out, as in Ollama.
//! Generation is CPU-bound and runs on blocking threads, at most `parallel` at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

pub use crate::catalogue::{
    ModelDetails, ModelFile, content_digest, describe, discover, header_bytes,
};
pub use crate::error::EngineError;
pub use crate::loaded::{Compute, Embedding, GenerateOptions, Generated, LoadedModel, TextStream};
use crate::remote::RemoteCompute;

/// Ollama's "for ever" (`keep_alive` < 0): the longest duration Go's time package holds, about 292
/// years. Every keep-alive is at most this, so the time a model expires can always be computed.
pub const FOREVER: Duration = Duration::from_nanos(i64::MAX as u64);

/// When a model kept for `keep` from `now` expires; `None`: never (past what the clock can hold).
fn expiry(now: Instant, keep: Duration) -> Option<Instant> {
    now.checked_add(keep)
}

/// A model in memory, when it expires (`None`: never) and when a request last asked for it.
#[derive(Debug)]
struct Kept {
    model: Arc<LoadedModel>,
    expires: Option<Instant>,
    used: Instant,
}

impl Kept {
    fn alive(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

/// The engine's models: known on disk, loaded in memory with their expiry.
#[derive(Debug)]
pub struct Engine {
    /// On disk, and (coordinator) served through stages; the latter come and go.
    files: RwLock<Vec<ModelFile>>,
    /// Each with when it expires (`None`: never).
    loaded: Mutex<BTreeMap<String, Kept>>,
    /// Serialises loads, as Ollama does.
    loading: tokio::sync::Mutex<()>,
    pub slots: Arc<tokio::sync::Semaphore>,
    pub parallel: usize,
    pub default_keep_alive: Duration,
    /// Models computed elsewhere (through stages), by name.
    remote: RwLock<BTreeMap<String, Arc<dyn RemoteCompute>>>,
    /// The most memory models loaded whole may take together (`engine.max_memory`): a larger model is
    /// refused, and loading one unloads the least recently used until it fits.
    max_memory: Option<u64>,
    /// Where the files were found (the models dir and Ollama's store), with the models dir's
    /// modification time at that scan: a file added or removed there (a model copied from another node,
    /// or by hand) is seen at the next lookup.
    source: Option<Source>,
}

#[derive(Debug)]
struct Source {
    models_dir: PathBuf,
    ollama_store: Option<PathBuf>,
    scanned: Mutex<Option<SystemTime>>,
}

impl Engine {
    pub fn new(files: Vec<ModelFile>, parallel: usize, default_keep_alive: Duration) -> Self {
        Self {
            files: RwLock::new(files),
            loaded: Mutex::new(BTreeMap::new()),
            loading: tokio::sync::Mutex::new(()),
            slots: Arc::new(tokio::sync::Semaphore::new(parallel.max(1))),
            parallel: parallel.max(1),
            default_keep_alive,
            remote: RwLock::new(BTreeMap::new()),
            max_memory: None,
            source: None,
        }
    }

    /// Looks for files again whenever `models_dir` changes (its modification time: a file renamed into
    /// it or removed); `files` are what a scan of it and `ollama_store` found just now.
    pub fn watching(mut self, models_dir: PathBuf, ollama_store: Option<PathBuf>) -> Self {
        let scanned = modified(&models_dir);
        self.source = Some(Source {
            models_dir,
            ollama_store,
            scanned: Mutex::new(scanned),
        });
        self
    }

    /// Scans again when the models dir changed since the last scan; models served through stages stay.
    fn refresh(&self) {
        let Some(source) = &self.source else { return };
        // Held through the scan: a slower scan that started earlier must not replace a newer one's list.
        let mut scanned = source
            .scanned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = modified(&source.models_dir);
        if scanned.is_some() && *scanned == now {
            return;
        }
        // File times tick coarsely (a few milliseconds): a change in the same tick as this scan would
        // leave the time as it is, so a time that recent is not trusted, and the next lookup scans again.
        let settled = now.is_some_and(|time| {
            time.elapsed()
                .is_ok_and(|age| age > Duration::from_millis(50))
        });
        *scanned = if settled { now } else { None };
        let mut found = discover(&source.models_dir, source.ollama_store.as_deref());
        let remote = self.remote.read().unwrap_or_else(PoisonError::into_inner);
        let mut files = self.files.write().unwrap_or_else(PoisonError::into_inner);
        found.retain(|file| !remote.contains_key(&file.name));
        found.extend(
            files
                .drain(..)
                .filter(|file| remote.contains_key(&file.name)),
        );
        *files = found;
    }

    /// Refuses to load whole a model whose file is larger than `limit`.
    pub fn with_max_memory(mut self, limit: Option<u64>) -> Self {
        self.max_memory = limit;
        self
    }

    /// Serves a model computed elsewhere from now on (its file size and digest become known once it
    /// is prepared); a no-op when it is served already.
    pub fn add_remote(&self, remote_model: Arc<dyn RemoteCompute>) {
        let name = sollol_shared::model_name::normalize(remote_model.model());
        let mut remote = self.remote.write().unwrap_or_else(PoisonError::into_inner);
        if remote.contains_key(&name) {
            return;
        }
        self.files
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(ModelFile {
                name: name.clone(),
                path: PathBuf::new(),
                size_bytes: 0,
                modified: SystemTime::now(),
                digest: String::new(),
                details: None,
            });
        remote.insert(name, remote_model);
    }

    /// Stops serving a model computed elsewhere (requests running on it finish).
    pub fn remove_remote(&self, name: &str) {
        let name = sollol_shared::model_name::normalize(name);
        if self
            .remote
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&name)
            .is_some()
        {
            self.files
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|file| file.name != name);
            self.unload(&name);
        }
    }

    pub fn files(&self) -> Vec<ModelFile> {
        self.refresh();
        self.files
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Removes the model called `name` from the models dir (unloading it first); its file there is the
    /// model (a link to a file elsewhere is removed, not what it points to). A model in Ollama's store,
    /// or computed elsewhere, is not this engine's to remove.
    pub fn delete(&self, name: &str) -> Result<(), EngineError> {
        let file = self
            .file(name)
            .ok_or_else(|| EngineError::NotFound(name.to_owned()))?;
        let path = self.own_file(&file)?;
        self.unload(&file.name);
        std::fs::remove_file(&path).map_err(|error| {
            EngineError::Unsupported(format!("cannot remove {}: {error}", file.name))
        })?;
        self.refresh();
        Ok(())
    }

    /// Makes `destination` a second name of the model `source`: a hard link in the models dir (no more
    /// disk), else a copy of the file. An existing `destination` is replaced, as in Ollama.
    pub fn copy(&self, source: &str, destination: &str) -> Result<(), EngineError> {
        let file = self
            .file(source)
            .ok_or_else(|| EngineError::NotFound(source.to_owned()))?;
        let Some(source_dir) = &self.source else {
            return Err(EngineError::Unsupported(
                "this engine has no models dir".to_owned(),
            ));
        };
        if file.path.as_os_str().is_empty() {
            return Err(EngineError::Unsupported(format!(
                "{} is computed on other nodes: there is no file to copy",
                file.name
            )));
        }
        let destination = sollol_shared::model_name::normalize(destination);
        if destination.contains('/') {
            return Err(EngineError::Unsupported(format!(
                "the built-in engine names models name:tag; {destination} has a namespace or registry"
            )));
        }
        let target = source_dir.models_dir.join(format!("{destination}.gguf"));
        // Written under another name, then renamed: the new name appears complete or not at all.
        let staging = source_dir
            .models_dir
            .join(format!(".{destination}.gguf.copying"));
        let _ = std::fs::remove_file(&staging);
        let made = std::fs::hard_link(&file.path, &staging)
            .or_else(|_| std::fs::copy(&file.path, &staging).map(|_| ()))
            .and_then(|()| std::fs::rename(&staging, &target));
        made.map_err(|error| {
            let _ = std::fs::remove_file(&staging);
            EngineError::Unsupported(format!(
                "cannot copy {} to {destination}: {error}",
                file.name
            ))
        })?;
        self.refresh();
        Ok(())
    }

    /// The path of `file` in the models dir, when it lies there (not in Ollama's store, not remote).
    fn own_file(&self, file: &ModelFile) -> Result<PathBuf, EngineError> {
        let Some(source) = &self.source else {
            return Err(EngineError::Unsupported(
                "this engine has no models dir".to_owned(),
            ));
        };
        if file.path.parent() == Some(source.models_dir.as_path()) {
            return Ok(file.path.clone());
        }
        Err(EngineError::Unsupported(format!(
            "{} is not a file in the models dir (it is in Ollama's store, or computed on other nodes): remove it there",
            file.name
        )))
    }

    /// The model called `name` (`name` alone means `name:latest`).
    pub fn file(&self, name: &str) -> Option<ModelFile> {
        let wanted = sollol_shared::model_name::normalize(&name.to_lowercase());
        self.refresh();
        self.files
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|file| file.name == wanted)
            .cloned()
    }

    /// Loaded models with when they expire (`None`: never).
    pub fn loaded(&self) -> Vec<(Arc<LoadedModel>, Option<Instant>)> {
        let now = Instant::now();
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        loaded.retain(|_, kept| kept.alive(now));
        loaded
            .values()
            .map(|kept| (Arc::clone(&kept.model), kept.expires))
            .collect()
    }

    /// The model in memory, loading it if needed; `Duration::ZERO` load time when it was warm.
    pub async fn get(
        &self,
        name: &str,
        keep_alive: Option<Duration>,
    ) -> Result<(Arc<LoadedModel>, Duration), EngineError> {
        let file = self
            .file(name)
            .ok_or_else(|| EngineError::NotFound(name.to_owned()))?;
        let keep = keep_alive.unwrap_or(self.default_keep_alive);
        if let Some(model) = self.touch(&file.name, keep) {
            return Ok((model, Duration::ZERO));
        }
        let _loading = self.loading.lock().await;
        if let Some(model) = self.touch(&file.name, keep) {
            return Ok((model, Duration::ZERO));
        }
        let remote = self
            .remote
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&file.name)
            .cloned();
        let loaded = if let Some(remote) = remote {
            tracing::info!(model = %file.name, "preparing the model where it is computed");
            LoadedModel::load_remote(&file, remote).await?
        } else {
            if let Some(offered) = self.max_memory
                && file.size_bytes > offered
            {
                return Err(EngineError::TooLarge {
                    model: file.name.clone(),
                    needs: file.size_bytes,
                    offered,
                });
            }
            if let Some(budget) = self.max_memory {
                self.make_room(&file.name, file.size_bytes, budget);
            }
            tracing::info!(model = %file.name, path = %file.path.display(), "loading model");
            tokio::task::spawn_blocking(move || LoadedModel::load(&file))
                .await
                .map_err(|error| EngineError::Stopped(error.to_string()))??
        };
        let loaded = Arc::new(loaded);
        let load_duration = loaded.load_duration;
        tracing::info!(model = %loaded.file.name, ms = load_duration.as_millis() as u64, "model loaded");
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                loaded.file.name.clone(),
                Kept {
                    model: Arc::clone(&loaded),
                    expires: expiry(Instant::now(), keep),
                    used: Instant::now(),
                },
            );
        Ok((loaded, load_duration))
    }

    fn touch(&self, name: &str, keep: Duration) -> Option<Arc<LoadedModel>> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        loaded.retain(|_, kept| kept.alive(now));
        let kept = loaded.get_mut(name)?;
        kept.expires = expiry(now, keep);
        kept.used = now;
        Some(Arc::clone(&kept.model))
    }

    /// Unloads the least recently used models until `needs` more bytes fit in `budget` (requests
    /// running on an unloaded model finish with it; its memory goes when they do).
    fn make_room(&self, name: &str, needs: u64, budget: u64) {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let used: u64 = loaded.values().map(|kept| kept.model.file.size_bytes).sum();
            if used.saturating_add(needs) <= budget {
                return;
            }
            let Some(oldest) = loaded
                .iter()
                .min_by_key(|(_, kept)| kept.used)
                .map(|(oldest, _)| oldest.clone())
            else {
                return;
            };
            tracing::info!(unloaded = %oldest, to_load = %name, budget, "unloading the least recently used model to make room");
            loaded.remove(&oldest);
        }
    }

    /// Drops a model from memory now (`keep_alive: 0`), once running requests finish with it.
    pub fn unload(&self, name: &str) {
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }
}

/// A directory's modification time (`None` when it cannot be read).
fn modified(directory: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(directory)
        .and_then(|metadata| metadata.modified())
        .ok()
}
