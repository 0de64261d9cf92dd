//! Chat at scale over `/v1/chat/completions`: what the KV pool's prefix cache and growth on
//! demand are for, measured on rbee-host with and without `--no-prefix-cache` and, when
//! given, llama.cpp's `llama-server` (its default `cache_prompt`) on the same GGUF, server by
//! server in turn for each repeat so all see the same machine.
//!
//!     cargo build --release -p rbee-host --examples && target/release/examples/bench_chat \
//!         --model models/SmolLM2-135M-Instruct.Q4_1.gguf [--llama-server PATH] \
//!         [--workloads conversation,shared-prompt,no-max-tokens] [--repeats 2]
//!
//! Workloads, all greedy and streamed:
//! - `conversation`: one client holds a 12-turn conversation, each turn a ~60-token user
//!   message and up to 64 tokens back, the whole history resent every turn. Reported: time
//!   to first token per turn.
//! - `shared-prompt`: 8 clients at once share one ~800-token system prompt and each ask a
//!   different short question (up to 32 tokens back), after one request that warms the
//!   server's cache with the system prompt. Reported: TTFT p50/p95, aggregate tokens/s,
//!   and rbee-host's share of prompt tokens found in its prefix cache.
//! - `no-max-tokens`: 16 chats at once without `max_tokens` (`--max-concurrent 16`, `-np
//!   16`) for a fixed window, each client starting another when one ends. Reported: the
//!   most requests running at once (the server's own gauge), how many clients' first chat
//!   streamed within the window, and aggregate tokens/s over the window.
//!
//! Figures are medians over `--repeats`; one JSON line per server and workload follows the
//! table, for scripts.

mod servers;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use servers::{Running, median, metric};

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
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "conversation,shared-prompt,no-max-tokens"
    )]
    workloads: Vec<String>,
    /// Measurements per server and workload, taken in turns; the medians are reported.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// Seconds the `no-max-tokens` workload runs.
    #[arg(long, default_value_t = 30)]
    window: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Server {
    RbeeHost,
    RbeeHostNoPrefixCache,
    LlamaCpp,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::RbeeHost => "rbee-host",
            Server::RbeeHostNoPrefixCache => "rbee-host --no-prefix-cache",
            Server::LlamaCpp => "llama-server",
        }
    }

    async fn start(self, args: &Args, slots: usize) -> Running {
        match self {
            Server::RbeeHost | Server::RbeeHostNoPrefixCache => {
                let extra: &[&str] = match self {
                    Server::RbeeHostNoPrefixCache => &["--no-prefix-cache"],
                    _ => &[],
                };
                let binary = servers::rbee_host_beside();
                servers::rbee_host(&binary, &args.guest, &args.model, slots, extra).await
            }
            Server::LlamaCpp => {
                let binary = args.llama_server.as_ref().expect("--llama-server");
                // The chat template from the GGUF, as rbee-host's guest uses it; `--metrics`
                // for its running-request gauge.
                let extra = ["--jinja", "--metrics"];
                servers::llama_server(binary, &args.model, slots, 8192, &extra).await
            }
        }
    }
}

/// The model's name on the OpenAI routes: rbee-host serves it under its file's stem (and
/// refuses another name); llama-server takes any.
static MODEL: OnceLock<String> = OnceLock::new();

/// Topics for user messages: each message is a topic and a fixed request around it, about
/// 60 tokens of SmolLM2's.
const TOPICS: &[&str] = &[
    "the water cycle",
    "how bread rises",
    "why the sky is blue",
    "the history of the bicycle",
    "how vaccines work",
    "the rules of chess",
    "how a compiler works",
    "the life of honey bees",
    "why leaves change colour",
    "how bridges carry weight",
    "the first moon landing",
    "how tides happen",
    "the invention of paper",
    "how a refrigerator cools",
    "the migration of birds",
    "how volcanoes form",
];

fn user_message(topic: &str) -> String {
    format!(
        "I am preparing a short talk for a group of curious students and would like your help. \
         Please explain {topic} in plain words, in three or four sentences, with one concrete \
         example that a twelve-year-old would understand, and avoid any jargon at all."
    )
}

