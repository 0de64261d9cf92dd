//! Hot-swapping the guest under load: file changes, SIGHUP, the admin endpoint, and invalid
//! components in between. No request may fail, every response must come entirely from one
//! guest version, and each swap's new behaviour must become visible.
//!
//! The two versions: `llm` answers the model's text, `shout` the same text upper-cased.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Options, Worker, greedy, guest};

const PROMPT: &str = "Tell me about rivers";
const TOKENS: u32 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Llm,
    Shout,
}

struct Versions {
    llm: String,
    shout: String,
}

impl Versions {
    fn classify(&self, text: &str) -> Option<Version> {
        if text == self.llm {
            Some(Version::Llm)
        } else if text == self.shout {
            Some(Version::Shout)
        } else {
            None
        }
    }
}

/// Replaces the file atomically, as deployment tools do (write aside, rename over).
fn install(from: &Path, to: &Path) {
    let aside = to.with_extension("wasm.new");
    std::fs::copy(from, &aside).unwrap();
    std::fs::rename(&aside, to).unwrap();
}

/// Rewrites the file in place in two halves with a pause, as a slow `cp` would.
fn write_in_pieces(from: &Path, to: &Path) {
    use std::io::Write;
    let bytes = std::fs::read(from).unwrap();
    let mut file = std::fs::File::create(to).unwrap();
    let half = bytes.len() / 2;
    file.write_all(&bytes[..half]).unwrap();
    file.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    file.write_all(&bytes[half..]).unwrap();
}

async fn current_version(worker: &Worker, versions: &Versions) -> Option<Version> {
    let (status, body) = worker.infer(greedy(PROMPT, TOKENS)).await;
    assert_eq!(status, 200, "{body}");
    versions.classify(body["text"].as_str().unwrap())
}

/// Polls until `expected` serves; returns how long that took.
async fn wait_for_version(worker: &Worker, versions: &Versions, expected: Version) -> Duration {
    let started = Instant::now();
    loop {
        if current_version(worker, versions).await == Some(expected) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{expected:?} never served"
        );
    }
}

async fn admin_put(worker: &Worker, body: Vec<u8>) -> (u16, Value) {
    let response = worker
        .client
        .put(worker.url("/v1/admin/guest"))
        .bearer_auth("swap-secret")
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Streaming and non-streaming clients in a loop until `stop`; returns each request's
/// latency. Panics on any failure or mixed response.
async fn client(
    worker: Arc<Worker>,
    versions: Arc<Versions>,
    stop: Arc<AtomicBool>,
    stream: bool,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let text = if stream {
            let streamed = worker.infer_stream(greedy(PROMPT, TOKENS)).await;
            assert_eq!(streamed.status, 200, "{streamed:?}");
            assert!(streamed.done && streamed.error.is_none(), "{streamed:?}");
            streamed.text()
        } else {
            let (status, body) = worker.infer(greedy(PROMPT, TOKENS)).await;
            assert_eq!(status, 200, "{body}");
            body["text"].as_str().unwrap().to_owned()
        };
        latencies.push(started.elapsed());
        assert!(
            versions.classify(&text).is_some(),
            "a response mixes guest versions: {text:?}"
        );
    }
    latencies
}

fn mean(latencies: &[Duration]) -> Duration {
    latencies.iter().sum::<Duration>() / latencies.len().max(1) as u32
}

async fn run_clients<F: Future<Output = ()>>(
    worker: &Arc<Worker>,
    versions: &Arc<Versions>,
    during: F,
) -> Vec<Duration> {
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(client(
                worker.clone(),
                versions.clone(),
                stop.clone(),
                i % 2 == 0,
            ))
        })
        .collect();
    during.await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await.expect("a client failed"));
    }
    latencies
}

