//! Host-side bindings for `wit/worker.wit`, generated at compile time.
//!
//! They are generated for the larger world, `openai-worker`; a guest of the plain `worker`
//! world lacks only the `openai` export, so each export is looked up on its own
//! ([`Exports`] in `compiler`) rather than through the world's all-or-nothing `…Pre`.
//!
//! The only host type the bindings name is `generation::Generation`, behind the `token-stream`
//! resource; it does not depend on the bindings, so the modules depend one way:
//! `imports` → `bindings` → `generation`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "openai-worker",
    with: {
        "rbee:worker/inference.token-stream": super::generation::Generation,
    },
});

pub use exports::rbee::worker::{handler, openai};
pub use rbee::worker::inference::{self, StreamItem};
pub use rbee::worker::types::{
    ChatMessage, ChatRequest, Completion, CompletionRequest, FinishReason, GenerationOptions,
    InferError, InferRequest, InferResponse, ModelInfo, PromptPart, Role, SamplingParams,
};
pub use rbee::worker::{log, output, types};
