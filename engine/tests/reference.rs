//! The engine against an independent implementation (PyTorch + transformers, see
//! fixtures/make_expected.py): f32 logits to 1e-4 and greedy tokens, token for token, for the
//! tiny Llama as a Hugging Face folder and as GGUF (f32 and Q8_0), and the Qwen2 variant.

mod common;

use common::{fixtures, greedy, load};
use rbee_engine::WeightFormat;
use serde_json::Value;

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check(model: &str) {
    let all = expected();
    let engine = load(&fixtures().join(model), WeightFormat::F32);
    let vocab = engine.info().vocab_size as usize;
    let new_tokens = all["new_tokens"].as_u64().unwrap() as u32;
    let mut worst = 0f32;
    for case in all[model].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            engine.tokenize(prompt).unwrap(),
            ids,
            "{model}: tokens of {prompt:?}"
        );

        let logits = engine.logits(&ids).unwrap();
        assert_eq!(logits.len(), ids.len() * vocab);
        let from = case["logits_from"].as_u64().unwrap() as usize;
        for (r, row) in case["logits"].as_array().unwrap().iter().enumerate() {
            let got = &logits[(from + r) * vocab..(from + r + 1) * vocab];
            for (g, want) in got.iter().zip(row.as_array().unwrap()) {
                let err = (g - want.as_f64().unwrap() as f32).abs();
                worst = worst.max(err);
            }
        }

        let mut want: Vec<u32> = serde_json::from_value(case["greedy"].clone()).unwrap();
        let (done, got) = engine.generate_ids(&ids, &greedy(new_tokens)).unwrap();
        // transformers keeps the eos token that ended its run; the engine stops before it.
        if (want.len() as u32) < new_tokens {
            let eos = want.pop().unwrap();
            let eos_text = engine
                .info()
                .eos_tokens
                .iter()
                .any(|t| engine.tokenize(t).unwrap() == [eos]);
            assert!(
                eos_text,
                "{model}: reference stopped early on non-eos token {eos}"
            );
            assert_eq!(done.finish_reason, rbee_engine::FinishReason::Eos);
        }
        assert_eq!(got, want, "{model}: greedy continuation of {prompt:?}");
    }
    println!("{model}: max |logit error| = {worst:e}");
    assert!(worst < 1e-4, "{model}: max logit error {worst} >= 1e-4");
}

#[test]
fn hf_folder_matches_transformers() {
    check("tiny-llama");
}

#[test]
fn qwen2_with_biases_and_untied_head_matches_transformers() {
    check("tiny-qwen2");
}

#[test]
fn gguf_f32_matches_transformers() {
    check("tiny-llama.gguf");
}

#[test]
fn gguf_q8_0_matches_transformers() {
    check("tiny-llama-q8_0.gguf");
}
