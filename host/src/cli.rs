//! Command-line interface. Accepts the flags upstream rbee uses to spawn workers
//! (`--worker-id --model --device --port --queen-url`, and `--hive-url`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use rbee_engine::{DeviceChoice, WeightFormat};

/// `--speculative`: how a generating request guesses tokens for a step to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Speculative {
    /// From what followed the latest n-gram in its own prompt and output.
    Ngram,
    /// No guesses: one token per step.
    Off,
}

/// `--kv-cache-type`: how the CPU model's KV cache keeps keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvCacheType {
    /// As computed.
    F32,
    /// Rounded to half precision: half the memory and half the reads.
    F16,
}

impl From<KvCacheType> for rbee_engine::KvCacheType {
    fn from(kind: KvCacheType) -> Self {
        match kind {
            KvCacheType::F32 => Self::F32,
            KvCacheType::F16 => Self::F16,
        }
    }
}

/// `--draft-length`: how many tokens a speculating request guesses for a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DraftLength {
    /// As many as pay, from the request's acceptance so far and the step times measured.
    Measured,
    /// All the context offers, up to `--draft-max`, whatever the rows cost.
    Max,
}

impl From<DraftLength> for rbee_engine::DraftLength {
    fn from(length: DraftLength) -> Self {
        match length {
            DraftLength::Measured => Self::Measured,
            DraftLength::Max => Self::Max,
        }
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "rbee-host",
    version,
    about = "rbee LLM worker: serves the rbee worker API with request logic in a WebAssembly guest",
    long_about = "rbee LLM worker. Serves GET /health, GET /info and POST /v1/infer (JSON or SSE), \
                  sends heartbeats to the queen, and runs the model with Burn on the GPU (wgpu) or \
                  the CPU. The request logic is a WebAssembly component (the guest, see \
                  wit/worker.wit), hot-swappable while the worker serves: replace the file, send \
                  SIGHUP, or PUT /v1/admin/guest."
)]
pub struct Args {
    /// The guest component (.wasm) implementing the `rbee:worker/worker` world.
    #[arg(long, value_name = "FILE.wasm")]
    pub guest: PathBuf,

    /// The model: a Hugging Face folder (config.json, safetensors, tokenizer.json) or a GGUF file.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,

    /// HTTP port (0 picks a free one; the chosen port is logged and reported in /info).
    #[arg(long, default_value_t = 9301)]
    pub port: u16,

    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Where the model runs: auto (a GPU if one is found, else the CPU), cpu, gpu, gpu:N, or a
    /// bare index N as the hive passes it (GPU N; 0 is the CPU on a machine without a GPU).
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,

    /// How weights are kept in memory: auto (the fastest the device supports) or f32
    /// (everything expanded, the reference for correctness checks).
    #[arg(long, default_value = "auto", value_parser = parse_weights)]
    pub weights: WeightFormat,

    /// This worker's id, as the hive assigned it (a random one otherwise).
    #[arg(long, value_parser = parse_non_empty)]
    pub worker_id: Option<String>,

    /// The queen to send heartbeats to, e.g. http://localhost:8500. No heartbeats without it.
    #[arg(long, value_name = "URL")]
    pub queen_url: Option<String>,

    /// The hive's URL, as upstream spawns workers with it: same meaning as --queen-url (heartbeats
    /// go there) when --queen-url is not given.
    #[arg(long, value_name = "URL")]
    pub hive_url: Option<String>,

    /// Seconds between heartbeats (the queen marks a worker unavailable after 3 missed beats).
    #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = parse_heartbeat_interval)]
    pub heartbeat_interval: Duration,

    /// Requests served at the same time: their sequences are decoded together, one forward
    /// pass for all of them (continuous batching). More wait in the queue. The default 4 is
    /// measured (engine/BENCHMARKS.md): on SmolLM2 and two cores, 8 gave no more tokens/s
    /// than 4 (116–121 against 110–120) and a later first token.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_concurrent: u32,

