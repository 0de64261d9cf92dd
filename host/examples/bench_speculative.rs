//! Speculative decoding from the context (`--speculative ngram`): rbee-host with it off and
//! on (its drafts sized by measured step costs, and with `--draft-length max`, every match
//! drafted whatever it costs, as llama-server drafts), another rbee-host binary with
//! `--speculative ngram` when given (`--baseline-rbee-host`, an earlier commit's, copied
//! aside), and, when given, llama.cpp's `llama-server` plain and with its own n-gram drafting
//! (`--spec-type`), on the same GGUF, server by server in turn for each repeat so all see
//! the same machine.
//!
//!     cargo build --release -p rbee-host --examples && target/release/examples/bench_speculative \
//!         --model models/SmolLM2-135M-Instruct.Q4_1.gguf [--llama-server PATH] \
//!         [--llama-spec-type ngram-simple] [--workloads copy,short,free] [--clients 1,4] \
//!         [--baseline-rbee-host PATH]
//!
//! Workloads, all greedy and streamed (SSE, the usage in a last chunk); each client goes
//! through the workload's prompts once, starting at its own, so clients at once ask
//! different things:
//! - `copy`: input that the answer repeats, over `/v1/chat/completions` — rename a variable
//!   in a ~300-token function, repeat a list with one change, re-emit JSON with one field
//!   changed; up to 320 tokens back.
//! - `short`: the serving benchmark's short prompts (lists, counting, code openings) over
//!   `/v1/completions`, up to 96 tokens back.
//! - `free`: explanations in prose over `/v1/chat/completions`, text that does not repeat
//!   its input, up to 96 tokens back.
//!
//! Reported per workload and client count: aggregate tokens/s (completion tokens over the
//! wall time, prompts' reads included) and its ratio to rbee-host with `--speculative off`;
//! the decode phase's tokens/s (each answer's tokens after its first over the time after its
//! first text, all answers together: what speculation speeds up, the prompt's read being
//! the same with it or without) and its ratio to `off`; the median time to first text; the
//! share of drafted tokens
//! accepted and the mean accepted length (tokens a verifying pass yields: the accepted
//! drafts plus the model's own, vLLM's measure), and whether rbee-host's answers with
//! speculation are the very answers without it. Medians over `--repeats`; one JSON line per
//! server, workload and client count follows the table, for scripts.

mod servers;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
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
    /// llama-server's n-gram drafting (`--spec-type`): `ngram-simple`, `ngram-map-k`,
    /// `ngram-mod`…
    #[arg(long, default_value = "ngram-simple")]
    llama_spec_type: String,
    /// Another rbee-host binary, run with `--speculative ngram` beside this build's.
    #[arg(long)]
    baseline_rbee_host: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "copy,short,free")]
    workloads: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    clients: Vec<usize>,
    /// Measurements per server, workload and client count, taken in turns; the medians are
    /// reported.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Server {
    RbeeHostOff,
    RbeeHostNgram,
    /// `--speculative ngram --draft-length max`.
    RbeeHostNgramMax,
    /// `--baseline-rbee-host` with `--speculative ngram`.
    BaselineNgram,
    LlamaCpp,
    LlamaCppNgram,
}

impl Server {
    fn name(self, args: &Args) -> String {
        match self {
            Server::RbeeHostOff => "rbee-host --speculative off".into(),
            Server::RbeeHostNgram => "rbee-host --speculative ngram".into(),
            Server::RbeeHostNgramMax => "rbee-host ngram --draft-length max".into(),
            Server::BaselineNgram => "baseline --speculative ngram".into(),
            Server::LlamaCpp => "llama-server".into(),
            Server::LlamaCppNgram => format!("llama-server --spec-type {}", args.llama_spec_type),
        }
    }

    fn is_rbee(self) -> bool {
        !matches!(self, Server::LlamaCpp | Server::LlamaCppNgram)
    }

    /// Whether it is an rbee-host that drafts (its answers must be those without).
    fn is_rbee_ngram(self) -> bool {
        self.is_rbee() && self != Server::RbeeHostOff
    }

