//! A model in memory and what runs on it: generation (here, or on a [`RemoteCompute`]), embeddings,
//! and the text stream that turns tokens into pieces of text while holding back possible stop strings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sollol_shared::layers::Sampling;

use crate::batch::Batcher;
use crate::catalogue::{ModelDetails, ModelFile, details_of};
use crate::error::EngineError;
use crate::gguf::Gguf;
use crate::model::{Model, Part};
use crate::remote::{RemoteCompute, RemoteGeneration};
use crate::sampling::{Sampler, SamplingOptions};
use crate::structured::{Constraint, Format, Grammars};
use crate::tokenizer::TextCodec;

/// Where a loaded model's forward passes run.
#[derive(Debug)]
pub enum Compute {
    /// In this process.
    Local(Box<Model>),
    /// Elsewhere (distributed inference: on agents' stages, each holding some layers).
    Remote(Arc<dyn RemoteCompute>),
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
    /// llguidance's view of the vocabulary, built by the first request with a format.
    grammars: std::sync::OnceLock<Result<Arc<Grammars>, String>>,
    /// The decoding steps of the sequences generating at once, run as one batch.
    steps: Batcher,
}

impl LoadedModel {
    pub fn load(file: &ModelFile) -> Result<Self, EngineError> {
        let started = Instant::now();
        let gguf = Gguf::open(&file.path)?;
        let mut codec = TextCodec::from_gguf(&gguf)?;
        if let Some(template) = template_beside(&file.path) {
            codec.set_template(template);
        }
        let shape = crate::model::Shape::read(&gguf)?;
        let model = Model::load(&file.path, &gguf, Part::whole(shape.layers))?;
        let details = details_of(&gguf, model.shape.context);
        Ok(Self {
            file: file.clone(),
            details,
            context: model.shape.context,
            compute: Compute::Local(Box::new(model)),
            codec,
            load_duration: started.elapsed(),
            grammars: std::sync::OnceLock::new(),
            steps: Batcher::default(),
        })
    }

    /// Gets a model computed elsewhere ready (plans and loads it on its stages); the tokenizer and
    /// template come from the remote copy of the file header (this process holds no weights).
    pub async fn load_remote(
        file: &ModelFile,
        remote: Arc<dyn RemoteCompute>,
    ) -> Result<Self, EngineError> {
        let started = Instant::now();
        let header = remote
            .prepare()
            .await
            .map_err(|error| EngineError::Distributed(error.to_string()))?;
        let gguf = Gguf::read(std::io::Cursor::new(header.bytes), header.file_bytes)?;
        let codec = TextCodec::from_gguf(&gguf)?;
        let context = crate::model::Shape::read(&gguf)?.context;
        let mut file = file.clone();
        file.size_bytes = header.file_bytes;
        file.digest = header.digest;
        Ok(Self {
            file,
            details: details_of(&gguf, context),
            compute: Compute::Remote(remote),
            codec,
            load_duration: started.elapsed(),
            context,
            grammars: std::sync::OnceLock::new(),
            steps: Batcher::default(),
        })
    }

    /// How many decoding steps have run batched with another sequence's.
    pub fn batched_steps(&self) -> u64 {
        self.steps.shared_steps()
    }

    /// The context a request may use: its `num_ctx`, at most the model's own.
    pub fn context_for(&self, request: &GenerateOptions) -> usize {
        request
            .num_ctx
            .map_or(self.context, |asked| asked.clamp(1, self.context))
    }

    /// The grammar state for one answer in `format`; refused (with the reason, a client's error) when
    /// the schema is unusable or the model is computed elsewhere.
    pub fn constrain(&self, format: &Format) -> Result<Constraint, String> {
        let grammars = self.grammars.get_or_init(|| {
            let bytes = self
                .codec
                .token_bytes()
                .map_err(|error| error.to_string())?;
            let end = self
                .codec
                .end_token()
                .ok_or("the model names no end-of-sequence token")?;
            Grammars::new(&bytes, end).map(Arc::new)
        });
        grammars.as_ref().map_err(Clone::clone)?.constrain(format)
    }

