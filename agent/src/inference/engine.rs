//! Models on disk, models in memory, and generation: what the engine's Ollama API calls.
//!
//! Models come from a models directory (`*.gguf`, named after the file) and
//! from Ollama's own store (manifests pointing at GGUF blobs). A model loads on
//! its first request and unloads when its keep-alive runs out, as in Ollama.
//! Generation is CPU-bound and runs on blocking threads, at most `parallel` at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use super::gguf::{Gguf, GgufError};
use super::model::{Model, ModelError, Part};
use super::sampling::{Sampler, SamplingOptions};
use super::tokenizer::{TextCodec, TokenizerError};
use crate::pipeline::{Candidate, Distributed};
use sollol_shared::layers::Sampling;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model {0:?} not found, try pulling it first")]
    NotFound(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("the prompt has {prompt} tokens; the context holds {context}")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("distributed inference: {0}")]
    Distributed(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "model {model} requires more memory ({} MiB) than this node offers ({} MiB, engine.max_memory)",
        needs >> 20,
        offered >> 20
    )]
    TooLarge {
        model: String,
        needs: u64,
        offered: u64,
    },
    #[error("the input is empty: there is nothing to embed")]
    EmptyInput,
    #[error("generation stopped: {0}")]
    Stopped(String),
}

/// A model the engine can serve.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFile {
    /// Ollama-style `name:tag`.
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub modified: SystemTime,
    /// `sha256:...` for Ollama blobs, else a digest of the path and size.
    pub digest: String,
    /// From the file's header, read at discovery; `None` when the header does not read.
    pub details: Option<ModelDetails>,
}

/// What an Ollama `details` object says about a model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelDetails {
    pub family: String,
    pub parameter_size: String,
    pub quantization_level: String,
    pub chat_template: Option<String>,
    pub context_length: usize,
}

/// Finds GGUF models in `models_dir` and in Ollama's store under `ollama_dir`, sorted by name.
pub fn discover(models_dir: &Path, ollama_dir: Option<&Path>) -> Vec<ModelFile> {
    let mut found = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(models_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|extension| extension.to_str()) != Some("gguf") {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|stem| stem.to_str()) else {
                continue;
            };
            let name = if stem.contains(':') {
                stem.to_lowercase()
            } else {
                format!("{}:latest", stem.to_lowercase())
            };
            if let Some(file) = model_file(name, &path, None) {
                found.insert(file.name.clone(), file);
            }
        }
    }
    if let Some(ollama_dir) = ollama_dir {
        for file in ollama_models(ollama_dir) {
            found.entry(file.name.clone()).or_insert(file);
        }
    }
    found.into_values().collect()
}

fn model_file(name: String, path: &Path, digest: Option<String>) -> Option<ModelFile> {
    let metadata = std::fs::metadata(path).ok()?;
    if !metadata.is_file() {
        return None;
    }
    let digest = digest.unwrap_or_else(|| {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(format!("{}:{}", path.display(), metadata.len()));
        format!("sha256:{}", hex::encode(hash))
    });
    Some(ModelFile {
        name,
        path: path.to_owned(),
        size_bytes: metadata.len(),
        modified: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        digest,
        details: describe(path),
    })
}

/// Ollama's store: `manifests/<registry>/<namespace>/<model>/<tag>` JSON naming a model layer blob.
fn ollama_models(root: &Path) -> Vec<ModelFile> {
    let mut found = Vec::new();
    let manifests = root.join("manifests");
    let mut stack = vec![manifests.clone()];
    while let Some(directory) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(relative) = path.strip_prefix(&manifests) else {
                continue;
            };
            let parts: Vec<&str> = relative.iter().filter_map(|part| part.to_str()).collect();
            let [registry, namespace, model, tag] = parts.as_slice() else {
                continue;
            };
            let name = if *registry == "registry.ollama.ai" && *namespace == "library" {
                format!("{model}:{tag}")
            } else {
                format!("{registry}/{namespace}/{model}:{tag}")
            };
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(manifest) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let digest = manifest["layers"].as_array().and_then(|layers| {
                layers
                    .iter()
                    .find(|layer| layer["mediaType"] == "application/vnd.ollama.image.model")
                    .and_then(|layer| layer["digest"].as_str())
            });
            if let Some(digest) = digest {
                let blob = root.join("blobs").join(digest.replace(':', "-"));
                if let Some(file) = model_file(name, &blob, Some(digest.to_owned())) {
                    found.push(file);
                }
            }
        }
    }
    found
}

