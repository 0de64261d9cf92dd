//! Host-side bindings for `wit/worker.wit`, generated at compile time.
//!
//! They are generated for the largest world, `agent-worker`; a guest of the `worker` or
//! `openai-worker` world lacks only the `openai` or `openai-agents` exports, so each export
//! is looked up on its own
//! ([`Exports`] in `compiler`) rather than through the world's all-or-nothing `…Pre`.
//!
//! The only host type the bindings name is `generation::Generation`, behind the `token-stream`
//! resource; it does not depend on the bindings, so the modules depend one way:
//! `imports` → `bindings` → `generation`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "agent-worker",
    with: {
        "rbee:worker/inference.token-stream": super::generation::Generation,
    },
});

pub use exports::rbee::worker::{handler, openai, openai_agents};
pub use rbee::worker::inference::{self, PieceItem, StreamItem};
pub use rbee::worker::types::{
    AgentAnswer, AgentChatRequest, AgentMessage, AgentOptions, AgentRole, ChatMessage, ChatRequest,
    Completion, CompletionRequest, Constraint, Decoding, FinishReason, Generation,
    GenerationOptions, InferError, InferRequest, InferResponse, JsonSchemaFormat, ModelInfo, Piece,
    PromptPart, ResponseFormat, Role, SamplingParams, Token, TokenLogprob, Tool, ToolCall,
    ToolChoice,
};
pub use rbee::worker::{log, output, types};