    async fn start(self, args: &Args, slots: usize) -> Running {
        if self.is_rbee() {
            let binary = match self {
                Server::BaselineNgram => args.baseline_rbee_host.clone().expect("a baseline"),
                _ => servers::rbee_host_beside(),
            };
            let extra: &[&str] = match self {
                Server::RbeeHostOff => &["--speculative", "off"],
                Server::RbeeHostNgramMax => &["--speculative", "ngram", "--draft-length", "max"],
                _ => &["--speculative", "ngram"],
            };
            return servers::rbee_host(&binary, &args.guest, &args.model, slots, extra).await;
        }
        let binary = args.llama_server.as_ref().expect("--llama-server");
        // The chat template from the GGUF, as rbee-host's guest uses it.
        let mut extra = vec!["--jinja"];
        if self == Server::LlamaCppNgram {
            extra.extend(["--spec-type", &args.llama_spec_type]);
        }
        servers::llama_server(binary, &args.model, slots, 4096, &extra).await
    }
}

/// The model's name on the OpenAI routes: rbee-host serves it under its file's stem (and
/// refuses another name); llama-server takes any.
static MODEL: OnceLock<String> = OnceLock::new();

/// A request of a workload: a chat message or a completion prompt, and its token budget.
#[derive(Clone)]
enum Request {
    Chat(String, u32),
    Completion(String, u32),
}

const FUNCTION_A: &str = r#"def summarize_orders(items, tax_rate, discounts):
    """Return the subtotal, tax and total of a list of order items."""
    subtotal = 0.0
    for item in items:
        price = item["price"] * item["quantity"]
        code = item.get("discount_code")
        if code in discounts:
            price = price * (1.0 - discounts[code])
        subtotal += price
    tax = round(subtotal * tax_rate, 2)
    total = round(subtotal + tax, 2)
    count = sum(item["quantity"] for item in items)
    largest = max(items, key=lambda item: item["price"] * item["quantity"])
    return {
        "subtotal": round(subtotal, 2),
        "tax": tax,
        "total": total,
        "count": count,
        "largest": largest["name"],
    }"#;

const FUNCTION_B: &str = r#"def parse_log_lines(lines, level_filter):
    """Group log lines by level, keeping those at or above the filter."""
    levels = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    minimum = levels.index(level_filter)
    grouped = {level: [] for level in levels[minimum:]}
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) < 3:
            continue
        timestamp, level, message = parts
        if level not in grouped:
            continue
        grouped[level].append({"time": timestamp, "message": message.strip()})
    for level in grouped:
        grouped[level].sort(key=lambda entry: entry["time"])
    return grouped"#;

const JSON_RECORD: &str = r#"{"id": 4182, "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "city": "London"}, "items": [{"sku": "BK-101", "title": "Notes on the Analytical Engine", "quantity": 2, "price": 12.5}, {"sku": "BK-204", "title": "Sketch of the Engine", "quantity": 1, "price": 30.0}, {"sku": "PN-009", "title": "Fountain pen", "quantity": 3, "price": 4.25}], "shipping": {"method": "post", "days": 3}, "status": "pending", "notes": "leave at the front desk"}"#;

fn copy_requests() -> Vec<Request> {
    let fruits = [
        "apple",
        "banana",
        "cherry",
        "date",
        "elderberry",
        "fig",
        "grape",
        "honeydew",
        "kiwi",
        "lemon",
        "mango",
        "nectarine",
        "orange",
        "papaya",
        "quince",
        "raspberry",
        "strawberry",
        "tangerine",
        "watermelon",
        "apricot",
        "blueberry",
        "coconut",
        "guava",
        "lime",
    ];
    let list: String = fruits
        .iter()
        .enumerate()
        .map(|(i, fruit)| format!("{}. {fruit}\n", i + 1))
        .collect();
    [
        format!(
            "Rewrite this function, renaming the variable `items` to `order_lines`. \
             Output only the code.\n\n```python\n{FUNCTION_A}\n```"
        ),
        format!("Repeat this list exactly, but replace banana with plum:\n\n{list}"),
        format!(
            "Rewrite this function, renaming `grouped` to `by_level`. Output only the \
             code.\n\n```python\n{FUNCTION_B}\n```"
        ),
        format!(
            "Output this JSON again with \"status\" set to \"shipped\" and nothing else \
             changed:\n\n{JSON_RECORD}"
        ),
    ]
    .into_iter()
    .map(|message| Request::Chat(message, 320))
    .collect()
}

