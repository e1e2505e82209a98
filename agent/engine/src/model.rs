//! The forward pass over quantized GGUF weights of the families the engine runs (llama, mistral, qwen2:
//! pre-norm blocks with SwiGLU; gemma3: see [`Family::Gemma3`]), split into `embed`, `layers(a..b)` and
//! `head` so that one process can hold only a slice of a model's layers.
//!
//! Tensors and kernels are candle's; the GGUF directory is ours ([`crate::gguf`]),
//! so every offset is checked before candle sees a byte.

use std::ops::Range;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, ggml_file};
use candle_core::{Device, IndexOp, Module, Tensor};

use crate::gguf::{Gguf, GgufError, TensorInfo};
use sollol_kernels::{
    Heads, KvLayer, Q4KMatrix, Q6KMatrix, Q41Matrix, Q50Matrix, Q80Matrix, Rope, Rotary,
};

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

/// What sets a family's layers apart from llama's, read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub enum Family {
    /// Llama, Mistral, Qwen 2: RMS norm before attention and feed-forward, SwiGLU.
    Llama,
    /// Gemma 3: embeddings scaled by the square root of their width, queries and keys RMS-normed per
    /// head, an RMS norm after attention and after the feed-forward too, GeGLU, queries scaled by
    /// `query_scale` before attention; every layer but each `pattern`-th attends within a sliding window
    /// of `window` positions with rotary base `local_rope_base`. Logits soft-capped where the file
    /// says so.
    Gemma3 {
        window: usize,
        pattern: usize,
        local_rope_base: f32,
        query_scale: f32,
        softcap: Option<f32>,
    },
}

impl Family {
    /// Whether layer `index` attends within a sliding window (and if so, how wide it is).
    pub fn window(&self, index: usize) -> Option<usize> {
        match self {
            Self::Llama => None,
            Self::Gemma3 {
                window, pattern, ..
            } => (*pattern == 0 || index % pattern < pattern - 1).then_some(*window),
        }
    }
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub architecture: String,
    pub family: Family,
    pub layers: usize,
    pub embedding: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub context: usize,
    pub vocab: usize,
    rope: Rope,
    rope_base: f32,
    rms_epsilon: f64,
}

impl Shape {
    pub fn read(gguf: &Gguf) -> Result<Self, ModelError> {
        let architecture = gguf.str("general.architecture")?.to_owned();
        let rope = match architecture.as_str() {
            "llama" | "mistral" => Rope::Adjacent,
            "qwen2" | "gemma3" => Rope::Halves,
            _ => return Err(ModelError::Architecture(architecture)),
        };
        let key = |name: &str| format!("{architecture}.{name}");
        let as_usize = |name: &str| -> Result<usize, ModelError> {
            Ok(usize::try_from(gguf.u64(&key(name))?).unwrap_or(usize::MAX))
        };
        let heads = as_usize("attention.head_count")?;
        let embedding = as_usize("embedding_length")?;
        // Gemma's heads are wider than the embedding divided among them.
        let head_dim = as_usize("attention.key_length").unwrap_or(embedding / heads.max(1));
        let family = if architecture == "gemma3" {
            Family::Gemma3 {
                // A window of 0 would leave a query nothing to attend to: read as no window.
                window: as_usize("attention.sliding_window")
                    .ok()
                    .filter(|window| *window > 0)
                    .unwrap_or(usize::MAX),
                pattern: as_usize("attention.sliding_window_pattern").unwrap_or(6),
                local_rope_base: gguf.f64(&key("rope.freq_base_swa")).unwrap_or(10_000.0) as f32,
                // llama.cpp's: 1/sqrt(head width), but 1/sqrt(embedding / heads) for the 27B model.
                query_scale: if as_usize("block_count").ok() == Some(62) {
                    1.0 / ((embedding / heads.max(1)) as f32).sqrt()
                } else {
                    1.0 / (head_dim as f32).sqrt()
                },
                softcap: gguf
                    .f64(&key("final_logit_softcapping"))
                    .ok()
                    .map(|cap| cap as f32)
                    .filter(|cap| *cap > 0.0),
            }
        } else {
            Family::Llama
        };
        let vocab = gguf
            .get("tokenizer.ggml.tokens")
            .and_then(crate::gguf::Value::as_array)
            .map_or(0, <[_]>::len);
        let shape = Self {
            layers: as_usize("block_count")?,
            embedding,
            heads,
            kv_heads: as_usize("attention.head_count_kv").unwrap_or(heads),
            head_dim,
            // Positions are precomputed up to this many; long contexts cost memory for nothing here.
            context: as_usize("context_length").unwrap_or(2048).min(8192),
            vocab,
            rope,
            rope_base: gguf.f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32,
            rms_epsilon: gguf
                .f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            architecture,
            family,
        };
        if shape.heads == 0
            || shape.kv_heads == 0
            || !shape.heads.is_multiple_of(shape.kv_heads)
            || shape.head_dim == 0
            || !shape.head_dim.is_multiple_of(2)
            || shape.layers == 0
        {
            return Err(ModelError::Gguf(GgufError::Corrupt(format!(
                "inconsistent shape: {} heads, {} kv heads, {} wide",
                shape.heads, shape.kv_heads, shape.embedding
            ))));
        }
        Ok(shape)
    }
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

/// The token embedding table kept quantized; rows are dequantized as tokens need them (the table in
/// f32 would be the largest allocation of a small model).
#[derive(Debug)]
struct Embeddings {
    bytes: Vec<u8>,
    dtype: GgmlDType,
    rows: usize,
    width: usize,
    row_bytes: usize,
}

impl Embeddings {
    fn row(&self, token: u32, device: &Device) -> Result<Tensor, ModelError> {
        let index = token as usize;
        if index >= self.rows {
            return Err(ModelError::Token(token));
        }
        let start = index * self.row_bytes;
        let row = &self.bytes[start..start + self.row_bytes];
        Ok(
            ggml_file::qtensor_from_ggml(self.dtype, row, vec![1, self.width], device)?
                .dequantize(device)?,
        )
    }
}

/// A weight matrix applied to activations: our kernels for Q4_1, Q8_0, Q5_0, Q4_K and Q6_K, candle's
/// quantized matmul for the other types.
#[derive(Debug)]
enum Linear {
    Candle(QMatMul),
    Q41(Q41Matrix),
    Q80(Q80Matrix),
    Q50(Q50Matrix),
    Q4K(Q4KMatrix),
    Q6K(Q6KMatrix),
}

impl Linear {
    fn columns(&self) -> usize {
        match self {
            Self::Candle(matmul) => match matmul {
                QMatMul::QTensor(tensor) => tensor.shape().dims().last().copied().unwrap_or(0),
                QMatMul::Tensor(tensor) | QMatMul::TensorF16(tensor) => {
                    tensor.dims().last().copied().unwrap_or(0)
                }
            },
            Self::Q41(matrix) => matrix.columns(),
            Self::Q80(matrix) => matrix.columns(),
            Self::Q50(matrix) => matrix.columns(),
            Self::Q4K(matrix) => matrix.columns(),
            Self::Q6K(matrix) => matrix.columns(),
        }
    }

