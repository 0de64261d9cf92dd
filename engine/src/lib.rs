//! rbee-engine: a Llama-family decoder, loaded from a Hugging Face folder or a GGUF file,
//! run with a KV cache, sampling and token streaming.
//!
//! This file is the public surface (the host depends on exactly these names). The work is
//! done in one module per concern, in the order a model goes through them:
//! - `load`: reading checkpoints (`hf`, `gguf` loaders) and choosing the weight plan, once;
//!   `gguf` (public) is the GGUF file format itself;
//! - `model`: the decoder in its two forms (Burn's layers for the GPU and f32; block weights
//!   on the CPU), its config and RoPE; `quant`: the block matrices and their kernels;
//! - `run`: the generation loop, sampling and streamed text (`Engine`'s methods);
//! - `device`: where it runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod device;
pub mod gguf;
mod load;
mod model;
mod quant;
mod run;

pub use run::{BatchStats, Cancelled, Prompt, PromptPart};

/// Where to run the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// A hardware GPU when wgpu finds one, else the CPU (a software adapter such as
    /// lavapipe is no GPU here: the CPU path is far faster).
    #[default]
    Auto,
    Cpu,
    /// The N-th hardware GPU; GPU 0 is the software adapter when that is all there is.
    Gpu(usize),
    /// A bare index, as upstream's hive spawns workers (`--device 0`): GPU N where there is
    /// one; on a machine without a GPU, 0 means the CPU (and says so in the log).
    Index(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" | "cpu:0" | "cpu-0" => Ok(Self::Cpu),
            "gpu" | "cuda" => Ok(Self::Gpu(0)),
            other if other.bytes().all(|b| b.is_ascii_digit()) => other
                .parse()
                .map(Self::Index)
                .map_err(|e| format!("device index `{s}`: {e}")),
            other => other
                .strip_prefix("gpu:")
                .or_else(|| other.strip_prefix("gpu-"))
                .or_else(|| other.strip_prefix("cuda:"))
                .and_then(|n| n.parse().ok())
                .map(Self::Gpu)
                .ok_or_else(|| {
                    format!("unknown device `{s}`: expected auto, cpu, gpu, gpu:N or an index N")
                }),
        }
    }
}

/// How weights are kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// The fastest format the backend supports for this checkpoint.
    #[default]
    Auto,
    /// Everything expanded to f32 (the reference format for correctness checks).
    F32,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: DeviceChoice,
    pub weights: WeightFormat,
    /// Sequences decoded together in one forward pass.
    pub max_batch: usize,
    /// KV-cache positions (prompt + max_tokens) of all running sequences together; a
    /// sequence that does not fit waits. `None`: derived from the model (`DEFAULT_KV_BYTES`
    /// worth, and at least one full context).
    pub kv_budget_tokens: Option<usize>,
    /// Prompt tokens a sequence feeds per step on the CPU: a long prompt is read in chunks
    /// so the sequences decoding beside it are held up by one chunk at a time.
    pub prompt_chunk: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::default(),
            weights: WeightFormat::default(),
            max_batch: DEFAULT_MAX_BATCH,
            kv_budget_tokens: None,
            prompt_chunk: DEFAULT_PROMPT_CHUNK,
        }
    }
}

/// Sequences per forward pass unless told otherwise (llama-server's default slot count).
pub const DEFAULT_MAX_BATCH: usize = 4;
/// Prompt tokens per step per sequence: about half a second of prefill on two cores.
pub const DEFAULT_PROMPT_CHUNK: usize = 256;
/// The KV-cache memory the default budget is sized to.
pub const DEFAULT_KV_BYTES: usize = 1 << 30;

/// What the loaded model is.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub architecture: String,
    /// "hf" or "gguf".
    pub format: String,
    pub path: PathBuf,
    pub context_length: u32,
    pub vocab_size: u32,
    pub bos_token: Option<String>,
    pub eos_tokens: Vec<String>,
    pub chat_template: Option<String>,
    /// "CPU-0", "GPU-0", ...
    pub device: String,
}

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 1.0 = off.
    pub top_p: f32,
    /// 1.0 = off.
    pub repeat_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens, every other setting off: what
    /// verification and benchmarks compare.
    pub fn greedy(max_tokens: u32) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
        }
    }
}