    /// KV-cache positions in the pool the running sequences share, in blocks of 16: a
    /// sequence takes blocks as it reaches new positions (not for max_tokens up front) and
    /// joins once its prompt's blocks are free; when the pool runs out, the most recently
    /// admitted sequence is preempted and resumes later. A request whose prompt and
    /// max_tokens exceed the pool is refused. Default: 1 GiB of cache for the model, and at
    /// least one full context.
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..=MAX_KV_BUDGET_TOKENS))]
    pub kv_budget_tokens: Option<u64>,

    /// How the KV cache keeps keys and values on the CPU (llama.cpp's `--cache-type-k/-v`):
    /// `f32` as computed; `f16` rounded to half precision, half the memory (the default
    /// budget then holds twice the positions) and half what attention reads per step,
    /// which pays at long contexts (the default, as llama.cpp's). The GPU path keeps its own.
    #[arg(long, value_enum, default_value = "f16")]
    pub kv_cache_type: KvCacheType,

    /// Speculative decoding from the context: `ngram` (the default) lets each generating
    /// request guess its next tokens from what followed their last occurrence in its prompt
    /// and output, and every step verifies the guesses (the answers are the same, greedy or
    /// seeded; it pays on text that repeats its input, ×1.6 on copying at one client, and
    /// drafts next to nothing where it would not pay: prose at four clients measures ×1.0);
    /// `off` decodes one token per step.
    #[arg(long, value_enum, default_value = "ngram")]
    pub speculative: Speculative,

    /// The most tokens a request guesses for one step with `--speculative ngram`.
    #[arg(long, value_name = "TOKENS", default_value_t = rbee_engine::DEFAULT_DRAFT_MAX as u32,
          value_parser = clap::value_parser!(u32).range(1..=MAX_DRAFT_MAX))]
    pub draft_max: u32,

    /// How many tokens a request guesses for a step with `--speculative ngram`: `measured`,
    /// as many as make the step's expected tokens per measured cost the most (none where
    /// guesses would not pay); `max`, all the context offers up to `--draft-max` whatever
    /// the rows cost, as llama-server's n-gram drafts (for comparing).
    #[arg(long, value_enum, default_value = "measured")]
    pub draft_length: DraftLength,

    /// Do not keep full KV blocks for later requests that begin with the same tokens (a
    /// chat's earlier turns, a shared system prompt): every prompt is computed whole.
    #[arg(long)]
    pub no_prefix_cache: bool,

    /// Do not feed the tokens a structured-output constraint forces (a JSON schema's fixed
    /// keys) in one step: decode them one per step like the rest. The answers are the same;
    /// for comparing speed.
    #[arg(long)]
    pub no_jump_forward: bool,

    /// Read long prompts with f32 gemm instead of the integer kernel that computes generated
    /// tokens: a long prompt never seen before is read ×1.1–1.3 faster, but a chat's last answer
    /// is no longer a prefix-cache hit on its next turn (its KV would not be the prompt's,
    /// bit for bit), so every turn reads it again.
    #[arg(long)]
    pub no_answer_reuse: bool,

    /// Requests that may wait for a free slot (0: none wait); beyond this the worker answers 503.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(0..=MAX_QUEUE_SIZE))]
    pub queue_size: u32,

    /// Longest a request may wait in the queue for a slot, in seconds; past it, 503.
    #[arg(long, default_value = "60", value_name = "SECONDS", value_parser = parse_request_time)]
    pub queue_timeout: Duration,

    /// Longest a request may take from arrival to the end of its answer (a stream included),
    /// in seconds; past it, 504, or a last error event in a stream.
    #[arg(long, default_value = "600", value_name = "SECONDS", value_parser = parse_request_time)]
    pub request_timeout: Duration,

    /// Open client connections. At the limit, the oldest connection that has not sent a
    /// request yet is closed for the new one (else the oldest, once its answer is done).
    /// Lowered to fit the open-file limit.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Longest a guest may compute per request, in seconds of its own time (time spent waiting
    /// on the model is not counted). A guest past it fails its request with 504.
    #[arg(long, default_value = "10", value_name = "SECONDS", value_parser = parse_guest_timeout)]
    pub guest_timeout: Duration,

    /// Memory a guest instance may use, in MiB (at most 4096, all a 32-bit WebAssembly
    /// memory can address). A guest growing past it fails its request.
    #[arg(long, default_value_t = 256, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=MAX_GUEST_MEMORY_MB))]
    pub guest_memory_mb: u64,

    /// Where compiled guests (keyed by content hash and engine settings) and, on a GPU, the
    /// kernel choices of its tuning (`gpu-tuning/`) are cached. Defaults to
    /// $XDG_CACHE_HOME/rbee-host or ~/.cache/rbee-host. Created private (0700); one that is
    /// not this user's, or that other users can write, is not used (a warning says why, and
    /// guests are compiled and kernels tuned at every start).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Do not cache compiled guests or GPU kernel tuning on disk.
    #[arg(long)]
    pub no_cache: bool,

    /// Enables PUT /v1/admin/guest and GET /v1/admin/guest, protected by this bearer token.
    #[arg(
        long,
        env = "RBEE_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        value_parser = parse_token
    )]
    pub admin_token: Option<String>,

    /// Requires `Authorization: Bearer KEY` on the OpenAI routes (/v1/models, /v1/completions,
    /// /v1/chat/completions), as llama-server and vLLM do. /health and the rbee routes stay open.
    #[arg(
        long,
        env = "RBEE_API_KEY",
        value_name = "KEY",
        hide_env_values = true,
        value_parser = parse_token
    )]
    pub api_key: Option<String>,

    /// The model's name in /v1/models, /info and heartbeats (default: the model file's stem or
    /// folder name). OpenAI requests naming another model get 404.
    #[arg(long, value_name = "NAME", value_parser = parse_non_empty)]
    pub served_model_name: Option<String>,

    /// Do not watch the guest file for changes (SIGHUP and the admin endpoint still reload).
    #[arg(long)]
    pub no_watch: bool,

    /// Largest request body accepted, in KiB (the admin endpoint accepts up to 256 MiB).
    #[arg(long, default_value_t = 1024, value_name = "KIB", value_parser = parse_max_body_kb)]
    pub max_body_kb: usize,

    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT before they are cut.
    #[arg(long, default_value = "10", value_name = "SECONDS", value_parser = parse_shutdown_grace)]
    pub shutdown_grace: Duration,
}

