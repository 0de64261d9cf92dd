//! Continuous batching: a sequence's tokens do not depend on what else runs beside it, and a
//! cancelled sequence leaves at the next step without disturbing the others (the KV pool's
//! admission, growth and preemption are `prefix_cache.rs`'s). Each test also checks, from the
//! scheduler's counters, that sequences really did share passes, so it cannot pass by
//! running them one at a time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use common::{assert_same_alone_and_batched, greedy};
use rbee_engine::{
    Completion, DeviceChoice, Engine, FinishReason, LoadOptions, SamplingParams, WeightFormat,
};

fn engine(weights: WeightFormat, options: LoadOptions) -> Engine {
    Engine::load(
        &common::fixtures().join("tiny-llama"),
        &LoadOptions {
            device: DeviceChoice::Cpu,
            weights,
            ..options
        },
    )
    .unwrap()
}

/// Prompts of different lengths (3 to 63 token ids of the tiny vocabulary) and output
/// lengths, so sequences join and leave the batch at different steps and some are still
/// reading their prompt while others decode.
fn workload() -> Vec<(Vec<u32>, u32)> {
    (0..6u32)
        .map(|i| {
            let prompt = (0..3 + 12 * i)
                .map(|k| 4 + (k * 7 + i * 13) % 370)
                .collect();
            (prompt, 20 + 17 * i)
        })
        .collect()
}

/// `prompt_chunk` 8: every prompt chunk is short and multiplied with the decode rows in one
/// call; 50: chunks of 50 take the tiled path on their own (from 48 rows) while the shorter
/// last chunks join the decode rows.
fn batch_equivalence(weights: WeightFormat, prompt_chunk: usize) {
    let engine = Arc::new(engine(
        weights,
        LoadOptions {
            max_batch: 4,
            prompt_chunk,
            ..LoadOptions::default()
        },
    ));
    let jobs: Vec<(Vec<u32>, SamplingParams)> = workload()
        .into_iter()
        .map(|(prompt, max)| (prompt, greedy(max)))
        .collect();
    assert_same_alone_and_batched(&engine, &jobs, 4, &format!("{weights:?}"));
}

#[test]
fn greedy_tokens_are_the_same_alone_or_in_a_changing_batch_cpu_blocks() {
    batch_equivalence(WeightFormat::Auto, 8);
    batch_equivalence(WeightFormat::Auto, 50);
}

#[test]
fn greedy_tokens_are_the_same_alone_or_in_a_changing_batch_burn_f32() {
    batch_equivalence(WeightFormat::F32, 8);
}

#[test]
fn seeded_sampling_is_reproducible_inside_a_batch() {
    let engine = Arc::new(engine(WeightFormat::Auto, LoadOptions::default()));
    let sampled = |seed| SamplingParams {
        temperature: 0.9,
        top_k: 40,
        seed: Some(seed),
        ..SamplingParams::greedy(60)
    };
    let jobs: Vec<(Vec<u32>, SamplingParams)> = workload()
        .into_iter()
        .take(4)
        .enumerate()
        .map(|(i, (prompt, _))| (prompt, sampled(100 + i as u64)))
        .collect();
    let max_batch = LoadOptions::default().max_batch;
    assert_same_alone_and_batched(&engine, &jobs, max_batch, "seeded sampling");
}

#[test]
fn a_sequence_cancelled_while_reading_its_prompt_leaves_and_frees_its_place() {
    // Room for two sequences: a long-running neighbour and the victim.
    let engine = Arc::new(engine(
        WeightFormat::Auto,
        LoadOptions {
            max_batch: 2,
            prompt_chunk: 1,
            ..LoadOptions::default()
        },
    ));
    // The victim's prompt: about 100 tokens, read one per step (chunk 1).
    let mut victim_prompt = String::new();
    while engine.tokenize(&victim_prompt).unwrap().len() < 100 {
        victim_prompt.push_str("the bees hum ");
    }
    let neighbour_prompt: Vec<u32> = (0..120u32).map(|k| 5 + k * 11 % 370).collect();
    let params = greedy(130);
    let alone = engine.generate_ids(&neighbour_prompt, &params).unwrap().0;

    let neighbour = {
        let (engine, prompt, params) = (engine.clone(), neighbour_prompt.clone(), params.clone());
        thread::spawn(move || engine.generate_ids(&prompt, &params).unwrap().0)
    };
    // The scheduler asks once per step whether to stop: say yes at the 10th step, while
    // the victim is still reading its prompt.
    let checks = Arc::new(AtomicUsize::new(0));
    let cancelled: rbee_engine::Cancelled = {
        let checks = checks.clone();
        Arc::new(move || checks.fetch_add(1, Ordering::AcqRel) >= 10)
    };
    let victim = engine
        .generate_cancellable(&victim_prompt, &params, Some(cancelled), &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(victim.finish_reason, FinishReason::Cancelled);
    assert_eq!(
        victim.generated_tokens, 0,
        "cancelled before its prompt was read"
    );

    // Its place is free at once: a short third sequence runs beside the neighbour and ends
    // long before it (had the place stayed taken, it would wait for the neighbour to end).
    let third = engine.generate_ids(&[7, 8, 9], &greedy(5)).unwrap().0;
    assert_eq!(third.generated_tokens, 5);
    assert!(
        !neighbour.is_finished(),
        "the third sequence waited for the neighbour: the victim's place was not freed"
    );
    let beside: Completion = neighbour.join().unwrap();
    assert_eq!(beside.text, alone.text, "the neighbour's text is unchanged");
    assert_eq!(beside.generated_tokens, alone.generated_tokens);
}

/// A step whose sequences have all been cancelled stops between layers: a long prompt
/// chunk nobody wants does not hold up whatever waits behind it.
#[test]
fn a_step_nobody_wants_stops_between_layers() {
    // The whole prompt in one step.
    let engine = engine(
        WeightFormat::Auto,
        LoadOptions {
            prompt_chunk: 4096,
            ..LoadOptions::default()
        },
    );
    let prompt = "the bees hum ".repeat(12);
    // Yes from the third check on. Checked only between steps, that is after the prompt
    // step and one decode step (2 tokens); checked between layers too, inside the prompt
    // step.
    let checks = Arc::new(AtomicUsize::new(0));
    let cancelled: rbee_engine::Cancelled = {
        let checks = checks.clone();
        Arc::new(move || checks.fetch_add(1, Ordering::AcqRel) >= 2)
    };
    let completion = engine
        .generate_cancellable(prompt.as_str(), &greedy(20), Some(cancelled), &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(completion.finish_reason, FinishReason::Cancelled);
    assert_eq!(
        completion.generated_tokens, 0,
        "the prompt step ran to its end"
    );
    // The engine goes on serving.
    let next = engine.generate_ids(&[7, 8, 9], &greedy(3)).unwrap().0;
    assert_eq!(next.generated_tokens, 3);
}
