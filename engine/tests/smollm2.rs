//! SmolLM2-135M-Instruct (GGUF Q4_1) against transformers running the same dequantized weights
//! (fixtures/smollm2_reference.py). The tests are ignored (cargo lists them so) unless asked
//! for with `--include-ignored`, which scripts/test.sh does when the model is there
//! (`scripts/fetch-model.sh` downloads it); run without the model, they fail saying so.

mod common;

use std::path::PathBuf;

use common::{fixtures, greedy, load};
use rbee_engine::{FinishReason, WeightFormat};
use serde_json::Value;

fn model_path() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is absent: run scripts/fetch-model.sh",
        path.display()
    );
    path
}

/// Greedy tokens of every reference case; returns (prefix agreement per case, full-length
/// agreement count).
fn agreement(format: WeightFormat) -> Vec<(usize, usize)> {
    let path = model_path();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2-reference.json")).unwrap(),
    )
    .unwrap();
    let engine = load(&path, format);
    let mut out = Vec::new();
    for case in reference["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["greedy"].clone()).unwrap();
        assert_eq!(
            engine.tokenize(prompt).unwrap(),
            ids,
            "tokens of {prompt:?}"
        );
        let (done, got) = engine
            .generate_ids(&ids, &greedy(want.len() as u32))
            .unwrap();
        let mut same = want.iter().zip(&got).take_while(|(a, b)| a == b).count();
        // The reference ran past end-of-sequence; the engine stops there (and does not return
        // the eos token). Agreeing up to and including the eos counts as agreeing throughout.
        let mut expected_len = want.len();
        if same == got.len() && done.finish_reason == FinishReason::Eos && same < want.len() {
            let eos_ids: Vec<u32> = engine
                .info()
                .eos_tokens
                .iter()
                .flat_map(|t| engine.tokenize(t).unwrap())
                .collect();
            if eos_ids.contains(&want[same]) {
                same += 1;
                expected_len = same;
            }
        }
        println!("{format:?} {prompt:?}: {same}/{expected_len} tokens agree");
        out.push((same, expected_len));
    }
    out
}

/// The first 8 greedy tokens of every prompt (or all, when the reference ends sooner) match
/// transformers; how many prompts agree over their whole length is reported.
fn first_8_tokens_match(format: WeightFormat) {
    let results = agreement(format);
    for (same, len) in &results {
        assert!(
            *same >= 8.min(*len),
            "first 8 greedy tokens must match: {results:?}"
        );
    }
    let full = results.iter().filter(|(same, len)| same == len).count();
    println!(
        "{full}/{} cases agree over their whole length",
        results.len()
    );
}

#[test]
#[ignore = "needs SmolLM2 (scripts/fetch-model.sh; scripts/test.sh then runs it)"]
fn f32_weights_match_transformers() {
    first_8_tokens_match(WeightFormat::F32);
}

#[test]
#[ignore = "needs SmolLM2 (scripts/fetch-model.sh; scripts/test.sh then runs it)"]
fn default_weights_keep_the_first_8_tokens() {
    first_8_tokens_match(WeightFormat::Auto);
}

/// SmolLM2's real widths through the batched paths: prompts of 5, 17 and 40 tokens go through
/// the row kernel with the decode rows, 50 and 57 through the tiled path (from 48 rows) together (one gemm
/// call for both), the first of each arriving while others already decode.
/// Every sequence's greedy tokens are those it gets alone.
#[test]
#[ignore = "needs SmolLM2 (scripts/fetch-model.sh; scripts/test.sh then runs it)"]
fn greedy_tokens_are_the_same_alone_or_batched() {
    let engine = std::sync::Arc::new(
        rbee_engine::Engine::load(
            &model_path(),
            &rbee_engine::LoadOptions {
                max_batch: 5,
                ..rbee_engine::LoadOptions::default()
            },
        )
        .unwrap(),
    );
    let text = "Count the honey bees in the garden, one after another, and list them: ";
    let ids = engine.tokenize(text).unwrap();
    let jobs: Vec<_> = [5usize, 17, 40, 50, 57]
        .iter()
        .map(|&len| {
            let prompt: Vec<u32> = ids.iter().cycle().take(len).copied().collect();
            (prompt, greedy(24))
        })
        .collect();
    common::assert_same_alone_and_batched(&engine, &jobs, 5, "SmolLM2");
}