impl Args {
    /// The heartbeat target: --queen-url, else --hive-url.
    pub fn heartbeat_url(&self) -> Option<&str> {
        self.queen_url.as_deref().or(self.hive_url.as_deref())
    }
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse()
}

fn parse_weights(s: &str) -> Result<WeightFormat, String> {
    match s.to_ascii_lowercase().as_str() {
        "auto" => Ok(WeightFormat::Auto),
        "f32" => Ok(WeightFormat::F32),
        other => Err(format!(
            "unknown weight format `{other}`: expected auto or f32"
        )),
    }
}

// Bounds on numeric flags. Each is far beyond any sensible setting and below where the
// value would overflow what it is converted into (a byte count, an `Instant` deadline), so
// a typo is refused at start with the flag's name rather than wrapping into a tiny limit
// or panicking later.

/// Guest memory: a 32-bit WebAssembly memory addresses at most 4 GiB.
const MAX_GUEST_MEMORY_MB: u64 = 4096;
/// Request bodies: 1 GiB.
const MAX_BODY_KB: usize = 1 << 20;
/// Requests waiting for a slot.
const MAX_QUEUE_SIZE: i64 = 1 << 16;
/// Tokens guessed for one step: each is a row of the step, and past some dozens a guess is
/// never all taken.
const MAX_DRAFT_MAX: i64 = 64;
/// KV-cache positions: far beyond any context (model contexts are u32 counts).
const MAX_KV_BUDGET_TOKENS: u64 = u32::MAX as u64;
/// A day: the longest any of the time flags may be.
const MAX_SECONDS: f64 = 86_400.0;
/// An hour: a guest may not hold a request, or shutdown wait, longer than this.
const MAX_GUEST_SECONDS: f64 = 3_600.0;

/// At least 10 ms: a shorter interval floods the queen (and one that rounds to 0 ns made
/// tokio's interval panic).
fn parse_heartbeat_interval(s: &str) -> Result<Duration, String> {
    let interval = parse_seconds(s, MAX_SECONDS)?;
    if interval < Duration::from_millis(10) {
        return Err(format!("`{s}` is too short: at least 0.01 seconds"));
    }
    Ok(interval)
}

fn parse_guest_timeout(s: &str) -> Result<Duration, String> {
    parse_seconds(s, MAX_GUEST_SECONDS)
}

fn parse_shutdown_grace(s: &str) -> Result<Duration, String> {
    parse_seconds(s, MAX_GUEST_SECONDS)
}

/// `--queue-timeout`, `--request-timeout`.
fn parse_request_time(s: &str) -> Result<Duration, String> {
    parse_seconds(s, MAX_SECONDS)
}

