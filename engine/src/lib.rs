//! rbee-engine: a Llama-family decoder on Burn, loaded from a Hugging Face folder or a GGUF
//! file, with a KV cache, sampling and token streaming.
//!
//! PUBLIC API CONTRACT (the host depends on exactly this; the implementation is in progress).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod gguf;

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
    #[error("prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's context length ({context_length})")]
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

/// One model in memory, shared by all requests (`Send + Sync`).
pub struct Engine {
    info: ModelInfo,
}

impl Engine {
    /// Loads a model from a Hugging Face folder or a GGUF file, showing progress (a bar on a
    /// terminal, log lines otherwise).
    pub fn load(path: &Path, _options: &LoadOptions) -> Result<Engine, EngineError> {
        Err(EngineError::Load {
            path: path.to_owned(),
            reason: "engine not implemented yet".into(),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Token ids of `text`, without special tokens.
    pub fn tokenize(&self, _text: &str) -> Result<Vec<u32>, EngineError> {
        Err(EngineError::Model("engine not implemented yet".into()))
    }

    /// Generates a completion of `prompt`. `on_text` receives each piece of text as it is
    /// produced (whole UTF-8, stop strings withheld); returning `Break` cancels the generation
    /// (finish reason `Cancelled`). Blocking: call it from a blocking thread.
    pub fn generate(
        &self,
        _prompt: &str,
        _params: &SamplingParams,
        _on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, EngineError> {
        Err(EngineError::Model("engine not implemented yet".into()))
    }
}
