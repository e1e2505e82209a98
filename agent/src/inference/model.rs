//! Llama-family forward pass over quantized GGUF weights, split into `embed`, `layers(a..b)` and `head`
//! so that one process can hold only a slice of a model's layers.
//!
//! Tensors and kernels are candle's; the GGUF directory is ours ([`super::gguf`]),
//! so every offset is checked before candle sees a byte.

use std::ops::Range;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, ggml_file};
use candle_core::{DType, Device, IndexOp, Module, Tensor};

use super::gguf::{Gguf, GgufError, TensorInfo};
use sollol_kernels::Q41Matrix;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("architecture {0:?} is not supported (llama, qwen2 and mistral are)")]
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
    #[error("the sequence is longer than the context of {0} tokens")]
    ContextFull(usize),
}

/// How rotary embeddings pair a head's dimensions: llama.cpp's "normal" (adjacent pairs) or "neox"
/// (first half with second half).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rope {
    Adjacent,
    Halves,
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub architecture: String,
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
            "qwen2" => Rope::Halves,
            _ => return Err(ModelError::Architecture(architecture)),
        };
        let key = |name: &str| format!("{architecture}.{name}");
        let as_usize = |name: &str| -> Result<usize, ModelError> {
            Ok(usize::try_from(gguf.u64(&key(name))?).unwrap_or(usize::MAX))
        };
        let heads = as_usize("attention.head_count")?;
        let embedding = as_usize("embedding_length")?;
        let vocab = gguf
            .get("tokenizer.ggml.tokens")
            .and_then(super::gguf::Value::as_array)
            .map_or(0, <[_]>::len);
        let shape = Self {
            layers: as_usize("block_count")?,
            embedding,
            heads,
            kv_heads: as_usize("attention.head_count_kv").unwrap_or(heads),
            head_dim: embedding / heads.max(1),
            // Positions are precomputed up to this many; long contexts cost memory for nothing here.
            context: as_usize("context_length").unwrap_or(2048).min(8192),
            vocab,
            rope,
            rope_base: gguf.f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32,
            rms_epsilon: gguf
                .f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            architecture,
        };
        if shape.heads == 0
            || shape.kv_heads == 0
            || !shape.heads.is_multiple_of(shape.kv_heads)
            || !shape.embedding.is_multiple_of(shape.heads)
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
    attention_norm: Tensor,
    /// Queries, keys and values.
    qkv: Projections,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    output: Linear,
    ffn_norm: Tensor,
    /// The feed-forward's gate and up projections.
    gate_up: Projections,
    down: Linear,
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

/// A weight matrix applied to activations: our Q4_1 kernel for Q4_1, candle's quantized matmul otherwise.
#[derive(Debug)]
enum Linear {
    Candle(QMatMul),
    Q41(Q41Matrix),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match self {
            Self::Candle(matmul) => Ok(matmul.forward(x)?),
            Self::Q41(matrix) => {
                let dims = x.dims().to_vec();
                let columns = dims.last().copied().unwrap_or(0);
                if columns != matrix.columns() {
                    return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                        "{columns} activations for a matrix of {} columns",
                        matrix.columns()
                    ))));
                }
                let tokens = x.elem_count() / columns.max(1);
                let input = x.flatten_all()?.to_vec1::<f32>()?;
                let output = matrix.forward(&input, tokens);
                let mut shape = dims;
                if let Some(last) = shape.last_mut() {
                    *last = matrix.rows();
                }
                Ok(Tensor::from_vec(output, shape, x.device())?)
            }
        }
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
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>, ModelError> {
        match self {
            Self::Stacked { matmul, outputs } => {
                let all = matmul.forward(x)?;
                let mut start = 0;
                let mut parts = Vec::with_capacity(outputs.len());
                for width in outputs {
                    parts.push(
                        all.narrow(candle_core::D::Minus1, start, *width)?
                            .contiguous()?,
                    );
                    start += width;
                }
                Ok(parts)
            }
            Self::Separate(matmuls) => Ok(matmuls
                .iter()
                .map(|matmul| matmul.forward(x))
                .collect::<Result<_, _>>()?),
        }
    }
}

#[derive(Debug)]
struct Head {
    norm: Tensor,
    output: Linear,
}

/// The keys and values a sequence has computed, per layer this instance holds.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Tokens already processed.
    pub length: usize,
}

/// The weights of some or all of a model.
#[derive(Debug)]
pub struct Model {
    pub shape: Shape,
    pub part: Part,
    embeddings: Option<Embeddings>,
    layers: Vec<Layer>,
    head: Option<Head>,
    cos: Tensor,
    sin: Tensor,
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
        if dtype_of(info)? == GgmlDType::Q4_1
            && let Some(matrix) = Q41Matrix::from_gguf(bytes, rows, columns)
        {
            return Ok(Linear::Q41(matrix));
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

    fn dense(&mut self, name: &str) -> Result<Tensor, ModelError> {
        Ok(self.qtensor(name)?.dequantize(&self.device)?)
    }

    fn optional_dense(&mut self, name: &str) -> Result<Option<Tensor>, ModelError> {
        if self.has(name) {
            self.dense(name).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl Model {
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
        let embeddings = if part.embed {
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
        // Angles as llama.cpp computes them: theta = position, multiplied by base^(-2/dim) per pair, in f32.
        let half = shape.head_dim / 2;
        let scale = shape.rope_base.powf(-2.0 / shape.head_dim as f32);
        let mut angles = Vec::with_capacity(shape.context * half);
        for position in 0..shape.context {
            let mut theta = position as f32;
            for _ in 0..half {
                angles.push(theta);
                theta *= scale;
            }
        }
        let angles = Tensor::from_vec(angles, (shape.context, half), &device)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
            shape,
            part,
            embeddings,
            layers,
            head,
            device,
        })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.layers.len()).map(|_| None).collect(),
            length: 0,
        }
    }