/// A positive number of seconds, at most `max` (fractions allowed: `0.5`).
fn parse_seconds(s: &str, max: f64) -> Result<Duration, String> {
    let seconds: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("`{s}` must be a positive number of seconds"));
    }
    if seconds > max {
        return Err(format!("`{s}` is too long: at most {max} seconds"));
    }
    // 1e-12 is positive but rounds to a zero Duration.
    match Duration::from_secs_f64(seconds) {
        Duration::ZERO => Err(format!("`{s}` is shorter than a nanosecond")),
        duration => Ok(duration),
    }
}

fn parse_max_body_kb(s: &str) -> Result<usize, String> {
    let kib: usize = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of KiB"))?;
    if !(1..=MAX_BODY_KB).contains(&kib) {
        return Err(format!("`{s}` is out of range: 1 to {MAX_BODY_KB} KiB"));
    }
    Ok(kib)
}

/// A secret the worker compares a request's credentials with: an empty one would let an
/// empty `Authorization: Bearer ` through, and one with whitespace or control characters
/// cannot be sent in a header as given.
fn parse_token(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the token is empty".into());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the token contains whitespace or control characters".into());
    }
    Ok(s.to_owned())
}

fn parse_non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_upstream_spawn_flags() {
        let args = Args::try_parse_from([
            "rbee-host",
            "--worker-id",
            "worker-abc123",
            "--model",
            "m.gguf",
            "--device",
            "gpu:1",
            "--port",
            "9400",
            "--queen-url",
            "http://queen:8500",
            "--hive-url",
            "http://hive:9000",
            "--guest",
            "g.wasm",
        ])
        .unwrap();
        assert_eq!(args.worker_id.as_deref(), Some("worker-abc123"));
        assert_eq!(args.device, DeviceChoice::Gpu(1));
        assert_eq!(args.port, 9400);
        assert_eq!(args.heartbeat_url(), Some("http://queen:8500"));
        assert_eq!(args.heartbeat_interval, Duration::from_secs(30));
    }

    #[test]
    fn accepts_the_hives_bare_device_index() {
        let args =
            Args::try_parse_from(["rbee-host", "--model=m", "--guest=g", "--device", "0"]).unwrap();
        assert_eq!(args.device, DeviceChoice::Index(0));
    }

    #[test]
    fn hive_url_stands_in_for_queen_url() {
        let args = Args::try_parse_from([
            "rbee-host",
            "--model=m",
            "--guest=g",
            "--hive-url=http://hive:9000",
            "--heartbeat-interval=0.5",
        ])
        .unwrap();
        assert_eq!(args.heartbeat_url(), Some("http://hive:9000"));
        assert_eq!(args.heartbeat_interval, Duration::from_millis(500));
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            ["--device", "tpu"],
            ["--heartbeat-interval", "-1"],
            ["--weights", "int3"],
            ["--max-concurrent", "0"],
            ["--heartbeat-interval", "0"],
            ["--heartbeat-interval", "1e30"],
            ["--heartbeat-interval", "1e-12"],
            ["--heartbeat-interval", "0.001"],
            ["--guest-timeout", "1e-12"],
            ["--guest-timeout", "0"],
            ["--guest-timeout", "1e20"],
            ["--shutdown-grace", "inf"],
            ["--guest-memory-mb", "0"],
            // × 1024² wraps a u64 into a small limit.
            ["--guest-memory-mb", "17592186044416"],
            ["--guest-memory-mb", "4097"],
            ["--max-body-kb", "0"],
            ["--max-body-kb", "18014398509481984"],
            ["--queue-size", "65537"],
            ["--kv-budget-tokens", "0"],
            ["--admin-token", ""],
            ["--admin-token", "two words"],
            ["--worker-id", ""],
        ] {
            let argv = ["rbee-host", "--model=m", "--guest=g", bad[0], bad[1]];
            assert!(Args::try_parse_from(argv).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn accepts_values_at_the_bounds() {
        let args = Args::try_parse_from([
            "rbee-host",
            "--model=m",
            "--guest=g",
            "--guest-memory-mb=4096",
            "--max-body-kb=1048576",
            "--queue-size=0",
            "--guest-timeout=3600",
            "--heartbeat-interval=86400",
            "--admin-token=s3cret",
        ])
        .unwrap();
        assert_eq!(args.guest_memory_mb << 20, 4 << 30);
        assert_eq!(args.queue_size, 0);
        assert_eq!(args.guest_timeout, Duration::from_secs(3600));
    }
}
