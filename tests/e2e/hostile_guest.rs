//! A hostile guest costs only its own request: what it can make the host hold — a thread,
//! log lines, memory for its output or its tokenizer calls, its stderr — is bounded, and the
//! worker answers the next request at once. The `chaos` guest plays the attacker; memory is
//! the worker's peak resident set (VmHWM), measured around each attack.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::harness::{Options, Worker, greedy};

const MIB: u64 = 1 << 20;

/// Peak resident memory of process `pid` so far, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .expect("no VmHWM in /proc/<pid>/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse().ok())
        .unwrap();
    kib * 1024
}

/// A normal request right after an attack answers, and quickly.
async fn still_serves(worker: &Worker) {
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(30),
        worker.infer(greedy("a normal request", 4)),
    )
    .await
    .expect("a normal request got no answer within 30 s");
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a normal request took {:?}",
        started.elapsed()
    );
}

/// A streaming request whose first piece has arrived; the rest is left unread.
async fn start_stream(worker: &Worker, prompt: &str) -> reqwest::Response {
    let response = worker
        .client
        .post(worker.url("/v1/infer"))
        .json(&json!({ "prompt": prompt, "stream": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "`{prompt}` was refused");
    response
}

/// All the text of an SSE response, read to its end or to where the connection broke.
async fn read_all(response: reqwest::Response) -> String {
    let mut body = response.bytes_stream();
    let mut text = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        text.extend_from_slice(&chunk);
    }
    String::from_utf8(text).unwrap()
}

#[tokio::test]
async fn a_guest_asleep_in_wasi_is_stopped_at_its_time_limit() {
    let worker = Worker::start(
        Options::new("chaos")
            .arg("--guest-timeout=1")
            .arg("--max-concurrent=1"),
    )
    .await;
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(20),
        worker.infer(json!({ "prompt": "sleep" })),
    )
    .await
    .expect("no answer: the sleeping guest holds its thread past its time limit");
    assert_eq!(status, 504, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("time limit"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    still_serves(&worker).await;
}

#[tokio::test]
async fn a_guest_asleep_in_wasi_stops_when_its_client_leaves() {
    // One place: the next request can only run once the sleeping guest has stopped.
    let worker = Worker::start(
        Options::new("chaos")
            .arg("--guest-timeout=600")
            .arg("--max-concurrent=1"),
    )
    .await;
    let response = start_stream(&worker, "sleep").await;
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("sleeping"));
    drop(body);
    still_serves(&worker).await;
}

#[tokio::test]
async fn the_shutdown_cut_reaches_a_guest_asleep_in_wasi() {
    let mut worker = Worker::start(
        Options::new("chaos")
            .arg("--guest-timeout=600")
            .arg("--shutdown-grace=1"),
    )
    .await;
    let response = start_stream(&worker, "sleep").await;
    worker.signal("TERM");
    // After the grace period the cut stops the guest, so its stream ends with an error
    // event; a guest the cut cannot reach is still asleep when the server is aborted, and
    // its stream just breaks off.
    let text = read_all(response).await;
    assert!(
        text.contains(r#"data: {"error""#),
        "the stream broke off without its end: {text:?}"
    );
    worker.wait_exit(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_guest_cannot_forge_host_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let mut options = Options::new("chaos").arg("--guest-timeout=10");
    options.stderr = Some(log.clone());
    let worker = Worker::start(options).await;
    // 1000 lines of 1 MiB, each full of "\nERROR rbee_host: forged".
    let started = Instant::now();
    let (status, body) = worker.infer(json!({ "prompt": "forge-logs" })).await;
    let took = started.elapsed().as_secs_f64();
    assert_eq!(status, 200, "{body}");
    still_serves(&worker).await;
    let log = std::fs::read(&log).unwrap();
    let log = String::from_utf8_lossy(&log);
    let forged: Vec<&str> = log
        .lines()
        .filter(|line| line.starts_with("ERROR rbee_host"))
        .take(3)
        .collect();
    assert!(forged.is_empty(), "forged log lines: {forged:?}");
    // A burst of 64 lines, then 16 a second, of at most 4 KiB each; the note that the rest
    // was dropped, once.
    let allowed = 64 + (16.0 * took).ceil() as usize;
    let logged = log.lines().filter(|line| line.contains("forged")).count();
    assert!(
        logged > 0,
        "no guest line reached the log: the test proves nothing"
    );
    assert!(
        logged <= allowed,
        "{logged} guest lines in {took:.1} s: not rate-limited"
    );
    // Each line: the message cut to 4 KiB, the time, level, target and guest field around
    // it; and the worker's own few lines.
    assert!(
        log.len() < allowed * (4096 + 512) + (16 << 10),
        "{} bytes of log for {logged} lines",
        log.len()
    );
    assert_eq!(
        log.matches("further lines of this request are dropped")
            .count(),
        1,
        "{}",
        &log[log.len().saturating_sub(2000)..]
    );
}

/// The worker for the memory attacks: guests may use enough memory for large pieces.
async fn roomy_worker() -> Worker {
    Worker::start(
        Options::new("chaos")
            .arg("--guest-timeout=10")
            .arg("--guest-memory-mb=512")
            .arg("--max-concurrent=4"),
    )
    .await
}

#[tokio::test]
async fn an_emit_larger_than_the_cap_is_refused() {
    let worker = roomy_worker().await;
    still_serves(&worker).await;
    let before = peak_rss(worker.pid());
    // 256 pieces of 1 MiB to a client that does not read.
    let response = worker
        .client
        .post(worker.url("/v1/infer"))
        .json(&json!({ "prompt": "pour-1024-256", "stream": true }))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = peak_rss(worker.pid()).saturating_sub(before);
    eprintln!("peak memory grew {} KiB", grown >> 10);
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(grown < 16 * MIB, "peak memory grew {} MiB", grown / MIB);
    assert_eq!(status, 400, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("at most 262144 bytes per call"),
        "{body}"
    );
    still_serves(&worker).await;
}

#[tokio::test]
async fn a_client_that_does_not_read_holds_a_bounded_buffer() {
    let worker = roomy_worker().await;
    // Warm up the same path: a small pour read to its end.
    let poured = read_all(start_stream(&worker, "pour-256-4").await).await;
    assert!(poured.contains("poured"), "{poured}");
    let before = peak_rss(worker.pid());
    // Four streams of 64 pieces of 256 KiB (the most one emit may send), none read.
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(start_stream(&worker, "pour-256-64").await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = peak_rss(worker.pid()).saturating_sub(before);
    eprintln!("peak memory grew {} KiB", grown >> 10);
    assert!(
        grown < 16 * MIB,
        "four unread streams grew peak memory {} MiB",
        grown / MIB
    );
    // The guests were waiting, not failing: read now, every stream ends well.
    for stream in streams {
        let text = read_all(stream).await;
        let tail = &text[text.len().saturating_sub(100)..];
        assert!(tail.contains("poured"), "...{tail}");
        assert!(tail.trim_end().ends_with("data: [DONE]"), "...{tail}");
    }
    still_serves(&worker).await;
}

#[tokio::test]
async fn tokenizing_text_that_cannot_fit_is_refused_at_once() {
    let worker = roomy_worker().await;
    still_serves(&worker).await;
    let before = peak_rss(worker.pid());
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(60),
        worker.infer(json!({ "prompt": "tokenize-48" })),
    )
    .await
    .expect("tokenizing 48 MiB got no answer within 60 s");
    let took = started.elapsed();
    let grown = peak_rss(worker.pid()).saturating_sub(before);
    eprintln!("peak memory grew {} KiB", grown >> 10);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("can ever fit"),
        "{body}"
    );
    assert!(took < Duration::from_secs(3), "the refusal took {took:?}");
    // The guest's own 48 MiB and the host's copy of the argument, nothing for tokens.
    assert!(grown < 160 * MIB, "peak memory grew {} MiB", grown / MIB);
    still_serves(&worker).await;
}

#[tokio::test]
async fn a_trap_after_much_stderr_keeps_the_panic_message() {
    let worker = Worker::start(Options::new("chaos")).await;
    // 1 MiB of noise on stderr, then the panic.
    let (status, body) = worker.infer(json!({ "prompt": "noisy-trap" })).await;
    assert_eq!(status, 500, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("trapped on purpose"),
        "the panic message is lost: {error}"
    );
    assert!(error.len() < 4096, "{} bytes of error", error.len());
    still_serves(&worker).await;
}

#[tokio::test]
async fn a_guest_holding_ever_more_handles_is_stopped_early() {
    let worker = roomy_worker().await;
    still_serves(&worker).await;
    let before = peak_rss(worker.pid());
    // Clock pollables, one after another, never dropped.
    let (status, body) = worker.infer(json!({ "prompt": "handles" })).await;
    let grown = peak_rss(worker.pid()).saturating_sub(before);
    eprintln!("peak memory grew {} KiB", grown >> 10);
    assert_eq!(status, 500, "{body}");
    assert!(body["error"].as_str().unwrap().contains("chaos"), "{body}");
    // wasmtime's own bound, a million entries, lets it grow the host's memory by 20 MiB.
    assert!(
        grown < 4 * MIB,
        "the guest's handles grew peak memory {} MiB",
        grown / MIB
    );
    still_serves(&worker).await;
}
