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

/// A fresh, empty scratch folder under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rbee-engine-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
