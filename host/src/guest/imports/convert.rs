//! Between WIT values and the engine's types. The guest is untrusted, so what it passes is
//! checked as strictly as a client's request; the checks are not written here but are the
//! engine's own (`SamplingParams::validate`), so that the engine, which knows what it can
//! run, is their one owner.

use rbee_engine::EngineError;

use crate::guest::bindings::{
    Completion, Constraint, Decoding, FinishReason, Generation, InferError, Piece, PromptPart,
    SamplingParams, Token, TokenLogprob,
};

/// A guest's sampling parameters as the engine takes them, refused as invalid input when the
/// engine could not run them.
pub fn engine_params(
    params: SamplingParams,
    decoding: Option<Decoding>,
) -> Result<rbee_engine::SamplingParams, InferError> {
    let decoding = decoding.unwrap_or(Decoding {
        constraint: None,
        logit_bias: Vec::new(),
        logprobs: None,
    });
    let params = rbee_engine::SamplingParams {
        constraint: decoding.constraint.map(engine_constraint),
        logit_bias: decoding.logit_bias,
        logprobs: decoding.logprobs,
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

pub fn engine_constraint(constraint: Constraint) -> rbee_engine::Constraint {
    match constraint {
        Constraint::JsonSchema(schema) => rbee_engine::Constraint::JsonSchema(schema),
        Constraint::Regex(regex) => rbee_engine::Constraint::Regex(regex),
        Constraint::Grammar(grammar) => rbee_engine::Constraint::Grammar(grammar),
        Constraint::Choice(choices) => rbee_engine::Constraint::Choice(choices),
    }
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

/// A finished generation with its log-probabilities.
pub fn wit_generation(mut done: rbee_engine::Completion) -> Generation {
    let logprobs = std::mem::take(&mut done.logprobs);
    Generation {
        completion: wit_completion(done),
        logprobs: logprobs.into_iter().map(wit_logprob).collect(),
    }
}

pub fn wit_piece(piece: rbee_engine::Piece) -> Piece {
    Piece {
        text: piece.text,
        logprobs: piece.logprobs.into_iter().map(wit_logprob).collect(),
    }
}

fn wit_logprob(logprob: rbee_engine::TokenLogprob) -> TokenLogprob {
    let token = |token: rbee_engine::TokenText| Token {
        id: token.id,
        bytes: token.bytes,
    };
    TokenLogprob {
        token: token(logprob.token),
        logprob: logprob.logprob,
        top: logprob
            .top
            .into_iter()
            .map(|(alternative, logprob)| (token(alternative), logprob))
            .collect(),
    }
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