/// `bench_serving`'s short prompts, whose greedy continuation keeps going.
fn short_requests() -> Vec<Request> {
    [
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
        "Here is a list of fruits: apple, banana, cherry, date,",
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
        "A B C D E F G H I J K L M N O P",
        "Monday, Tuesday, Wednesday, Thursday,",
        "for i in range(10):\n    print(i)\nfor j in range(",
        "The numbers from one to twenty are: one, two, three, four,",
        "import numpy as np\nimport pandas as pd\nimport",
    ]
    .into_iter()
    .map(|prompt| Request::Completion(prompt.into(), 96))
    .collect()
}

fn free_requests() -> Vec<Request> {
    [
        "why the sky is blue",
        "how bread rises",
        "the history of the bicycle",
        "how a refrigerator cools",
    ]
    .into_iter()
    .map(|topic| {
        let message = format!(
            "Explain {topic} in plain words, in a short paragraph, with one concrete example."
        );
        Request::Chat(message, 96)
    })
    .collect()
}

fn requests(workload: &str) -> Vec<Request> {
    match workload {
        "copy" => copy_requests(),
        "short" => short_requests(),
        "free" => free_requests(),
        other => panic!("unknown workload {other} (copy, short, free)"),
    }
}

/// What one answer gave: its text, its completion tokens, when its first text and its end
/// came (from the request's start) and, from llama-server, its drafted and accepted tokens.
struct Answer {
    text: String,
    tokens: u64,
    first: Duration,
    total: Duration,
    drafted: u64,
    accepted: u64,
}

/// One request, streamed as a client streams it (`stream_options.include_usage` for the
/// token count): the text is the deltas put together, the first token's time is when the
/// first text arrived.
async fn ask(client: &reqwest::Client, url: &str, request: &Request) -> Result<Answer, String> {
    let model = MODEL.get().expect("set in main");
    let (path, mut body) = match request {
        Request::Chat(message, max_tokens) => (
            "/v1/chat/completions",
            json!({"model": model, "messages": [{"role": "user", "content": message}],
                   "max_tokens": max_tokens, "temperature": 0.0}),
        ),
        Request::Completion(prompt, max_tokens) => (
            "/v1/completions",
            json!({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                   "temperature": 0.0}),
        ),
    };
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let started = Instant::now();
    let response = servers::post_json(client, &format!("{url}{path}"), &body)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(format!("{status}: {body}"));
    }
    let mut events = response.bytes_stream().eventsource();
    let (mut text, mut first, mut pieces) = (String::new(), None, 0);
    let (mut usage, mut timings) = (Value::Null, Value::Null);
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| e.to_string())?;
        if event.data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&event.data).map_err(|e| e.to_string())?;
        let choice = &chunk["choices"][0];
        let piece = choice["delta"]["content"]
            .as_str()
            .or_else(|| choice["text"].as_str())
            .unwrap_or_default();
        if !piece.is_empty() {
            first.get_or_insert_with(|| started.elapsed());
            text.push_str(piece);
            pieces += 1;
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
        if !chunk["timings"].is_null() {
            timings = chunk["timings"].clone();
        }
    }
    let total = started.elapsed();
    let count = |value: &Value| value.as_u64().unwrap_or(0);
    Ok(Answer {
        text,
        // A server that sends no usage: its text pieces (a token or more each).
        tokens: usage["completion_tokens"].as_u64().unwrap_or(pieces),
        first: first.unwrap_or(total),
        total,
        drafted: count(&timings["draft_n"]),
        accepted: count(&timings["draft_n_accepted"]),
    })
}

