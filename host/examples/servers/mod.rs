//! What the serving benchmarks (`bench_serving`, `bench_chat`, `bench_speculative`) share:
//! starting a server — a build of rbee-host or llama.cpp's `llama-server` on the same GGUF —
//! on a free port, waiting until it answers, and stopping it; reading its `/metrics`; the
//! median of repeated measurements.

// Each benchmark uses part of what is here.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A server process; dropping it stops the server.
pub struct Running {
    child: Child,
    pub url: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The rbee-host binary built beside this example (`target/<profile>/rbee-host`).
pub fn rbee_host_beside() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("rbee-host")))
        .filter(|path| path.exists())
        .expect("build rbee-host first: cargo build -p rbee-host")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// rbee-host `binary` serving `model` with `guest` on the CPU, `slots` requests at once,
/// with `extra` arguments; returns once `/info` says `ready`.
pub async fn rbee_host(
    binary: &Path,
    guest: &Path,
    model: &Path,
    slots: usize,
    extra: &[&str],
) -> Running {
    let port = free_port();
    let mut command = Command::new(binary);
    command
        .arg("--guest")
        .arg(guest)
        .arg("--model")
        .arg(model)
        .args(["--device", "cpu", "--host", "127.0.0.1", "--no-watch"])
        .args(["--port", &port.to_string()])
        .args(["--max-concurrent", &slots.to_string()])
        .args(extra);
    let running = spawn(command, port);
    wait_until(&running, "rbee-host", |client, url| async move {
        match client.get(format!("{url}/info")).send().await {
            Ok(response) => response
                .json::<Value>()
                .await
                .is_ok_and(|info| info["status"] == "ready"),
            Err(_) => false,
        }
    })
    .await;
    running
}

/// llama-server `binary` serving `model` with `slots` parallel slots of `context_per_slot`
/// positions on two threads (this machine's cores), with `extra` arguments; returns once
/// `/health` answers 200 (the model is loaded).
pub async fn llama_server(
    binary: &Path,
    model: &Path,
    slots: usize,
    context_per_slot: usize,
    extra: &[&str],
) -> Running {
    let port = free_port();
    let mut command = Command::new(binary);
    command
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-np", &slots.to_string(), "-t", "2", "-c"])
        .arg((slots * context_per_slot).to_string())
        .args(extra);
    let running = spawn(command, port);
    wait_until(&running, "llama-server", |client, url| async move {
        client
            .get(format!("{url}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    running
}

fn spawn(mut command: Command, port: u16) -> Running {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server");
    Running {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn wait_until<F, Fut>(running: &Running, name: &str, ready: F)
where
    F: Fn(reqwest::Client, String) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready(client.clone(), running.url.clone()).await {
        assert!(Instant::now() < deadline, "{name} did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The server's `/metrics` sample `name` (rbee-host's carry the model's label,
/// llama-server's none), or 0.
pub async fn metric(url: &str, name: &str) -> f64 {
    let Ok(response) = reqwest::get(format!("{url}/metrics")).await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}

/// POSTs `body` as JSON to `url`. A request that could not be sent at all (a kept-alive
/// connection the server had closed: llama-server does so between requests and after a
/// stream the client left) is sent once more, on a new connection.
pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> reqwest::Result<reqwest::Response> {
    let send = || client.post(url).json(body).send();
    match send().await {
        Err(e) if e.is_request() && !e.is_timeout() => send().await,
        other => other,
    }
}

/// The middle of `values` (the upper one of an even count).
pub fn median<T: Copy + PartialOrd>(mut values: Vec<T>) -> T {
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    values[values.len() / 2]
}
