//! A guest that misbehaves fails its own request only: the right error, a healthy worker
//! afterwards, and other requests served meanwhile (the `chaos` guest serves any prompt it
//! does not recognise as an instruction to misbehave).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Options, Worker, greedy};

async fn chaos_worker() -> Worker {
    Worker::start(
        Options::new("chaos")
            .arg("--max-concurrent=4")
            .arg("--guest-timeout=1")
            .arg("--guest-memory-mb=64"),
    )
    .await
}

/// Runs a misbehaving request while normal requests are served, and checks both.
async fn misbehave(worker: &Worker, prompt: &str) -> (u16, String) {
    let (_, reference) = worker.infer(greedy("a normal request", 6)).await;
    let bad = worker.infer(json!({ "prompt": prompt, "max_tokens": 4 }));
    let others = async {
        let mut served = 0;
        for _ in 0..3 {
            let (status, body) = worker.infer(greedy("a normal request", 6)).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["text"], reference["text"]);
            served += 1;
        }
        served
    };
    let ((status, body), served) = tokio::join!(bad, others);
    assert_eq!(served, 3);
    assert_eq!(worker.info().await["status"], "ready");
    let (after, _) = worker.infer(greedy("after", 2)).await;
    assert_eq!(after, 200, "the worker is unhealthy after `{prompt}`");
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn an_endless_loop_times_out() {
    let worker = chaos_worker().await;
    let started = Instant::now();
    let (status, error) = misbehave(&worker, "loop").await;
    assert_eq!(status, 504);
    assert!(error.contains("time limit"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn memory_past_the_cap_fails_the_request() {
    let worker = chaos_worker().await;
    let (status, error) = misbehave(&worker, "hog").await;
    assert_eq!(status, 500);
    assert!(error.contains("memory limit of 64 MiB"), "{error}");
}

#[tokio::test]
async fn a_trap_is_a_500_naming_the_guest_failure() {
    let worker = chaos_worker().await;
    let (status, error) = misbehave(&worker, "trap").await;
    assert_eq!(status, 500);
    assert!(error.contains("chaos"), "{error}");
    assert!(
        error.contains("trapped on purpose"),
        "the panic message is lost: {error}"
    );
}

#[tokio::test]
async fn bad_calls_to_the_host_are_refused() {
    let worker = chaos_worker().await;
    for (prompt, status, needle) in [
        ("bad-temperature", 400, "temperature"),
        ("bad-max-tokens", 400, "max_tokens"),
        ("emit", 400, "streaming"),
        ("two-streams", 503, "already running"),
    ] {
        let (got, error) = misbehave(&worker, prompt).await;
        assert_eq!(got, status, "{prompt}: {error}");
        // The engine names fields as `max_tokens` or `max-tokens`: either says which.
        assert!(
            error.replace('-', "_").contains(needle),
            "{prompt}: {error}"
        );
    }
}

/// 1 s of guest time, but the guest spends three times that waiting in the host: it streams
/// to a client that stops reading, so `output.emit` waits on back-pressure. Waiting on the host
/// is not the guest's time, so the request still ends well. The guest reports how long `emit`
/// kept it waiting, which shows the wait really was longer than its limit.
#[tokio::test]
async fn host_time_does_not_count_against_the_guest() {
    use futures::StreamExt;
    let worker = chaos_worker().await;
    let response = worker
        .client
        .post(worker.url("/v1/infer"))
        .json(&json!({ "prompt": "flood-2000", "stream": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut received = body.next().await.unwrap().unwrap().to_vec();
    // Not reading: the buffers between guest and client fill, and `emit` waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    while let Some(chunk) = body.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(received).unwrap();
    let tail = &text[text.len().saturating_sub(200)..];
    assert!(
        tail.trim_end().ends_with("data: [DONE]"),
        "the stream did not end well: ...{tail}"
    );
    let waited: u64 = tail
        .split("waited=")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|millis| millis.parse().ok())
        .unwrap_or_else(|| panic!("no waited=MS from the guest: ...{tail}"));
    assert!(
        waited >= 2000,
        "emit kept the guest waiting only {waited} ms: the test did not exercise its limit"
    );
}

#[tokio::test]
async fn guests_get_no_ambient_authority() {
    // A listening socket the guest will try to reach; the worker's own environment is not
    // empty, and its filesystem has a root: none of it may reach the guest.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let worker = chaos_worker().await;
    let (status, body) = worker
        .infer(json!({ "prompt": format!("probe:{address}") }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["text"], "env=0 fs=err net=err");
}
