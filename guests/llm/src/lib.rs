//! The default rbee guest: serves the upstream `/v1/infer` contract on the model as it is.
//!
//! Policy lives here: defaults are filled in (max_tokens 256 or what the context leaves,
//! temperature 0.7 as the API documents, top-p 0.95) and the prompt goes to the model
//! unchanged. Ranges are not checked here: the host has already refused a request outside the
//! API's schema, and the engine refuses what it cannot run (see `sampling-params` in the WIT).
//! Streaming requests forward each piece of text to the client as it arrives.

wit_bindgen::generate!({ path: "../../wit", world: "worker" });

use exports::rbee::worker::handler::Guest;
use rbee::worker::inference::{self, StreamItem};
use rbee::worker::log::{Level, log};
use rbee::worker::output;
use rbee::worker::types::{InferError, InferRequest, InferResponse, SamplingParams};

const DEFAULT_MAX_TOKENS: u32 = 256;
const DEFAULT_TEMPERATURE: f32 = 0.7;
const DEFAULT_TOP_P: f32 = 0.95;

struct Llm;

impl Guest for Llm {
    fn handle(request: InferRequest) -> Result<InferResponse, InferError> {
        let params = sampling_params(&request)?;
        log(
            Level::Debug,
            &format!(
                "llm: {} prompt bytes, max_tokens {}, temperature {}, stream {}",
                request.prompt.len(),
                params.max_tokens,
                params.temperature,
                request.stream
            ),
        );
        if !request.stream {
            let completion = inference::infer(&request.prompt, &params)?;
            return Ok(InferResponse {
                text: completion.text,
                tokens_generated: completion.tokens_generated,
            });
        }
        let stream = inference::infer_stream(&request.prompt, &params)?;
        loop {
            match stream.next()? {
                StreamItem::Text(text) => output::emit(&text)?,
                StreamItem::Done(completion) => {
                    return Ok(InferResponse {
                        text: completion.text,
                        tokens_generated: completion.tokens_generated,
                    });
                }
            }
        }
    }
}

/// Up to DEFAULT_MAX_TOKENS, but never more than the context leaves after the prompt (and a
/// beginning-of-sequence token), so a request without max_tokens does not fail on a small
/// model.
fn default_max_tokens(prompt: &str) -> Result<u32, InferError> {
    let context = inference::model().context_length;
    let prompt_tokens = inference::tokenize(prompt)?.len() as u32 + 1;
    Ok(context
        .saturating_sub(prompt_tokens)
        .clamp(1, DEFAULT_MAX_TOKENS))
}

/// Fills the defaults for what the client left out.
fn sampling_params(request: &InferRequest) -> Result<SamplingParams, InferError> {
    let max_tokens = match request.max_tokens {
        Some(max_tokens) => max_tokens,
        None => default_max_tokens(&request.prompt)?,
    };
    Ok(SamplingParams {
        max_tokens,
        temperature: request.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        top_k: request.top_k.unwrap_or(0),
        top_p: request.top_p.unwrap_or(DEFAULT_TOP_P),
        repeat_penalty: request.repeat_penalty.unwrap_or(1.0),
        seed: request.seed,
        stop: request.stop.clone(),
    })
}

export!(Llm);