/// Where a loaded model's forward passes run.
#[derive(Debug)]
pub enum Compute {
    /// In this process.
    Local(Box<Model>),
    /// On agents' stages, each holding some layers (distributed inference).
    Distributed(Arc<DistributedModel>),
}

/// A model the engine serves through a pipeline of stages.
pub struct DistributedModel {
    pub pipeline: Arc<Distributed>,
    /// The agents that may hold stages now, best first.
    pub candidates: Box<dyn Fn() -> Vec<Candidate> + Send + Sync>,
}

impl std::fmt::Debug for DistributedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistributedModel")
            .field("model", &self.pipeline.model)
            .finish_non_exhaustive()
    }
}

/// A model in memory (or, distributed, planned and loaded on its stages).
#[derive(Debug)]
pub struct LoadedModel {
    pub file: ModelFile,
    pub details: ModelDetails,
    pub compute: Compute,
    pub codec: TextCodec,
    pub load_duration: Duration,
    /// The model's context length, in tokens.
    pub context: usize,
}

impl LoadedModel {
    pub fn load(file: &ModelFile) -> Result<Self, EngineError> {
        let started = Instant::now();
        let handle = std::fs::File::open(&file.path).map_err(GgufError::Io)?;
        let length = handle.metadata().map_err(GgufError::Io)?.len();
        let gguf = Gguf::read(std::io::BufReader::new(handle), length)?;
        let codec = TextCodec::from_gguf(&gguf)?;
        let shape = super::model::Shape::read(&gguf)?;
        let model = Model::load(&file.path, &gguf, Part::whole(shape.layers))?;
        let details = details_of(&gguf, model.shape.context);
        Ok(Self {
            file: file.clone(),
            details,
            context: model.shape.context,
            compute: Compute::Local(Box::new(model)),
            codec,
            load_duration: started.elapsed(),
        })
    }

    /// Plans and loads a distributed model on its stages; the tokenizer and template come from the
    /// first stage's copy of the file header (this process holds no weights).
    pub async fn load_distributed(
        file: &ModelFile,
        source: Arc<DistributedModel>,
    ) -> Result<Self, EngineError> {
        let started = Instant::now();
        let pipeline = source
            .pipeline
            .pipeline(&(source.candidates)())
            .await
            .map_err(|error| EngineError::Distributed(error.to_string()))?;
        let (header, file_bytes) = pipeline
            .header()
            .await
            .map_err(|error| EngineError::Distributed(error.to_string()))?;
        let gguf = Gguf::read(std::io::Cursor::new(header), file_bytes)?;
        let codec = TextCodec::from_gguf(&gguf)?;
        let context = super::model::Shape::read(&gguf)?.context;
        let mut file = file.clone();
        file.size_bytes = file_bytes;
        file.digest = pipeline.plan.digest.clone();
        Ok(Self {
            file,
            details: details_of(&gguf, context),
            compute: Compute::Distributed(source),
            codec,
            load_duration: started.elapsed(),
            context,
        })
    }

    /// Generates from `prompt` tokens, handing each piece of text to `emit` (which returns false to
    /// stop). Blocks: call it from a blocking thread (a distributed model's steps run on the runtime).
    pub fn generate(
        &self,
        prompt: &[u32],
        request: &GenerateOptions,
        emit: impl FnMut(&str) -> bool,
    ) -> Result<Generated, EngineError> {
        let context = self.context;
        if prompt.is_empty() || prompt.len() >= context {
            return Err(EngineError::PromptTooLong {
                prompt: prompt.len(),
                context,
            });
        }
        match &self.compute {
            Compute::Local(model) => self.generate_here(model, prompt, request, emit),
            Compute::Distributed(source) => {
                self.generate_distributed(source, prompt, request, emit)
            }
        }
    }

