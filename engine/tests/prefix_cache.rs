//! The KV pool's prefix cache and its growth on demand: a sequence that starts from blocks
//! another one left (a chat's earlier turn, a shared system prompt) produces the very tokens
//! it produces without them, wherever the hit ends; a small pool serves every sequence its
//! own tokens. The hit tests also check the scheduler's counters, so they cannot pass
//! without hits. (Joining by blocks and preemption are driven turn by turn in the
//! scheduler's unit tests, where who overlaps whom does not depend on the OS.)

mod common;

use std::sync::Arc;

use common::{greedy, together};
use rbee_engine::{DeviceChoice, Engine, LoadOptions, SamplingParams, WeightFormat};

/// Positions per KV block (the engine's `kv::BLOCK_SIZE`).
const BLOCK: usize = 16;

fn engine(options: LoadOptions) -> Engine {
    Engine::load(
        &common::fixtures().join("tiny-llama"),
        &LoadOptions {
            device: DeviceChoice::Cpu,
            weights: WeightFormat::Auto,
            ..options
        },
    )
    .unwrap()
}

/// Token ids of the tiny vocabulary, different for each `seed`.
fn ids(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|k| 4 + (k * 7 + seed * 31 + k * k * seed) % 370)
        .collect()
}

fn generate(engine: &Engine, prompt: &[u32], params: &SamplingParams) -> Vec<u32> {
    engine.generate_ids(prompt, params).unwrap().1
}

/// Prompts that share their first `shared` of `total` tokens with an earlier 120-token one:
/// each gives the tokens an engine without the prefix cache gives, and finds the blocks
/// expected in the cache: full blocks within all but its last token, whose positions the
/// earlier prompt computed by the same kernel as this one would (with `answer_reuse` off, a
/// chunk's length picks its kernel; a block is reused only where it holds the very numbers
/// this sequence would compute).
fn hits_give_the_tokens_computed_without_them(
    prompt_chunk: usize,
    answer_reuse: bool,
    cases: &[(usize, usize, u64)],
) {
    let options = |prefix_caching| LoadOptions {
        prompt_chunk,
        prefix_caching,
        answer_reuse,
        ..LoadOptions::default()
    };
    let cached = engine(options(true));
    let uncached = engine(options(false));
    let params = greedy(24);
    let first = ids(1, 120);
    assert_eq!(
        generate(&cached, &first, &params),
        generate(&uncached, &first, &params)
    );
    for &(shared, total, expected_hits) in cases {
        let mut prompt = first[..shared].to_vec();
        prompt.extend(ids(2 + total as u32, total - shared));
        let before = cached.batch_stats();
        let with_hits = generate(&cached, &prompt, &params);
        let after = cached.batch_stats();
        let case = format!("chunks of {prompt_chunk}, {shared} of {total} tokens shared");
        assert_eq!(with_hits, generate(&uncached, &prompt, &params), "{case}");
        assert_eq!(
            after.prefix_hit_tokens - before.prefix_hit_tokens,
            expected_hits,
            "{case}: hits"
        );
        assert_eq!(
            after.prefix_queried_tokens - before.prefix_queried_tokens,
            total as u64
        );
    }
    assert_eq!(uncached.batch_stats().prefix_hit_tokens, 0);
}

#[test]
fn prefix_hits_give_the_tokens_computed_without_them() {
    // Every position on the row kernel (the default): every full block within all but the
    // last token is a hit, however the prompts were cut into chunks.
    for chunk in [256, 50] {
        hits_give_the_tokens_computed_without_them(
            chunk,
            true,
            &[
                (50, 90, 48),
                (64, 73, 64),
                (60, 60, 48),
                (120, 120, 112),
                (119, 150, 112),
                (7, 30, 0),
                (40, 40, 32),
            ],
        );
    }
}

