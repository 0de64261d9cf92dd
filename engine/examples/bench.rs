//! Prefill and decode speed and peak memory of the engine on one model.
//!
//!     cargo build --workspace --bins --examples
//!     $CARGO_TARGET_DIR/debug/examples/bench --model models/SmolLM2-135M-Instruct.Q4_1.gguf
//!
//! (`-p rbee-engine` alone resolves other features than the workspace's and builds the whole
//! tree a second time.) Options: `--help`. Speculative decoding and the prefix cache are off:
//! the prompt repeats itself, and the figures are of the model's steps. Prints one human line
//! and one JSON line (for scripts/bench.sh).
//!
//! `--clients N` (1) runs N generations of the same prompt at once (they share every
//! forward pass) and reports their aggregate decode rate: generated tokens after the first
//! of each, over the time from the last first token to the last token.
//!
//! On a GPU it also counts the device kernels a decode step launches (CubeCL's launch
//! observer): the launches of N generations of `1 + K` tokens less those of N generations
//! of one token, over the K decode steps between them. Kernel launches, not arithmetic,
//! bound a small model's step on a GPU, so this is the figure fusion and batching move —
//! and it needs no GPU of note: lavapipe launches what a real card would.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use rbee_engine::{DeviceChoice, Engine, KvCacheType, LoadOptions, SamplingParams, WeightFormat};

/// Prefill and decode speed and peak memory of the engine on one model.
#[derive(Parser)]
struct Args {
    /// The model: a GGUF file or a Hugging Face folder.
    #[arg(long)]
    model: PathBuf,
    /// cpu, gpu, gpu:N or auto.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    #[arg(long, value_enum, default_value = "auto")]
    weights: Weights,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    new_tokens: u32,
    /// Runs after a warm-up; the best is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Generations of the same prompt at once, sharing every forward pass.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    #[arg(long, value_enum, default_value = "f16")]
    kv_cache_type: KvCache,
    /// Where a GPU keeps its kernel tuning; without it, each run tunes afresh.
    #[arg(long, value_name = "DIR")]
    tuning_cache: Option<PathBuf>,
    /// Sample at this temperature (seeded) rather than greedily: the sampler's cost per token.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// With `--temperature`: the nucleus (1 keeps every token).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
}

#[derive(Clone, Copy, ValueEnum)]
enum Weights {
    Auto,
    F32,
}

#[derive(Clone, Copy, ValueEnum)]
enum KvCache {
    F32,
    F16,
}

