//! Start-up, busy/ready, client disconnects and shutdown, with a real (slow enough) model.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use crate::harness::{Options, Queen, Wait, Worker, cpu_load, greedy, smollm2, tiny_model};

/// A prompt SmolLM2 continues greedily for thousands of tokens (it counts on; a prompt such as
/// "Here is a list of five hundred cities" ends after about 30), so a generation of 2000 tokens
/// from it runs for about a minute on a CPU.
const ENDLESS: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";

/// While the model loads, `/info` says `starting` and `/v1/infer` answers 503. The model's
/// tokenizer.json is a FIFO the test writes only after checking, so loading really waits.
#[tokio::test]
async fn starting_until_the_model_is_loaded() {
    let model = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "tokenizer.json" {
            std::fs::copy(entry.path(), model.path().join(entry.file_name())).unwrap();
        }
    }
    let tokenizer = model.path().join("tokenizer.json");
    let made = std::process::Command::new("mkfifo")
        .arg(&tokenizer)
        .status()
        .unwrap();
    assert!(made.success());
    let mut options = Options::new("llm");
    options.model = model.path().to_owned();
    options.wait = Wait::Http;
    let worker = Worker::start(options).await;

    assert_eq!(worker.info().await["status"], "starting");
    let (status, body) = worker.infer(greedy("too early", 2)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("starting"));

    let contents = std::fs::read(tiny_model().join("tokenizer.json")).unwrap();
    tokio::task::spawn_blocking(move || std::fs::write(tokenizer, contents))
        .await
        .unwrap()
        .unwrap();
    worker.wait_for_status("ready").await;
    let (status, _) = worker.infer(greedy("now", 2)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_model_that_cannot_load_stops_the_worker() {
    let queen = Queen::start(Duration::ZERO).await;
    let missing = tempfile::tempdir().unwrap();
    let mut options = Options::new("llm").arg(format!("--queen-url={}", queen.url));
    options.model = missing.path().join("nothing-here");
    options.wait = Wait::Nothing;
    let mut worker = Worker::start(options).await;
    let exit = worker.wait_exit(Duration::from_secs(30)).await;
    assert!(!exit.success());
    queen
        .wait_for("with status stopped", |beat| {
            beat.body["worker"]["status"] == "stopped"
        })
        .await;
}

#[tokio::test]
async fn sigterm_finishes_in_flight_work_then_exits_zero() {
    let queen = Queen::start(Duration::ZERO).await;
    let mut worker = Worker::start(
        Options::new("chaos")
            .arg(format!("--queen-url={}", queen.url))
            .arg("--shutdown-grace=10"),
    )
    .await;
    // A request that takes a while is in flight when the signal arrives…
    let in_flight = worker.infer(json!({ "prompt": "slow-800", "max_tokens": 2 }));
    let signal = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        worker.signal("TERM");
    };
    let ((status, body), ()) = tokio::join!(in_flight, signal);
    // …and still gets its answer.
    assert_eq!(status, 200, "{body}");
    let exit = worker.wait_exit(Duration::from_secs(20)).await;
    assert!(exit.success(), "{exit:?}");
    let last = queen.beats().last().cloned().unwrap();
    assert_eq!(last.body["worker"]["status"], "stopped");
}

#[tokio::test]
#[ignore = "needs SmolLM2 (scripts/fetch-model.sh; scripts/test.sh then runs it)"]
async fn past_the_grace_period_running_generations_are_cut() {
    use eventsource_stream::Eventsource;
    let mut options = Options::new("llm").arg("--shutdown-grace=1");
    options.model = smollm2();
    let mut worker = Worker::start(options).await;
    // Far more tokens than the grace period allows on a CPU.
    let response = worker
        .client
        .post(worker.url("/v1/infer"))
        .json(&json!({ "prompt": ENDLESS, "max_tokens": 2000, "temperature": 0.0, "stream": true }))
        .send()
        .await
        .unwrap();
    let mut events = response.bytes_stream().eventsource();
    let first = events.next().await.unwrap().unwrap();
    assert!(first.data.contains("token"), "{first:?}");
    let signalled = std::time::Instant::now();
    worker.signal("TERM");
    let mut after = 0;
    while let Some(Ok(_)) = events.next().await {
        after += 1;
    }
    // The grace (1 s) plus the cut's own allowance (2 s), with room for a loaded machine.
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "not cut: {:?}, {after} events",
        signalled.elapsed()
    );
    assert!(after < 1999, "the generation ran to the end");
    let exit = worker.wait_exit(Duration::from_secs(20)).await;
    assert!(exit.success());
}

/// A streaming client that goes away mid-generation: the worker stops computing for it (its
/// CPU time stops growing) and its slot serves the next request at once. The generation asked
/// for would run for about a minute, so one that kept running would be seen doing so.
#[tokio::test]
#[ignore = "needs SmolLM2 (scripts/fetch-model.sh; scripts/test.sh then runs it)"]
async fn a_client_that_disconnects_stops_its_generation() {
    let mut options = Options::new("llm").arg("--max-concurrent=1");
    options.model = smollm2();
    let worker = Worker::start(options).await;
    let response = worker
        .client
        .post(worker.url("/v1/infer"))
        .json(&json!({ "prompt": ENDLESS, "max_tokens": 2000, "temperature": 0.0, "stream": true }))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    // Decoding: what a running generation costs, as the measure below sees it. The client
    // does not read meanwhile; the text is far smaller than the buffers on the way, so the
    // generation does not wait for it.
    let generating = cpu_load(worker.pid(), Duration::from_secs(2)).await;
    assert!(
        generating > 0.3,
        "a generation should keep a core busy: {generating:.2} CPU-s/s"
    );
    drop(body);
    // The host notices at its next write, one token later; give it a moment, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = cpu_load(worker.pid(), Duration::from_secs(2)).await;
    assert!(
        after < generating / 5.0,
        "the abandoned generation kept running: {after:.2} CPU-s/s after the disconnect, \
         {generating:.2} while generating"
    );
    // With one slot, the next request runs only once the abandoned generation has given it up.
    let started = std::time::Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(30), worker.infer(greedy("Hi", 2))).await;
    let (status, body) = next.expect("the abandoned generation kept its slot");
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the next request waited {:?}",
        started.elapsed()
    );
}

