//! rbee-engine: a Llama-family decoder, loaded from a Hugging Face folder or a GGUF file,
//! run with a KV cache, sampling and token streaming.
//!
//! This file is the public surface (the host depends on exactly these names). The work is
//! done in one module per concern, in the order a model goes through them:
//! - `options`: how to load a model (`LoadOptions`, `DeviceChoice`, `WeightFormat`);
//! - `load`: reading checkpoints (`hf`, `gguf` loaders) and choosing the weight plan, once;
//!   `gguf` (public) is the GGUF file format itself;
//! - `model`: the decoder in its two forms (Burn's layers for the GPU and f32; block weights
//!   on the CPU), its config and RoPE; `quant`: the block matrices and their kernels;
//! - `engine`: `Engine`, a loaded model and its scheduler, and `ModelInfo`;
//! - `request`: what a generation asks for (`SamplingParams`) and gets (`Completion`);
//! - `kv`: the KV cache as a pool of blocks shared by prefix (which block holds what);
//! - `run`: the scheduler, sampling and streamed text, which `Engine` calls into;
//! - `device`: where it runs; `error`: what can go wrong.

mod device;
mod engine;
mod error;
pub mod gguf;
mod kv;
mod load;
mod model;
mod options;
mod quant;
mod request;
mod run;

pub use engine::{Engine, ModelInfo};
pub use error::EngineError;
pub use options::{
    DEFAULT_DRAFT_MAX, DEFAULT_KV_BYTES, DEFAULT_MAX_BATCH, DEFAULT_PROMPT_CHUNK, DeviceChoice,
    DraftLength, KvCacheType, LoadOptions, WeightFormat,
};
pub use request::{
    Completion, Constraint, FinishReason, Piece, SamplingParams, TokenLogprob, TokenText, limits,
};
pub use run::{BatchStats, Cancelled, MASK_BUCKETS_MICROS, MaskHistogram, Prompt, PromptPart};