    fn generate_distributed(
        &self,
        source: &Arc<DistributedModel>,
        prompt: &[u32],
        request: &GenerateOptions,
        mut emit: impl FnMut(&str) -> bool,
    ) -> Result<Generated, EngineError> {
        let options = &request.sampling;
        let sampling = Sampling {
            temperature: options.temperature,
            top_k: u32::try_from(options.top_k).unwrap_or(u32::MAX),
            top_p: options.top_p,
            min_p: options.min_p,
            repeat_penalty: options.repeat_penalty,
            repeat_last_n: u32::try_from(options.repeat_last_n).unwrap_or(u32::MAX),
            seed: options.seed.unwrap_or_else(rand::random),
        };
        let limit = request
            .num_predict
            .unwrap_or(usize::MAX)
            .min(self.context - prompt.len());
        let started = Instant::now();
        let mut first_token = None;
        let mut text = TextStream::new(&self.codec, &request.stop);
        // The pipeline runs on the runtime; tokens come here, to this blocking thread, where `emit`
        // may block on a slow client.
        let (tokens, arriving) = std::sync::mpsc::channel::<u32>();
        let wanted = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let runtime = tokio::runtime::Handle::current();
        let running = {
            let source = Arc::clone(source);
            let stops = self.codec.stop_tokens.clone();
            let prompt = prompt.to_vec();
            let wanted = Arc::clone(&wanted);
            runtime.spawn(async move {
                source
                    .pipeline
                    .generate(
                        || (source.candidates)(),
                        &sampling,
                        &prompt,
                        limit,
                        |token| stops.contains(&token),
                        |token| {
                            tokens.send(token).is_ok()
                                && wanted.load(std::sync::atomic::Ordering::Relaxed)
                        },
                    )
                    .await
            })
        };
        let (mut cut, mut gone) = (false, false);
        for token in arriving {
            first_token.get_or_insert_with(Instant::now);
            if cut || gone {
                continue;
            }
            let (piece, stopped) = text.push(token)?;
            if !piece.is_empty() && !emit(&piece) {
                gone = true;
            }
            cut = stopped;
            if cut || gone {
                wanted.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let generated = runtime
            .block_on(running)
            .map_err(|error| EngineError::Stopped(error.to_string()))?
            .map_err(|error| EngineError::Distributed(error.to_string()))?;
        if gone {
            return Err(EngineError::Stopped("the client went away".to_owned()));
        }
        let rest = text.finish()?;
        if !rest.is_empty() {
            emit(&rest);
        }
        let first_token = first_token.unwrap_or_else(Instant::now);
        Ok(Generated {
            prompt_tokens: prompt.len(),
            prompt_duration: first_token.duration_since(started),
            output_tokens: text.tokens(),
            generation_duration: first_token.elapsed(),
            done_reason: if generated.stopped || cut {
                "stop"
            } else {
                "length"
            },
        })
    }

    fn generate_here(
        &self,
        model: &Model,
        prompt: &[u32],
        request: &GenerateOptions,
        mut emit: impl FnMut(&str) -> bool,
    ) -> Result<Generated, EngineError> {
        let context = self.context;
        let mut sampler = Sampler::new(request.sampling.clone());
        let mut cache = model.new_cache();
        let started = Instant::now();
        let hidden = model.embed(prompt)?;
        let hidden = model.layers(hidden, &mut cache)?;
        cache.length += prompt.len();
        let mut logits = model.head(&hidden)?;
        let prompt_duration = started.elapsed();

        let generation_started = Instant::now();
        let mut history = prompt.to_vec();
        let mut text = TextStream::new(&self.codec, &request.stop);
        let mut done_reason = "length";
        let limit = request
            .num_predict
            .unwrap_or(usize::MAX)
            .min(context - prompt.len());
        while text.tokens() < limit {
            let token = sampler.next(&logits, &history);
            if self.codec.is_stop(token) {
                done_reason = "stop";
                break;
            }
            history.push(token);
            let (piece, stopped) = text.push(token)?;
            if !piece.is_empty() && !emit(&piece) {
                return Err(EngineError::Stopped("the client went away".to_owned()));
            }
            if stopped {
                done_reason = "stop";
                break;
            }
            if text.tokens() == limit || cache.length + 1 >= context {
                break;
            }
            let hidden = model.embed(&[token])?;
            let hidden = model.layers(hidden, &mut cache)?;
            cache.length += 1;
            logits = model.head(&hidden)?;
        }
        let rest = text.finish()?;
        if !rest.is_empty() {
            emit(&rest);
        }
        Ok(Generated {
            prompt_tokens: prompt.len(),
            prompt_duration,
            output_tokens: text.tokens(),
            generation_duration: generation_started.elapsed(),
            done_reason,
        })
    }
}

impl LoadedModel {
    /// The embedding of `ids`: the mean over positions of the final norm's output (llama.cpp's mean
    /// pooling, what Ollama's `/api/embed` returns before normalising). Inputs longer than the context
    /// are cut to it when `truncate`, refused otherwise.
    pub fn embed(&self, ids: &[u32], truncate: bool) -> Result<Embedding, EngineError> {
        let Compute::Local(model) = &self.compute else {
            return Err(EngineError::Unsupported(
                "embeddings are not computed for distributed models".to_owned(),
            ));
        };
        let context = self.context;
        if ids.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        let ids = match ids.len() > context {
            true if truncate => &ids[..context],
            true => {
                return Err(EngineError::PromptTooLong {
                    prompt: ids.len(),
                    context,
                });
            }
            false => ids,
        };
        let mut cache = model.new_cache();
        let hidden = model.layers(model.embed(ids)?, &mut cache)?;
        let rows = model.normed(&hidden)?;
        let width = model.shape.embedding;
        let mut sums = vec![0f64; width];
        for row in rows.chunks_exact(width) {
            for (sum, value) in sums.iter_mut().zip(row) {
                *sum += f64::from(*value);
            }
        }
        Ok(Embedding {
            values: sums
                .iter()
                .map(|sum| (sum / ids.len() as f64) as f32)
                .collect(),
            tokens: ids.len(),
        })
    }
}

/// One text's embedding and how many tokens it took.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    pub values: Vec<f32>,
    pub tokens: usize,
}

impl Embedding {
    /// Scaled to length 1 (a zero vector stays zero).
    pub fn normalized(mut self) -> Self {
        let length = self
            .values
            .iter()
            .map(|value| f64::from(*value).powi(2))
            .sum::<f64>()
            .sqrt();
        if length > 0.0 {
            for value in &mut self.values {
                *value = (f64::from(*value) / length) as f32;
            }
        }
        self
    }
}

/// Generated tokens as text to send: what could still become a stop string or is a partial UTF-8
/// character is held back, and a stop string ends the answer before it.
#[derive(Debug)]
pub struct TextStream<'a> {
    codec: &'a TextCodec,
    stops: &'a [String],
    output: Vec<u32>,
    sent: usize,
    cut_at_stop_string: bool,
}

