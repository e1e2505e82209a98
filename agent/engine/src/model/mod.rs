//! The forward pass over quantized GGUF weights of the families the engine runs (llama, mistral, qwen2:
//! pre-norm blocks with SwiGLU; gemma3: see [`Family::Gemma3`]), split into `embed`, `layers(a..b)` and
//! `head` so that one process can hold only a slice of a model's layers.
//!
//! `shape` reads what the model is from its metadata, `weights` holds the matrices (our kernels for
//! the formats `sollol-kernels` has, candle's for the others) and loads them; the GGUF directory is ours
//! ([`crate::gguf`]), so every offset is checked before a byte is read.

use std::ops::Range;
use std::path::Path;

use candle_core::{Device, IndexOp, Tensor};

use crate::gguf::{Gguf, GgufError};
use sollol_kernels::{Heads, KvLayer, Rotary};

mod shape;
mod weights;

pub use shape::{Family, Shape};
use weights::{Embeddings, Linear, Loader, Projections, dtype_of};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("architecture {0:?} is not supported (llama, qwen2, mistral and gemma3 are)")]
    Architecture(String),
    #[error("layers {start}..{end} are not within the model's {count}")]
    Layers {
        start: usize,
        end: usize,
        count: usize,
    },
    #[error("this part of the model has no {0}")]
    MissingPart(&'static str),
    #[error("token id {0} is not in the vocabulary")]
    Token(u32),
    #[error("the key/value cache holds {cached} positions but these tokens start at {start}")]
    CacheBehind { cached: usize, start: usize },
    #[error("the sequence is longer than the context of {0} tokens")]
    ContextFull(usize),
    #[error("a batched step failed: {0}")]
    Batch(String),
}

/// Which parts of a model an instance holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub embed: bool,
    pub layers: Range<usize>,
    pub head: bool,
}

impl Part {
    pub fn whole(layers: usize) -> Self {
        Self {
            embed: true,
            layers: 0..layers,
            head: true,
        }
    }
}

#[derive(Debug)]
struct Layer {
    attention_norm: Vec<f32>,
    /// Queries, keys and values.
    qkv: Projections,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    output: Linear,
    ffn_norm: Vec<f32>,
    /// The feed-forward's gate and up projections.
    gate_up: Projections,
    down: Linear,
    /// Gemma's: per-head norms of queries and keys, norms of the attention's and feed-forward's outputs.
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attention_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
}

#[derive(Debug)]
struct Head {
    norm: Vec<f32>,
    output: Linear,
}

/// The keys and values a sequence has computed (f16), per layer this instance holds.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<KvLayer>,
    /// Tokens already processed.
    pub length: usize,
}

/// One sequence's rows in [`Model::layers_batch`].
#[derive(Debug)]
pub struct Segment<'a> {
    pub tokens: usize,
    pub cache: &'a mut KvCache,
}

/// The weights of some or all of a model.
#[derive(Debug)]
pub struct Model {
    pub shape: Shape,
    pub part: Part,
    embeddings: Option<Embeddings>,
    /// Token embeddings are the head's output matrix's rows (tied Q8_0 tables).
    tied: bool,
    layers: Vec<Layer>,
    head: Option<Head>,
    rotary: Rotary,
    /// The sliding-window layers' angles, where their rotary base differs (Gemma 3).
    local_rotary: Option<Rotary>,
    device: Device,
}

impl Model {
    /// The whole model in the GGUF file at `path`.
    pub fn load_whole(path: &Path) -> Result<Self, ModelError> {
        let file = std::fs::File::open(path).map_err(GgufError::Io)?;
        let length = file.metadata().map_err(GgufError::Io)?.len();
        let gguf = Gguf::read(std::io::BufReader::new(file), length)?;
        let layers = Shape::read(&gguf)?.layers;
        Self::load(path, &gguf, Part::whole(layers))
    }

