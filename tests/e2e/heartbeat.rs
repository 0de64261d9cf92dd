//! Heartbeats to a real queen: shape, cadence, the beat on each status change, the final
//! `stopped` beat, and queens that are down or slow.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Options, Queen, Worker, free_port, greedy};

#[tokio::test]
async fn beats_have_the_upstream_shape_and_cadence() {
    let queen = Queen::start(Duration::ZERO).await;
    let mut worker = Worker::start(
        Options::new("llm")
            .arg(format!("--queen-url={}", queen.url))
            .arg("--worker-id=worker-hb")
            .arg("--heartbeat-interval=0.3"),
    )
    .await;
    let ready = queen
        .wait_for("ready", |beat| beat.body["worker"]["status"] == "ready")
        .await;

    // Shape: {"worker": WorkerInfo, "timestamp": RFC 3339}.
    let worker_info = &ready.body["worker"];
    assert_eq!(worker_info["id"], "worker-hb");
    assert_eq!(worker_info["port"], worker.port);
    assert_eq!(worker_info["device"], "CPU-0");
    assert_eq!(worker_info["implementation"], "llm-worker-rbee");
    for field in ["model_id", "version"] {
        assert!(worker_info[field].is_string(), "{field}: {worker_info}");
    }
    let timestamp = ready.body["timestamp"].as_str().unwrap();
    humantime::parse_rfc3339(timestamp).unwrap_or_else(|e| panic!("{timestamp}: {e}"));

    // Cadence: idle beats about every 0.3 s.
    let since = Instant::now();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let periodic = queen.beats().iter().filter(|beat| beat.at >= since).count();
    assert!(
        (2..=8).contains(&periodic),
        "{periodic} beats in 1.6 s at 0.3 s"
    );

    // The final beat says `stopped`.
    worker.signal("TERM");
    let exit = worker.wait_exit(Duration::from_secs(20)).await;
    assert!(exit.success());
    let beats = queen.beats();
    assert_eq!(beats.last().unwrap().body["worker"]["status"], "stopped");
}

#[tokio::test]
async fn status_changes_are_beaten_at_once() {
    let queen = Queen::start(Duration::ZERO).await;
    // A long interval: every beat after the first comes from a status change.
    let worker = Worker::start(
        Options::new("chaos")
            .arg(format!("--queen-url={}", queen.url))
            .arg("--heartbeat-interval=3600"),
    )
    .await;
    queen
        .wait_for("ready", |beat| beat.body["worker"]["status"] == "ready")
        .await;
    let before = Instant::now();
    let (status, _) = worker
        .infer(json!({ "prompt": "slow-300", "max_tokens": 2 }))
        .await;
    assert_eq!(status, 200);
    let busy = queen
        .wait_for("busy", |beat| {
            beat.at >= before && beat.body["worker"]["status"] == "busy"
        })
        .await;
    let ready_again = queen
        .wait_for("ready again", |beat| {
            beat.at > busy.at && beat.body["worker"]["status"] == "ready"
        })
        .await;
    assert!(busy.at.duration_since(before) < Duration::from_secs(1));
    assert!(ready_again.at > busy.at);
}

#[tokio::test]
async fn a_queen_that_is_down_does_not_disturb_serving() {
    let dead_queen = format!("http://127.0.0.1:{}", free_port());
    let mut worker = Worker::start(
        Options::new("llm")
            .arg(format!("--queen-url={dead_queen}"))
            .arg("--heartbeat-interval=0.1"),
    )
    .await;
    for _ in 0..3 {
        let started = Instant::now();
        let (status, _) = worker.infer(greedy("hello", 4)).await;
        assert_eq!(status, 200);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(20)).await.success());
}

#[tokio::test]
async fn a_slow_queen_does_not_delay_serving() {
    // The queen takes 10 s to answer each beat.
    let queen = Queen::start(Duration::from_secs(10)).await;
    let worker = Worker::start(
        Options::new("llm")
            .arg(format!("--queen-url={}", queen.url))
            .arg("--heartbeat-interval=0.2"),
    )
    .await;
    queen.wait_for("any", |_| true).await;
    let started = Instant::now();
    let (status, _) = worker.infer(greedy("hello", 4)).await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(worker.info().await["status"], "ready");
}

#[tokio::test]
async fn hive_url_is_accepted_as_the_heartbeat_target() {
    let queen = Queen::start(Duration::ZERO).await;
    let _worker = Worker::start(Options::new("llm").arg(format!("--hive-url={}", queen.url))).await;
    queen
        .wait_for("ready", |beat| beat.body["worker"]["status"] == "ready")
        .await;
}

/// A queen behind `https://`: the worker's heartbeats go over TLS (rustls), trusting the
/// queen's certificate through `SSL_CERT_FILE` as an operator with a private CA would.
#[tokio::test]
async fn an_https_queen_gets_the_beats() {
    use std::sync::{Arc, Mutex};

    use tokio_rustls::rustls;

    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("queen.pem");
    std::fs::write(&ca_file, certified.cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![certified.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into()),
        )
        .unwrap();

    let beats: Arc<Mutex<Vec<Value>>> = Arc::default();
    let recorded = beats.clone();
    let app = axum::Router::new().route(
        "/v1/worker-heartbeat",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            recorded.lock().unwrap().push(body);
            async { axum::Json(json!({ "status": "ok" })) }
        }),
    );
    let listener = TlsListener {
        tcp: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
    };
    let queen_port = listener.tcp.local_addr().unwrap().port();
    let queen = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let cache = tempfile::tempdir().unwrap();
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_rbee-host"))
        .arg("--guest")
        .arg(crate::harness::guest("llm"))
        .arg("--model")
        .arg(crate::harness::tiny_model())
        .args(["--port", &free_port().to_string(), "--host", "127.0.0.1"])
        .args(["--device", "cpu", "--heartbeat-interval=0.2"])
        .arg(format!("--queen-url=https://localhost:{queen_port}"))
        .arg("--cache-dir")
        .arg(cache.path())
        .env("SSL_CERT_FILE", &ca_file)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let ready = beats
            .lock()
            .unwrap()
            .iter()
            .any(|beat| beat["worker"]["status"] == "ready");
        if ready || Instant::now() > deadline {
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = worker.kill();
    let _ = worker.wait();
    queen.abort();
    assert!(
        ready,
        "no `ready` beat over https: {:?}",
        beats.lock().unwrap()
    );
}

/// A TLS listener for axum::serve: TCP accept, then the handshake (a failed one is skipped).
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