impl<'a> TextStream<'a> {
    pub fn new(codec: &'a TextCodec, stops: &'a [String]) -> Self {
        Self {
            codec,
            stops,
            output: Vec::new(),
            sent: 0,
            cut_at_stop_string: false,
        }
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> usize {
        self.output.len()
    }

    /// Adds a generated token: the text that can be sent now, and whether a stop string ended the answer.
    pub fn push(&mut self, token: u32) -> Result<(String, bool), EngineError> {
        self.output.push(token);
        let text = self.codec.decode(&self.output)?;
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|stop| text.find(stop.as_str()))
            .min()
        {
            let piece = text.get(self.sent..cut).unwrap_or_default().to_owned();
            self.sent = self.sent.max(cut);
            self.cut_at_stop_string = true;
            return Ok((piece, true));
        }
        let safe = safe_prefix(&text, self.stops);
        let piece = text.get(self.sent..safe).unwrap_or_default().to_owned();
        self.sent = self.sent.max(safe);
        Ok((piece, false))
    }

    /// What was held back as a possible stop string, once generation ends (not a character cut off by
    /// the length limit, decoded as U+FFFD).
    pub fn finish(&mut self) -> Result<String, EngineError> {
        if self.cut_at_stop_string {
            return Ok(String::new());
        }
        let text = self.codec.decode(&self.output)?;
        let end = safe_prefix(&text, &[]);
        let piece = text.get(self.sent..end).unwrap_or_default().to_owned();
        self.sent = self.sent.max(end);
        Ok(piece)
    }
}