/// With `--no-answer-reuse`, a chunk's length picks its kernel, and a block is a hit only
/// where the cached prompt's chunk took the kernel this prompt's takes.
#[test]
fn without_answer_reuse_hits_follow_the_chunks_kernels() {
    // Chunks of 256: prompts from 48 tokens are one gemm chunk; the earlier prompt's blocks
    // serve every later one that long.
    hits_give_the_tokens_computed_without_them(
        256,
        false,
        &[
            // A hit that ends mid-block: the fourth block differs from its 51st token.
            (50, 90, 48),
            // One that ends at a block's end.
            (64, 73, 64),
            // A strict prefix of the cached prompt (its own last block is not full).
            (60, 60, 48),
            // The same prompt again: all but the block holding its last token.
            (120, 120, 112),
            (119, 150, 112),
            // Less than a block in common.
            (7, 30, 0),
            // 40 tokens take the row kernel; the cached blocks were computed by gemm.
            (40, 40, 0),
        ],
    );
    // Chunks of 50: the earlier prompt was read as 50 + 50 (gemm) + 20 (row kernel).
    hits_give_the_tokens_computed_without_them(
        50,
        false,
        &[
            // Its last chunk is 40 rows (row kernel): the fourth block's kernels differ.
            (50, 90, 48),
            // The hit ends 4 rows before its chunk's end: those 4 rows go through gemm, as
            // they did in the 50-row chunk.
            (100, 130, 96),
            // A strict prefix, whose hit ends 2 rows into a gemm chunk.
            (60, 60, 48),
            (120, 120, 112),
            // Its third chunk is 50 rows (gemm), the cached one's 20 (row kernel).
            (119, 150, 96),
        ],
    );
}

/// A conversation: each turn's prompt is the last turn's prompt, its answer and a new
/// message. Every turn gives the tokens it gives without the cache, and from the second on
/// it starts from the blocks of the turn before, its answer's included: it reads only the
/// block the answer ended in and the new message.
#[test]
fn each_chat_turn_starts_from_the_turns_before() {
    let cached = engine(LoadOptions::default());
    let uncached = engine(LoadOptions {
        prefix_caching: false,
        ..LoadOptions::default()
    });
    let params = greedy(20);
    let mut prompt = ids(3, 60);
    // Positions the turn before computed.
    let mut previous = 0;
    for turn in 0..4u32 {
        let before = cached.batch_stats().prefix_hit_tokens;
        let answer = generate(&cached, &prompt, &params);
        assert_eq!(answer, generate(&uncached, &prompt, &params), "turn {turn}");
        let hits = (cached.batch_stats().prefix_hit_tokens - before) as usize;
        // The last turn's prompt and answer, less the block that holds the answer's last
        // token (whose keys and values no step computed).
        let reusable = previous / BLOCK * BLOCK;
        assert!(
            hits >= reusable,
            "turn {turn}: {hits} tokens from the cache, {reusable} reusable from the turn before"
        );
        previous = prompt.len() + answer.len() - 1;
        prompt.extend(answer);
        prompt.extend(ids(10 + turn, 25));
    }
}

/// A pool too small for the sequences that run together, on the engine's own scheduler
/// thread: however they overlap (preempting one another or not; the scheduler's unit tests
/// drive a preemption turn by turn), every sequence's tokens are those it gives alone and
/// the pool ends empty; a request the pool can never hold is refused at once.
#[test]
fn a_small_pool_serves_each_sequence_its_own_tokens_and_refuses_what_never_fits() {
    // Each sequence (20 + 140 positions) fills the whole pool by itself.
    let params = greedy(140);
    let engine = Arc::new(engine(LoadOptions {
        max_batch: 4,
        kv_budget_tokens: Some(10 * BLOCK),
        prefix_caching: false,
        ..LoadOptions::default()
    }));
    let jobs: Vec<(Vec<u32>, SamplingParams)> =
        (0..4).map(|i| (ids(40 + i, 20), params.clone())).collect();
    let alone: Vec<Vec<u32>> = jobs
        .iter()
        .map(|(prompt, params)| generate(&engine, prompt, params))
        .collect();
    assert_eq!(together(&engine, &jobs), alone);
    let stats = engine.batch_stats();
    assert_eq!(
        (stats.running, stats.waiting, stats.kv_blocks_held),
        (0, 0, 0)
    );

    let error = engine
        .generate_ids(&ids(1, 20), &greedy(10 * BLOCK as u32))
        .unwrap_err();
    assert!(error.to_string().contains("KV pool holds 160"), "{error}");
}
