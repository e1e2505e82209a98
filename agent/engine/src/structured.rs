//! Structured outputs: Ollama's `format` (`"json"` or a JSON schema) and OpenAI's `response_format`,
//! enforced while decoding with llguidance (the constrained-decoding library llama.cpp uses). Before
//! each token, every token that cannot continue a valid answer is masked out of the logits; the answer
//! ends when the grammar does. So every answer parses, and validates against its schema, unless it is
//! cut by `num_predict` first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

/// What shape an answer must have.
#[derive(Clone, Debug, PartialEq)]
pub enum Format {
    /// Any JSON object (Ollama's `"json"`, OpenAI's `json_object`).
    Json,
    /// An instance of this JSON schema.
    Schema(Value),
}

impl Format {
    /// Ollama's `format`: absent, null or `""` for free text, `"json"`, or a JSON schema object.
    pub fn from_ollama(value: Option<&Value>) -> Result<Option<Self>, String> {
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) if text.is_empty() => Ok(None),
            Some(Value::String(text)) if text == "json" => Ok(Some(Self::Json)),
            Some(Value::Object(_)) => Ok(Some(Self::Schema(value.cloned().unwrap_or_default()))),
            Some(other) => Err(format!(
                "invalid format {other}: use \"json\" or a JSON schema object"
            )),
        }
    }

    /// OpenAI's `response_format`: `{"type": "text"}`, `{"type": "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`.
    pub fn from_openai(value: Option<&Value>) -> Result<Option<Self>, String> {
        let Some(value) = value.filter(|value| !value.is_null()) else {
            return Ok(None);
        };
        match value.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Self::Json)),
            Some("json_schema") => match value.pointer("/json_schema/schema") {
                Some(schema @ Value::Object(_)) => Ok(Some(Self::Schema(schema.clone()))),
                _ => Err(
                    "response_format.json_schema.schema must be a JSON schema object".to_owned(),
                ),
            },
            _ => Err(
                "response_format.type must be \"text\", \"json_object\" or \"json_schema\""
                    .to_owned(),
            ),
        }
    }

    /// The grammar: the schema with our own layout, JSON on one line as `json.dumps` writes it (no
    /// free whitespace: a small model given room for it can pad an answer with spaces until the
    /// token limit). Options a client put in the schema for llguidance (`x-guidance`) are replaced.
    fn grammar(&self) -> TopLevelGrammar {
        let mut schema = match self {
            Self::Json => json!({"type": "object"}),
            Self::Schema(schema) => schema.clone(),
        };
        if let Some(object) = schema.as_object_mut() {
            object.insert(
                "x-guidance".to_owned(),
                json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
            );
        }
        TopLevelGrammar::from_json_schema(schema)
    }
}

/// llguidance's view of one model's vocabulary, built once per loaded model (the first request with
/// a format pays for it: tens of milliseconds for a 49k vocabulary).
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// From the bytes each token stands for (special tokens already marked) and the token that ends
    /// an answer.
    pub fn new(token_bytes: &[Vec<u8>], end: u32) -> Result<Self, String> {
        let vocabulary = u32::try_from(token_bytes.len()).map_err(|_| "vocabulary too large")?;
        let info = TokRxInfo::new(vocabulary, end);
        let trie = TokTrie::from(&info, token_bytes);
        let environment: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new(
            &environment,
            InferenceCapabilities::default(),
            &SlicedBiasComputer::general_slices(),
        )
        .map_err(|error| format!("structured outputs are unavailable for this model: {error}"))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A constraint for one answer; an unusable schema is the caller's error.
    pub fn constrain(&self, format: &Format) -> Result<Constraint, String> {
        let parser = self
            .factory
            .create_parser(format.grammar())
            .map_err(|error| format!("invalid format: {error}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(format!("invalid format: {error}"));
        }
        Ok(Constraint {
            matcher,
            spent: Duration::ZERO,
            steps: 0,
        })
    }
}

/// One answer's grammar state.
pub struct Constraint {
    matcher: Matcher,
    spent: Duration,
    steps: u32,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("spent", &self.spent)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sets the logit of every token that cannot come next to minus infinity.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let started = Instant::now();
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|error| format!("structured output failed: {error}"))?;
        for (id, logit) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        self.spent += started.elapsed();
        self.steps += 1;
        Ok(())
    }

    /// Advances the grammar by the token chosen.
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        let started = Instant::now();
        let result = self
            .matcher
            .consume_token(token)
            .map_err(|error| format!("structured output failed: {error}"));
        self.spent += started.elapsed();
        result
    }

    /// Whether the answer is complete: nothing but its end may follow.
    pub fn finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Time spent masking and advancing so far, and the number of tokens masked.
    pub fn cost(&self) -> (Duration, u32) {
        (self.spent, self.steps)
    }
}

