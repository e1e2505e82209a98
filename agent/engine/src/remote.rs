//! Models computed elsewhere: the engine serves a model whose forward passes run outside this process
//! through [`RemoteCompute`]. The engine knows nothing of how (the binary's distributed inference
//! implements it with a pipeline of agents' stages); it only tokenizes, streams text and keeps the
//! model's place among the loaded ones.

use std::future::Future;
use std::pin::Pin;

use sollol_shared::layers::Sampling;

/// A future that a [`RemoteCompute`] returns (object-safe, sendable across the runtime).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Whatever went wrong where the model runs, said in a sentence.
pub type RemoteError = Box<dyn std::error::Error + Send + Sync>;

/// The head of a remote model's GGUF file: enough to build its tokenizer and chat template here.
#[derive(Clone, Debug)]
pub struct RemoteHeader {
    /// The file's bytes up to its tensor data (metadata and tensor directory).
    pub bytes: Vec<u8>,
    /// The whole file's length.
    pub file_bytes: u64,
    /// The file's content digest (`sha256:…`), as `/api/tags` shows it.
    pub digest: String,
}

/// Picks the next token from a step's logits here (a structured output's grammar masks them first),
/// instead of the last stage sampling: `Err` ends the generation with that message.
pub type Chooser<'a> = &'a mut (dyn FnMut(&mut [f32]) -> Result<u32, String> + Send);

/// One generation asked of a remote model.
pub struct RemoteGeneration<'a> {
    pub sampling: Sampling,
    pub prompt: &'a [u32],
    /// The most tokens to generate.
    pub limit: usize,
    /// Tokens that end the answer (the model's end-of-generation tokens).
    pub stop_tokens: &'a [u32],
    /// When set, every step's logits come back and this picks the token.
    pub choose: Option<Chooser<'a>>,
}

impl std::fmt::Debug for RemoteGeneration<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RemoteGeneration")
            .field("sampling", &self.sampling)
            .field("prompt", &self.prompt.len())
            .field("limit", &self.limit)
            .field("choose", &self.choose.is_some())
            .finish_non_exhaustive()
    }
}

/// "Compute this model elsewhere." Implemented by distributed inference; held by the engine as
/// `Arc<dyn RemoteCompute>` so that the engine does not depend on how or where.
pub trait RemoteCompute: Send + Sync + std::fmt::Debug {
    /// The model's name as clients ask for it.
    fn model(&self) -> &str;

    /// Gets the model ready to run where it runs (plans and loads it) and returns its file's head.
    fn prepare(&self) -> BoxFuture<'_, Result<RemoteHeader, RemoteError>>;

    /// Generates after the prompt, handing each token to `on_token` (which returns false to stop).
    /// Answers whether a stop token ended it (else the limit or the caller did).
    fn generate<'a>(
        &'a self,
        generation: RemoteGeneration<'a>,
        on_token: &'a mut (dyn FnMut(u32) -> bool + Send),
    ) -> BoxFuture<'a, Result<bool, RemoteError>>;
}