/// How much of `text` can be sent: not a trailing partial UTF-8 character (decoded as U+FFFD), nor a
/// tail that is the start of a stop string.
fn safe_prefix(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    for stop in stops {
        for length in (1..stop.len()).rev() {
            if stop.is_char_boundary(length) && text[..end].ends_with(&stop[..length]) {
                end -= length;
                break;
            }
        }
    }
    end
}

/// What a request asks of generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerateOptions {
    pub sampling: SamplingOptions,
    pub num_predict: Option<usize>,
    pub stop: Vec<String>,
}

/// Ollama's timing figures of one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    pub prompt_tokens: usize,
    pub prompt_duration: Duration,
    pub output_tokens: usize,
    pub generation_duration: Duration,
    pub done_reason: &'static str,
}

/// `sha256:…` of the file's content (what distributed stages match their copies by).
pub fn content_digest(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// The GGUF file's bytes before its first tensor (header, metadata, tensor directory) and its length:
/// enough to read the tokenizer and template without the weights.
pub fn header_bytes(path: &Path) -> Result<(Vec<u8>, u64), GgufError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(GgufError::Io)?;
    let length = file.metadata().map_err(GgufError::Io)?.len();
    let gguf = Gguf::read(std::io::BufReader::new(&file), length)?;
    let end = gguf
        .tensors
        .iter()
        .map(|tensor| tensor.offset)
        .min()
        .unwrap_or(length);
    let mut bytes = Vec::new();
    std::io::BufReader::new(std::fs::File::open(path).map_err(GgufError::Io)?)
        .take(end)
        .read_to_end(&mut bytes)
        .map_err(GgufError::Io)?;
    Ok((bytes, length))
}

/// What the header of the GGUF at `path` says about the model, without loading it.
pub fn describe(path: &Path) -> Option<ModelDetails> {
    let file = std::fs::File::open(path).ok()?;
    let length = file.metadata().ok()?.len();
    let gguf = Gguf::read(std::io::BufReader::new(file), length).ok()?;
    let context = super::model::Shape::read(&gguf).ok()?.context;
    Some(details_of(&gguf, context))
}

fn details_of(gguf: &Gguf, context_length: usize) -> ModelDetails {
    let architecture = gguf
        .str("general.architecture")
        .unwrap_or("unknown")
        .to_owned();
    let parameter_size = gguf
        .str("general.size_label")
        .map(str::to_owned)
        .unwrap_or_else(|_| {
            let parameters: u64 = gguf
                .tensors
                .iter()
                .map(|tensor| tensor.dims.iter().product::<u64>())
                .sum();
            if parameters >= 1_000_000_000 {
                format!("{:.1}B", parameters as f64 / 1e9)
            } else {
                format!("{}M", parameters / 1_000_000)
            }
        });
    let quantization_level = gguf
        .tensors
        .iter()
        .find(|tensor| tensor.name == "blk.0.attn_q.weight")
        .and_then(|tensor| super::gguf::type_name(tensor.ggml_type))
        .unwrap_or("unknown")
        .to_owned();
    ModelDetails {
        family: architecture,
        parameter_size,
        quantization_level,
        chat_template: gguf.str("tokenizer.chat_template").ok().map(str::to_owned),
        context_length,
    }
}

