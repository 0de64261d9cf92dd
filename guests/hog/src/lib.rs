//! Misbehaving on purpose: allocates (and touches) memory until the allocator fails. The
//! host's per-instance memory cap must make this request fail, not the worker.

wit_bindgen::generate!({ path: "../../wit", world: "worker" });

use exports::rbee::worker::handler::Guest;
use rbee::worker::types::{InferError, InferRequest, InferResponse};

struct Hog;

impl Guest for Hog {
    fn handle(_request: InferRequest) -> Result<InferResponse, InferError> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // 16 MiB at a time, written so the pages are really committed.
            hoard.push(vec![0xA5; 16 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

export!(Hog);
