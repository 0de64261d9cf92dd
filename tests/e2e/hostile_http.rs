//! Clients written as an attacker would: requests for what does not exist, sockets opened and
//! left silent or half-written, a request held in the queue behind work that does not end,
//! a stream that is never read. Each costs only its own request: the worker keeps answering.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Options, Worker, greedy};

/// A raw HTTP/1.1 exchange on a fresh socket: (status, body).
fn raw(port: u16, request: &str) -> (u16, String) {
    let mut socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    socket.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn error_of(body: &str) -> String {
    let json: Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not a JSON body: {body:?}"));
    json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no `error` string: {json}"))
        .to_owned()
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_are_json_errors() {
    let worker = Worker::start(Options::new("llm")).await;
    let port = worker.port;
    let cases = [
        ("GET /nope", 404),
        ("GET /v1/infer", 405),
        ("DELETE /info", 405),
        ("PUT /health", 405),
    ];
    for (line, expected) in cases {
        let request = format!("{line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, body) = tokio::task::spawn_blocking(move || raw(port, &request))
            .await
            .unwrap();
        assert_eq!(status, expected, "{line}: {body}");
        let error = error_of(&body);
        assert!(!error.is_empty(), "{line}");
    }
    // A wrong method is told which ones the route takes, in the error and in `Allow`.
    let response = worker.get("/v1/infer").await;
    assert_eq!(response.status(), 405);
    let allow = response.headers().get("allow").cloned();
    assert_eq!(allow.as_ref().map(|a| a.to_str().unwrap()), Some("POST"));
    let error = error_of(&response.text().await.unwrap());
    assert_eq!(error, "GET is not allowed on /v1/infer (allowed: POST)");
    // A body that is not the route's JSON: axum's own rejection, as JSON too.
    let request = "POST /v1/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                   Content-Type: application/json\r\nContent-Length: 5\r\n\r\n{nope";
    let (status, body) = tokio::task::spawn_blocking(move || raw(port, request))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    error_of(&body);
}

/// How long `GET /health` takes on a fresh connection.
async fn health_latency(worker: &Worker) -> Duration {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let started = Instant::now();
    let response = client.get(worker.url("/health")).send().await;
    let elapsed = started.elapsed();
    let response = response.expect("/health did not answer");
    assert_eq!(response.status(), 200);
    elapsed
}

/// 500 sockets that connect and then send nothing, or half a request head, against a worker
/// whose open-file limit is 256: without a cap, the worker runs out of descriptors holding
/// them and `/health` is never accepted (40 s and counting, measured); with it, the oldest
/// half-open sockets are closed to make room and `/health` answers at once.
#[tokio::test]
async fn half_open_sockets_do_not_starve_health() {
    let worker = Worker::start(Options::new("llm")).await;
    let limited = Command::new("prlimit")
        .args(["--pid", &worker.pid().to_string(), "--nofile=256:256"])
        .status()
        .expect("prlimit (util-linux) is needed");
    assert!(limited.success());
    let before = health_latency(&worker).await;

    let port = worker.port;
    let sockets = tokio::task::spawn_blocking(move || {
        let mut sockets = Vec::new();
        for i in 0..500 {
            let mut socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
            if i % 2 == 1 {
                socket
                    .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
            }
            sockets.push(socket);
        }
        sockets
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        worst = worst.max(health_latency(&worker).await);
    }
    eprintln!(
        "/health: {before:?} idle, at worst {worst:?} with {} half-open sockets",
        sockets.len()
    );
    assert!(
        worst < Duration::from_secs(1),
        "/health took {worst:?} behind half-open sockets"
    );
    // And the model is still served.
    let (status, body) = worker.infer(greedy("hello", 2)).await;
    assert_eq!(status, 200, "{body}");
}

/// Sockets that each send one request and then sit idle on keep-alive, more of them than
/// `--max-connections`: the oldest are closed (gracefully: none was answering) to let a new
/// client in, rather than the new one waiting for an idle one to time out (10 s).
#[tokio::test]
async fn idle_keep_alive_sockets_at_the_cap_do_not_starve_health() {
    let worker = Worker::start(Options::new("llm").arg("--max-connections=50")).await;
    let port = worker.port;
    let sockets = tokio::task::spawn_blocking(move || {
        let mut sockets = Vec::new();
        for _ in 0..120 {
            let Ok(mut socket) = TcpStream::connect(("127.0.0.1", port)) else {
                break;
            };
            // Short: sockets past the cap wait to be accepted, and the test must not wait for
            // the header timeout (10 s) to free their places.
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let _ = socket.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut answer = [0u8; 256];
            let _ = socket.read(&mut answer);
            sockets.push(socket);
        }
        sockets
    })
    .await
    .unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        worst = worst.max(health_latency(&worker).await);
    }
    eprintln!(
        "/health at worst {worst:?} with {} idle keep-alive sockets at a cap of 50",
        sockets.len()
    );
    assert!(
        worst < Duration::from_secs(1),
        "/health took {worst:?} behind idle keep-alive sockets"
    );
}

/// An upload without the token is refused before its body is read: the 401 comes back
/// while the client has sent only the head of a 200 MB request.
#[tokio::test]
async fn an_unauthenticated_upload_is_refused_before_its_body() {
    let worker = Worker::start(Options::new("llm").arg("--admin-token=secret")).await;
    let port = worker.port;
    let (status, body) = tokio::task::spawn_blocking(move || {
        let mut socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket
            .write_all(
                b"PUT /v1/admin/guest HTTP/1.1\r\nHost: x\r\nContent-Length: 200000000\r\n\r\n",
            )
            .unwrap();
        let mut answer = vec![0u8; 4096];
        let read = socket.read(&mut answer).expect("no answer before the body");
        let answer = String::from_utf8_lossy(&answer[..read]).into_owned();
        let status: u16 = answer.split(' ').nth(1).unwrap().parse().unwrap();
        let body = answer.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    })
    .await
    .unwrap();
    assert_eq!(status, 401, "{body}");
    error_of(&body);
}

/// One slot, held by a request that computes for 4 s: the next one waits in the queue for
/// the queue timeout (1 s), then gets 503 with a JSON error rather than hanging behind it.
#[tokio::test]
async fn a_request_stuck_in_the_queue_gets_503() {
    let worker = Worker::start(
        Options::new("chaos")
            .arg("--max-concurrent=1")
            .arg("--queue-timeout=1"),
    )
    .await;
    let holder = worker.infer(json!({ "prompt": "slow-4000", "max_tokens": 2 }));
    let queued = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let answer = worker.infer(greedy("queued", 2)).await;
        (answer, started.elapsed())
    };
    let ((held, _), ((status, body), waited)) = tokio::join!(holder, queued);
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("queue"), "{body}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "answered after {waited:?}"
    );
    assert_eq!(held, 200);
}

/// A request that runs past `--request-timeout` gets 504 with a JSON error at the deadline.
#[tokio::test]
async fn a_request_past_the_request_timeout_gets_504() {
    let worker = Worker::start(Options::new("chaos").arg("--request-timeout=1")).await;
    let started = Instant::now();
    let (status, body) = worker
        .infer(json!({ "prompt": "slow-5000", "max_tokens": 2 }))
        .await;
    assert_eq!(status, 504, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("request timeout"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// A streaming client that sends its request and never reads the answer, while the guest
/// streams as fast as it can (chaos `flood-N` emits until `emit` has waited N ms for the
/// client). With one slot, the next request waits behind it; the worker cuts the unread
/// stream (its writes wait no longer than the request timeout, 2 s) and serves the next
/// request, instead of holding the slot for the minute the flood would last.
#[tokio::test]
async fn a_stream_nobody_reads_gives_its_slot_back() {
    let worker = Worker::start(
        Options::new("chaos")
            .arg("--max-concurrent=1")
            .arg("--request-timeout=2")
            .arg("--guest-timeout=120"),
    )
    .await;
    let body = json!({ "prompt": "flood-60000", "stream": true }).to_string();
    let request = format!(
        "POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut reader_that_never_reads = TcpStream::connect(("127.0.0.1", worker.port)).unwrap();
    reader_that_never_reads
        .write_all(request.as_bytes())
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(30), worker.infer(greedy("next", 2)))
            .await
            .expect("the unread stream kept the slot");
    let waited = started.elapsed();
    eprintln!("the request behind an unread stream waited {waited:?}");
    assert_eq!(status, 200, "{body}");
    assert!(waited < Duration::from_secs(8), "waited {waited:?}");
    drop(reader_that_never_reads);
}

/// Guest uploads run one at a time: while one is still sending its body, another (with the
/// right token) is refused at once with 429, instead of a second body of up to 256 MiB being
/// read and compiled beside it. The first then completes.
#[tokio::test]
async fn guest_uploads_run_one_at_a_time() {
    use futures::SinkExt;

    let worker = Worker::start(Options::new("llm").arg("--admin-token=secret")).await;
    let component = std::fs::read(crate::harness::guest("llm")).unwrap();
    let (mut body, chunks) = futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let first = tokio::spawn(
        worker
            .client
            .put(worker.url("/v1/admin/guest"))
            .bearer_auth("secret")
            .body(reqwest::Body::wrap_stream(chunks))
            .send(),
    );
    let half = component.len() / 2;
    body.send(Ok(component[..half].to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let second = worker
        .client
        .put(worker.url("/v1/admin/guest"))
        .bearer_auth("secret")
        .body(component.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 429);
    let error = error_of(&second.text().await.unwrap());
    assert!(error.contains("in progress"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));

    body.send(Ok(component[half..].to_vec())).await.unwrap();
    drop(body);
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 200, "{}", first.text().await.unwrap());
}
