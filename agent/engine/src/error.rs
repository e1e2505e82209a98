//! The engine's one error type: what can go wrong finding, loading and running a model.

use crate::gguf::GgufError;
use crate::model::ModelError;
use crate::tokenizer::TokenizerError;

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
    #[error("{0}")]
    Format(String),
}
