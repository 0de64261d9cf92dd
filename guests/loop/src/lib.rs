//! Misbehaving on purpose: spins forever without calling the host. The host's per-call
//! deadline (epoch interruption) must stop it and fail only this request.

wit_bindgen::generate!({ path: "../../wit", world: "worker" });

use exports::rbee::worker::handler::Guest;
use rbee::worker::types::{InferError, InferRequest, InferResponse};

struct Loop;

impl Guest for Loop {
    fn handle(request: InferRequest) -> Result<InferResponse, InferError> {
        let mut counter = request.prompt.len() as u64;
        loop {
            // black_box keeps the optimiser from proving the loop has no effect.
            counter = std::hint::black_box(counter.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

export!(Loop);
