//! What a model is, read from its GGUF metadata: its size ([`Shape`]) and what sets its family apart
//! ([`Family`]).

use sollol_kernels::Rope;

use super::ModelError;
use crate::gguf::{Gguf, GgufError};

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
    pub(super) rope: Rope,
    pub(super) rope_base: f32,
    pub(super) rms_epsilon: f64,
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