    /// `x` holds `tokens` rows of `columns` values; returns `tokens` rows of the matrix's rows.
    /// `sequences`: how many of the rows belong to each sequence, in turn (each computed as alone).
    fn forward(
        &self,
        x: &[f32],
        tokens: usize,
        sequences: &[usize],
    ) -> Result<Vec<f32>, ModelError> {
        let columns = self.columns();
        if x.len() != tokens * columns {
            return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "{} activations for {tokens} rows of a matrix of {columns} columns",
                x.len()
            ))));
        }
        Ok(match self {
            Self::Candle(matmul) => {
                let input = Tensor::from_slice(x, (tokens, columns), &Device::Cpu)?;
                matmul.forward(&input)?.flatten_all()?.to_vec1::<f32>()?
            }
            Self::Q41(matrix) => matrix.forward_sequences(x, sequences),
            Self::Q80(matrix) => matrix.forward_sequences(x, sequences),
            Self::Q50(matrix) => matrix.forward_sequences(x, sequences),
            Self::Q4K(matrix) => matrix.forward_sequences(x, sequences),
            Self::Q6K(matrix) => matrix.forward_sequences(x, sequences),
        })
    }
}

/// Matrices applied to the same input: one quantized matmul over their rows stacked when they share a
/// type and a width (one pass over the input instead of several), else one each.
#[derive(Debug)]
enum Projections {
    Stacked { matmul: Linear, outputs: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    /// Each matrix's output, `tokens` rows each.
    fn forward(
        &self,
        x: &[f32],
        tokens: usize,
        sequences: &[usize],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        match self {
            Self::Stacked { matmul, outputs } => {
                let all = matmul.forward(x, tokens, sequences)?;
                let total: usize = outputs.iter().sum();
                let mut start = 0;
                let mut parts = Vec::with_capacity(outputs.len());
                for width in outputs {
                    parts.push(
                        all.chunks_exact(total)
                            .flat_map(|row| &row[start..start + width])
                            .copied()
                            .collect(),
                    );
                    start += width;
                }
                Ok(parts)
            }
            Self::Separate(matmuls) => matmuls
                .iter()
                .map(|matmul| matmul.forward(x, tokens, sequences))
                .collect(),
        }
    }
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

fn dtype_of(info: &TensorInfo) -> Result<GgmlDType, ModelError> {
    Ok(match info.ggml_type {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        other => {
            return Err(ModelError::Gguf(GgufError::TensorType {
                name: info.name.clone(),
                ggml_type: other,
            }));
        }
    })
}

struct Loader<'a> {
    gguf: &'a Gguf,
    file: std::fs::File,
    device: Device,
}

impl Loader<'_> {
    fn has(&self, name: &str) -> bool {
        self.gguf.tensor(name).is_some()
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor, ModelError> {
        let (info, bytes) = self.gguf.tensor_bytes(&mut self.file, name)?;
        // candle wants the row-major shape: ggml's dimensions reversed.
        let dims: Vec<usize> = info
            .dims
            .iter()
            .rev()
            .map(|dim| usize::try_from(*dim).unwrap_or(usize::MAX))
            .collect();
        Ok(ggml_file::qtensor_from_ggml(
            dtype_of(&info)?,
            &bytes,
            dims,
            &self.device,
        )?)
    }

    fn matmul(&mut self, name: &str) -> Result<Linear, ModelError> {
        let (info, bytes) = self.gguf.tensor_bytes(&mut self.file, name)?;
        self.linear(&info, &bytes, None)
    }

    /// A matrix from its GGUF bytes; `rows` overrides the row count (stacked matrices).
    fn linear(
        &self,
        info: &TensorInfo,
        bytes: &[u8],
        rows: Option<usize>,
    ) -> Result<Linear, ModelError> {
        let columns = usize::try_from(info.dims[0]).unwrap_or(usize::MAX);
        let rows = rows.unwrap_or_else(|| {
            info.dims[1..]
                .iter()
                .map(|dim| usize::try_from(*dim).unwrap_or(usize::MAX))
                .product()
        });
        match dtype_of(info)? {
            GgmlDType::Q4_1 => {
                if let Some(matrix) = Q41Matrix::from_gguf(bytes, rows, columns) {
                    return Ok(Linear::Q41(matrix));
                }
            }
            GgmlDType::Q8_0 => {
                if let Some(matrix) = Q80Matrix::from_gguf(bytes, rows, columns) {
                    return Ok(Linear::Q80(matrix));
                }
            }
            GgmlDType::Q5_0 => {
                if let Some(matrix) = Q50Matrix::from_gguf(bytes, rows, columns) {
                    return Ok(Linear::Q50(matrix));
                }
            }
            GgmlDType::Q4K => {
                if let Some(matrix) = Q4KMatrix::from_gguf(bytes, rows, columns) {
                    return Ok(Linear::Q4K(matrix));
                }
            }
            GgmlDType::Q6K => {
                if let Some(matrix) = Q6KMatrix::from_gguf(bytes, rows, columns) {
                    return Ok(Linear::Q6K(matrix));
                }
            }
            _ => {}
        }
        let qtensor = ggml_file::qtensor_from_ggml(
            dtype_of(info)?,
            bytes,
            vec![rows, columns],
            &self.device,
        )?;
        Ok(Linear::Candle(QMatMul::from_qtensor(qtensor)?))
    }

    fn projections(&mut self, names: &[&str]) -> Result<Projections, ModelError> {
        let infos: Vec<TensorInfo> = names
            .iter()
            .map(|name| {
                self.gguf
                    .tensor(name)
                    .cloned()
                    .ok_or_else(|| GgufError::MissingTensor((*name).to_owned()))
            })
            .collect::<Result<_, _>>()?;
        let stackable = infos.iter().all(|info| {
            info.dims.len() == 2
                && info.ggml_type == infos[0].ggml_type
                && info.dims[0] == infos[0].dims[0]
        });
        if !stackable {
            return Ok(Projections::Separate(
                names
                    .iter()
                    .map(|name| self.matmul(name))
                    .collect::<Result<_, _>>()?,
            ));
        }
        let mut bytes = Vec::new();
        let mut outputs = Vec::with_capacity(names.len());
        for name in names {
            let (info, tensor) = self.gguf.tensor_bytes(&mut self.file, name)?;
            bytes.extend_from_slice(&tensor);
            outputs.push(usize::try_from(info.dims[1]).unwrap_or(usize::MAX));
        }
        Ok(Projections::Stacked {
            matmul: self.linear(&infos[0], &bytes, Some(outputs.iter().sum()))?,
            outputs,
        })
    }

    /// A vector (norm weights, biases) as f32 values.
    fn dense(&mut self, name: &str) -> Result<Vec<f32>, ModelError> {
        Ok(self
            .qtensor(name)?
            .dequantize(&self.device)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    fn optional_dense(&mut self, name: &str) -> Result<Option<Vec<f32>>, ModelError> {
        if self.has(name) {
            self.dense(name).map(Some)
        } else {
            Ok(None)
        }
    }
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
    pub fn layers_batch(
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
