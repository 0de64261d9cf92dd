//! Between WIT values and the engine's types. The guest is untrusted, so what it passes is
//! checked as strictly as a client's request; the checks are not written here but are the
//! engine's own (`SamplingParams::validate`), so that the engine, which knows what it can
//! run, is their one owner.

use rbee_engine::EngineError;

use crate::guest::bindings::{Completion, FinishReason, InferError, PromptPart, SamplingParams};

/// A guest's sampling parameters as the engine takes them, refused as invalid input when the
/// engine could not run them.
pub fn engine_params(params: SamplingParams) -> Result<rbee_engine::SamplingParams, InferError> {
    let params = rbee_engine::SamplingParams {
        max_tokens: params.max_tokens,
        temperature: params.temperature,
        top_k: params.top_k,
        top_p: params.top_p,
        repeat_penalty: params.repeat_penalty,
        seed: params.seed,
        stop: params.stop,
    };
    params.validate().map_err(infer_error)?;
    Ok(params)
}

/// A guest's prompt parts as the engine takes them.
pub fn engine_prompt(parts: Vec<PromptPart>) -> rbee_engine::Prompt {
    rbee_engine::Prompt::Parts(
        parts
            .into_iter()
            .map(|part| match part {
                PromptPart::Markup(text) => rbee_engine::PromptPart::Markup(text),
                PromptPart::Text(text) => rbee_engine::PromptPart::Text(text),
            })
            .collect(),
    )
}

pub fn wit_completion(done: rbee_engine::Completion) -> Completion {
    Completion {
        text: done.text,
        prompt_tokens: done.prompt_tokens,
        tokens_generated: done.generated_tokens,
        finish_reason: match done.finish_reason {
            rbee_engine::FinishReason::Eos => FinishReason::Eos,
            rbee_engine::FinishReason::Length => FinishReason::Length,
            rbee_engine::FinishReason::Stop => FinishReason::Stop,
            rbee_engine::FinishReason::Cancelled => FinishReason::Cancelled,
        },
    }
}

/// The WIT's error for an engine error (see `infer-error` in wit/worker.wit).
pub fn infer_error(error: EngineError) -> InferError {
    match error {
        EngineError::InvalidInput(message) => InferError::InvalidInput(message),
        error @ EngineError::ContextOverflow { .. } => {
            InferError::ContextOverflow(error.to_string())
        }
        error @ (EngineError::Load { .. } | EngineError::Model(_)) => {
            InferError::ModelError(error.to_string())
        }
    }
}
