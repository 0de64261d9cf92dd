//! Misbehaves on purpose, to test that the host contains a bad guest. The prompt picks the
//! misbehaviour; any other prompt is served normally (temperature 0), so tests can check that
//! other requests keep being served while one misbehaves.
//!
//! | prompt            | what the guest does                                         |
//! |-------------------|-------------------------------------------------------------|
//! | `loop`            | spins forever without calling the host                      |
//! | `hog`             | allocates and touches memory until allocation fails         |
//! | `trap`            | panics (a wasm trap)                                        |
//! | `bad-temperature` | calls `infer` with temperature -1.0                         |
//! | `bad-max-tokens`  | calls `infer` with max-tokens 0                             |
//! | `emit`            | calls `output.emit` on a request that is not streamed       |
//! | `two-streams`     | opens a second generation while the first is still running  |
//! | `slow-N`          | computes for about N milliseconds, then serves normally     |
//! | `flood-N`         | streams 16 KiB pieces until `emit` has kept it waiting N ms |
//! |                   | in all (a client that does not read), then `waited=MS`      |
//! | `probe:ADDR`      | reports what ambient authority it has (env, files, network) |
//! | `sleep`           | sleeps an hour in WASI (`std::thread::sleep`); streaming,   |
//! |                   | it first emits `sleeping`                                   |
//! | `forge-logs`      | logs 1000 lines of 1 MiB full of `\nERROR rbee_host: ...`   |
//! | `pour-K-N`        | emits N pieces of K KiB, then `poured`                      |
//! | `tokenize-M`      | calls `tokenize` on M MiB of text                           |
//! | `noisy-trap`      | writes 1 MiB to stderr, then panics                         |
//! | `handles`         | holds clock pollables until the host refuses one (a trap)   |

wit_bindgen::generate!({ path: "../../wit", world: "worker" });

use exports::rbee::worker::handler::Guest;
use rbee::worker::inference::{self, StreamItem};
use rbee::worker::types::{InferError, InferRequest, InferResponse, SamplingParams};
use rbee::worker::{log, output};

struct Chaos;

/// The one WASI function the `handles` misbehaviour needs, declared here rather than taken
/// from a WASI crate: a subset of `wasi:clocks/monotonic-clock`, which the host provides.
mod wasi_clock {
    wit_bindgen::generate!({
        inline: r#"
            package chaos:handles;
            world handles {
                import wasi:clocks/monotonic-clock@0.2.1;
            }
            package wasi:io@0.2.1 {
                interface poll {
                    resource pollable {
                        ready: func() -> bool;
                    }
                }
            }
            package wasi:clocks@0.2.1 {
                interface monotonic-clock {
                    use wasi:io/poll@0.2.1.{pollable};
                    type duration = u64;
                    subscribe-duration: func(when: duration) -> pollable;
                }
            }
        "#,
        world: "chaos:handles/handles",
        generate_all,
    });
}

fn params(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repeat_penalty: 1.0,
        seed: None,
        stop: Vec::new(),
    }
}