/// The bytes a GPT-2 byte-level token stands for: each character maps back to one byte through
/// GPT-2's byte-to-character table. `None` for a character outside the table.
pub fn byte_level_bytes(token: &str) -> Option<Vec<u8>> {
    token.chars().map(byte_of_char).collect()
}

/// GPT-2's table: printable bytes stand for themselves, the 68 others (0-32, 127-160 and 173, in
/// that order) for U+0100 upwards.
fn byte_of_char(character: char) -> Option<u8> {
    let code = u32::from(character);
    let byte = match code {
        33..=126 | 161..=172 | 174..=255 => code,
        256..=288 => code - 256,
        289..=322 => code - 289 + 127,
        323 => 173,
        _ => return None,
    };
    u8::try_from(byte).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_characters_map_back_to_their_bytes() {
        assert_eq!(byte_level_bytes("Hello"), Some(b"Hello".to_vec()));
        // Ġ (U+0120) is the space, Ċ (U+010A) the newline, Ā (U+0100) the zero byte.
        assert_eq!(byte_level_bytes("Ġthe"), Some(b" the".to_vec()));
        assert_eq!(byte_level_bytes("Ċ"), Some(b"\n".to_vec()));
        assert_eq!(byte_level_bytes("Ā"), Some(vec![0]));
        // Every byte has exactly one character.
        let mut seen = std::collections::BTreeSet::new();
        for code in (0u32..512).filter_map(char::from_u32) {
            if let Some(byte) = byte_of_char(code) {
                assert!(seen.insert(byte), "byte {byte} twice");
            }
        }
        assert_eq!(seen.len(), 256);
        assert_eq!(byte_level_bytes("日本"), None);
    }

    #[test]
    fn formats_are_read_as_ollama_and_openai_send_them() {
        assert_eq!(Format::from_ollama(None), Ok(None));
        assert_eq!(Format::from_ollama(Some(&json!(""))), Ok(None));
        assert_eq!(
            Format::from_ollama(Some(&json!("json"))),
            Ok(Some(Format::Json))
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            Format::from_ollama(Some(&schema)),
            Ok(Some(Format::Schema(schema.clone())))
        );
        assert!(Format::from_ollama(Some(&json!("yaml"))).is_err());
        assert!(Format::from_ollama(Some(&json!(5))).is_err());
        assert_eq!(
            Format::from_openai(Some(&json!({"type": "text"}))),
            Ok(None)
        );
        assert_eq!(
            Format::from_openai(Some(&json!({"type": "json_object"}))),
            Ok(Some(Format::Json))
        );
        assert_eq!(
            Format::from_openai(Some(
                &json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
            )),
            Ok(Some(Format::Schema(schema)))
        );
        assert!(Format::from_openai(Some(&json!({"type": "json_schema"}))).is_err());
        assert!(Format::from_openai(Some(&json!({"type": "xml"}))).is_err());
    }

    /// A vocabulary of single bytes and a few words: the grammar lets through only what continues a
    /// valid answer, and ends it.
    #[test]
    fn the_mask_allows_only_what_continues_the_schema() {
        let mut words: Vec<Vec<u8>> = (0u8..=255).map(|byte| vec![byte]).collect();
        words.push(b"{\"".to_vec());
        let end = words.len() as u32;
        words.push(b"\xFF</s>".to_vec());
        let grammars = Grammars::new(&words, end).expect("grammars");
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": false});
        let mut constraint = grammars
            .constrain(&Format::Schema(schema))
            .expect("constraint");
        let mut produced = Vec::new();
        // Greedy over a "model" that prefers, in order: the letter x, a closing brace, the digit 7,
        // the end, anything else.
        for _ in 0..40 {
            let mut logits = vec![0.0f32; words.len()];
            logits[usize::from(b'x')] = 3.0;
            logits[usize::from(b'}')] = 2.5;
            logits[usize::from(b'7')] = 2.0;
            logits[end as usize] = 1.0;
            constraint.mask(&mut logits).expect("mask");
            let best = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(id, _)| id as u32)
                .expect("a token");
            if best == end {
                break;
            }
            constraint.commit(best).expect("commit");
            produced.extend_from_slice(&words[best as usize]);
            if constraint.finished() {
                break;
            }
        }
        let text = String::from_utf8(produced).expect("utf-8");
        let value: Value =
            serde_json::from_str(&text).unwrap_or_else(|error| panic!("{text}: {error}"));
        assert_eq!(value, json!({"n": 7}), "{text}");
        assert!(constraint.cost().1 > 0);
        assert!(
            grammars
                .constrain(&Format::Schema(json!({"type": "no such type"})))
                .is_err()
        );
    }
}
