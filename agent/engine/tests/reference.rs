//! The built-in engine against llama.cpp's reference outputs for the test model
//! (`../shared/reference/smollm2-135m-q4_1.llamacpp.json` beside the repository, copied into
//! `tests/reference/`): tokenization, chat prompts, greedy generation, and a two-way layer split.
//!
//! The model is fetched by `scripts/fetch-model` (run by `scripts/test`); `SOLLOL_TEST_MODEL` overrides its path.

use serde_json::Value;
use sollol_engine::gguf::Gguf;
use sollol_engine::model::{Model, Part};
use sollol_engine::tokenizer::{ChatMessage, TextCodec};

mod support;

use support::{
    assert_halves_match, discovered, greedy_run, ids, model_path, open_gguf, reference_file, root,
};

fn reference() -> Value {
    reference_file("smollm2-135m-q4_1.llamacpp.json")
}

fn gguf() -> Gguf {
    open_gguf(&model_path())
}

#[test]
fn tokenization_matches_llama_cpp() {
    let codec = TextCodec::from_gguf(&gguf()).expect("tokenizer");
    for case in reference()["tokenize"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let ours = codec.encode(text).expect("encode");
        assert_eq!(ours, ids(&case["ids"]), "token ids of {text:?}");
        assert_eq!(
            codec.decode(&ours).expect("decode"),
            text,
            "round trip of {text:?}"
        );
    }
}

#[test]
fn chat_prompts_match_llama_cpp() {
    let codec = TextCodec::from_gguf(&gguf()).expect("tokenizer");
    for case in reference()["completions"].as_array().expect("cases") {
        let messages = [ChatMessage {
            role: "user".to_owned(),
            content: case["user_message"].as_str().expect("message").to_owned(),
            ..Default::default()
        }];
        let rendered = codec.render_chat(&messages).expect("template");
        assert_eq!(rendered, case["rendered_prompt"].as_str().expect("prompt"));
        assert_eq!(
            codec.encode(&rendered).expect("encode"),
            ids(&case["prompt_ids"]),
            "prompt ids of {}",
            case["name"]
        );
    }
}

#[test]
fn greedy_generation_matches_llama_cpp_and_a_layer_split_matches_the_whole() {
    let path = model_path();
    let gguf = gguf();
    let layers = sollol_engine::model::Shape::read(&gguf)
        .expect("shape")
        .layers;
    let whole = Model::load(&path, &gguf, Part::whole(layers)).expect("load");
    for case in reference()["completions"].as_array().expect("cases") {
        let prompt = ids(&case["prompt_ids"]);
        // The reference stops at the end-of-sequence token: 14 ids for one prompt.
        let expected: Vec<u32> = ids(&case["output_ids"]).into_iter().take(16).collect();
        let (ours, logits) = greedy_run(&[&whole], &prompt, expected.len());
        if let Some(step) = ours.iter().zip(&expected).position(|(a, b)| a != b) {
            // Where the two part, how far llama.cpp's choice is from ours says rounding or bug.
            let gap = logits[step][ours[step] as usize] - logits[step][expected[step] as usize];
            panic!(
                "{}: greedy ids part from llama.cpp's at step {step} (logit gap {gap:.4}): {ours:?} vs {expected:?}",
                case["name"]
            );
        }
    }

    // Two instances, each holding only its layers, give the whole model's logits.
    let prompt = ids(&reference()["completions"][0]["prompt_ids"]);
    let front = assert_halves_match(&path, &gguf, &whole, &prompt, 16);
    assert!(
        front.head(&front.embed(&[1]).expect("embed")).is_err(),
        "the front half has no head"
    );
}

#[test]
fn embeddings_match_llama_cpp_mean_pooling() {
    let model = sollol_engine::engine::LoadedModel::load(&discovered(&model_path())).expect("load");
    let reference_path = root().join("tests/reference/smollm2-135m-q4_1.embeddings.llamacpp.json");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(reference_path).expect("reference"))
            .expect("JSON");
    for case in reference["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let tokens = model.codec.encode(text).expect("encode");
        assert_eq!(tokens, ids(&case["ids"]), "token ids of {text:?}");
        let ours = model.embed(&tokens, true).expect("embed");
        let theirs: Vec<f32> = case["embedding"]
            .as_array()
            .expect("embedding")
            .iter()
            .map(|value| value.as_f64().expect("number") as f32)
            .collect();
        assert_eq!(ours.values.len(), theirs.len());
        let worst = ours
            .values
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{text:?}: largest difference from llama.cpp {worst:e}");
        // llama.cpp pools with an f32 matrix product, we sum in f64: equal but for the last bits.
        assert!(
            worst <= 1e-4,
            "{text:?}: embedding differs from llama.cpp's by up to {worst}"
        );
        let unit = ours.normalized();
        let length: f32 = unit.values.iter().map(|value| value * value).sum();
        assert!((length - 1.0).abs() < 1e-5, "normalised length² {length}");
    }
    assert!(matches!(
        model.embed(&[], true),
        Err(sollol_engine::engine::EngineError::EmptyInput)
    ));
}
