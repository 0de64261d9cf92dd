//! Structured output's cost: chat answers with and without a JSON-schema `response_format`,
//! on rbee-host and, when given, llama.cpp's `llama-server` (`--jinja`, the same schema
//! through its own grammar sampler), on the same GGUF, server by server in turn for each
//! repeat so all see the same machine.
//!
//!     cargo build -p rbee-host --example bench_structured && target/debug/examples/bench_structured \
//!         --model models/SmolLM2-135M-Instruct.Q4_1.gguf [--llama-server PATH] [--clients 1,4]
//!
//! Each client asks for a product description as JSON, once per product, at temperature 0:
//! `free` without a format (the model writes what it likes), `schema` with a JSON schema
//! (required fields, an enum, a number range, a bounded array of bounded strings). Reported
//! per server, mode and client count: aggregate completion tokens per second, the ratio of
//! `schema` to `free`, how many `schema` answers parse and hold the schema's fields, and,
//! from rbee-host's `/metrics`, the 50th and 99th percentile bounds of the time to compute
//! one token's mask. `rbee-host-step` is rbee-host with `--no-jump-forward` (the tokens a
//! schema forces decoded one per step), `schema` only, compared with rbee-host's `free`.
//! Medians over `--repeats`; one JSON line per row follows the table.

mod servers;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use clap::Parser;
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
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    clients: Vec<usize>,
    /// Tokens per answer at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Measurements per server, mode and client count, taken in turns; the medians are
    /// reported.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Server {
    RbeeHost,
    RbeeHostStepping,
    LlamaCpp,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::RbeeHost => "rbee-host",
            Server::RbeeHostStepping => "rbee-host-step",
            Server::LlamaCpp => "llama-server",
        }
    }

    async fn start(self, args: &Args, slots: usize) -> Running {
        match self {
            Server::RbeeHost | Server::RbeeHostStepping => {
                let binary = servers::rbee_host_beside();
                let extra: &[&str] = match self {
                    Server::RbeeHostStepping => &["--no-jump-forward"],
                    _ => &[],
                };
                servers::rbee_host(&binary, &args.guest, &args.model, slots, extra).await
            }
            Server::LlamaCpp => {
                let binary = args.llama_server.as_ref().expect("--llama-server");
                servers::llama_server(binary, &args.model, slots, 4096, &["--jinja"]).await
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Free,
    Schema,
}

/// The model's name on the OpenAI routes: rbee-host serves it under its file's stem.
static MODEL: OnceLock<String> = OnceLock::new();

const PRODUCTS: [&str; 8] = [
    "a steel water bottle",
    "a pair of running shoes",
    "a paperback novel about the sea",
    "a wireless keyboard",
    "a bag of coffee beans",
    "a wool scarf",
    "a desk lamp",
    "a set of watercolour paints",
];

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "category": {"enum": ["home", "sport", "books", "electronics", "food", "clothing", "art"]},
            "price": {"type": "number", "minimum": 0, "maximum": 1000},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 4},
            "in_stock": {"type": "boolean"}
        },
        "required": ["name", "category", "price", "tags", "in_stock"],
        "additionalProperties": false
    })
}

/// Whether `text` is an answer the schema holds: the fields, their types and ranges.
fn holds_schema(text: &str) -> bool {
    let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    let categories = [
        "home",
        "sport",
        "books",
        "electronics",
        "food",
        "clothing",
        "art",
    ];
    let tags = fields.get("tags").and_then(Value::as_array);
    fields.len() == 5
        && fields["name"]
            .as_str()
            .is_some_and(|n| n.chars().count() <= 40)
        && fields["category"]
            .as_str()
            .is_some_and(|c| categories.contains(&c))
        && fields["price"]
            .as_f64()
            .is_some_and(|p| (0.0..=1000.0).contains(&p))
        && tags.is_some_and(|tags| {
            (1..=4).contains(&tags.len())
                && tags
                    .iter()
                    .all(|t| t.as_str().is_some_and(|t| t.chars().count() <= 16))
        })
        && fields["in_stock"].is_boolean()
}

/// One answer: its completion tokens and whether it holds the schema.
async fn ask(
    client: &reqwest::Client,
    url: &str,
    product: &str,
    mode: Mode,
    max_tokens: u32,
) -> Result<(u64, bool), String> {
    let mut body = json!({
        "model": MODEL.get().expect("set in main"),
        "messages": [{"role": "user", "content": format!(
            "Describe {product} for a shop's catalogue as a JSON object with a name, a \
             category, a price, a few tags and whether it is in stock."
        )}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    });
    if mode == Mode::Schema {
        body["response_format"] = json!({
            "type": "json_schema",
            "json_schema": {"name": "product", "schema": schema(), "strict": true}
        });
    }
    let response = servers::post_json(client, &format!("{url}/v1/chat/completions"), &body)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let tokens = body["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    Ok((tokens, holds_schema(text)))
}

#[derive(Debug, Clone, Default)]
struct Measured {
    tokens_per_second: f64,
    answers: usize,
    valid: usize,
    failed: usize,
}

/// `clients` clients at once, each asking about every product once, from its own first.
async fn measure(url: &str, mode: Mode, clients: usize, max_tokens: u32) -> Measured {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (client, url) = (client.clone(), url.to_string());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for k in 0..PRODUCTS.len() {
                    let product = PRODUCTS[(c + k) % PRODUCTS.len()];
                    answers.push(ask(&client, &url, product, mode, max_tokens).await);
                }
                answers
            })
        })
        .collect();
    let mut measured = Measured::default();
    let mut tokens = 0;
    for task in tasks {
        for answer in task.await.expect("a client task") {
            match answer {
                Ok((answer_tokens, valid)) => {
                    tokens += answer_tokens;
                    measured.answers += 1;
                    measured.valid += valid as usize;
                }
                Err(error) => {
                    eprintln!("{error}");
                    measured.failed += 1;
                }
            }
        }
    }
    measured.tokens_per_second = tokens as f64 / started.elapsed().as_secs_f64();
    measured
}