/// A conversation through SmolLM2's chat template, each turn resending the history: every
/// turn's greedy answer is the same with the prefix cache as without it, and from the second
/// turn on most of the prompt comes from the cache (hits that end mid-block, and each
/// turn's prompt a strict prefix of the later ones).
#[test]
#[ignore = "needs SmolLM2 (scripts/fetch-model.sh; scripts/test.sh then runs it)"]
fn chat_turns_give_the_same_tokens_from_the_prefix_cache() {
    let load = |prefix_caching| {
        rbee_engine::Engine::load(
            &model_path(),
            &rbee_engine::LoadOptions {
                prefix_caching,
                ..rbee_engine::LoadOptions::default()
            },
        )
        .unwrap()
    };
    let (cached, uncached) = (load(true), load(false));
    let turn = |role: &str, text: &str| format!("<|im_start|>{role}\n{text}<|im_end|>\n");
    let mut history = turn("system", "You are a helpful AI assistant named SmolLM.");
    for (turn_index, question) in [
        "What is the capital of France?",
        "And how many people live there?",
        "Name three museums in that city.",
    ]
    .into_iter()
    .enumerate()
    {
        history.push_str(&turn("user", question));
        let prompt = format!("{history}<|im_start|>assistant\n");
        let ids = cached.tokenize(&prompt).unwrap();
        let before = cached.batch_stats().prefix_hit_tokens;
        let (completion, answer) = cached.generate_ids(&ids, &greedy(32)).unwrap();
        let hits = cached.batch_stats().prefix_hit_tokens - before;
        assert_eq!(
            answer,
            uncached.generate_ids(&ids, &greedy(32)).unwrap().1,
            "{question}"
        );
        // The first turn's prompt is short enough for the row kernel, the second's is not,
        // so the second computes its own (a block is reused only where it holds the very
        // numbers the sequence would compute); from the third on, the turn before's prompt
        // is a hit.
        if turn_index >= 2 {
            assert!(
                hits as usize * 2 >= ids.len(),
                "{question}: {hits} of {} tokens hit",
                ids.len()
            );
        }
        history.push_str(&turn("assistant", &completion.text));
    }
    assert!(cached.batch_stats().prefix_hit_tokens > 0);
}

/// Speculative decoding on SmolLM2: tokens with it are the tokens without it, greedy and
/// sampled with a seed, on a prompt whose answer copies its input (drafts mostly accepted)
/// and on free text (mostly not), alone and batched together.
#[test]
#[ignore = "needs SmolLM2 (scripts/fetch-model.sh; scripts/test.sh then runs it)"]
fn speculation_keeps_the_tokens() {
    let load = |speculative| {
        std::sync::Arc::new(
            rbee_engine::Engine::load(
                &model_path(),
                &rbee_engine::LoadOptions {
                    speculative,
                    // Every match drafted, however fast this machine's rows are.
                    draft_length: rbee_engine::DraftLength::Max,
                    ..rbee_engine::LoadOptions::default()
                },
            )
            .unwrap(),
        )
    };
    let (on, off) = (load(true), load(false));
    let copy = "<|im_start|>user\nRepeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, mango.<|im_end|>\n<|im_start|>assistant\n";
    let free =
        "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n";
    let sampled = |seed| rbee_engine::SamplingParams {
        temperature: 0.7,
        seed: Some(seed),
        ..greedy(48)
    };
    let jobs: Vec<_> = [copy, free]
        .iter()
        .flat_map(|text| {
            let prompt = on.tokenize(text).unwrap();
            [greedy(48), sampled(1), sampled(2)].map(|params| (prompt.clone(), params))
        })
        .collect();
    for (prompt, params) in &jobs {
        assert_eq!(
            on.generate_ids(prompt, params).unwrap().1,
            off.generate_ids(prompt, params).unwrap().1
        );
    }
    let alone: Vec<Vec<u32>> = jobs
        .iter()
        .map(|(prompt, params)| off.generate_ids(prompt, params).unwrap().1)
        .collect();
    assert_eq!(common::together(&on, &jobs), alone);
    let stats = on.batch_stats();
    assert!(stats.accepted_tokens > 0, "{stats:?}");
}