    /// Hidden states `(1, tokens, embedding)` for `tokens`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        let table = self
            .embeddings
            .as_ref()
            .ok_or(ModelError::MissingPart("embedding"))?;
        let rows = tokens
            .iter()
            .map(|token| table.row(*token, &self.device))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(&rows, 0)?.unsqueeze(0)?)
    }

    /// Runs this instance's layers over `hidden` (positions `cache.length..`), extending the cache.
    /// The caller advances `cache.length` once every layer of the model has seen the tokens.
    pub fn layers(&self, hidden: Tensor, cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let (_, tokens, _) = hidden.dims3()?;
        let start = cache.length;
        if start + tokens > self.shape.context {
            return Err(ModelError::ContextFull(self.shape.context));
        }
        let mask = (tokens > 1)
            .then(|| causal_mask(tokens, start, &self.device))
            .transpose()?;
        let mut hidden = hidden;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let normed = candle_nn::ops::rms_norm(
                &hidden,
                &layer.attention_norm,
                self.shape.rms_epsilon as f32,
            )?;
            let attended = self.attention(layer, &normed, slot, start, mask.as_ref())?;
            hidden = (hidden + attended)?;
            let normed =
                candle_nn::ops::rms_norm(&hidden, &layer.ffn_norm, self.shape.rms_epsilon as f32)?;
            let [gate, up] = <[Tensor; 2]>::try_from(layer.gate_up.forward(&normed)?)
                .map_err(|_| ModelError::MissingPart("feed-forward projections"))?;
            let gate = candle_nn::ops::silu(&gate)?;
            hidden = (hidden + layer.down.forward(&(gate * up)?)?)?;
        }
        Ok(hidden)
    }

    /// Logits `(vocab)` of the last position of `hidden`.
    pub fn head(&self, hidden: &Tensor) -> Result<Vec<f32>, ModelError> {
        let head = self
            .head
            .as_ref()
            .ok_or(ModelError::MissingPart("output head"))?;
        let (_, tokens, _) = hidden.dims3()?;
        let last = hidden.i((.., tokens - 1..tokens, ..))?;
        let normed = candle_nn::ops::rms_norm(&last, &head.norm, self.shape.rms_epsilon as f32)?;
        Ok(head
            .output
            .forward(&normed)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        slot: &mut Option<(Tensor, Tensor)>,
        start: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let (batch, tokens, width) = x.dims3()?;
        let shape = &self.shape;
        let [q, k, v] = <[Tensor; 3]>::try_from(layer.qkv.forward(x)?)
            .map_err(|_| ModelError::MissingPart("attention projections"))?;
        let project =
            |out: Tensor, bias: &Option<Tensor>, heads: usize| -> Result<Tensor, ModelError> {
                let mut out = out;
                if let Some(bias) = bias {
                    out = out.broadcast_add(bias)?;
                }
                Ok(out
                    .reshape((batch, tokens, heads, shape.head_dim))?
                    .transpose(1, 2)?)
            };
        let q = self.rotate(&project(q, &layer.q_bias, shape.heads)?, start)?;
        let k = self.rotate(&project(k, &layer.k_bias, shape.kv_heads)?, start)?;
        let v = project(v, &layer.v_bias, shape.kv_heads)?;
        let (k, v) = match slot.take() {
            Some((past_k, past_v)) if start > 0 => (
                Tensor::cat(&[&past_k, &k], 2)?.contiguous()?,
                Tensor::cat(&[&past_v, &v], 2)?.contiguous()?,
            ),
            _ => (k.contiguous()?, v.contiguous()?),
        };
        *slot = Some((k.clone(), v.clone()));
        let group = shape.heads / shape.kv_heads;
        let expand = |t: Tensor| -> Result<Tensor, ModelError> {
            if group == 1 {
                return Ok(t);
            }
            let (b, kv, length, dim) = t.dims4()?;
            Ok(t.unsqueeze(2)?
                .expand((b, kv, group, length, dim))?
                .reshape((b, kv * group, length, dim))?)
        };
        let k = expand(k)?;
        let v = expand(v)?;
        let scale = 1.0 / (shape.head_dim as f64).sqrt();
        let mut scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = weights.matmul(&v.contiguous()?)?;
        let out = out.transpose(1, 2)?.reshape((batch, tokens, width))?;
        layer.output.forward(&out)
    }

    /// Rotary position embedding of `x` `(batch, heads, tokens, head_dim)` at positions `start..`.
    fn rotate(&self, x: &Tensor, start: usize) -> Result<Tensor, ModelError> {
        let (_, _, tokens, _) = x.dims4()?;
        let cos = self.cos.narrow(0, start, tokens)?;
        let sin = self.sin.narrow(0, start, tokens)?;
        let x = x.contiguous()?;
        Ok(match self.shape.rope {
            Rope::Adjacent => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
            Rope::Halves => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
        })
    }
}

/// `(tokens, start + tokens)`: 0 where a query may look, minus infinity at later positions.
fn causal_mask(tokens: usize, start: usize, device: &Device) -> Result<Tensor, ModelError> {
    let values: Vec<f32> = (0..tokens)
        .flat_map(|row| {
            (0..start + tokens).map(move |column| {
                if column > start + row {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(values, (tokens, start + tokens), device)?.to_dtype(DType::F32)?)
}
