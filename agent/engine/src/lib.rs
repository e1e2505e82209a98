//! sollol's built-in inference engine: serves GGUF models (llama, mistral, qwen2, gemma3) as an Ollama
//! node.
//!
//! `gguf` reads and checks the file, `model` runs the forward pass in parts (embedding, a range of
//! layers, the head), `tokenizer` builds the tokenizer and chat template from the file (`spm` is the
//! SentencePiece-style tokenizer of `llama` vocabularies), `sampling`
//! picks tokens, `batch` runs the next tokens of sequences generating at once as one batch, `catalogue` finds models on disk and describes them, `engine` loads, keeps and runs
//! them, and `server` is the Ollama- and OpenAI-compatible HTTP API. A model may also run elsewhere
//! (`remote`): the engine then only tokenizes and streams, and whoever implements [`RemoteCompute`]
//! computes. This crate knows nothing of clusters.

pub mod batch;
pub mod catalogue;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod loaded;
pub mod model;
pub mod remote;
pub mod sampling;
pub mod server;
mod spm;
pub mod structured;
pub mod tokenizer;
pub mod tools;

pub use remote::{RemoteCompute, RemoteError, RemoteGeneration, RemoteHeader};