    /// Generates from `prompt` tokens, handing each piece of text to `emit` (which returns false to
    /// stop). Blocks: call it from a blocking thread (a distributed model's steps run on the runtime).
    pub fn generate(
        &self,
        prompt: &[u32],
        request: &GenerateOptions,
        emit: impl FnMut(&str) -> bool,
    ) -> Result<Generated, EngineError> {
        let context = self.context_for(request);
        if prompt.is_empty() || prompt.len() >= context {
            return Err(EngineError::PromptTooLong {
                prompt: prompt.len(),
                context,
            });
        }
        match &self.compute {
            Compute::Local(model) => self.generate_here(model, prompt, request, emit),
            Compute::Remote(remote) => self.generate_remote(remote, prompt, request, emit),
        }
    }

    fn generate_remote(
        &self,
        remote: &Arc<dyn RemoteCompute>,
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
            .min(self.context_for(request) - prompt.len());
        // A format: every step's logits come here, are masked by the grammar and sampled here (the
        // last stage cannot hold the grammar).
        let chooser = match &request.format {
            Some(format) => Some(Arc::new(std::sync::Mutex::new(Choice {
                constraint: self.constrain(format).map_err(EngineError::Format)?,
                sampler: Sampler::new(request.sampling.clone()),
                history: prompt.to_vec(),
                end: self.codec.end_token(),
            }))),
            None => None,
        };
        let started = Instant::now();
        let mut first_token = None;
        let mut text = TextStream::new(&self.codec, &request.stop);
        // The pipeline runs on the runtime; tokens come here, to this blocking thread, where `emit`
        // may block on a slow client.
        let (tokens, arriving) = std::sync::mpsc::channel::<u32>();
        let wanted = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let runtime = tokio::runtime::Handle::current();
        let running = {
            let remote = Arc::clone(remote);
            let stop_tokens = self.codec.stop_tokens.clone();
            let prompt = prompt.to_vec();
            let wanted = Arc::clone(&wanted);
            let chooser = chooser.clone();
            runtime.spawn(async move {
                let mut on_token = |token| {
                    tokens.send(token).is_ok() && wanted.load(std::sync::atomic::Ordering::Relaxed)
                };
                let mut choose = chooser.map(|choice| {
                    move |logits: &mut [f32]| {
                        choice
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .choose(logits)
                    }
                });
                let generation = RemoteGeneration {
                    sampling,
                    prompt: &prompt,
                    limit,
                    stop_tokens: &stop_tokens,
                    choose: choose.as_mut().map(|choose| {
                        choose as &mut (dyn FnMut(&mut [f32]) -> Result<u32, String> + Send)
                    }),
                };
                remote.generate(generation, &mut on_token).await
            })
        };
        let (mut cut, mut gone) = (false, false);
        let mut tokens = Vec::new();
        for token in arriving {
            first_token.get_or_insert_with(Instant::now);
            if cut || gone {
                continue;
            }
            tokens.push(token);
            let (piece, stopped) = text.push(token)?;
            if !piece.is_empty() && !emit(&piece) {
                gone = true;
            }
            cut = stopped;
            if cut || gone {
                wanted.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let stopped = runtime
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
        let format_duration = chooser.map_or(Duration::ZERO, |choice| {
            choice
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .constraint
                .cost()
                .0
        });
        Ok(Generated {
            prompt_tokens: prompt.len(),
            prompt_duration: first_token.duration_since(started),
            output_tokens: text.tokens(),
            generation_duration: first_token.elapsed(),
            done_reason: if stopped || cut { "stop" } else { "length" },
            format_duration,
            tokens,
        })
    }

    fn generate_here(
        &self,
        model: &Model,
        prompt: &[u32],
        request: &GenerateOptions,
        mut emit: impl FnMut(&str) -> bool,
    ) -> Result<Generated, EngineError> {
        let context = self.context_for(request);
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
        let mut constraint = match &request.format {
            Some(format) => Some(self.constrain(format).map_err(EngineError::Format)?),
            None => None,
        };
        // From here, this sequence's steps run batched with the others generating on this model.
        let _decoding = self.steps.decoding();
        while text.tokens() < limit {
            if let Some(constraint) = &mut constraint {
                constraint.mask(&mut logits).map_err(EngineError::Format)?;
            }
            let token = sampler.next(&logits, &history);
            if self.codec.is_stop(token) {
                done_reason = "stop";
                break;
            }
            if let Some(constraint) = &mut constraint {
                constraint.commit(token).map_err(EngineError::Format)?;
            }
            history.push(token);
            let (piece, stopped) = text.push(token)?;
            if !piece.is_empty() && !emit(&piece) {
                return Err(EngineError::Stopped("the client went away".to_owned()));
            }
            if stopped || constraint.as_ref().is_some_and(Constraint::finished) {
                done_reason = "stop";
                break;
            }
            if text.tokens() == limit || cache.length + 1 >= context {
                break;
            }
            logits = self.steps.step(model, token, &mut cache)?;
        }
        let rest = text.finish()?;
        if !rest.is_empty() {
            emit(&rest);
        }
        let format_duration = constraint
            .as_ref()
            .map_or(Duration::ZERO, |constraint| constraint.cost().0);
        Ok(Generated {
            prompt_tokens: prompt.len(),
            prompt_duration,
            output_tokens: text.tokens(),
            generation_duration: generation_started.elapsed(),
            done_reason,
            format_duration,
            tokens: history.split_off(prompt.len()),
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

/// Picks a remote model's tokens here when a format constrains them: the grammar masks the step's
/// logits, the request's sampler picks, the grammar takes the token; once the grammar is finished, the
/// end token.
struct Choice {
    constraint: Constraint,
    sampler: Sampler,
    history: Vec<u32>,
    end: Option<u32>,
}

impl Choice {
    fn choose(&mut self, logits: &mut [f32]) -> Result<u32, String> {
        if self.constraint.finished() {
            return self
                .end
                .ok_or_else(|| "the model names no end-of-sequence token".to_owned());
        }
        self.constraint.mask(logits)?;
        let token = self.sampler.next(logits, &self.history);
        self.constraint.commit(token)?;
        self.history.push(token);
        Ok(token)
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

/// A chat template in a file beside the model (`NAME.jinja` for `NAME.gguf`), which replaces the
/// one inside it, as llama.cpp's `--chat-template-file` does: for a model whose own template lacks
/// something (tools, a system role). At most 1 MiB.
fn template_beside(model: &std::path::Path) -> Option<String> {
    let path = model.with_extension("jinja");
    let size = std::fs::metadata(&path).ok()?.len();
    if size > 1 << 20 {
        tracing::warn!(path = %path.display(), size, "chat template file ignored: larger than 1 MiB");
        return None;
    }
    let template = std::fs::read_to_string(&path).ok()?;
    tracing::info!(path = %path.display(), "chat template from the file beside the model");
    Some(template)
}

/// What a request asks of generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerateOptions {
    pub sampling: SamplingOptions,
    pub num_predict: Option<usize>,
    pub stop: Vec<String>,
    /// The shape the answer must have (Ollama's `format`, OpenAI's `response_format`).
    pub format: Option<Format>,
    /// Ollama's `num_ctx`: the context this request may use, at most the model's.
    pub num_ctx: Option<usize>,
}

/// Ollama's timing figures of one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    pub prompt_tokens: usize,
    pub prompt_duration: Duration,
    pub output_tokens: usize,
    pub generation_duration: Duration,
    pub done_reason: &'static str,
    /// Of the generation, the time spent keeping the answer to its format (zero without one).
    pub format_duration: Duration,
    /// The tokens generated, in order (Ollama's `context` is the prompt's and these).
    pub tokens: Vec<u32>,
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
}