/// A model folder whose tokenizer.json is a FIFO nobody writes: loading it blocks for good.
fn model_that_never_loads() -> tempfile::TempDir {
    let model = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "tokenizer.json" {
            std::fs::copy(entry.path(), model.path().join(entry.file_name())).unwrap();
        }
    }
    let made = std::process::Command::new("mkfifo")
        .arg(model.path().join("tokenizer.json"))
        .status()
        .unwrap();
    assert!(made.success());
    model
}

/// A model load that never ends does not keep the worker from exiting: SIGTERM, the final
/// `stopped` beat, exit (it used to wait for the loading thread for ever).
#[tokio::test]
async fn a_stuck_model_load_does_not_keep_the_worker_from_exiting() {
    let queen = Queen::start(Duration::ZERO).await;
    let model = model_that_never_loads();
    let mut options = Options::new("llm").arg(format!("--queen-url={}", queen.url));
    options.model = model.path().to_owned();
    options.wait = Wait::Http;
    let mut worker = Worker::start(options).await;
    assert_eq!(worker.info().await["status"], "starting");
    let signalled = std::time::Instant::now();
    worker.signal("TERM");
    let exit = worker.wait_exit(Duration::from_secs(15)).await;
    assert!(exit.success(), "{exit:?}");
    eprintln!("exited {:?} after SIGTERM", signalled.elapsed());
    let last = queen.beats().last().cloned().unwrap();
    assert_eq!(last.body["worker"]["status"], "stopped");
}

/// A second SIGTERM exits at once, without waiting for the grace period or the request in
/// flight (which computes for 8 s; the grace is 30 s).
#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut worker = Worker::start(Options::new("chaos").arg("--shutdown-grace=30")).await;
    let client = worker.client.clone();
    let url = worker.url("/v1/infer");
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({ "prompt": "slow-8000", "max_tokens": 2 }))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = std::time::Instant::now();
    worker.signal("TERM");
    let exit = worker.wait_exit(Duration::from_secs(20)).await;
    let took = second.elapsed();
    eprintln!("exited {took:?} after the second signal");
    assert!(
        took < Duration::from_secs(2),
        "exited {took:?} after the second signal"
    );
    assert!(!exit.success(), "{exit:?}");
    in_flight.abort();
}

/// Draining is not `ready`: the queen hears `stopped` as soon as the signal arrives, while
/// the request in flight is still running (it used to hear it only after the grace period),
/// and the request still gets its answer.
#[tokio::test]
async fn draining_starts_by_leaving_ready() {
    let queen = Queen::start(Duration::ZERO).await;
    let mut worker = Worker::start(
        Options::new("chaos")
            .arg(format!("--queen-url={}", queen.url))
            .arg("--heartbeat-interval=3600")
            .arg("--shutdown-grace=20"),
    )
    .await;
    queen
        .wait_for("ready", |beat| beat.body["worker"]["status"] == "ready")
        .await;
    let in_flight = worker.infer(json!({ "prompt": "slow-3000", "max_tokens": 2 }));
    let signal = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        worker.signal("TERM");
        let signalled = std::time::Instant::now();
        let stopped = queen
            .wait_for("stopped", |beat| beat.body["worker"]["status"] == "stopped")
            .await;
        stopped.at.duration_since(signalled)
    };
    let ((status, body), heard_after) = tokio::join!(in_flight, signal);
    let answered = std::time::Instant::now();
    eprintln!("the queen heard `stopped` {heard_after:?} after the signal");
    assert_eq!(status, 200, "{body}");
    assert!(
        heard_after < Duration::from_secs(1),
        "the queen heard `stopped` {heard_after:?} after the signal"
    );
    let stopped = queen
        .beats()
        .into_iter()
        .find(|beat| beat.body["worker"]["status"] == "stopped")
        .unwrap();
    assert!(stopped.at < answered, "`stopped` only after the answer");
    assert!(worker.wait_exit(Duration::from_secs(20)).await.success());
}

/// A guest stuck in a blocking call (chaos `sleep`: an hour in WASI) does not keep the worker
/// from exiting: SIGTERM, the grace period (1 s), the cut, the final `stopped` beat, exit.
#[tokio::test]
async fn a_stuck_guest_does_not_keep_the_worker_from_exiting() {
    let queen = Queen::start(Duration::ZERO).await;
    let mut worker = Worker::start(
        Options::new("chaos")
            .arg(format!("--queen-url={}", queen.url))
            .arg("--shutdown-grace=1")
            .arg("--guest-timeout=3600"),
    )
    .await;
    let client = worker.client.clone();
    let url = worker.url("/v1/infer");
    let stuck = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({ "prompt": "sleep", "max_tokens": 2 }))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = std::time::Instant::now();
    worker.signal("TERM");
    let exit = worker.wait_exit(Duration::from_secs(20)).await;
    let took = signalled.elapsed();
    eprintln!("exited {took:?} after SIGTERM with a guest asleep in WASI");
    assert!(exit.success(), "{exit:?}");
    assert!(
        took < Duration::from_secs(10),
        "exited {took:?} after SIGTERM"
    );
    let last = queen.beats().last().cloned().unwrap();
    assert_eq!(last.body["worker"]["status"], "stopped");
    stuck.abort();
}
