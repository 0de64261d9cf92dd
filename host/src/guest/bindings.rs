//! Host-side bindings for `wit/worker.wit`, generated at compile time.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "worker",
    with: {
        // The host's own type behind the `token-stream` resource handles.
        "rbee:worker/inference.token-stream": super::stream::TokenStream,
    },
});

pub use rbee::worker::inference::{self, StreamItem};
pub use rbee::worker::types::{
    Completion, FinishReason, InferError, InferRequest, InferResponse, ModelInfo, SamplingParams,
};
pub use rbee::worker::{log, output, types};
