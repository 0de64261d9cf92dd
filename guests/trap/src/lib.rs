//! Misbehaving on purpose: panics (a wasm trap) in the middle of a request. Only this request
//! may fail.

wit_bindgen::generate!({ path: "../../wit", world: "worker" });

use exports::rbee::worker::handler::Guest;
use rbee::worker::types::{InferError, InferRequest, InferResponse};

struct Trap;

impl Guest for Trap {
    fn handle(request: InferRequest) -> Result<InferResponse, InferError> {
        panic!("trap guest refuses prompt of {} bytes", request.prompt.len());
    }
}

export!(Trap);