#[tokio::test]
async fn swaps_under_load_fail_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.wasm");
    let (llm, shout) = (guest("llm"), guest("shout"));
    install(&llm, &live);
    let mut options = Options::new("llm")
        .arg("--admin-token=swap-secret")
        .arg("--max-concurrent=4")
        .arg("--queue-size=64");
    options.guest = live.clone();
    let worker = Arc::new(Worker::start(options).await);

    let (_, body) = worker.infer(greedy(PROMPT, TOKENS)).await;
    let text = body["text"].as_str().unwrap().to_owned();
    assert_ne!(
        text,
        text.to_uppercase(),
        "the reference text cannot tell the guests apart"
    );
    let versions = Arc::new(Versions {
        shout: text.to_uppercase(),
        llm: text,
    });

    // Baseline: the same clients, no swaps.
    let baseline = run_clients(
        &worker,
        &versions,
        tokio::time::sleep(Duration::from_secs(2)),
    )
    .await;

    let mut file_swaps = Vec::new();
    let swapping = async {
        for round in 0..3 {
            // 1. The file changes on disk (atomic replacement, then an in-place slow write).
            let changed = Instant::now();
            install(&shout, &live);
            wait_for_version(&worker, &versions, Version::Shout).await;
            file_swaps.push(changed.elapsed());
            let changed = Instant::now();
            let back = live.clone();
            let from = llm.clone();
            tokio::task::spawn_blocking(move || write_in_pieces(&from, &back))
                .await
                .unwrap();
            wait_for_version(&worker, &versions, Version::Llm).await;
            file_swaps.push(changed.elapsed());

            // 2. The admin endpoint: live as soon as it answers.
            let (status, answer) = admin_put(&worker, std::fs::read(&shout).unwrap()).await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["swapped"], true);
            assert_eq!(
                current_version(&worker, &versions).await,
                Some(Version::Shout)
            );

            // 3. SIGHUP reloads the file (still `llm`) over the uploaded guest.
            worker.signal("HUP");
            wait_for_version(&worker, &versions, Version::Llm).await;

            // 4. Invalid components are refused; the current guest keeps serving.
            let (status, answer) = admin_put(&worker, b"\0asm not really".to_vec()).await;
            assert_eq!(status, 400, "{answer}");
            std::fs::write(dir.path().join("live.wasm.new"), format!("garbage {round}")).unwrap();
            std::fs::rename(dir.path().join("live.wasm.new"), &live).unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            let info = worker.info().await;
            assert!(info["guest"]["last_failure"]["error"].is_string(), "{info}");
            assert_eq!(
                current_version(&worker, &versions).await,
                Some(Version::Llm)
            );
            install(&llm, &live);
        }
    };
    let during = run_clients(&worker, &versions, swapping).await;

    let info = worker.info().await;
    assert!(
        info["guest"]["active"]["generation"].as_u64().unwrap() >= 13,
        "{info}"
    );
    let file_mean = mean(&file_swaps);
    eprintln!(
        "hot swap: {} requests during swaps, 0 failed; file change → new guest serving: mean {:?}, max {:?}; \
         request latency during swaps / without: {:.2} ({:?} / {:?}, {} baseline requests)",
        during.len(),
        file_mean,
        file_swaps.iter().max().unwrap(),
        mean(&during).as_secs_f64() / mean(&baseline).as_secs_f64(),
        mean(&during),
        mean(&baseline),
        baseline.len(),
    );
}

#[tokio::test]
async fn the_admin_endpoint_needs_the_token() {
    let worker = Worker::start(Options::new("llm").arg("--admin-token=swap-secret")).await;
    let shout = std::fs::read(guest("shout")).unwrap();
    let anonymous = worker
        .client
        .put(worker.url("/v1/admin/guest"))
        .body(shout.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    let wrong = worker
        .client
        .put(worker.url("/v1/admin/guest"))
        .bearer_auth("guess")
        .body(shout)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    let status: Value = worker
        .client
        .get(worker.url("/v1/admin/guest"))
        .bearer_auth("swap-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["active"]["name"], "llm");
    assert!(status["last_failure"].is_null());
}

#[tokio::test]
async fn a_restart_loads_the_guest_from_the_compile_cache() {
    let cache = tempfile::tempdir().unwrap();
    let options = || {
        let mut options = Options::new("llm");
        options.cache_dir = Some(cache.path().to_owned());
        options
    };
    let first = Worker::start(options()).await;
    assert_eq!(first.info().await["guest"]["active"]["from_cache"], false);
    drop(first);
    // A second worker on the same cache directory skips compilation.
    let second = Worker::start(options()).await;
    let active = &second.info().await["guest"]["active"];
    assert_eq!(active["from_cache"], true, "{active}");
}
