//! Misbehaving on purpose: asks the host for things it must refuse — sampling parameters out of
//! range, output on a request that is not streaming — and reports what the host answered.
//! `prompt` picks the misbehaviour: "temperature", "max-tokens", "emit", "two-streams".

wit_bindgen::generate!({ path: "../../wit", world: "worker" });

use exports::rbee::worker::handler::Guest;
use rbee::worker::inference;
use rbee::worker::output;
use rbee::worker::types::{InferError, InferRequest, InferResponse, SamplingParams};

struct BadParams;

fn params() -> SamplingParams {
    SamplingParams {
        max_tokens: 4,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repeat_penalty: 1.0,
        seed: None,
        stop: Vec::new(),
    }
}

impl Guest for BadParams {
    fn handle(request: InferRequest) -> Result<InferResponse, InferError> {
        match request.prompt.as_str() {
            "temperature" => {
                inference::infer("hi", &SamplingParams { temperature: 9.5, ..params() })?;
            }
            "max-tokens" => {
                inference::infer("hi", &SamplingParams { max_tokens: 0, ..params() })?;
            }
            "emit" => output::emit("not a stream")?,
            "two-streams" => {
                let _first = inference::infer_stream("hi", &params())?;
                let _second = inference::infer_stream("hi", &params())?;
            }
            other => {
                return Err(InferError::GuestError(format!("unknown misbehaviour `{other}`")));
            }
        }
        Err(InferError::GuestError("the host accepted a bad call".into()))
    }
}

export!(BadParams);
