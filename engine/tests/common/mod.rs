//! Shared helpers for the engine's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rbee_engine::{DeviceChoice, Engine, LoadOptions, SamplingParams, WeightFormat};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn load(path: &Path, weights: WeightFormat) -> Engine {
    Engine::load(
        path,
        &LoadOptions {
            device: DeviceChoice::Cpu,
            weights,
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// One engine per fixture per test binary (loading is quick, but tests run in parallel).
pub fn tiny_llama() -> Arc<Engine> {
    static ENGINE: OnceLock<Mutex<Option<Arc<Engine>>>> = OnceLock::new();
    let cell = ENGINE.get_or_init(|| Mutex::new(None));
    let mut guard = cell.lock().unwrap();
    guard
        .get_or_insert_with(|| Arc::new(load(&fixtures().join("tiny-llama"), WeightFormat::F32)))
        .clone()
}

pub fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams::greedy(max_tokens)
}

/// Runs every job at once, each thread starting a little after the previous one, so the
/// sequences join the batch at different steps; returns each job's generated ids.
pub fn together(engine: &Arc<Engine>, jobs: &[(Vec<u32>, SamplingParams)]) -> Vec<Vec<u32>> {
    let handles: Vec<_> = jobs
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, (prompt, params))| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(3 * i as u64));
                engine.generate_ids(&prompt, &params).unwrap().1
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Runs `jobs` one after another, then all at once ([`together`]), and asserts that every
/// job's tokens are the same both ways, that some pass served two sequences and that none
/// served more than `max_batch`. `label` names the case in the messages.
pub fn assert_same_alone_and_batched(
    engine: &Arc<Engine>,
    jobs: &[(Vec<u32>, SamplingParams)],
    max_batch: usize,
    label: &str,
) {
    let alone: Vec<Vec<u32>> = jobs
        .iter()
        .map(|(prompt, params)| engine.generate_ids(prompt, params).unwrap().1)
        .collect();
    let before = engine.batch_stats();
    let batched = together(engine, jobs);
    let stats = engine.batch_stats();
    assert!(
        stats.batched_steps > before.batched_steps,
        "{label}: no pass served two sequences ({stats:?})"
    );
    assert!(
        stats.most_sequences <= max_batch as u64,
        "max_batch is {max_batch}: {stats:?}"
    );
    for (i, (alone, batched)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(alone, batched, "{label}: sequence {i} alone vs batched");
    }
}

/// A fresh, empty scratch folder under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rbee-engine-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of fixture `model` (a Hugging Face folder of f32 safetensors) with every f32
/// tensor rounded to bf16, as Hugging Face ships most checkpoints (SmolLM2, Llama, Qwen,
/// Mistral); the other files are copied as they are.
pub fn bf16_copy(model: &str) -> PathBuf {
    let from = fixtures().join(model);
    let dir = scratch(&format!("{model}-bf16"));
    for entry in std::fs::read_dir(&from).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name != "model.safetensors" {
            std::fs::copy(&path, dir.join(name)).unwrap();
        }
    }
    let bytes = std::fs::read(from.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let mut tensors: Vec<(String, serde_json::Value)> = header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .collect();
    tensors.sort_by_key(|(_, info)| info["data_offsets"][0].as_u64());
    let (mut new_header, mut new_data) = (serde_json::Map::new(), Vec::new());
    for (name, mut info) in tensors {
        let span = |k: usize| info["data_offsets"][k].as_u64().unwrap() as usize;
        let raw = &data[span(0)..span(1)];
        let start = new_data.len();
        if info["dtype"] == "F32" {
            for value in raw.chunks_exact(4) {
                let value = f32::from_le_bytes(value.try_into().unwrap());
                new_data.extend(half::bf16::from_f32(value).to_le_bytes());
            }
            info["dtype"] = "BF16".into();
        } else {
            new_data.extend_from_slice(raw);
        }
        info["data_offsets"] = serde_json::json!([start, new_data.len()]);
        new_header.insert(name, info);
    }
    let mut header = serde_json::to_vec(&new_header).unwrap();
    // The data starts 8-aligned, as the format asks.
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    file.extend(new_data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
    dir
}
