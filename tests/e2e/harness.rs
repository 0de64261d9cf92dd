//! Starting workers, a queen that records heartbeats, and HTTP/SSE clients.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The tiny Llama-shaped model the engine's fixtures generate.
pub fn tiny_model() -> PathBuf {
    repo_root().join("engine/tests/fixtures/tiny-llama")
}

/// A guest built by `guests/build.sh`; a missing one fails the test with the fix in the message.
pub fn guest(name: &str) -> PathBuf {
    let path = repo_root().join("guests").join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run guests/build.sh first",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How a test worker is started; `Worker::start` fills in the rest.
pub struct Options {
    pub guest: PathBuf,
    pub model: PathBuf,
    pub args: Vec<String>,
    pub wait: Wait,
    /// The worker's cache (compiled guests, GPU kernel tuning); a fresh temporary one when
    /// `None`.
    pub cache_dir: Option<PathBuf>,
    /// Where the worker's stderr (its log) goes; the test's own stderr when `None`.
    pub stderr: Option<PathBuf>,
    /// What the log shows (`RUST_LOG`); the test's own `RUST_LOG`, else `warn`, when `None`.
    pub log_filter: Option<String>,
}

/// What `Worker::start` waits for before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Ready,
    Http,
    Nothing,
}

impl Options {
    pub fn new(guest_name: &str) -> Self {
        Self {
            guest: guest(guest_name),
            model: tiny_model(),
            args: Vec::new(),
            wait: Wait::Ready,
            cache_dir: None,
            stderr: None,
            log_filter: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }
}

/// A running `rbee-host`, killed when dropped.
pub struct Worker {
    child: Child,
    pub port: u16,
    pub base: String,
    pub client: reqwest::Client,
    _cache: Option<tempfile::TempDir>,
}

impl Worker {
    pub async fn start(options: Options) -> Worker {
        let temporary_cache = match options.cache_dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().unwrap()),
        };
        let cache_dir = options
            .cache_dir
            .clone()
            .unwrap_or_else(|| temporary_cache.as_ref().unwrap().path().to_owned());
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_rbee-host"))
            .arg("--guest")
            .arg(&options.guest)
            .arg("--model")
            .arg(&options.model)
            .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
            // The CPU unless the test names a device itself.
            .args(
                (!options.args.iter().any(|arg| arg.starts_with("--device")))
                    .then_some(["--device", "cpu"])
                    .into_iter()
                    .flatten(),
            )
            .arg("--cache-dir")
            .arg(&cache_dir)
            .args(&options.args)
            .env(
                "RUST_LOG",
                options
                    .log_filter
                    .clone()
                    .or_else(|| std::env::var("RUST_LOG").ok())
                    .unwrap_or_else(|| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(match &options.stderr {
                Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                None => Stdio::inherit(),
            })
            .spawn()
            .expect("cannot start rbee-host");
        let worker = Worker {
            child,
            port,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            _cache: temporary_cache,
        };
        if options.wait != Wait::Nothing {
            worker.wait_for_http().await;
        }
        if options.wait == Wait::Ready {
            worker.wait_for_status("ready").await;
        }
        worker
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_for_http(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(response) = self.client.get(self.url("/health")).send().await
                && response.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("rbee-host did not answer /health within 120 s");
    }

    pub async fn info(&self) -> Value {
        self.client
            .get(self.url("/info"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn wait_for_status(&self, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let info = self.info().await;
            if info["status"] == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never reached `{status}`: {info}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GETs `path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// POSTs `body` as JSON to `path`.
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs `body` to `path` and reads the answer as JSON (with its status).
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self.post(path, body).await;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("not JSON (HTTP {status}): {text:?}"));
        (status, json)
    }

    /// POST /v1/infer with a JSON body: (status, body as JSON).
    pub async fn infer(&self, body: Value) -> (u16, Value) {
        self.post_json("/v1/infer", &body).await
    }

    /// POST /v1/infer with `stream: true`, read with an SSE client.
    pub async fn infer_stream(&self, mut body: Value) -> Streamed {
        body["stream"] = Value::Bool(true);
        read_sse(self.post("/v1/infer", &body).await).await
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (after a signal).
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "rbee-host did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What an SSE response carried.
#[derive(Debug)]
pub struct Streamed {
    pub status: u16,
    pub content_type: String,
    /// `data:` payloads of token events, in order.
    pub tokens: Vec<String>,
    /// True when the stream ended with `data: [DONE]`.
    pub done: bool,
    /// A final `data: {"error": ...}` event, or the JSON error body of a non-200 answer.
    pub error: Option<String>,
}

impl Streamed {
    pub fn text(&self) -> String {
        self.tokens.concat()
    }
}

pub async fn read_sse(response: reqwest::Response) -> Streamed {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let mut streamed = Streamed {
        status,
        content_type: content_type.clone(),
        tokens: Vec::new(),
        done: false,
        error: None,
    };
    if !content_type.starts_with("text/event-stream") {
        let body: Value = response.json().await.unwrap();
        streamed.error = body["error"].as_str().map(ToOwned::to_owned);
        return streamed;
    }
    let mut events = response.bytes_stream().eventsource();
    while let Some(event) = events.next().await {
        let event = event.expect("malformed SSE");
        assert!(!streamed.done, "data after [DONE]: {:?}", event.data);
        if event.data == "[DONE]" {
            streamed.done = true;
            continue;
        }
        let data: Value = serde_json::from_str(&event.data).expect("SSE data is JSON");
        if let Some(token) = data["token"].as_str() {
            assert!(streamed.error.is_none(), "token after an error event");
            streamed.tokens.push(token.to_owned());
        } else if let Some(error) = data["error"].as_str() {
            streamed.error = Some(error.to_owned());
        } else {
            panic!("unexpected SSE data: {data}");
        }
    }
    streamed
}

/// One heartbeat as the queen received it.
#[derive(Debug, Clone)]
pub struct Beat {
    pub at: Instant,
    pub body: Value,
}

/// A real HTTP server playing the queen: records every heartbeat; can answer slowly.
pub struct Queen {
    pub url: String,
    beats: Arc<Mutex<Vec<Beat>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Queen {
    pub async fn start(delay: Duration) -> Queen {
        use axum::routing::post;
        let beats: Arc<Mutex<Vec<Beat>>> = Arc::default();
        let recorded = beats.clone();
        let app = axum::Router::new().route(
            "/v1/worker-heartbeat",
            post(move |axum::Json(body): axum::Json<Value>| {
                let recorded = recorded.clone();
                async move {
                    recorded.lock().unwrap().push(Beat {
                        at: Instant::now(),
                        body,
                    });
                    tokio::time::sleep(delay).await;
                    axum::Json(serde_json::json!({ "status": "ok" }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Queen {
            url: format!("http://{addr}"),
            beats,
            task,
        }
    }

    pub fn beats(&self) -> Vec<Beat> {
        self.beats.lock().unwrap().clone()
    }

    /// Waits until a beat matches.
    pub async fn wait_for(&self, what: &str, matches: impl Fn(&Beat) -> bool) -> Beat {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(beat) = self.beats().into_iter().find(&matches) {
                return beat;
            }
            assert!(
                Instant::now() < deadline,
                "no heartbeat {what}: {:?}",
                self.beats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Queen {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request body at temperature 0 (deterministic).
pub fn greedy(prompt: &str, max_tokens: u32) -> Value {
    serde_json::json!({ "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0 })
}

/// SmolLM2-135M-Instruct (scripts/fetch-model.sh), for tests that need a real model's speed or
/// text. Such tests are `#[ignore = "needs SmolLM2 ..."]`, so that without the model they show
/// as ignored in cargo's summary; `scripts/test.sh` runs them (`--include-ignored`) when the
/// model is there. Run without it, they fail here, saying how to get it.
pub fn smollm2() -> PathBuf {
    let path = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is absent: run scripts/fetch-model.sh",
        path.display()
    );
    path
}

/// CPU time (user + system) the process `pid` has used so far, from /proc/<pid>/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may contain spaces:
    // state is field 3, utime and stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on
    // Linux).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// The CPU time `pid` uses during the next `window`, as a fraction of that window (2.0 = two
/// cores busy throughout).
pub async fn cpu_load(pid: u32, window: Duration) -> f64 {
    let before = cpu_time(pid);
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let used = cpu_time(pid) - before;
    used.as_secs_f64() / started.elapsed().as_secs_f64()
}
