//! A second, recognisably different request policy, used by the hot-swap tests: the same
//! generation as `llm` at temperature 0, but every piece of text upper-cased, so a client can
//! tell which guest produced each token of a response.

wit_bindgen::generate!({ path: "../../wit", world: "worker" });

use exports::rbee::worker::handler::Guest;
use rbee::worker::inference::{self, StreamItem};
use rbee::worker::output;
use rbee::worker::types::{InferError, InferRequest, InferResponse, SamplingParams};

struct Shout;

impl Guest for Shout {
    fn handle(request: InferRequest) -> Result<InferResponse, InferError> {
        let params = SamplingParams {
            max_tokens: request.max_tokens.unwrap_or(256),
            temperature: request.temperature.unwrap_or(0.7),
            top_k: request.top_k.unwrap_or(0),
            top_p: request.top_p.unwrap_or(0.95),
            repeat_penalty: request.repeat_penalty.unwrap_or(1.0),
            seed: request.seed,
            stop: request.stop.clone(),
        };
        if !request.stream {
            let completion = inference::infer(&request.prompt, &params)?;
            return Ok(InferResponse {
                text: completion.text.to_uppercase(),
                tokens_generated: completion.tokens_generated,
            });
        }
        let stream = inference::infer_stream(&request.prompt, &params)?;
        loop {
            match stream.next()? {
                StreamItem::Text(text) => output::emit(&text.to_uppercase())?,
                StreamItem::Done(completion) => {
                    return Ok(InferResponse {
                        text: completion.text.to_uppercase(),
                        tokens_generated: completion.tokens_generated,
                    });
                }
            }
        }
    }
}

export!(Shout);
