//! The tokenizer and chat template a GGUF file carries: byte-level BPE built from
//! `tokenizer.ggml.tokens`/`merges` with the pre-tokenizer `tokenizer.ggml.pre` names (as llama.cpp
//! chooses it), or SentencePiece-style vocabularies ([`crate::spm`]), and `tokenizer.chat_template`
//! rendered with minijinja.

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::gguf::{Gguf, GgufError, Value};
use crate::spm::Spm;

/// llama.cpp's token type for control tokens (`<|im_start|>` and the like).
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// The pre-tokenizer regex llama.cpp uses for Qwen2's vocabulary.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(
        "tokenizer model {0:?} is not supported (gpt2-style BPE and llama-style SentencePiece are)"
    )]
    Model(String),
    #[error("pre-tokenizer {0:?} is not supported (smollm, gpt2, qwen2 are)")]
    Pre(String),
    #[error("the tokenizer failed: {0}")]
    Tokenizer(String),
    #[error("the model's chat template failed: {0}")]
    Template(String),
}

fn failed(error: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Tokenizer(error.to_string())
}

/// One chat message for the template.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant's calls, `[{"type": "function", "function": {"name", "arguments": {...}}}]`, as
    /// chat templates read them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool result's tool name (role `tool`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A vocabulary's kind of tokenizer.
#[derive(Debug)]
enum Vocabulary {
    /// Byte-level BPE (`gpt2`), through the `tokenizers` crate.
    Bpe(Box<Tokenizer>),
    /// SentencePiece-style merges by score (`llama`).
    Spm(Spm),
}

/// Encodes and decodes text for one model, and renders its chat template.
#[derive(Debug)]
pub struct TextCodec {
    vocabulary: Vocabulary,
    template: Option<String>,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    add_bos: bool,
    /// Tokens that end generation: end of sequence and end of turn.
    pub stop_tokens: Vec<u32>,
    /// Control and user-defined tokens (`<|im_start|>` and the like), sorted.
    special_ids: Vec<u32>,
}