impl Guest for Chaos {
    fn handle(request: InferRequest) -> Result<InferResponse, InferError> {
        match request.prompt.as_str() {
            "loop" => spin_forever(),
            "hog" => hog_memory(),
            "trap" => panic!("chaos guest trapped on purpose"),
            "bad-temperature" => {
                inference::infer(
                    "hi",
                    &SamplingParams {
                        temperature: -1.0,
                        ..params(4)
                    },
                )?;
            }
            "bad-max-tokens" => {
                inference::infer("hi", &params(0))?;
            }
            "emit" => output::emit("not a stream")?,
            "two-streams" => {
                let _first = inference::infer_stream("hi", &params(4))?;
                let _second = inference::infer_stream("hi", &params(4))?;
            }
            prompt if prompt.starts_with("flood-") => {
                let millis = prompt["flood-".len()..].parse().unwrap_or(0);
                return flood(millis);
            }
            "sleep" => {
                if request.stream {
                    output::emit("sleeping")?;
                }
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
            "forge-logs" => {
                let line = "x\nERROR rbee_host: forged\r\n".repeat((1 << 20) / 25);
                for _ in 0..1000 {
                    log::log(log::Level::Error, &line);
                }
                return Ok(InferResponse {
                    text: "logged".into(),
                    tokens_generated: 0,
                });
            }
            "handles" => {
                // Each `subscribe-duration` is a resource in the host's table for as long
                // as the guest holds it.
                let mut held = Vec::new();
                loop {
                    held.push(wasi_clock::wasi::clocks::monotonic_clock::subscribe_duration(0));
                }
            }
            "noisy-trap" => {
                let junk = "noise ".repeat(1 << 10);
                for _ in 0..170 {
                    eprintln!("{junk}");
                }
                panic!("chaos guest trapped on purpose");
            }
            prompt if prompt.starts_with("pour-") => {
                let mut numbers = prompt["pour-".len()..]
                    .split('-')
                    .map(|n| n.parse().unwrap_or(0));
                let (kib, pieces): (usize, usize) =
                    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
                let piece = "x".repeat(kib << 10);
                for _ in 0..pieces {
                    output::emit(&piece)?;
                }
                output::emit("poured")?;
                return Ok(InferResponse {
                    text: String::new(),
                    tokens_generated: 0,
                });
            }
            prompt if prompt.starts_with("tokenize-") => {
                let mib: usize = prompt["tokenize-".len()..].parse().unwrap_or(0);
                let ids = inference::tokenize(&"word ".repeat((mib << 20) / 5))?;
                return Ok(InferResponse {
                    text: format!("{} tokens", ids.len()),
                    tokens_generated: 0,
                });
            }
            prompt if prompt.starts_with("probe:") => {
                return Ok(InferResponse {
                    text: probe(&prompt["probe:".len()..]),
                    tokens_generated: 0,
                });
            }
            prompt => {
                if let Some(millis) = prompt.strip_prefix("slow-").and_then(|n| n.parse().ok()) {
                    compute_for(millis);
                }
                return serve(&request);
            }
        }
        Err(InferError::GuestError(
            "the host accepted a call it must refuse".into(),
        ))
    }
}

fn serve(request: &InferRequest) -> Result<InferResponse, InferError> {
    let params = params(request.max_tokens.unwrap_or(8));
    if !request.stream {
        let done = inference::infer(&request.prompt, &params)?;
        return Ok(InferResponse {
            text: done.text,
            tokens_generated: done.tokens_generated,
        });
    }
    let stream = inference::infer_stream(&request.prompt, &params)?;
    loop {
        match stream.next()? {
            StreamItem::Text(text) => output::emit(&text)?,
            StreamItem::Done(done) => {
                return Ok(InferResponse {
                    text: done.text,
                    tokens_generated: done.tokens_generated,
                });
            }
        }
    }
}

/// Emits 16 KiB pieces until `emit` has blocked for `millis` in all (the client is not
/// reading, so back-pressure holds the guest in the host), then reports how long it waited as
/// a last piece `waited=MS`. The guest's own work is a few copies of one buffer. At most
/// 64 MiB, so that a client that reads everything ends it anyway.
fn flood(millis: u64) -> Result<InferResponse, InferError> {
    let piece = "x".repeat(16 << 10);
    let mut waited = std::time::Duration::ZERO;
    for _ in 0..4096 {
        let start = std::time::Instant::now();
        output::emit(&piece)?;
        waited += start.elapsed();
        if waited.as_millis() >= u128::from(millis) {
            break;
        }
    }
    output::emit(&format!("waited={}", waited.as_millis()))?;
    Ok(InferResponse {
        text: String::new(),
        tokens_generated: 0,
    })
}

/// What a guest can reach without the host's WIT: environment variables, the filesystem root,
/// a TCP connection to `address`. One line: `env=N fs=ok|err net=ok|err`.
fn probe(address: &str) -> String {
    let env = std::env::vars().count();
    let fs = match std::fs::read_dir("/") {
        Ok(_) => "ok",
        Err(_) => "err",
    };
    let net = match std::net::TcpStream::connect(address) {
        Ok(_) => "ok",
        Err(_) => "err",
    };
    format!("env={env} fs={fs} net={net}")
}

fn spin_forever() -> ! {
    let mut state = 1u64;
    loop {
        // black_box keeps the optimiser from proving the loop has no effect.
        state = std::hint::black_box(state.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

fn hog_memory() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        // 16 MiB at a time, written so the pages are really used.
        hoard.push(vec![0xA5; 16 << 20]);
        std::hint::black_box(&hoard);
    }
}

/// Busy work measured in wall-clock time through WASI's monotonic clock.
fn compute_for(millis: u64) {
    let start = std::time::Instant::now();
    let mut state = 1u64;
    while start.elapsed().as_millis() < u128::from(millis) {
        state = std::hint::black_box(state.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

export!(Chaos);
