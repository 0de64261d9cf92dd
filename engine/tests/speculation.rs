//! Speculative decoding from the context: a greedy sequence's tokens are the very tokens it
//! gets without speculation, alone and in a changing batch, on text that repeats (drafts
//! accepted, on SmolLM2 in `smollm2.rs`) and text that does not; sampled sequences draft nothing, so a seed still gives
//! the same tokens whatever runs beside it (`batching.rs`). The test checks the scheduler's
//! counters, so it cannot pass without drafts being verified.

mod common;

use std::sync::Arc;

use common::{greedy, together};
use rbee_engine::{DeviceChoice, Engine, LoadOptions, SamplingParams, WeightFormat};

fn engine(speculative: bool) -> Engine {
    Engine::load(
        &common::fixtures().join("tiny-llama"),
        &LoadOptions {
            device: DeviceChoice::Cpu,
            weights: WeightFormat::Auto,
            speculative,
            max_batch: 4,
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

/// A prompt that repeats a phrase (its continuation is often the phrase again), and one
/// that does not.
fn prompts() -> Vec<Vec<u32>> {
    let phrase: Vec<u32> = vec![17, 230, 45, 9, 301, 77, 12];
    let repeating: Vec<u32> = phrase.iter().cycle().take(40).copied().collect();
    let varied: Vec<u32> = (0..30).map(|k| 4 + (k * 37 + k * k * 11) % 370).collect();
    vec![repeating, varied]
}

#[test]
fn greedy_tokens_are_the_same_with_and_without_speculation() {
    let (on, off) = (Arc::new(engine(true)), Arc::new(engine(false)));
    let params = greedy(64);
    for prompt in prompts() {
        let want = off.generate_ids(&prompt, &params).unwrap().1;
        assert_eq!(on.generate_ids(&prompt, &params).unwrap().1, want);
    }
    // The tiny model's random weights rarely echo their input, so here the drafts are
    // mostly rejected; `smollm2.rs` checks accepted ones.
    let stats = on.batch_stats();
    assert!(stats.drafts > 0, "{stats:?}");
    assert_eq!(off.batch_stats().drafts, 0);

    // In a changing batch: four at once, joining a few milliseconds apart.
    let jobs: Vec<(Vec<u32>, SamplingParams)> = prompts()
        .into_iter()
        .cycle()
        .take(4)
        .enumerate()
        .map(|(i, prompt)| (prompt, greedy(24 + 12 * i as u32)))
        .collect();
    let alone: Vec<Vec<u32>> = jobs
        .iter()
        .map(|(prompt, params)| off.generate_ids(prompt, params).unwrap().1)
        .collect();
    assert_eq!(together(&on, &jobs), alone);
}