    /// Loads `part` of the model in `path`; only that part's tensors are read.
    pub fn load(path: &Path, gguf: &Gguf, part: Part) -> Result<Self, ModelError> {
        let shape = Shape::read(gguf)?;
        if part.layers.start > part.layers.end || part.layers.end > shape.layers {
            return Err(ModelError::Layers {
                start: part.layers.start,
                end: part.layers.end,
                count: shape.layers,
            });
        }
        let device = Device::Cpu;
        let mut loader = Loader {
            gguf,
            file: std::fs::File::open(path).map_err(GgufError::Io)?,
            device: device.clone(),
        };
        // A tied Q8_0 table that the head holds anyway is read from there (one copy in memory, not two).
        let tied = part.embed
            && part.head
            && !loader.has("output.weight")
            && gguf
                .tensor("token_embd.weight")
                .is_some_and(|info| info.ggml_type == 8);
        let embeddings = if part.embed && !tied {
            let (info, bytes) = gguf.tensor_bytes(&mut loader.file, "token_embd.weight")?;
            let [width, rows] = info.dims[..] else {
                return Err(ModelError::Gguf(GgufError::Corrupt(
                    "token_embd.weight is not a matrix".to_owned(),
                )));
            };
            let rows = usize::try_from(rows).unwrap_or(usize::MAX);
            Some(Embeddings {
                row_bytes: bytes.len() / rows.max(1),
                dtype: dtype_of(&info)?,
                width: usize::try_from(width).unwrap_or(usize::MAX),
                rows,
                bytes,
            })
        } else {
            None
        };
        let mut layers = Vec::with_capacity(part.layers.len());
        for index in part.layers.clone() {
            let name = |suffix: &str| format!("blk.{index}.{suffix}");
            layers.push(Layer {
                attention_norm: loader.dense(&name("attn_norm.weight"))?,
                qkv: loader.projections(&[
                    &name("attn_q.weight"),
                    &name("attn_k.weight"),
                    &name("attn_v.weight"),
                ])?,
                q_bias: loader.optional_dense(&name("attn_q.bias"))?,
                k_bias: loader.optional_dense(&name("attn_k.bias"))?,
                v_bias: loader.optional_dense(&name("attn_v.bias"))?,
                output: loader.matmul(&name("attn_output.weight"))?,
                ffn_norm: loader.dense(&name("ffn_norm.weight"))?,
                gate_up: loader.projections(&[&name("ffn_gate.weight"), &name("ffn_up.weight")])?,
                down: loader.matmul(&name("ffn_down.weight"))?,
                q_norm: loader.optional_dense(&name("attn_q_norm.weight"))?,
                k_norm: loader.optional_dense(&name("attn_k_norm.weight"))?,
                post_attention_norm: loader.optional_dense(&name("post_attention_norm.weight"))?,
                post_ffn_norm: loader.optional_dense(&name("post_ffw_norm.weight"))?,
            });
        }
        let head = if part.head {
            // Models with tied embeddings have no output matrix of their own.
            let output = if loader.has("output.weight") {
                "output.weight"
            } else {
                "token_embd.weight"
            };
            Some(Head {
                norm: loader.dense("output_norm.weight")?,
                output: loader.matmul(output)?,
            })
        } else {
            None
        };
        let local_rotary = match shape.family {
            Family::Gemma3 {
                local_rope_base, ..
            } => Some(Rotary::new(
                shape.rope,
                shape.head_dim,
                local_rope_base,
                shape.context,
            )),
            Family::Llama => None,
        };
        Ok(Self {
            rotary: Rotary::new(shape.rope, shape.head_dim, shape.rope_base, shape.context),
            local_rotary,
            shape,
            part,
            embeddings,
            tied,
            layers,
            head,
            device,
        })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![KvLayer::default(); self.layers.len()],
            length: 0,
        }
    }

    /// Hidden states `(1, tokens, embedding)` for `tokens`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        let rows = if let (
            true,
            Some(Head {
                output: Linear::Q80(matrix),
                ..
            }),
        ) = (self.tied, &self.head)
        {
            tokens
                .iter()
                .map(|token| {
                    let row = matrix
                        .row(*token as usize)
                        .ok_or(ModelError::Token(*token))?;
                    Ok(Tensor::from_vec(row, (1, matrix.columns()), &self.device)?)
                })
                .collect::<Result<Vec<_>, ModelError>>()?
        } else {
            let table = self
                .embeddings
                .as_ref()
                .ok_or(ModelError::MissingPart("embedding"))?;
            tokens
                .iter()
                .map(|token| table.row(*token, &self.device))
                .collect::<Result<Vec<_>, _>>()?
        };
        let hidden = Tensor::cat(&rows, 0)?.unsqueeze(0)?;
        Ok(match self.shape.family {
            // ggml_scale by sqrtf(n_embd), in f32.
            Family::Gemma3 { .. } => {
                let scale = (self.shape.embedding as f32).sqrt();
                let values: Vec<f32> = hidden
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(|value| value * scale)
                    .collect();
                Tensor::from_vec(values, hidden.shape(), &self.device)?
            }
            Family::Llama => hidden,
        })
    }

    /// Runs this instance's layers over `hidden` (positions `cache.length..`), extending the cache.
    /// The caller advances `cache.length` once every layer of the model has seen the tokens.
    pub fn layers(&self, hidden: Tensor, cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let (batch, tokens, width) = hidden.dims3()?;
        let hidden = self.layers_batch(
            hidden.flatten_all()?.to_vec1::<f32>()?,
            &mut [Segment { tokens, cache }],
        )?;
        Ok(Tensor::from_vec(
            hidden,
            (batch, tokens, width),
            &self.device,
        )?)
    }

    /// [`Model::layers`] for several sequences at once: `hidden` holds each segment's rows in turn
    /// (`segment.tokens` rows of the embedding width, at positions `segment.cache.length..`). The
    /// matrices see every row together, so their weights are read once for all the sequences; each
    /// sequence attends to its own cache only. Returns the rows in the same order.
    ///
    /// The layers run on a thread of the kernels' pool (rayon's global one): each matrix product
    /// splits its rows between that thread and the others, which stay awake between the products of
    /// a step. From any other thread, every product would send its work to the pool and sleep until
    /// it came back (two wake-ups per product: a fifth of generation time went to them).
    pub fn layers_batch(
        &self,
        hidden: Vec<f32>,
        segments: &mut [Segment<'_>],
    ) -> Result<Vec<f32>, ModelError> {
        rayon::scope(|_| self.layers_here(hidden, segments))
    }

    /// [`Model::layers_batch`] on the calling thread.
    fn layers_here(
        &self,
        mut hidden: Vec<f32>,
        segments: &mut [Segment<'_>],
    ) -> Result<Vec<f32>, ModelError> {
        let tokens: usize = segments.iter().map(|segment| segment.tokens).sum();
        if hidden.len() != tokens * self.shape.embedding {
            return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "{} hidden values for {tokens} rows of width {}",
                hidden.len(),
                self.shape.embedding
            ))));
        }
        if segments
            .iter()
            .any(|segment| segment.cache.length + segment.tokens > self.shape.context)
        {
            return Err(ModelError::ContextFull(self.shape.context));
        }
        let epsilon = self.shape.rms_epsilon as f32;
        // The rows of each sequence are computed as they would be alone (batched decoding, or a
        // stage's batch of several sequences).
        let sequences: Vec<usize> = segments.iter().map(|segment| segment.tokens).collect();
        for (index, layer) in self.layers.iter().enumerate() {
            let post_norm = |values: Vec<f32>, norm: &Option<Vec<f32>>| match norm {
                Some(norm) => sollol_kernels::rms_norm(&values, norm, epsilon),
                None => values,
            };
            let normed = sollol_kernels::rms_norm(&hidden, &layer.attention_norm, epsilon);
            let attended = self.attention(layer, index, &normed, tokens, segments, &sequences)?;
            add(
                &mut hidden,
                &post_norm(attended, &layer.post_attention_norm),
            );
            let normed = sollol_kernels::rms_norm(&hidden, &layer.ffn_norm, epsilon);
            let [gate, up] =
                <[Vec<f32>; 2]>::try_from(layer.gate_up.forward(&normed, tokens, &sequences)?)
                    .map_err(|_| ModelError::MissingPart("feed-forward projections"))?;
            let gated = match self.shape.family {
                Family::Llama => sollol_kernels::swiglu(&gate, &up),
                Family::Gemma3 { .. } => sollol_kernels::geglu(&gate, &up),
            };
            let down = layer.down.forward(&gated, tokens, &sequences)?;
            add(&mut hidden, &post_norm(down, &layer.post_ffn_norm));
        }
        Ok(hidden)
    }

    /// The output norm applied to every position of `hidden`: `tokens` rows of `embedding` values (what
    /// embeddings pool).
    pub fn normed(&self, hidden: &Tensor) -> Result<Vec<f32>, ModelError> {
        let head = self
            .head
            .as_ref()
            .ok_or(ModelError::MissingPart("output head"))?;
        let values = hidden.flatten_all()?.to_vec1::<f32>()?;
        Ok(sollol_kernels::rms_norm(
            &values,
            &head.norm,
            self.shape.rms_epsilon as f32,
        ))
    }

    /// Logits `(vocab)` of the last position of `hidden`.
    pub fn head(&self, hidden: &Tensor) -> Result<Vec<f32>, ModelError> {
        let (_, tokens, _) = hidden.dims3()?;
        self.logits(&hidden.i((0, tokens - 1))?.to_vec1::<f32>()?)
    }

    /// Logits `(vocab)` of one position's hidden state.
    pub fn logits(&self, last: &[f32]) -> Result<Vec<f32>, ModelError> {
        self.logits_rows(last, 1)
    }

    /// Logits of `rows` positions' hidden states at once (one per sequence of a batch), `vocab` values
    /// each, one after the other.
    pub fn logits_rows(&self, hidden: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        let head = self
            .head
            .as_ref()
            .ok_or(ModelError::MissingPart("output head"))?;
        let normed = sollol_kernels::rms_norm(hidden, &head.norm, self.shape.rms_epsilon as f32);
        // Each row is a different sequence's (or position's) last token.
        let mut logits = head.output.forward(&normed, rows, &vec![1; rows])?;
        if let Family::Gemma3 {
            softcap: Some(cap), ..
        } = self.shape.family
        {
            for logit in &mut logits {
                *logit = (*logit * (1.0 / cap)).tanh() * cap;
            }
        }
        Ok(logits)
    }

    /// Self-attention of `x` (`tokens` rows, each segment's in turn) in layer `index`: each segment's
    /// rows at its positions, appending their keys and values to its cache.
    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        x: &[f32],
        tokens: usize,
        segments: &mut [Segment<'_>],
        sequences: &[usize],
    ) -> Result<Vec<f32>, ModelError> {
        let shape = &self.shape;
        let heads = Heads {
            query: shape.heads,
            kv: shape.kv_heads,
            dim: shape.head_dim,
        };
        // `[token][head][dim]`, biases added.
        let [mut q, mut k, mut v] =
            <[Vec<f32>; 3]>::try_from(layer.qkv.forward(x, tokens, sequences)?)
                .map_err(|_| ModelError::MissingPart("attention projections"))?;
        for (values, bias) in [
            (&mut q, &layer.q_bias),
            (&mut k, &layer.k_bias),
            (&mut v, &layer.v_bias),
        ] {
            if let Some(bias) = bias {
                for row in values.chunks_exact_mut(bias.len()) {
                    add(row, bias);
                }
            }
        }
        let epsilon = shape.rms_epsilon as f32;
        if let Some(norm) = &layer.q_norm {
            q = sollol_kernels::rms_norm(&q, norm, epsilon);
        }
        if let Some(norm) = &layer.k_norm {
            k = sollol_kernels::rms_norm(&k, norm, epsilon);
        }
        let window = shape.family.window(index + self.part.layers.start);
        let rotary = match (&self.local_rotary, window) {
            (Some(local), Some(_)) => local,
            _ => &self.rotary,
        };
        let (q_width, kv_width) = (heads.query * heads.dim, heads.kv * heads.dim);
        let mut out = vec![0f32; q.len()];
        let mut row = 0;
        for segment in segments.iter() {
            let rows = row..row + segment.tokens;
            let start = segment.cache.length;
            sollol_kernels::rotate(
                rotary,
                &mut q[rows.start * q_width..rows.end * q_width],
                heads.query,
                start,
            );
            sollol_kernels::rotate(
                rotary,
                &mut k[rows.start * kv_width..rows.end * kv_width],
                heads.kv,
                start,
            );
            row = rows.end;
        }
        // Gemma scales the rotated queries and attends with a scale of 1.
        let scale = match shape.family {
            Family::Gemma3 { query_scale, .. } => {
                for value in q.iter_mut() {
                    *value *= query_scale;
                }
                1.0
            }
            Family::Llama => 1.0 / (heads.dim as f32).sqrt(),
        };
        // Each segment's keys and values into its cache, then every segment's attention (at once
        // when there are several: one decoding step of each sequence is too little work to share
        // otherwise).
        let mut row = 0;
        let mut work = Vec::with_capacity(segments.len());
        let (mut q_rest, mut out_rest) = (&q[..], &mut out[..]);
        for segment in segments.iter_mut() {
            let rows = row..row + segment.tokens;
            let start = segment.cache.length;
            let k = &k[rows.start * kv_width..rows.end * kv_width];
            let v = &v[rows.start * kv_width..rows.end * kv_width];
            let cache = segment
                .cache
                .layers
                .get_mut(index)
                .ok_or(ModelError::MissingPart("key/value cache layer"))?;
            // A cache that went further (a request retried from an earlier point) forgets the rest.
            cache.truncate(start, &heads);
            let cached = cache.len(&heads);
            if cached != start {
                return Err(ModelError::CacheBehind { cached, start });
            }
            cache.push(k, v);
            let (queries, q_next) = q_rest.split_at(segment.tokens * q_width);
            let (into, out_next) = out_rest.split_at_mut(segment.tokens * q_width);
            (q_rest, out_rest) = (q_next, out_next);
            work.push((&*cache, queries, into));
            row = rows.end;
        }
        sollol_kernels::attend_each(work, &heads, window.unwrap_or(usize::MAX), scale);
        layer.output.forward(&out, tokens, sequences)
    }
}

/// `into += values`, element by element.
fn add(into: &mut [f32], values: &[f32]) {
    for (into, value) in into.iter_mut().zip(values) {
        *into += value;
    }
}
