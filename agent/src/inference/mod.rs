//! The built-in inference engine: GGUF llama-family models served as an Ollama node.
//!
//! `gguf` reads and checks the file, `model` runs the forward pass in parts
//! (`embed`, `layers(a..b)`, `head`), `tokenizer` turns text into tokens and
//! renders the chat template, `sampling` picks tokens.

pub mod engine;
pub mod gguf;
pub mod model;
pub mod sampling;
pub mod server;
pub mod tokenizer;
