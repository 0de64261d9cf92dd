//! The real binary on `--device gpu`: the model on wgpu (in CI, Mesa's lavapipe, a software
//! Vulkan) serves a guest's streamed completion and seeded samples; and `--device auto` on a
//! machine whose only adapter is software starts on the CPU without an error-looking line.
//!
//! Where wgpu has no adapter at all, the GPU test says so and passes, unless
//! `RBEE_GPU_TESTS=required` (set by .ci/run once it has installed lavapipe).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{Options, Wait, Worker, greedy};

/// What the worker became: ready to serve, or stopped because it found no adapter.
enum Started {
    Ready(Worker),
    NoAdapter,
}

/// Starts a worker with `args`, its log in `log`, and waits until it is ready or has given up
/// for want of a GPU adapter (the message `device.rs` gives when wgpu finds none at all).
async fn start(args: &[&str], log: &Path) -> Started {
    start_with(Options::new("llm"), args, log).await
}

async fn start_with(mut options: Options, args: &[&str], log: &Path) -> Started {
    options.args = args.iter().map(|arg| arg.to_string()).collect();
    options.wait = Wait::Nothing;
    options.stderr = Some(log.to_owned());
    let worker = Worker::start(options).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("hardware GPU adapter(s) found") && !text.contains("software adapter") {
            return Started::NoAdapter;
        }
        assert!(!text.contains("could not be loaded"), "{text}");
        if let Ok(response) = worker.client.get(worker.url("/info")).send().await
            && let Ok(info) = response.json::<serde_json::Value>().await
            && info["status"] == "ready"
        {
            return Started::Ready(worker);
        }
        assert!(
            Instant::now() < deadline,
            "the worker was not ready within 120 s: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The worker's own cache directory (so a restart finds what the first start kept), and a
/// log that shows CubeCL's count of tuning results read back.
fn keeping(cache: &Path) -> Options {
    let mut options = Options::new("llm");
    options.cache_dir = Some(cache.to_owned());
    options.log_filter = Some("warn,cubecl_runtime::tune=info".into());
    options
}

/// How many kernel tunings the log says were read back from the cache, over all tuners.
fn tunings_read_back(log: &str) -> usize {
    log.lines()
        .filter(|line| line.contains("autotune cached entries"))
        .filter_map(|line| line.split("Loaded ").nth(1)?.split(' ').next())
        .map(|count| count.parse::<usize>().unwrap())
        .sum()
}

#[tokio::test]
async fn device_gpu_streams_a_guests_completion() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let log = dir.path().join("worker.log");
    let worker = match start_with(keeping(&cache), &["--device", "gpu"], &log).await {
        Started::Ready(worker) => worker,
        Started::NoAdapter => {
            assert_ne!(
                std::env::var("RBEE_GPU_TESTS").as_deref(),
                Ok("required"),
                "RBEE_GPU_TESTS=required, but wgpu found no adapter: apt-get install \
                 mesa-vulkan-drivers"
            );
            // Straight to stderr, past the test harness's capture: a skip is news.
            let _ = writeln!(
                std::io::stderr(),
                "tests/e2e/gpu.rs SKIPPED: wgpu found no adapter (apt-get install \
                 mesa-vulkan-drivers, or set RBEE_GPU_TESTS=required to make this a failure)"
            );
            return;
        }
    };
    let info = worker.info().await;
    assert_eq!(info["device"], "GPU-0", "{info}");

    // Few tokens: on lavapipe every kernel runs on the CPU.
    let streamed = worker.infer_stream(greedy("The quick brown fox", 6)).await;
    assert_eq!(streamed.status, 200, "{streamed:?}");
    assert!(streamed.content_type.starts_with("text/event-stream"));
    assert!(streamed.error.is_none(), "{streamed:?}");
    assert!(streamed.done, "no [DONE]: {streamed:?}");
    assert!(!streamed.tokens.is_empty(), "{streamed:?}");
    let (status, whole) = worker.infer(greedy("The quick brown fox", 6)).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(streamed.text(), whole["text"].as_str().unwrap());

    let first_log = std::fs::read_to_string(&log).unwrap();
    assert!(!first_log.contains("XDG_RUNTIME_DIR"), "{first_log}");
    assert_eq!(tunings_read_back(&first_log), 0, "{first_log}");
    drop(worker);

    // The kernels autotune chose are kept in the cache (private, as the guests' are), and a
    // restart reads them back rather than timing the candidates again.
    let tuning = cache.join("gpu-tuning");
    let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&tuning).unwrap());
    assert_eq!(mode & 0o777, 0o700);
    assert!(
        std::fs::read_dir(&tuning).unwrap().next().is_some(),
        "nothing in {}: {first_log}",
        tuning.display()
    );
    let log = dir.path().join("restarted.log");
    let Started::Ready(worker) = start_with(keeping(&cache), &["--device", "gpu"], &log).await
    else {
        panic!("the adapter went away");
    };
    let (status, again) = worker.infer(greedy("The quick brown fox", 6)).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["text"], whole["text"]);
    let restarted_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        tunings_read_back(&restarted_log) > 0,
        "no tuning read back: {restarted_log}"
    );

    // Seeded sampling over the OpenAI route, log-probabilities asked: drawn from the best
    // candidates the device hands back, the same text and log-probabilities as drawn from
    // the logits read whole (a logit bias of 0 makes the host read them), with the nucleus
    // and without (where a draw may walk past the candidates and read the row after all).
    for (temperature, top_p) in [(0.9, 0.95), (2.0, 1.0)] {
        let body = |whole: bool| {
            let mut body = serde_json::json!({
                "prompt": "The quick brown fox", "max_tokens": 8, "seed": 11,
                "temperature": temperature, "top_p": top_p, "logprobs": 2,
            });
            if whole {
                body["logit_bias"] = serde_json::json!({ "5": 0 });
            }
            body
        };
        let (status, on_device) = worker.post_json("/v1/completions", &body(false)).await;
        assert_eq!(status, 200, "{on_device}");
        let (status, whole) = worker.post_json("/v1/completions", &body(true)).await;
        assert_eq!(status, 200, "{whole}");
        let (on_device, whole) = (&on_device["choices"][0], &whole["choices"][0]);
        assert_eq!(
            on_device["text"], whole["text"],
            "temperature {temperature}"
        );
        let logprobs = &on_device["logprobs"];
        assert_eq!(logprobs["tokens"], whole["logprobs"]["tokens"]);
        let values = |logprobs: &serde_json::Value| -> Vec<f64> {
            let values = logprobs["token_logprobs"].as_array().unwrap();
            values.iter().map(|v| v.as_f64().unwrap()).collect()
        };
        let (got, want) = (values(logprobs), values(&whole["logprobs"]));
        assert!(!got.is_empty() && got.len() == want.len(), "{logprobs}");
        for (got, want) in got.iter().zip(&want) {
            assert!((got - want).abs() < 1e-3, "{got} vs {want}");
        }
    }
}

#[tokio::test]
async fn device_auto_without_a_hardware_gpu_starts_quietly_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let Started::Ready(worker) = start(&["--device", "auto"], &log).await else {
        panic!("`--device auto` needs no adapter");
    };
    let info = worker.info().await;
    let log = std::fs::read_to_string(&log).unwrap();
    // Mesa's Vulkan layer used to make libwayland print this twice on a headless machine.
    assert!(!log.contains("XDG_RUNTIME_DIR"), "{log}");
    if info["device"] == "CPU-0" {
        // No GPU (a software adapter is none): nothing at warn level or above.
        assert!(
            !log.contains("WARN") && !log.contains("ERROR") && !log.contains("error"),
            "{log}"
        );
    } else {
        assert_eq!(info["device"], "GPU-0", "{info}");
    }
}