/// What one measurement of one server gave.
#[derive(Debug, Clone, Default)]
struct Measured {
    tokens_per_second: f64,
    /// Tokens after each answer's first over the time from its first to its last (the
    /// decode phase, which speculation changes; the prompt's read it does not), all answers
    /// together: a stream's own speed, as llama-server's `predicted_per_second`.
    decode_tokens_per_second: f64,
    /// The median time to the first text.
    first_token: Duration,
    drafts: f64,
    drafted: f64,
    accepted: f64,
    /// Each request's answer, by (client, request index).
    answers: BTreeMap<(usize, usize), String>,
    failed: usize,
}

impl Measured {
    /// Drafted tokens accepted, of those drafted.
    fn acceptance(&self) -> Option<f64> {
        (self.drafted > 0.0).then(|| self.accepted / self.drafted)
    }

    /// Tokens a verifying pass yields: its accepted drafts and the model's own token.
    fn mean_accepted_length(&self) -> Option<f64> {
        (self.drafts > 0.0).then(|| 1.0 + self.accepted / self.drafts)
    }
}

/// The spec-decode counters of rbee-host: drafts, drafted tokens, accepted tokens.
async fn rbee_counters(url: &str) -> [f64; 3] {
    [
        metric(url, "rbee:spec_decode_num_drafts_total").await,
        metric(url, "rbee:spec_decode_num_draft_tokens_total").await,
        metric(url, "rbee:spec_decode_num_accepted_tokens_total").await,
    ]
}

/// `clients` clients at once, each through every request of `workload` once.
async fn measure(server: Server, url: &str, workload: &[Request], clients: usize) -> Measured {
    let client = reqwest::Client::new();
    let before = rbee_counters(url).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (client, url, workload) = (client.clone(), url.to_string(), workload.to_vec());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for k in 0..workload.len() {
                    let index = (c + k) % workload.len();
                    answers.push((index, ask(&client, &url, &workload[index]).await));
                }
                answers
            })
        })
        .collect();
    let mut measured = Measured::default();
    let mut tokens = 0;
    let (mut decode_tokens, mut decode_time, mut firsts) = (0, Duration::ZERO, Vec::new());
    for (c, task) in tasks.into_iter().enumerate() {
        for (index, answer) in task.await.expect("a client task") {
            match answer {
                Ok(answer) => {
                    tokens += answer.tokens;
                    if answer.tokens > 1 {
                        decode_tokens += answer.tokens - 1;
                        decode_time += answer.total - answer.first;
                    }
                    firsts.push(answer.first);
                    measured.drafts += (answer.drafted > 0) as u64 as f64;
                    measured.drafted += answer.drafted as f64;
                    measured.accepted += answer.accepted as f64;
                    measured.answers.insert((c, index), answer.text);
                }
                Err(error) => {
                    eprintln!("{server:?}: {error}");
                    measured.failed += 1;
                }
            }
        }
    }
    measured.tokens_per_second = tokens as f64 / started.elapsed().as_secs_f64();
    measured.decode_tokens_per_second = decode_tokens as f64 / decode_time.as_secs_f64();
    if !firsts.is_empty() {
        measured.first_token = median(firsts);
    }
    if server.is_rbee() {
        let after = rbee_counters(url).await;
        measured.drafts = after[0] - before[0];
        measured.drafted = after[1] - before[1];
        measured.accepted = after[2] - before[2];
    } else {
        // llama-server reports each answer's drafted and accepted totals, not its drafts:
        // the mean accepted length is rbee-host's only.
        measured.drafts = 0.0;
    }
    measured
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let stem = args
        .model
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model");
    MODEL.set(stem.to_string()).expect("set once");
    let mut servers = vec![
        Server::RbeeHostOff,
        Server::RbeeHostNgram,
        Server::RbeeHostNgramMax,
    ];
    if args.baseline_rbee_host.is_some() {
        servers.push(Server::BaselineNgram);
    }
    if args.llama_server.is_some() {
        servers.extend([Server::LlamaCpp, Server::LlamaCppNgram]);
    }
    let slots = args.clients.iter().copied().max().unwrap_or(1);
    // (server, workload, clients) → one measurement per repeat.
    let mut results: BTreeMap<(Server, String, usize), Vec<Measured>> = BTreeMap::new();
    for repeat in 0..args.repeats {
        for &server in &servers {
            let running = server.start(&args, slots).await;
            // One request first: the first pass of a fresh process pays for its pages.
            let warm = Request::Completion("Hello".into(), 8);
            let _ = ask(&reqwest::Client::new(), &running.url, &warm).await;
            for workload in &args.workloads {
                let prompts = requests(workload);
                for &clients in &args.clients {
                    let measured = measure(server, &running.url, &prompts, clients).await;
                    eprintln!(
                        "repeat {repeat}, {}, {workload}, {clients} client(s): {:.1} tok/s",
                        server.name(&args),
                        measured.tokens_per_second
                    );
                    results
                        .entry((server, workload.clone(), clients))
                        .or_default()
                        .push(measured);
                }
            }
        }
    }
    report(&args, &results);
}