/// What the engine can run: the limits its one check, [`SamplingParams::validate`], holds a
/// request to. Ranges of a wire format (an HTTP API's `max_tokens` cap) belong to that API.
pub mod limits {
    /// Stop strings per generation: each is searched for after every token.
    pub const MAX_STOP_SEQUENCES: usize = 16;
    /// Bytes per stop string.
    pub const MAX_STOP_BYTES: usize = 256;
}

impl SamplingParams {
    /// The engine's one check of what it can run (the prompt's fit in the context is checked
    /// where the prompt is tokenized). Every generation passes through it; callers that want
    /// to fail before starting a generation (a stream) may call it early.
    pub fn validate(&self) -> Result<(), EngineError> {
        use limits::{MAX_STOP_BYTES, MAX_STOP_SEQUENCES};
        let invalid = |message: String| Err(EngineError::InvalidInput(message));
        if self.max_tokens == 0 {
            return invalid("max_tokens must be at least 1".into());
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return invalid(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return invalid(format!(
                "repeat_penalty must be a finite number > 0, got {}",
                self.repeat_penalty
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return invalid(format!(
                "at most {MAX_STOP_SEQUENCES} stop sequences, got {}",
                self.stop.len()
            ));
        }
        if self
            .stop
            .iter()
            .any(|stop| stop.is_empty() || stop.len() > MAX_STOP_BYTES)
        {
            return invalid(format!(
                "stop sequences must be 1..={MAX_STOP_BYTES} bytes long"
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Length,
    Stop,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub finish_reason: FinishReason,
    pub prefill: Duration,
    pub decode: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    InvalidInput(String),
    #[error(
        "prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's context length ({context_length})"
    )]
    ContextOverflow {
        prompt_tokens: u32,
        max_tokens: u32,
        context_length: u32,
    },
    #[error("cannot load model from {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("model error: {0}")]
    Model(String),
}

/// One model in memory, shared by all requests (`Send + Sync`: the model is immutable once
/// loaded, and each generation keeps its own KV cache). Every generation runs in one batch
/// on the scheduler's thread; the methods are in `run`.
pub struct Engine {
    info: ModelInfo,
    core: std::sync::Arc<run::Core>,
    limits: run::Limits,
    scheduler: run::Scheduler,
}

impl Engine {
    /// Loads a model from a Hugging Face folder or a GGUF file, showing progress (a bar on a
    /// terminal, log lines otherwise).
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Engine, EngineError> {
        let started = std::time::Instant::now();
        let engine = Self::from_checkpoint(load::load(path, options)?, path, options)?;
        tracing::info!(
            model = %engine.info.id,
            architecture = %engine.info.architecture,
            device = %engine.info.device,
            max_batch = engine.limits.max_batch,
            kv_budget_tokens = engine.limits.kv_budget,
            seconds = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        Ok(engine)
    }

    fn from_checkpoint(
        checkpoint: load::Checkpoint,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<Engine, EngineError> {
        let tokenizer = checkpoint.tokenizer;
        let special = checkpoint.special;
        let config = checkpoint.config;
        let eos_tokens = special
            .eos_ids
            .iter()
            .filter_map(|&id| tokenizer.id_to_token(id))
            .collect();
        let bos_id = special
            .bos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t));
        let info = ModelInfo {
            id: checkpoint.id,
            architecture: config.architecture.clone(),
            format: checkpoint.format.name().into(),
            path: path.to_owned(),
            context_length: config.max_position_embeddings as u32,
            vocab_size: config.vocab_size as u32,
            bos_token: special.bos_token,
            eos_tokens,
            chat_template: special.chat_template,
            device: checkpoint.device_name,
        };
        let limits = run::Limits {
            max_batch: options.max_batch.max(1),
            kv_budget: options.kv_budget_tokens.unwrap_or_else(|| {
                (DEFAULT_KV_BYTES / config.kv_bytes_per_token().max(1))
                    .max(config.max_position_embeddings)
            }),
            prompt_chunk: options.prompt_chunk.max(1),
        };
        let core = std::sync::Arc::new(run::Core {
            model: checkpoint.model,
            prompts: run::PromptEncoder::new(tokenizer, bos_id)?,
            eos_ids: special.eos_ids,
            context_length: config.max_position_embeddings,
            vocab_size: config.vocab_size,
            stats: Default::default(),
            max_token_bytes: Default::default(),
        });
        let scheduler = run::Scheduler::start(core.clone(), limits)
            .map_err(|e| EngineError::Model(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Engine {
            info,
            core,
            limits,
            scheduler,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
}

// The host shares one `Engine` between concurrent requests.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
};
