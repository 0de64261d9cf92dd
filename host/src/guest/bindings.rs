//! Host-side bindings for `wit/worker.wit`, generated at compile time.
//!
//! The only host type the bindings name is `generation::Generation`, behind the `token-stream`
//! resource; it does not depend on the bindings, so the modules depend one way:
//! `imports` → `bindings` → `generation`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "worker",
    with: {
        "rbee:worker/inference.token-stream": super::generation::Generation,
    },
});

pub use rbee::worker::inference::{self, StreamItem};
pub use rbee::worker::types::{
    Completion, FinishReason, InferError, InferRequest, InferResponse, ModelInfo, SamplingParams,
};
pub use rbee::worker::{log, output, types};