/// A system prompt of about 800 tokens: the kind of long instructions agents resend.
fn system_prompt() -> String {
    let rules = [
        "Answer in plain English and keep every answer short and to the point.",
        "If a question is ambiguous, state the most likely reading and answer that one.",
        "Never invent facts; say that you do not know when you are not sure.",
        "Prefer concrete examples over abstract explanations whenever possible.",
        "Use metric units, and give both units when the user used imperial ones.",
        "Do not repeat the question back to the user before answering it.",
        "When asked for code, give a complete runnable snippet and nothing else.",
        "Keep a friendly, patient tone, even when the user is frustrated.",
    ];
    let mut prompt = String::from(
        "You are the help desk assistant of a public library. Follow these rules strictly.\n",
    );
    for round in 1..=5 {
        for (i, rule) in rules.iter().enumerate() {
            prompt.push_str(&format!("Rule {round}.{}: {rule}\n", i + 1));
        }
    }
    prompt
}

/// One streamed chat completion: (time to first token, the answer's text, tokens
/// received), or why it failed.
async fn chat(
    client: &reqwest::Client,
    url: &str,
    messages: &[Value],
    max_tokens: Option<u32>,
    deadline: Option<Instant>,
    streamed: Option<&AtomicUsize>,
) -> Result<(Duration, String, u32), String> {
    let started = Instant::now();
    let model = MODEL.get().expect("set in main");
    let mut body =
        json!({"model": model, "messages": messages, "temperature": 0.0, "stream": true});
    if let Some(max) = max_tokens {
        body["max_tokens"] = max.into();
    }
    let response = servers::post_json(client, &format!("{url}/v1/chat/completions"), &body)
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!(
            "{}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        ));
    }
    let mut events = response.bytes_stream().eventsource();
    let (mut first, mut text, mut count) = (None, String::new(), 0u32);
    loop {
        let next = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), events.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => events.next().await,
        };
        let Some(Ok(event)) = next else { break };
        if event.data == "[DONE]" {
            break;
        }
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        if let Some(piece) = data["choices"][0]["delta"]["content"].as_str()
            && !piece.is_empty()
        {
            if first.is_none() {
                first = Some(started.elapsed());
                if let Some(streamed) = streamed {
                    streamed.fetch_add(1, Ordering::Relaxed);
                }
            }
            text.push_str(piece);
            count += 1;
        }
    }
    Ok((first.unwrap_or_default(), text, count))
}

/// What one workload measured on one server.
#[derive(Debug, Clone, Default)]
struct Measured {
    /// `conversation`: TTFT of each turn, in ms.
    turns_ms: Vec<f64>,
    ttft_p50_ms: f64,
    ttft_p95_ms: f64,
    aggregate_tps: f64,
    /// `shared-prompt` on rbee-host: prompt tokens found in the prefix cache, of those
    /// looked up, after the warm-up request.
    prefix_hit_share: Option<f64>,
    /// `no-max-tokens`: requests running at once, at most (the server's own gauge:
    /// `rbee:num_requests_running`, `llamacpp:requests_processing`).
    most_running: f64,
    /// `no-max-tokens`: clients whose first chat had streamed a token within the window.
    chats_streaming: usize,
    failed: usize,
}

