//! Serving throughput over HTTP: the real `rbee-host` binary and, when given, llama.cpp's
//! `llama-server` on the same GGUF, driven by the same streaming clients, alternating
//! server by server for each client count so both see the same machine.
//!
//!     cargo build -p rbee-host && cargo run -p rbee-host --example bench_serving -- \
//!         --model models/SmolLM2-135M-Instruct.Q4_1.gguf [--llama-server PATH] \
//!         [--baseline-rbee-host PATH] [--clients 1,2,4,8] [--tokens 128] [--rounds 2] \
//!         [--repeats 3] [--long-prompts] [--plot FILE.svg]
//!
//! `--baseline-rbee-host` adds another rbee-host binary (an earlier commit's, copied aside)
//! to the turns: two builds compared in one sitting, each against the same machine.
//!
//! Every client streams completions of prompts whose greedy continuation does not end
//! early (counting, lists, code), temperature 0, `--tokens` new tokens each. Reported per
//! server and client count: aggregate generated tokens/s (all clients' tokens over the wall
//! time), per-stream tokens/s (median), and time to first token (p50, p95). The run makes
//! `--repeats` passes, each measuring every client count on every server in turn, and each
//! figure is the median of its repeats: on a shared machine one measurement of a few seconds
//! can land in a slow spell that the one it is compared with (the other server's, or the same
//! server's at another client count) did not. One JSON line per server and client count
//! follows the table, for scripts.

mod servers;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use servers::{Running, median};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    /// The guest rbee-host serves.
    #[arg(long, default_value = "guests/llm.wasm")]
    guest: PathBuf,
    /// llama.cpp's server binary (`../shared/tools/build-llama-server.sh` builds one).
    #[arg(long)]
    llama_server: Option<PathBuf>,
    /// Another build of rbee-host (a copy of an earlier commit's binary), measured in turn
    /// with this one: an A/B of two builds in one sitting.
    #[arg(long)]
    baseline_rbee_host: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    clients: Vec<usize>,
    /// New tokens per request.
    #[arg(long, default_value_t = 128)]
    tokens: u32,
    /// Requests per client in each measurement.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Measurements per server and client count, taken in turns; the medians are reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Long prompts (each short one 40 times: 320–1520 tokens of SmolLM2's, 64 new tokens):
    /// prefill under load.
    #[arg(long)]
    long_prompts: bool,
    /// Draws aggregate tokens/s and time to first token (p50) against the client count,
    /// one line per server, into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Prompts whose greedy continuation keeps going: lists, counting, code.
const PROMPTS: &[&str] = &[
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "Here is a list of fruits: apple, banana, cherry, date,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "A B C D E F G H I J K L M N O P",
    "Monday, Tuesday, Wednesday, Thursday,",
    "for i in range(10):\n    print(i)\nfor j in range(",
    "The numbers from one to twenty are: one, two, three, four,",
    "import numpy as np\nimport pandas as pd\nimport",
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Server {
    RbeeHost,
    /// `--baseline-rbee-host`: the same API, another binary.
    Baseline,
    LlamaCpp,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::RbeeHost => "rbee-host",
            Server::Baseline => "baseline",
            Server::LlamaCpp => "llama-server",
        }
    }

    /// Whether it speaks rbee-host's API (`/info`, `/v1/infer`).
    fn is_rbee_host(self) -> bool {
        matches!(self, Server::RbeeHost | Server::Baseline)
    }
}

async fn start(server: Server, args: &Args, slots: usize) -> Running {
    match server {
        Server::RbeeHost | Server::Baseline => {
            let binary = match server {
                Server::Baseline => args
                    .baseline_rbee_host
                    .clone()
                    .expect("--baseline-rbee-host"),
                _ => servers::rbee_host_beside(),
            };
            servers::rbee_host(&binary, &args.guest, &args.model, slots, &[]).await
        }
        Server::LlamaCpp => {
            let binary = args.llama_server.as_ref().expect("--llama-server");
            servers::llama_server(binary, &args.model, slots, 2048, &[]).await
        }
    }
}