/// rbee-host's mask-time histogram from `/metrics`: (bucket upper bound in seconds,
/// cumulative count), in order.
async fn mask_histogram(url: &str) -> Vec<(f64, f64)> {
    let Ok(response) = reqwest::get(format!("{url}/metrics")).await else {
        return Vec::new();
    };
    let text = response.text().await.unwrap_or_default();
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|line| line.starts_with("rbee:constrained_mask_seconds_bucket{"))
        .filter_map(|line| {
            let bound = line.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            Some((bound, line.rsplit_once(' ')?.1.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The smallest bucket bound that holds quantile `q` of the masks.
fn quantile_bound(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    (total > 0.0).then(|| {
        buckets
            .iter()
            .find(|(_, count)| *count >= q * total)
            .map_or(f64::INFINITY, |(bound, _)| *bound)
    })
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
    let mut servers = vec![Server::RbeeHost, Server::RbeeHostStepping];
    if args.llama_server.is_some() {
        servers.push(Server::LlamaCpp);
    }
    let slots = args.clients.iter().copied().max().unwrap_or(1);
    let mut results: BTreeMap<(Server, Mode, usize), Vec<Measured>> = BTreeMap::new();
    let mut masks = Vec::new();
    for repeat in 0..args.repeats {
        for &server in &servers {
            let running = server.start(&args, slots).await;
            // One request of each mode first: a fresh process pays for its pages, and a
            // schema for its compilation.
            for mode in [Mode::Free, Mode::Schema] {
                let _ = ask(&reqwest::Client::new(), &running.url, "a cup", mode, 8).await;
            }
            // Jump-forward changes nothing without a schema.
            let modes: &[Mode] = match server {
                Server::RbeeHostStepping => &[Mode::Schema],
                _ => &[Mode::Free, Mode::Schema],
            };
            for &clients in &args.clients {
                for &mode in modes {
                    let measured = measure(&running.url, mode, clients, args.max_tokens).await;
                    eprintln!(
                        "repeat {repeat}, {}, {mode:?}, {clients} client(s): {:.1} tok/s, {}/{} valid",
                        server.name(),
                        measured.tokens_per_second,
                        measured.valid,
                        measured.answers
                    );
                    results
                        .entry((server, mode, clients))
                        .or_default()
                        .push(measured);
                }
            }
            if server == Server::RbeeHost {
                masks = mask_histogram(&running.url).await;
            }
        }
    }
    println!(
        "{:<14} {:>7} {:>7} {:>8} {:>10} {:>9}",
        "server", "mode", "clients", "tok/s", "vs free", "valid"
    );
    for ((server, mode, clients), repeats) in &results {
        let tps = median(repeats.iter().map(|m| m.tokens_per_second).collect());
        let free_server = match server {
            Server::RbeeHostStepping => Server::RbeeHost,
            other => *other,
        };
        let free = &results[&(free_server, Mode::Free, *clients)];
        let free_tps = median(free.iter().map(|m| m.tokens_per_second).collect());
        let valid: usize = repeats.iter().map(|m| m.valid).sum();
        let answers: usize = repeats.iter().map(|m| m.answers).sum();
        let failed: usize = repeats.iter().map(|m| m.failed).sum();
        println!(
            "{:<14} {:>7} {:>7} {:>8.1} {:>10} {:>9}{}",
            server.name(),
            format!("{mode:?}").to_lowercase(),
            clients,
            tps,
            format!("x{:.2}", tps / free_tps),
            format!("{valid}/{answers}"),
            if failed > 0 {
                format!("  ({failed} failed)")
            } else {
                String::new()
            }
        );
    }
    let micros = |q| quantile_bound(&masks, q).map(|s| s * 1e6);
    println!(
        "rbee-host mask time per token (last run): p50 <= {:?} us, p99 <= {:?} us, {} masks",
        micros(0.5),
        micros(0.99),
        masks.last().map_or(0.0, |(_, n)| *n)
    );
    for ((server, mode, clients), repeats) in &results {
        let line = json!({
            "server": server.name(),
            "mode": format!("{mode:?}").to_lowercase(),
            "clients": clients,
            "tokens_per_second": repeats.iter().map(|m| m.tokens_per_second).collect::<Vec<_>>(),
            "valid": repeats.iter().map(|m| m.valid).sum::<usize>(),
            "answers": repeats.iter().map(|m| m.answers).sum::<usize>(),
        });
        println!("{line}");
    }
}
