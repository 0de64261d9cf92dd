//! What can go wrong, for every caller of the engine: the request, its fit in the context,
//! loading, or running the model.

use std::path::PathBuf;

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
