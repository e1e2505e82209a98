//! SentencePiece-style tokenization of GGUF vocabularies of type `llama` (Gemma, Llama 1/2, the first
//! Mistral models), computed as llama.cpp computes it, since a model is only token-exact with llama.cpp
//! if it sees the same ids:
//!
//! - Special tokens written in the text (control, user-defined and unknown ones: `<start_of_turn>`,
//!   runs of newlines in Gemma's vocabulary) are split out first, longest first at each position.
//! - Each other piece has its spaces replaced by `▁` (and a `▁` put before it when the vocabulary asks
//!   for a space prefix and it follows a special token or starts the text), is split into characters,
//!   and adjacent symbols are merged while their concatenation is in the vocabulary, the pair whose
//!   token has the highest score first (the leftmost of equal scores).
//! - A character that is no token is written as its UTF-8 bytes' `<0xXX>` tokens.

use std::collections::{BinaryHeap, HashMap};

use crate::gguf::{Gguf, Value};

const NORMAL: u64 = 1;
const UNKNOWN: u64 = 2;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;
const BYTE: u64 = 6;

/// A vocabulary's tokenizer.
#[derive(Debug)]
pub struct Spm {
    tokens: Vec<String>,
    scores: Vec<f32>,
    kinds: Vec<u64>,
    ids: HashMap<String, u32>,
    /// The `<0xXX>` tokens by byte value.
    bytes: Vec<Option<u32>>,
    /// Special tokens by their text's first byte, longest text first.
    specials: HashMap<u8, Vec<(String, u32)>>,
    add_space_prefix: bool,
}

/// A piece of text being merged: `start..start + length` of the text, linked to its neighbours.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    length: usize,
    previous: Option<usize>,
    next: Option<usize>,
}

/// Two adjacent symbols whose concatenation is a token of score `score`.
#[derive(Debug, PartialEq)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    length: usize,
}

impl Eq for Pair {}

impl Ord for Pair {
    /// The highest score first; of equal scores, the leftmost.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Spm {
    pub fn from_gguf(gguf: &Gguf, tokens: &[&str], kinds: &[u64]) -> Self {
        let scores: Vec<f32> = gguf
            .get("tokenizer.ggml.scores")
            .and_then(Value::as_array)
            .map(|scores| {
                scores
                    .iter()
                    .map(|score| score.as_f64().unwrap_or(0.0) as f32)
                    .collect()
            })
            .unwrap_or_default();
        let mut ids = HashMap::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            ids.insert((*token).to_owned(), id as u32);
        }
        let kind = |id: usize| kinds.get(id).copied().unwrap_or(NORMAL);
        let bytes = (0..=255u8)
            .map(|byte| ids.get(&format!("<0x{byte:02X}>")).copied())
            .collect();
        let mut specials: HashMap<u8, Vec<(String, u32)>> = HashMap::new();
        for (id, token) in tokens.iter().enumerate() {
            if matches!(kind(id), CONTROL | USER_DEFINED | UNKNOWN) && !token.is_empty() {
                specials
                    .entry(token.as_bytes()[0])
                    .or_default()
                    .push(((*token).to_owned(), id as u32));
            }
        }
        for candidates in specials.values_mut() {
            candidates.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        }
        Self {
            tokens: tokens.iter().map(|token| (*token).to_owned()).collect(),
            scores,
            kinds: (0..tokens.len()).map(kind).collect(),
            ids,
            bytes,
            specials,
            add_space_prefix: gguf
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        }
    }

    pub fn vocabulary_size(&self) -> usize {
        self.tokens.len()
    }

    /// The ids of `text`, special tokens written in it recognised; no BOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut after_special = true;
        let mut plain_start = 0;
        let mut at = 0;
        let bytes = text.as_bytes();
        while at < bytes.len() {
            let special = self.specials.get(&bytes[at]).and_then(|candidates| {
                candidates
                    .iter()
                    .find(|(token, _)| bytes[at..].starts_with(token.as_bytes()))
            });
            match special {
                Some((token, id)) => {
                    if plain_start < at {
                        self.encode_plain(&text[plain_start..at], after_special, &mut ids);
                    }
                    ids.push(*id);
                    after_special = true;
                    at += token.len();
                    plain_start = at;
                }
                None => at += 1,
            }
        }
        if plain_start < bytes.len() {
            self.encode_plain(&text[plain_start..], after_special, &mut ids);
        }
        ids
    }

    /// One piece of text without special tokens.
    fn encode_plain(&self, text: &str, after_special: bool, ids: &mut Vec<u32>) {
        let mut escaped = String::with_capacity(text.len() + 3);
        if self.add_space_prefix && after_special {
            escaped.push('▁');
        }
        escaped.push_str(&text.replace(' ', "▁"));
        let text = escaped.as_str();
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .map(|(start, character)| Symbol {
                start,
                length: character.len_utf8(),
                previous: None,
                next: None,
            })
            .collect();
        let count = symbols.len();
        for (index, symbol) in symbols.iter_mut().enumerate() {
            symbol.previous = index.checked_sub(1);
            symbol.next = (index + 1 < count).then_some(index + 1);
        }
        let mut queue = BinaryHeap::new();
        let pair = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
            let (left, right) = (left?, right?);
            let start = symbols[left].start;
            let length = symbols[left].length + symbols[right].length;
            let id = *self.ids.get(&text[start..start + length])?;
            Some(Pair {
                score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                left,
                right,
                length,
            })
        };
        for left in 1..count {
            queue.extend(pair(&symbols, Some(left - 1), Some(left)));
        }
        while let Some(merge) = queue.pop() {
            let (left, right) = (symbols[merge.left], symbols[merge.right]);
            // One of the two was merged into another since this pair was queued.
            if left.length == 0 || right.length == 0 || left.length + right.length != merge.length {
                continue;
            }
            symbols[merge.left].length += right.length;
            symbols[merge.right].length = 0;
            symbols[merge.left].next = right.next;
            if let Some(next) = right.next {
                symbols[next].previous = Some(merge.left);
            }
            queue.extend(pair(&symbols, left.previous, Some(merge.left)));
            queue.extend(pair(&symbols, Some(merge.left), right.next));
        }
        let mut at = (count > 0).then_some(0);
        while let Some(index) = at {
            let symbol = symbols[index];
            let piece = &text[symbol.start..symbol.start + symbol.length];
            match self.ids.get(piece) {
                Some(id) => ids.push(*id),
                None => ids.extend(
                    piece
                        .bytes()
                        .filter_map(|byte| self.bytes[usize::from(byte)]),
                ),
            }
            at = symbol.next;
        }
    }

    /// What token `id` stands for in text: `▁` as a space, `<0xXX>` as its byte, special tokens as
    /// their text.
    pub fn piece(&self, id: u32) -> Vec<u8> {
        let Some(token) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match self.kinds[id as usize] {
            BYTE => u8::from_str_radix(token.trim_start_matches("<0x").trim_end_matches('>'), 16)
                .map_or_else(|_| token.as_bytes().to_vec(), |byte| vec![byte]),
            NORMAL => token.replace('▁', " ").into_bytes(),
            _ => token.as_bytes().to_vec(),
        }
    }

    /// Whether `id` is a special token (control, user-defined, unknown).
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.kinds.get(id as usize),
            Some(&(CONTROL | USER_DEFINED | UNKNOWN))
        )
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|id| self.piece(*id)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