/// One streamed completion: (time to first token, generated tokens, total time), or why it
/// failed (a server that drops a connection is counted, not fatal to the run).
async fn request(
    client: &reqwest::Client,
    server: Server,
    url: &str,
    prompt: &str,
    tokens: u32,
) -> Result<(Duration, u32, Duration), String> {
    let started = Instant::now();
    let (path, body) = match server {
        Server::RbeeHost | Server::Baseline => (
            "/v1/infer",
            json!({"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "stream": true}),
        ),
        Server::LlamaCpp => (
            "/completion",
            json!({"prompt": prompt, "n_predict": tokens, "temperature": 0.0, "stream": true,
                   "cache_prompt": false}),
        ),
    };
    let response = servers::post_json(client, &format!("{url}{path}"), &body)
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(response.status().to_string());
    }
    let mut events = response.bytes_stream().eventsource();
    let (mut first, mut count) = (None, 0u32);
    while let Some(Ok(event)) = events.next().await {
        if event.data == "[DONE]" {
            break;
        }
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        let piece = match server.is_rbee_host() {
            true => data.get("token").is_some(),
            false => data["content"].as_str().is_some_and(|c| !c.is_empty()),
        };
        if piece {
            first.get_or_insert_with(|| started.elapsed());
            count += 1;
        }
        if server == Server::LlamaCpp && data["stop"] == true {
            break;
        }
    }
    Ok((first.unwrap_or_default(), count, started.elapsed()))
}

struct Measured {
    aggregate: f64,
    per_stream: f64,
    ttft_p50: Duration,
    ttft_p95: Duration,
    /// Requests that got no answer (each also printed once).
    failed: usize,
}

/// The middle value (the upper one of an even count) of a non-empty list.
impl Measured {
    /// Each figure's median over repeated measurements; the failures are summed.
    fn median(repeats: &[Measured]) -> Measured {
        Measured {
            aggregate: median(repeats.iter().map(|m| m.aggregate).collect()),
            per_stream: median(repeats.iter().map(|m| m.per_stream).collect()),
            ttft_p50: median(repeats.iter().map(|m| m.ttft_p50).collect()),
            ttft_p95: median(repeats.iter().map(|m| m.ttft_p95).collect()),
            failed: repeats.iter().map(|m| m.failed).sum(),
        }
    }
}

async fn measure(server: Server, url: &str, clients: usize, args: &Args) -> Measured {
    let client = reqwest::Client::new();
    let (prompts, tokens) = if args.long_prompts {
        let long: Vec<String> = PROMPTS.iter().map(|p| p.repeat(40)).collect();
        (long, 64)
    } else {
        (PROMPTS.iter().map(|p| p.to_string()).collect(), args.tokens)
    };
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (client, url, prompts) = (client.clone(), url.to_string(), prompts.clone());
            let rounds = args.rounds;
            tokio::spawn(async move {
                let mut results = Vec::new();
                for r in 0..rounds {
                    let prompt = &prompts[(c + r * 3) % prompts.len()];
                    results.push(request(&client, server, &url, prompt, tokens).await);
                }
                results
            })
        })
        .collect();
    let mut results = Vec::new();
    let mut failed = 0;
    for task in tasks {
        for result in task.await.expect("a client") {
            match result {
                Ok(r) => results.push(r),
                Err(e) => {
                    eprintln!("{}: a request failed: {e}", server.name());
                    failed += 1;
                }
            }
        }
    }
    if results.is_empty() {
        results.push((Duration::ZERO, 0, Duration::from_secs(1)));
    }
    let wall = started.elapsed().as_secs_f64();
    let generated: u32 = results.iter().map(|r| r.1).sum();
    let mut ttft: Vec<Duration> = results.iter().map(|r| r.0).collect();
    ttft.sort();
    let streams: Vec<f64> = results
        .iter()
        .map(|(first, n, total)| *n as f64 / (*total - *first).as_secs_f64().max(1e-9))
        .collect();
    let pick = |q: f64| ttft[((ttft.len() - 1) as f64 * q).round() as usize];
    Measured {
        aggregate: generated as f64 / wall,
        per_stream: median(streams),
        ttft_p50: pick(0.5),
        ttft_p95: pick(0.95),
        failed,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut servers = vec![Server::RbeeHost];
    if args.baseline_rbee_host.is_some() {
        servers.push(Server::Baseline);
    }
    if args.llama_server.is_some() {
        servers.push(Server::LlamaCpp);
    }
    // Repeat by repeat, every client count and every server in turn: each figure is then the
    // median of measurements spread over the whole run, so the figures compared with each
    // other (two servers, or one server's 1 and 4 clients) saw the same spread of this
    // machine's fast and slow spells.
    let mut repeats: Vec<Vec<Vec<Measured>>> = args
        .clients
        .iter()
        .map(|_| servers.iter().map(|_| Vec::new()).collect())
        .collect();
    for repeat in 0..args.repeats.max(1) {
        for (&clients, by_server) in args.clients.iter().zip(&mut repeats) {
            for (&server, measured) in servers.iter().zip(by_server) {
                let running = start(server, &args, clients.max(1)).await;
                // One warm-up request, then the measurement.
                let _ = request(&reqwest::Client::new(), server, &running.url, PROMPTS[0], 8).await;
                let m = measure(server, &running.url, clients, &args).await;
                eprintln!(
                    "repeat {}: {} with {clients} clients: {:.1} tok/s",
                    repeat + 1,
                    server.name(),
                    m.aggregate
                );
                measured.push(m);
            }
        }
    }
    println!(
        "{:<13} {:>7} {:>12} {:>14} {:>12} {:>10} {:>10} {:>7}",
        "server",
        "clients",
        "aggregate/s",
        "(min-max)",
        "per-stream/s",
        "ttft p50",
        "ttft p95",
        "failed"
    );
    let mut lines = Vec::new();
    let mut all = Vec::new();
    for (&clients, by_server) in args.clients.iter().zip(&repeats) {
        for (&server, measured) in servers.iter().zip(by_server) {
            let aggregates: Vec<f64> = measured.iter().map(|m| m.aggregate).collect();
            let m = Measured::median(measured);
            let range = format!(
                "({:.1}-{:.1})",
                aggregates.iter().copied().fold(f64::INFINITY, f64::min),
                aggregates.iter().copied().fold(0.0, f64::max)
            );
            println!(
                "{:<13} {:>7} {:>12.1} {:>14} {:>12.1} {:>8.0}ms {:>8.0}ms {:>7}",
                server.name(),
                clients,
                m.aggregate,
                range,
                m.per_stream,
                m.ttft_p50.as_secs_f64() * 1e3,
                m.ttft_p95.as_secs_f64() * 1e3,
                m.failed
            );
            lines.push(json!({
                "server": server.name(), "clients": clients, "long_prompts": args.long_prompts,
                "aggregate_tps": m.aggregate, "aggregate_tps_repeats": aggregates,
                "per_stream_tps": m.per_stream,
                "ttft_p50_ms": m.ttft_p50.as_secs_f64() * 1e3,
                "ttft_p95_ms": m.ttft_p95.as_secs_f64() * 1e3, "failed": m.failed,
            }));
            all.push((server, clients, m));
        }
    }
    for line in lines {
        println!("{line}");
    }
    if let Some(path) = &args.plot {
        let title = if args.long_prompts {
            "long prompts (320-1520 tokens), 64 new tokens"
        } else {
            "short prompts (8-38 tokens), 128 new tokens"
        };
        plot(path, title, &servers, &all).expect("drawing the plot");
        println!("plot: {}", path.display());
    }
}

/// Two panels side by side: aggregate tokens/s and TTFT p50 against clients, per server.
fn plot(
    path: &std::path::Path,
    title: &str,
    servers: &[Server],
    all: &[(Server, usize, Measured)],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let panels = root.split_evenly((1, 2));
    let max_clients = all.iter().map(|(_, c, _)| *c).max().unwrap_or(1) as f64;
    type Value = fn(&Measured) -> f64;
    let charts: [(&str, Value); 2] = [
        ("aggregate tokens/s", |m| m.aggregate),
        ("time to first token p50 (ms)", |m| {
            m.ttft_p50.as_secs_f64() * 1e3
        }),
    ];
    for (panel, (label, value)) in panels.iter().zip(charts) {
        let top = all.iter().map(|(_, _, m)| value(m)).fold(0.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .caption(label, ("sans-serif", 16))
            .build_cartesian_2d(0.5..max_clients + 0.5, 0.0..top.max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("concurrent clients")
            .y_desc(label)
            .draw()?;
        for (server, color) in servers.iter().zip([BLUE, GREEN, RED]) {
            let points: Vec<(f64, f64)> = all
                .iter()
                .filter(|(s, _, _)| s == server)
                .map(|(_, c, m)| (*c as f64, value(m)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(server.name())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