fn report(args: &Args, results: &BTreeMap<(Server, String, usize), Vec<Measured>>) {
    println!(
        "{:<44} {:>8} {:>7} {:>8} {:>7} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9}",
        "server",
        "workload",
        "clients",
        "tok/s",
        "vs off",
        "decode/s",
        "vs off",
        "TTFT ms",
        "accepted",
        "mean len",
        "same text"
    );
    for ((server, workload, clients), repeats) in results {
        let tps = median(repeats.iter().map(|m| m.tokens_per_second).collect());
        let off = &results[&(Server::RbeeHostOff, workload.clone(), *clients)];
        let off_tps = median(off.iter().map(|m| m.tokens_per_second).collect());
        let decode = median(repeats.iter().map(|m| m.decode_tokens_per_second).collect());
        let off_decode = median(off.iter().map(|m| m.decode_tokens_per_second).collect());
        let first_token = median(repeats.iter().map(|m| m.first_token).collect());
        // Greedy answers with speculation are the answers without it, every repeat.
        let same = server.is_rbee_ngram().then(|| {
            repeats
                .iter()
                .zip(off)
                .all(|(with, without)| with.answers == without.answers)
        });
        let acceptance = median(
            repeats
                .iter()
                .map(|m| m.acceptance().unwrap_or(0.0))
                .collect(),
        );
        let length = median(
            repeats
                .iter()
                .map(|m| m.mean_accepted_length().unwrap_or(0.0))
                .collect(),
        );
        let failed: usize = repeats.iter().map(|m| m.failed).sum();
        let show = |value: f64, format: fn(f64) -> String| {
            if value > 0.0 {
                format(value)
            } else {
                "-".into()
            }
        };
        println!(
            "{:<44} {:>8} {:>7} {:>8.1} {:>7} {:>9.1} {:>7} {:>8.0} {:>9} {:>9} {:>9}{}",
            server.name(args),
            workload,
            clients,
            tps,
            format!("x{:.2}", tps / off_tps),
            decode,
            format!("x{:.2}", decode / off_decode),
            first_token.as_secs_f64() * 1e3,
            show(acceptance, |a| format!("{:.0} %", a * 100.0)),
            show(length, |l| format!("{l:.2}")),
            same.map_or("-", |same| if same { "yes" } else { "NO" }),
            if failed > 0 {
                format!("  ({failed} failed)")
            } else {
                String::new()
            }
        );
    }
    for ((server, workload, clients), repeats) in results {
        let line = json!({
            "server": server.name(args),
            "workload": workload,
            "clients": clients,
            "tokens_per_second": repeats.iter().map(|m| m.tokens_per_second).collect::<Vec<_>>(),
            "decode_tokens_per_second": repeats.iter().map(|m| m.decode_tokens_per_second).collect::<Vec<_>>(),
            "first_token_ms": repeats.iter().map(|m| m.first_token.as_secs_f64() * 1e3).collect::<Vec<_>>(),
            "acceptance": repeats.iter().map(Measured::acceptance).collect::<Vec<_>>(),
            "mean_accepted_length": repeats.iter().map(Measured::mean_accepted_length).collect::<Vec<_>>(),
            "failed": repeats.iter().map(|m| m.failed).sum::<usize>(),
        });
        println!("{line}");
    }
}
