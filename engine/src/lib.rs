//! rbee-engine: a Llama-family decoder on Burn, loaded from a Hugging Face folder or a GGUF
//! file, with a KV cache, sampling and token streaming.
//!
//! This file is the public surface (the host depends on exactly these names); the work is
//! done in one module per concern:
//! - `config`: the model's shape (HF `config.json` or GGUF metadata)
//! - `model` (+ `linear`): the decoder in Burn, top to bottom, with its KV cache
//! - `loader`, `hf`, `gguf_loader`: reading checkpoints; `gguf`: the GGUF format itself
//! - `sampling`, `text`, `generate`: choosing tokens, streaming text, the generation loop
//! - `device`, `progress`: where it runs, and what loading shows

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod config;
mod device;
mod generate;
pub mod gguf;
mod gguf_loader;
mod hf;
mod host_layers;
mod linear;
mod loader;
mod model;
mod progress;
mod quant;
mod sampling;
mod text;

/// Where to run the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// A GPU when wgpu finds an adapter, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The N-th GPU adapter.
    Gpu(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" | "cpu:0" | "cpu-0" => Ok(Self::Cpu),
            "gpu" | "cuda" => Ok(Self::Gpu(0)),
            other => other
                .strip_prefix("gpu:")
                .or_else(|| other.strip_prefix("gpu-"))
                .or_else(|| other.strip_prefix("cuda:"))
                .and_then(|n| n.parse().ok())
                .map(Self::Gpu)
                .ok_or_else(|| format!("unknown device `{s}`: expected auto, cpu, gpu or gpu:N")),
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

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub device: DeviceChoice,
    pub weights: WeightFormat,
}

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
/// loaded, and each generation keeps its own KV cache).
pub struct Engine {
    info: ModelInfo,
    runtime: generate::Runtime,
}

impl Engine {
    /// Loads a model from a Hugging Face folder or a GGUF file, showing progress (a bar on a
    /// terminal, log lines otherwise).
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Engine, EngineError> {
        let format = loader::detect(path)?;
        tracing::info!(path = %path.display(), format = format.name(), "loading model");
        let selected = device::select(options.device)?;
        let started = std::time::Instant::now();
        let mut loaded = match format {
            loader::Format::HfFolder => hf::load(path, &selected.device)?,
            loader::Format::Gguf => gguf_loader::load(
                path,
                &selected.device,
                options.weights == WeightFormat::Auto && !selected.is_gpu,
            )?,
        };
        loader::convert_weights(&mut loaded.model, options.weights, selected.is_gpu);
        let tokenizer = &loaded.tokenizer;
        let eos_tokens = loaded
            .special
            .eos_ids
            .iter()
            .filter_map(|&id| tokenizer.id_to_token(id))
            .collect();
        let bos_id = loaded
            .special
            .bos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t));
        let config = &loaded.config;
        let info = ModelInfo {
            id: loaded.id.clone(),
            architecture: config.architecture.clone(),
            format: format.name().into(),
            path: path.to_owned(),
            context_length: config.max_position_embeddings as u32,
            vocab_size: config.vocab_size as u32,
            bos_token: loaded.special.bos_token.clone(),
            eos_tokens,
            chat_template: loaded.special.chat_template.clone(),
            device: selected.name.clone(),
        };
        tracing::info!(
            model = %info.id,
            architecture = %info.architecture,
            layers = config.num_layers,
            device = %info.device,
            seconds = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        let runtime = generate::Runtime {
            context_length: config.max_position_embeddings,
            vocab_size: config.vocab_size,
            model: loaded.model,
            rope: loaded.rope,
            tokenizer: loaded.tokenizer,
            eos_ids: loaded.special.eos_ids,
            bos_id,
            device: selected.device,
        };
        Ok(Engine { info, runtime })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Token ids of `text`, without special tokens.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.runtime.encode(text, false)
    }

    /// Generates a completion of `prompt`. `on_text` receives each piece of text as it is
    /// produced (whole UTF-8, stop strings withheld); returning `Break` cancels the generation
    /// (finish reason `Cancelled`). Blocking: call it from a blocking thread.
    pub fn generate(
        &self,
        prompt: &str,
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, EngineError> {
        self.runtime.generate(prompt, params, on_text)
    }

    /// Like [`Engine::generate`] from token ids (no bos added), also returning the generated
    /// ids. For verification against a reference implementation.
    pub fn generate_ids(
        &self,
        prompt_ids: &[u32],
        params: &SamplingParams,
    ) -> Result<(Completion, Vec<u32>), EngineError> {
        self.runtime
            .generate_ids(prompt_ids, params, &mut |_| ControlFlow::Continue(()))
    }

    /// The logits (`[ids.len(), vocab_size]`, row-major) of one forward pass over `ids`.
    /// For verification against a reference implementation.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        self.runtime.logits(ids)
    }
}

// The host shares one `Engine` between concurrent requests.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
};