fn main() {
    let Args {
        model,
        device,
        weights,
        prompt_tokens,
        new_tokens,
        runs,
        clients,
        kv_cache_type,
        tuning_cache,
        temperature,
        top_p,
    } = Args::parse();
    let weights = match weights {
        Weights::Auto => WeightFormat::Auto,
        Weights::F32 => WeightFormat::F32,
    };
    let kv_cache_type = match kv_cache_type {
        KvCache::F32 => KvCacheType::F32,
        KvCache::F16 => KvCacheType::F16,
    };

    let started = Instant::now();
    let engine = Engine::load(
        &model,
        &LoadOptions {
            device,
            weights,
            max_batch: clients.max(rbee_engine::DEFAULT_MAX_BATCH),
            kv_cache_type,
            speculative: false,
            // Every run reads the same prompt: with the prefix cache, every run after the
            // first would time a cache hit, not a prefill.
            prefix_caching: false,
            tuning_cache,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let load_s = started.elapsed().as_secs_f64();

    // A prompt of exactly `prompt_tokens` tokens from ordinary text.
    let text = "The honey bee is a eusocial flying insect within the genus Apis of the bee clade. \
                Bees live in colonies, build nests from wax, and store honey and pollen. ";
    let mut ids = Vec::new();
    while ids.len() < prompt_tokens {
        ids.extend(engine.tokenize(text).unwrap());
    }
    ids.truncate(prompt_tokens);

    let params = SamplingParams {
        temperature,
        top_p,
        seed: Some(0),
        ..SamplingParams::greedy(new_tokens)
    };
    // The first run warms up (allocations, GPU shader compilation); the best of the rest is
    // reported.
    let mut best: Option<(f64, f64, u32)> = None;
    for run in 0..=runs {
        let (prefill_tps, decode_tps, done) = if clients > 1 {
            together(&engine, &ids, &params, clients)
        } else {
            let (done, _) = engine.generate_ids(&ids, &params).unwrap();
            let prefill_tps = ids.len() as f64 / done.prefill.as_secs_f64();
            // The first new token comes from the prefill's logits; the rest each cost one step.
            let steps = done.generated_tokens.saturating_sub(1).max(1);
            (prefill_tps, steps as f64 / done.decode.as_secs_f64(), done)
        };
        if run == 0 {
            continue;
        }
        let better = best.is_none_or(|(p, d, _)| prefill_tps + decode_tps > p + d);
        if better {
            best = Some((prefill_tps, decode_tps, done.generated_tokens));
        }
    }
    let (prefill_tps, decode_tps, generated) = best.unwrap();
    let launches = launches_per_decode_step(&engine, &ids, &params, clients);
    let peak_mb = peak_rss_mb();
    let clients_note = if clients > 1 {
        format!(" ({clients} clients at once: aggregate)")
    } else {
        String::new()
    };
    println!(
        "{} on {}{clients_note}: load {load_s:.2} s, prefill {prefill_tps:.1} tok/s ({} tokens), decode {decode_tps:.1} tok/s ({generated} tokens), peak RSS {peak_mb:.0} MB",
        engine.info().id,
        engine.info().device,
        ids.len()
    );
    if let Some((launches, by_kernel)) = &launches {
        println!(
            "kernel launches per decode step: {launches:.1} ({:.1} per token; {clients} sequence(s) a step); the most launched:",
            launches / clients as f64
        );
        for (kernel, n) in by_kernel.iter().take(12) {
            println!("  {n:8.1}  {kernel}");
        }
    }
    let launches = launches.map_or("null".to_string(), |(l, _)| format!("{l:.1}"));
    println!(
        "{{\"engine\":\"rbee-engine\",\"device\":\"{}\",\"weights\":\"{weights:?}\",\"prefill_tps\":{prefill_tps:.2},\"decode_tps\":{decode_tps:.2},\"prompt_tokens\":{},\"new_tokens\":{generated},\"clients\":{clients},\"launches_per_decode_step\":{launches},\"peak_rss_mb\":{peak_mb:.1},\"load_s\":{load_s:.2}}}",
        engine.info().device,
        ids.len()
    );
}

/// Device kernels launched per decode step of `clients` generations of `ids` at once, on a
/// GPU, and the most launched kernels' shares of them (`None` on the CPU, which launches
/// none).
#[cfg(feature = "wgpu")]
fn launches_per_decode_step(
    engine: &Engine,
    ids: &[u32],
    params: &SamplingParams,
    clients: usize,
) -> Option<(f64, Vec<(String, f64)>)> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use burn::cubecl::config::{TypeNameFormatLevel, type_name_format};
    use burn::cubecl::logging::{LaunchObservation, LaunchObserver};

    /// Launches by kernel name.
    #[derive(Default)]
    struct Count(Mutex<HashMap<&'static str, u64>>);
    impl LaunchObserver for Count {
        fn launched(&self, kernel: &'static str) {
            *self.0.lock().unwrap().entry(kernel).or_default() += 1;
        }
    }

    if engine.info().device.starts_with("CPU") {
        return None;
    }
    // Launches by kernel and tokens per generation.
    let launches = |new_tokens: u32| {
        let count = Arc::new(Count::default());
        let watching = LaunchObservation::new(count.clone());
        // As the runs sample (a sampled row's candidates are found on the device).
        let params = SamplingParams {
            max_tokens: new_tokens,
            ..params.clone()
        };
        let (_, _, done) = together(engine, ids, &params, clients);
        drop(watching);
        let by_kernel = std::mem::take(&mut *count.0.lock().unwrap());
        (by_kernel, done.generated_tokens)
    };
    let (first_token, _) = launches(1);
    let (more, generated) = launches(9);
    let steps = generated.checked_sub(1).filter(|&s| s > 0)? as f64;
    let mut per_step: Vec<(String, f64)> = more
        .iter()
        .map(|(kernel, &n)| {
            let before = first_token.get(kernel).copied().unwrap_or(0);
            let name = type_name_format(kernel, TypeNameFormatLevel::Short);
            (name, n.saturating_sub(before) as f64 / steps)
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    per_step.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total = per_step.iter().map(|(_, n)| n).sum();
    Some((total, per_step))
}

#[cfg(not(feature = "wgpu"))]
fn launches_per_decode_step(
    _: &Engine,
    _: &[u32],
    _: &SamplingParams,
    _: usize,
) -> Option<(f64, Vec<(String, f64)>)> {
    None
}

/// `clients` generations of `ids` at once: (aggregate prefill tok/s, aggregate decode tok/s,
/// one of the completions). Prefill: all prompts over the time to the last first token;
/// decode: the tokens after each first one over the time from the last first token to the
/// last token.
fn together(
    engine: &Engine,
    ids: &[u32],
    params: &SamplingParams,
    clients: usize,
) -> (f64, f64, rbee_engine::Completion) {
    let started = Instant::now();
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| {
                    let (done, _) = engine.generate_ids(ids, params).unwrap();
                    (done, started.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // A generation's prefill ends at its first token; its decode runs from there to its end.
    let first_tokens = results
        .iter()
        .map(|(done, ended)| ended.saturating_sub(done.decode))
        .max()
        .unwrap();
    let last = results.iter().map(|(_, ended)| *ended).max().unwrap();
    let decoded: u32 = results
        .iter()
        .map(|(done, _)| done.generated_tokens.saturating_sub(1))
        .sum();
    let prefill_tps = (ids.len() * clients) as f64 / first_tokens.as_secs_f64();
    let decode_tps = decoded as f64 / (last - first_tokens).as_secs_f64();
    (
        prefill_tps,
        decode_tps,
        results.into_iter().next().unwrap().0,
    )
}

/// Peak resident memory of this process (Linux `VmHWM`), in MB; 0 where unknown.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}
