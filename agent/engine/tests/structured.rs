//! Structured outputs with the test model: a JSON schema or `"json"` as the format, greedy and
//! sampled. Every answer parses as JSON and has the schema's shape, though the model left alone
//! answers in prose.

use std::time::SystemTime;

use serde_json::{Value, json};
use sollol_engine::catalogue::ModelFile;
use sollol_engine::engine::{GenerateOptions, LoadedModel};
use sollol_engine::sampling::SamplingOptions;
use sollol_engine::structured::Format;
use sollol_engine::tokenizer::ChatMessage;

mod support;

fn model() -> LoadedModel {
    let path = support::model_path();
    let size_bytes = std::fs::metadata(&path).expect("model file").len();
    LoadedModel::load(&ModelFile {
        name: "smollm2:135m".to_owned(),
        path,
        size_bytes,
        modified: SystemTime::now(),
        digest: "test".to_owned(),
        details: None,
    })
    .expect("the test model loads")
}

fn answer(
    model: &LoadedModel,
    question: &str,
    options: &GenerateOptions,
) -> (String, &'static str) {
    let prompt = model
        .codec
        .render_chat(&[ChatMessage {
            role: "user".to_owned(),
            content: question.to_owned(),
            ..Default::default()
        }])
        .expect("prompt");
    let ids = model.codec.encode(&prompt).expect("tokens");
    let mut text = String::new();
    let generated = model
        .generate(&ids, options, |piece| {
            text.push_str(piece);
            true
        })
        .expect("generation");
    (text, generated.done_reason)
}

fn greedy(format: Option<Format>) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingOptions {
            temperature: 0.0,
            ..SamplingOptions::default()
        },
        num_predict: Some(200),
        stop: Vec::new(),
        format,
        num_ctx: None,
    }
}

const QUESTION: &str = "Describe a cat: its name, its age in years, and whether it is friendly.";

fn cat_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "friendly": {"type": "boolean"},
            "colour": {"enum": ["black", "white", "ginger", "grey"]}
        },
        "required": ["name", "age", "friendly", "colour"],
        "additionalProperties": false
    })
}

/// The schema's constraints, checked by hand (the test does not trust the library it tests).
fn check_cat(text: &str) {
    let cat: Value = serde_json::from_str(text).unwrap_or_else(|error| panic!("{text:?}: {error}"));
    let object = cat
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {text}"));
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["age", "colour", "friendly", "name"], "{text}");
    assert!(
        cat["name"]
            .as_str()
            .is_some_and(|name| name.chars().count() <= 20),
        "{text}"
    );
    assert!(cat["age"].as_u64().is_some_and(|age| age <= 30), "{text}");
    assert!(cat["friendly"].is_boolean(), "{text}");
    assert!(
        ["black", "white", "ginger", "grey"].contains(&cat["colour"].as_str().unwrap_or("")),
        "{text}"
    );
}

#[test]
fn answers_follow_a_json_schema_greedy_and_sampled() {
    let model = model();
    // Left alone, the model answers in prose.
    let (free, _) = answer(&model, QUESTION, &greedy(None));
    assert!(serde_json::from_str::<Value>(&free).is_err(), "{free}");

    let (text, reason) = answer(
        &model,
        QUESTION,
        &greedy(Some(Format::Schema(cat_schema()))),
    );
    println!("greedy: {text}");
    assert_eq!(reason, "stop", "the grammar ended the answer: {text}");
    check_cat(&text);

    for seed in 0..4 {
        let options = GenerateOptions {
            sampling: SamplingOptions {
                temperature: 1.0,
                seed: Some(seed),
                ..SamplingOptions::default()
            },
            num_predict: Some(200),
            stop: Vec::new(),
            format: Some(Format::Schema(cat_schema())),
            num_ctx: None,
        };
        let (text, reason) = answer(&model, QUESTION, &options);
        println!("seed {seed}: {text}");
        assert_eq!(reason, "stop", "seed {seed}: {text}");
        check_cat(&text);
    }
}

#[test]
fn the_json_format_gives_an_object() {
    let model = model();
    let (text, reason) = answer(&model, "List three colours.", &greedy(Some(Format::Json)));
    println!("json: {text}");
    assert_eq!(reason, "stop", "{text}");
    let value: Value =
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("{text:?}: {error}"));
    assert!(value.is_object(), "{text}");
}

#[test]
fn an_unusable_schema_is_refused_before_generation() {
    let model = model();
    let refused = model
        .constrain(&Format::Schema(
            json!({"type": "object", "properties": {"a": {"type": "wat"}}}),
        ))
        .expect_err("refused");
    assert!(refused.starts_with("invalid format"), "{refused}");
}