impl TextCodec {
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, TokenizerError> {
        let model = gguf.str("tokenizer.ggml.model")?;
        let tokens = gguf.strings("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = gguf
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|types| {
                types
                    .iter()
                    .map(|kind| kind.as_u64().unwrap_or(1))
                    .collect()
            })
            .unwrap_or_default();
        let vocabulary = match model {
            "gpt2" => Vocabulary::Bpe(Box::new(Self::bpe(gguf, &tokens, &types)?)),
            "llama" => Vocabulary::Spm(Spm::from_gguf(gguf, &tokens, &types)),
            other => return Err(TokenizerError::Model(other.to_owned())),
        };
        let special_ids: Vec<u32> = types
            .iter()
            .enumerate()
            .filter(|(_, kind)| **kind == CONTROL || **kind == USER_DEFINED)
            .filter_map(|(id, _)| u32::try_from(id).ok())
            .collect();
        let token_of = |key: &str| -> Option<(u32, String)> {
            let id = gguf.u64(key).ok()?;
            let text = tokens.get(usize::try_from(id).ok()?)?;
            Some((u32::try_from(id).ok()?, (*text).to_owned()))
        };
        let eos = token_of("tokenizer.ggml.eos_token_id");
        let mut stop_tokens: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
        // End-of-turn markers of common chat formats end generation too.
        for marker in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(id) = tokens.iter().position(|token| *token == marker) {
                stop_tokens.push(id as u32);
            }
        }
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        Ok(Self {
            vocabulary,
            template: gguf.str("tokenizer.chat_template").ok().map(str::to_owned),
            bos: token_of("tokenizer.ggml.bos_token_id"),
            eos,
            add_bos: gguf
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            stop_tokens,
            special_ids,
        })
    }

    /// A byte-level BPE tokenizer for the vocabulary, its merges and pre-tokenizer.
    fn bpe(gguf: &Gguf, tokens: &[&str], types: &[u64]) -> Result<Tokenizer, TokenizerError> {
        let merges: Vec<(String, String)> = gguf
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|merge| {
                merge
                    .split_once(' ')
                    .map(|(left, right)| (left.to_owned(), right.to_owned()))
            })
            .collect();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| ((*token).to_owned(), id as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(failed)?;
        let mut tokenizer = Tokenizer::new(bpe);
        let pre = gguf.str("tokenizer.ggml.pre").unwrap_or("gpt2");
        let byte_level = |use_regex: bool| -> PreTokenizerWrapper {
            ByteLevel::new(false, true, use_regex).into()
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
            "gpt2" | "default" => byte_level(true),
            "qwen2" => Sequence::new(vec![
                Split::new(
                    SplitPattern::Regex(QWEN2_SPLIT.to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(failed)?
                .into(),
                byte_level(false),
            ])
            .into(),
            other => return Err(TokenizerError::Pre(other.to_owned())),
        };
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        let specials: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, kind)| **kind == CONTROL || **kind == USER_DEFINED)
            .filter_map(|(id, _)| tokens.get(id))
            .map(|token| AddedToken::from((*token).to_owned(), true))
            .collect();
        tokenizer.add_special_tokens(specials).map_err(failed)?;
        Ok(tokenizer)
    }

    /// The bytes each token stands for, by id, for constrained decoding: special tokens marked with
    /// llguidance's leading 0xFF (a grammar never produces them by their text).
    pub fn token_bytes(&self) -> Result<Vec<Vec<u8>>, TokenizerError> {
        let size = self.vocabulary_size();
        let mut all = Vec::with_capacity(size);
        let tokenizer = match &self.vocabulary {
            Vocabulary::Bpe(tokenizer) => tokenizer,
            Vocabulary::Spm(spm) => {
                for id in 0..u32::try_from(size).map_err(failed)? {
                    let mut bytes = spm.piece(id);
                    if spm.is_special(id) {
                        bytes.insert(0, 0xFF);
                    }
                    all.push(bytes);
                }
                return Ok(all);
            }
        };
        for id in 0..u32::try_from(size).map_err(failed)? {
            let token = tokenizer.id_to_token(id).unwrap_or_default();
            let bytes = if self.special_ids.binary_search(&id).is_ok() {
                let mut marked = vec![0xFF];
                marked.extend_from_slice(token.as_bytes());
                marked
            } else {
                crate::structured::byte_level_bytes(&token).ok_or_else(|| {
                    TokenizerError::Tokenizer(format!(
                        "token {id} ({token:?}) is not byte-level BPE text"
                    ))
                })?
            };
            all.push(bytes);
        }
        Ok(all)
    }

    /// Whether `encode` starts with BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Replaces the GGUF's chat template (a template file beside the model, as llama.cpp's
    /// `--chat-template-file`).
    pub fn set_template(&mut self, template: String) {
        self.template = Some(template);
    }

    /// Whether the chat template renders a list of tools (it names `tools`).
    pub fn template_takes_tools(&self) -> bool {
        self.template
            .as_deref()
            .is_some_and(|template| template.contains("tools"))
    }

    /// The size of the vocabulary: token ids run below it.
    pub fn vocabulary_size(&self) -> usize {
        match &self.vocabulary {
            Vocabulary::Bpe(tokenizer) => tokenizer.get_vocab_size(true),
            Vocabulary::Spm(spm) => spm.vocabulary_size(),
        }
    }

    /// The token that ends an answer: end of sequence, else the first end-of-turn marker.
    pub fn end_token(&self) -> Option<u32> {
        self.eos
            .as_ref()
            .map(|(id, _)| *id)
            .or_else(|| self.stop_tokens.first().copied())
    }

    /// Token ids of `text`; special tokens written in the text are recognised. Adds BOS when the model asks.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if self.add_bos
            && let Some((bos, _)) = &self.bos
        {
            ids.push(*bos);
        }
        match &self.vocabulary {
            Vocabulary::Bpe(tokenizer) => {
                ids.extend_from_slice(tokenizer.encode(text, false).map_err(failed)?.get_ids());
            }
            Vocabulary::Spm(spm) => ids.extend(spm.encode(text)),
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match &self.vocabulary {
            Vocabulary::Bpe(tokenizer) => tokenizer.decode(ids, false).map_err(failed),
            Vocabulary::Spm(spm) => Ok(spm.decode(ids)),
        }
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_tokens.contains(&id)
    }

    /// The prompt for `messages` from the model's own chat template, ending where the assistant speaks.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        self.render_chat_with_tools(messages, &[])
    }

    /// [`render_chat`](Self::render_chat) with the tools the model may call (`tools` in the template).
    pub fn render_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
    ) -> Result<String, TokenizerError> {
        let Some(template) = &self.template else {
            // No template: plain "role: content" lines, which any model can continue.
            let mut prompt: String = messages
                .iter()
                .map(|message| format!("{}: {}\n", message.role, message.content))
                .collect();
            prompt.push_str("assistant: ");
            return Ok(prompt);
        };
        let mut environment = minijinja::Environment::new();
        environment.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        environment
            .add_template("chat", template)
            .map_err(|error| TokenizerError::Template(error.to_string()))?;
        let rendered = environment
            .get_template("chat")
            .and_then(|template| {
                template.render(minijinja::context! {
                    messages => messages,
                    tools => (!tools.is_empty()).then_some(tools),
                    add_generation_prompt => true,
                    bos_token => self.bos.as_ref().map(|(_, text)| text.as_str()).unwrap_or(""),
                    eos_token => self.eos.as_ref().map(|(_, text)| text.as_str()).unwrap_or(""),
                })
            })
            .map_err(|error| TokenizerError::Template(error.to_string()))?;
        Ok(rendered)
    }
}