fn quantile(values: &[Duration], q: f64) -> f64 {
    let mut values = values.to_vec();
    values.sort();
    values
        .get(((values.len().max(1) - 1) as f64 * q).round() as usize)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

async fn conversation(url: &str) -> Measured {
    let client = reqwest::Client::new();
    let mut messages = Vec::new();
    let mut measured = Measured::default();
    for (turn, topic) in TOPICS[..12].iter().enumerate() {
        messages.push(json!({"role": "user", "content": user_message(topic)}));
        match chat(&client, url, &messages, Some(64), None, None).await {
            Ok((ttft, answer, _)) => {
                measured.turns_ms.push(ttft.as_secs_f64() * 1e3);
                messages.push(json!({"role": "assistant", "content": answer}));
            }
            Err(error) => {
                eprintln!("turn {}: {error}", turn + 1);
                measured.failed += 1;
                return measured;
            }
        }
    }
    measured
}

async fn shared_prompt(server: Server, url: &str) -> Measured {
    let client = reqwest::Client::new();
    let system = json!({"role": "system", "content": system_prompt()});
    let ask = |topic: &str| {
        vec![
            system.clone(),
            json!({"role": "user", "content": format!("In one sentence: what is {topic}?")}),
        ]
    };
    // One request first, as a deployment sees its system prompt before the rush.
    let _ = chat(&client, url, &ask("a library card"), Some(8), None, None).await;
    let is_rbee = server != Server::LlamaCpp;
    let (queried, hit) = if is_rbee {
        (
            metric(url, "rbee:prefix_cache_queries_total").await,
            metric(url, "rbee:prefix_cache_hits_total").await,
        )
    } else {
        (0.0, 0.0)
    };
    let started = Instant::now();
    let tasks: Vec<_> = TOPICS[..8]
        .iter()
        .map(|topic| {
            let (client, url, messages) = (client.clone(), url.to_string(), ask(topic));
            tokio::spawn(async move { chat(&client, &url, &messages, Some(32), None, None).await })
        })
        .collect();
    let mut measured = Measured::default();
    let (mut ttfts, mut tokens) = (Vec::new(), 0);
    for task in tasks {
        match task.await.expect("a client") {
            Ok((ttft, _, count)) => {
                ttfts.push(ttft);
                tokens += count;
            }
            Err(error) => {
                eprintln!("{}: {error}", server.name());
                measured.failed += 1;
            }
        }
    }
    measured.aggregate_tps = tokens as f64 / started.elapsed().as_secs_f64();
    measured.ttft_p50_ms = quantile(&ttfts, 0.5);
    measured.ttft_p95_ms = quantile(&ttfts, 0.95);
    if is_rbee {
        let queried = metric(url, "rbee:prefix_cache_queries_total").await - queried;
        let hit = metric(url, "rbee:prefix_cache_hits_total").await - hit;
        measured.prefix_hit_share = Some(hit / queried.max(1.0));
    }
    measured
}

async fn no_max_tokens(server: Server, url: &str, window: Duration) -> Measured {
    let client = reqwest::Client::new();
    let streaming = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + window;
    let started = Instant::now();
    let tasks: Vec<_> = TOPICS
        .iter()
        .map(|topic| {
            let (client, url, streaming) = (client.clone(), url.to_string(), streaming.clone());
            let messages = vec![json!({"role": "user", "content": user_message(topic)})];
            tokio::spawn(async move {
                // Chat after chat until the window closes, as users who keep talking; the
                // first chat's first token counts the client as streaming.
                let mut tokens = 0;
                let mut first = Some(&*streaming);
                let mut failed = Vec::new();
                while Instant::now() < deadline {
                    let sent = chat(&client, &url, &messages, None, Some(deadline), first.take());
                    match sent.await {
                        Ok((_, _, count)) => tokens += count,
                        Err(error) => failed.push(error),
                    }
                }
                (tokens, failed)
            })
        })
        .collect();
    // The server's own count of the requests it runs, sampled through the window.
    let gauge = match server {
        Server::LlamaCpp => "llamacpp:requests_processing",
        _ => "rbee:num_requests_running",
    };
    let mut most_running = 0f64;
    while Instant::now() < deadline {
        most_running = most_running.max(metric(url, gauge).await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut measured = Measured::default();
    let mut tokens = 0;
    for task in tasks {
        let (count, failed) = task.await.expect("a client");
        tokens += count;
        for error in failed {
            eprintln!("{}: {error}", server.name());
            measured.failed += 1;
        }
    }
    measured.aggregate_tps = tokens as f64 / started.elapsed().as_secs_f64();
    measured.most_running = most_running;
    measured.chats_streaming = streaming.load(Ordering::Relaxed);
    measured
}

/// Each figure's median over the repeats (turn by turn for the conversation).
fn medians(repeats: &[Measured]) -> Measured {
    let of = |f: fn(&Measured) -> f64| median(repeats.iter().map(f).collect());
    let turns = repeats.iter().map(|m| m.turns_ms.len()).min().unwrap_or(0);
    Measured {
        turns_ms: (0..turns)
            .map(|t| median(repeats.iter().map(|m| m.turns_ms[t]).collect()))
            .collect(),
        ttft_p50_ms: of(|m| m.ttft_p50_ms),
        ttft_p95_ms: of(|m| m.ttft_p95_ms),
        aggregate_tps: of(|m| m.aggregate_tps),
        prefix_hit_share: repeats[0]
            .prefix_hit_share
            .map(|_| of(|m| m.prefix_hit_share.unwrap_or(0.0))),
        most_running: of(|m| m.most_running),
        chats_streaming: repeats.iter().map(|m| m.chats_streaming).min().unwrap_or(0),
        failed: repeats.iter().map(|m| m.failed).sum(),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let stem = args
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned());
    MODEL.get_or_init(|| stem.unwrap_or_default());
    let mut servers = vec![Server::RbeeHost, Server::RbeeHostNoPrefixCache];
    if args.llama_server.is_some() {
        servers.push(Server::LlamaCpp);
    }
    let window = Duration::from_secs(args.window);
    let mut results: Vec<(String, Server, Vec<Measured>)> = Vec::new();
    for workload in &args.workloads {
        for &server in &servers {
            results.push((workload.clone(), server, Vec::new()));
        }
    }
    for repeat in 0..args.repeats.max(1) {
        for (workload, server, measured) in &mut results {
            let slots = match workload.as_str() {
                "conversation" => 1,
                "shared-prompt" => 8,
                "no-max-tokens" => 16,
                other => panic!("unknown workload {other}"),
            };
            let running = server.start(&args, slots).await;
            let m = match workload.as_str() {
                "conversation" => conversation(&running.url).await,
                "shared-prompt" => shared_prompt(*server, &running.url).await,
                _ => no_max_tokens(*server, &running.url, window).await,
            };
            eprintln!(
                "repeat {}: {workload} on {}: {m:?}",
                repeat + 1,
                server.name()
            );
            measured.push(m);
        }
    }
    let mut lines = Vec::new();
    for (workload, server, measured) in &results {
        let m = medians(measured);
        match workload.as_str() {
            "conversation" => {
                let turns: Vec<String> = m.turns_ms.iter().map(|t| format!("{t:.0}")).collect();
                println!(
                    "{workload:<14} {:<28} TTFT per turn (ms): {}",
                    server.name(),
                    turns.join(" ")
                );
            }
            "shared-prompt" => println!(
                "{workload:<14} {:<28} TTFT p50 {:>6.0} ms  p95 {:>6.0} ms  {:>6.1} tok/s{}",
                server.name(),
                m.ttft_p50_ms,
                m.ttft_p95_ms,
                m.aggregate_tps,
                m.prefix_hit_share
                    .map(|share| format!("  prefix hits {:.0} %", share * 100.0))
                    .unwrap_or_default()
            ),
            _ => println!(
                "{workload:<14} {:<28} {:>2} of 16 chats streamed, at most {:.0} running at once  {:>6.1} tok/s",
                server.name(),
                m.chats_streaming,
                m.most_running,
                m.aggregate_tps
            ),
        }
        if m.failed > 0 {
            println!("  ({} requests failed)", m.failed);
        }
        lines.push(json!({
            "workload": workload, "server": server.name(), "turns_ttft_ms": m.turns_ms,
            "ttft_p50_ms": m.ttft_p50_ms, "ttft_p95_ms": m.ttft_p95_ms,
            "aggregate_tps": m.aggregate_tps, "prefix_hit_share": m.prefix_hit_share,
            "most_running": m.most_running, "chats_streaming": m.chats_streaming,
            "failed": m.failed,
        }));
    }
    for line in lines {
        println!("{line}");
    }
}