/// The engine's models: known on disk, loaded in memory with their expiry.
#[derive(Debug)]
pub struct Engine {
    /// On disk, and (coordinator) served through stages; the latter come and go.
    files: RwLock<Vec<ModelFile>>,
    loaded: Mutex<BTreeMap<String, (Arc<LoadedModel>, Instant)>>,
    /// Serialises loads, as Ollama does.
    loading: tokio::sync::Mutex<()>,
    pub slots: Arc<tokio::sync::Semaphore>,
    pub parallel: usize,
    pub default_keep_alive: Duration,
    /// Models served through stages, by name.
    distributed: RwLock<BTreeMap<String, Arc<DistributedModel>>>,
    /// The most memory a model loaded whole may take (`engine.max_memory`).
    max_memory: Option<u64>,
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
            distributed: RwLock::new(BTreeMap::new()),
            max_memory: None,
        }
    }

    /// Refuses to load whole a model whose file is larger than `limit`.
    pub fn with_max_memory(mut self, limit: Option<u64>) -> Self {
        self.max_memory = limit;
        self
    }

    /// Serves a model through stages from now on (its file size and digest become known once
    /// planned); a no-op when it is served already.
    pub fn add_distributed(&self, source: Arc<DistributedModel>) {
        let name = crate::cluster::normalize_model(&source.pipeline.model);
        let mut distributed = self
            .distributed
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if distributed.contains_key(&name) {
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
        distributed.insert(name, source);
    }

    /// Stops serving a distributed model (requests running on it finish).
    pub fn remove_distributed(&self, name: &str) {
        let name = crate::cluster::normalize_model(name);
        if self
            .distributed
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

    /// The models served through stages.
    pub fn distributed(&self) -> Vec<Arc<DistributedModel>> {
        self.distributed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    pub fn files(&self) -> Vec<ModelFile> {
        self.files
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The model called `name` (`name` alone means `name:latest`).
    pub fn file(&self, name: &str) -> Option<ModelFile> {
        let wanted = if name.contains(':') {
            name.to_lowercase()
        } else {
            format!("{}:latest", name.to_lowercase())
        };
        self.files
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|file| file.name == wanted)
            .cloned()
    }

    /// Loaded models with when they expire.
    pub fn loaded(&self) -> Vec<(Arc<LoadedModel>, Instant)> {
        let now = Instant::now();
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        loaded.retain(|_, (_, expires)| *expires > now);
        loaded.values().cloned().collect()
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
        let source = self
            .distributed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&file.name)
            .cloned();
        let loaded = if let Some(source) = source {
            tracing::info!(model = %file.name, "planning the distributed model on its stages");
            LoadedModel::load_distributed(&file, source).await?
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
                (Arc::clone(&loaded), Instant::now() + keep),
            );
        Ok((loaded, load_duration))
    }

    fn touch(&self, name: &str, keep: Duration) -> Option<Arc<LoadedModel>> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        loaded.retain(|_, (_, expires)| *expires > now);
        let (model, expires) = loaded.get_mut(name)?;
        *expires = now + keep;
        Some(Arc::clone(model))
    }

    /// Drops a model from memory now (`keep_alive: 0`), once running requests finish with it.
    pub fn unload(&self, name: &str) {
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_may_start_a_stop_string_is_held_back() {
        let stops = vec!["<end>".to_owned()];
        assert_eq!(safe_prefix("hello <e", &stops), "hello ".len());
        assert_eq!(safe_prefix("hello", &stops), 5);
        assert_eq!(safe_prefix("caf\u{FFFD}", &[]), 3);
    }

    #[test]
    fn models_are_found_in_a_directory_and_in_ollamas_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("Tiny-Model.gguf"), b"GGUF").expect("write");
        std::fs::write(dir.path().join("notes.txt"), b"x").expect("write");
        let store = dir.path().join("ollama");
        let manifest_dir = store.join("manifests/registry.ollama.ai/library/smollm2");
        std::fs::create_dir_all(&manifest_dir).expect("dirs");
        std::fs::create_dir_all(store.join("blobs")).expect("dirs");
        std::fs::write(store.join("blobs/sha256-abc"), b"GGUF").expect("write");
        std::fs::write(
            manifest_dir.join("135m"),
            r#"{"layers":[{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:abc"}]}"#,
        )
        .expect("write");
        let names: Vec<String> = discover(dir.path(), Some(&store))
            .into_iter()
            .map(|file| file.name)
            .collect();
        assert_eq!(names, ["smollm2:135m", "tiny-model:latest"]);
    }
}
