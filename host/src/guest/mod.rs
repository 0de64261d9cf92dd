//! The guest runtime: compiles guest components, keeps the active one hot-swappable, and runs
//! each request in a fresh, sandboxed instance.
//!
//! One module per concern:
//! - `source`: where a guest comes from, its bytes and their hash;
//! - `compiler`: wasmtime's engine, linker, compile cache and limits, which turn bytes into a
//!   [`LoadedGuest`] (with `pool`, wasmtime's configuration, and `cache`);
//! - `registry`: the active guest, swaps and the record of failed loads;
//! - `sandbox`: the per-request time and memory accounting; `stderr`: the end of what a guest
//!   wrote there;
//! - `imports`: the host side of the WIT, one context per capability; `request`: a request's
//!   store data, made of those contexts, and the linker wiring; `generation`: a generation on
//!   its own thread, behind a `token-stream` handle; `cancellation`: the flag the HTTP layer,
//!   the worker and the model thread share;
//! - `client`: the channel from a streaming guest to its client, bounded in bytes;
//! - `failure`: what a client is told when a guest fails.
//!
//! [`GuestRuntime`] puts them together: a request takes the active guest's `Arc`, gets a
//! fresh store and instance, and finishes on that guest even if another is swapped in.

mod bindings;
mod cache;
mod cancellation;
mod client;
mod compiler;
mod failure;
mod generation;
mod imports;
mod pool;
mod registry;
mod request;
mod sandbox;
mod source;
mod stderr;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

pub use bindings::{
    AgentAnswer, AgentChatRequest, AgentMessage, AgentOptions, AgentRole, ChatMessage, ChatRequest,
    Completion, CompletionRequest, Constraint, FinishReason, Generation, GenerationOptions,
    InferError, InferRequest, InferResponse, JsonSchemaFormat, ResponseFormat, Role, TokenLogprob,
    Tool, ToolCall, ToolChoice,
};
pub use cache::ComponentCache;
pub use cancellation::Cancellation;
pub use client::{ClientReceiver, ClientSender, Emitted, chat_channel, client_channel};
pub use compiler::{GuestMeta, LoadedGuest};
pub use failure::GuestFailure;
pub use registry::{FailedLoad, GuestStatus, SwapOutcome};
pub use request::RequestContext;
pub use sandbox::GuestLimits;
pub use source::GuestSource;

use compiler::Compiler;
use registry::Registry;
use request::RequestState;
use sandbox::EpochTicker;

/// How the guest runtime is set up.
pub struct GuestRuntimeSettings {
    pub limits: GuestLimits,
    /// Guest instances that may exist at once (requests in flight plus validation).
    pub max_instances: u32,
    pub cache_dir: Option<PathBuf>,
}

pub struct GuestRuntime {
    compiler: Compiler,
    registry: Registry,
    /// Advances the epoch that enforces guests' time limits, for as long as the runtime lives.
    _ticker: EpochTicker,
}

impl GuestRuntime {
    /// Sets up wasmtime and loads the first guest (blocking: it may compile for seconds).
    pub fn start(settings: GuestRuntimeSettings, first: GuestSource) -> anyhow::Result<Self> {
        let compiler = Compiler::new(settings.limits, settings.max_instances, settings.cache_dir)?;
        let ticker = EpochTicker::start(compiler.engine().clone())?;
        let describe = first.describe();
        let first = first
            .read()
            .and_then(|candidate| compiler.compile(candidate, 1))
            .with_context(|| format!("cannot load guest {describe}"))?;
        Ok(Self {
            compiler,
            registry: Registry::new(first),
            _ticker: ticker,
        })
    }

    /// The guest new requests run on.
    pub fn active(&self) -> Arc<LoadedGuest> {
        self.registry.active()
    }

    pub fn status(&self) -> GuestStatus {
        self.registry.status()
    }

    /// Compiles and validates a new guest, then makes it the active one. On failure the
    /// current guest keeps serving and the failure is recorded. Blocking.
    pub fn load(&self, source: GuestSource) -> anyhow::Result<SwapOutcome> {
        self.registry.load(source, |candidate, generation| {
            self.compiler.compile(candidate, generation)
        })
    }

    /// Serves one `/v1/infer` request on `guest` in a fresh instance. Blocking: call it from
    /// a blocking thread.
    pub fn handle(
        &self,
        guest: &LoadedGuest,
        request: InferRequest,
        context: RequestContext,
    ) -> Result<InferResponse, GuestFailure> {
        self.call(guest, context, |store, instance| {
            guest
                .exports
                .handler
                .load(&mut *store, instance)?
                .call_handle(store, &request)
        })
    }

    /// Serves one OpenAI-style request on `guest` in a fresh instance: on its
    /// `openai-agents` export where it has one, else on `openai`. A guest without either,
    /// or without `openai-agents` for a request that sets an agent option or has tool
    /// turns, is refused before it is instantiated. Blocking.
    pub fn openai(
        &self,
        guest: &LoadedGuest,
        request: OpenAiRequest,
        context: RequestContext,
    ) -> Result<AgentAnswer, GuestFailure> {
        if let Some(agents) = &guest.exports.openai_agents {
            let OpenAiRequest { call, agent } = request;
            let agent = agent.options();
            return self.call(guest, context, |store, instance| {
                let agents = agents.load(&mut *store, instance)?;
                match &call {
                    OpenAiCall::Completion(request) => Ok(agents
                        .call_complete(store, request, &agent)?
                        .map(AgentAnswer::text)),
                    OpenAiCall::Chat(request) => agents.call_chat(store, request, &agent),
                }
            });
        }
        if let Some(field) = request.first_agent_field() {
            return Err(GuestFailure::NoAgentOptions {
                guest: guest.meta.name.clone(),
                field,
            });
        }
        let Some(openai) = &guest.exports.openai else {
            return Err(GuestFailure::NoOpenAi {
                guest: guest.meta.name.clone(),
            });
        };
        let call = request.call;
        let completion = self.call(guest, context, |store, instance| {
            let openai = openai.load(&mut *store, instance)?;
            match &call {
                OpenAiCall::Completion(request) => openai.call_complete(store, request),
                OpenAiCall::Chat(request) => openai.call_chat(store, &plain_chat(request)),
            }
        })?;
        Ok(AgentAnswer::text(Generation {
            completion,
            logprobs: Vec::new(),
        }))
    }

    /// Instantiates `guest` in a fresh store for one request and runs `call` on it, turning
    /// a trap into the failure a client is told.
    fn call<T>(
        &self,
        guest: &LoadedGuest,
        context: RequestContext,
        call: impl FnOnce(
            &mut wasmtime::Store<RequestState>,
            &wasmtime::component::Instance,
        ) -> wasmtime::Result<Result<T, InferError>>,
    ) -> Result<T, GuestFailure> {
        let limits = self.compiler.limits();
        let mut store = self.compiler.store(RequestState::for_request(
            limits,
            context,
            guest.name.clone(),
        ));
        let outcome = guest
            .pre
            .instantiate(&mut store)
            .and_then(|instance| call(&mut store, &instance));
        match outcome {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => Err(GuestFailure::Returned(error)),
            Err(trap) => {
                let state = store.data();
                Err(GuestFailure::from_trap(
                    &guest.meta.name,
                    limits,
                    state.sandbox.exceeded,
                    &state.stderr,
                    trap,
                ))
            }
        }
    }
}

/// An OpenAI-style request as the guest's exports take it.
#[derive(Debug, Clone)]
pub struct OpenAiRequest {
    pub call: OpenAiCall,
    pub agent: AgentFields,
}

impl OpenAiRequest {
    /// The request for choice `index` of several (`n`): the same, but a seed, when the
    /// client gave one, moved on by `index`, so that sampled choices differ and the whole
    /// answer is still reproducible.
    pub fn for_choice(&self, index: u32) -> Self {
        let mut request = self.clone();
        let options = match &mut request.call {
            OpenAiCall::Completion(completion) => &mut completion.options,
            OpenAiCall::Chat(chat) => &mut chat.options,
        };
        options.seed = options.seed.map(|seed| seed.wrapping_add(u64::from(index)));
        request
    }

    /// The first field only `openai-agents` serves, if any: an agent option, tools, or a
    /// tool turn in the conversation.
    pub fn first_agent_field(&self) -> Option<&'static str> {
        let tools = match &self.call {
            OpenAiCall::Chat(chat) => chat_tool_field(chat),
            OpenAiCall::Completion(_) => None,
        };
        self.agent.first_field().or(tools)
    }
}

/// The route's own request. A chat is read in the agents' shape (tool turns, tools), and
/// lowered for a guest that only has `openai`.
#[derive(Debug, Clone)]
pub enum OpenAiCall {
    Completion(CompletionRequest),
    Chat(AgentChatRequest),
}

/// Which tool field a chat sets, if any (`tool_choice: none` without tools sets nothing).
fn chat_tool_field(chat: &AgentChatRequest) -> Option<&'static str> {
    if !chat.tools.is_empty() {
        return Some("tools");
    }
    let tool_turn = |message: &AgentMessage| {
        matches!(message.role, AgentRole::Tool) || !message.tool_calls.is_empty()
    };
    chat.messages.iter().any(tool_turn).then_some("messages")
}

/// A chat without tool fields (see [`chat_tool_field`]) as the plain `openai` export takes it.
fn plain_chat(chat: &AgentChatRequest) -> ChatRequest {
    let messages = chat
        .messages
        .iter()
        .map(|message| ChatMessage {
            role: match message.role {
                AgentRole::System => Role::System,
                AgentRole::User => Role::User,
                // A tool turn was refused by `first_agent_field` before this.
                AgentRole::Assistant | AgentRole::Tool => Role::Assistant,
            },
            content: message.content.clone(),
        })
        .collect();
    ChatRequest {
        messages,
        options: chat.options.clone(),
    }
}

impl AgentAnswer {
    /// An answer of text only.
    pub fn text(generation: Generation) -> Self {
        Self {
            generation,
            tool_calls: Vec::new(),
        }
    }
}

/// What agent clients set, each with the field that set it (for a guest that cannot serve
/// it to be refused naming the field).
#[derive(Debug, Clone, Default)]
pub struct AgentFields {
    pub response_format: Option<ResponseFormat>,
    pub structured_outputs: Option<Constraint>,
    /// With the field that asked (`logprobs` or `top_logprobs`).
    pub logprobs: Option<(u32, &'static str)>,
    pub logit_bias: Vec<(u32, f32)>,
}

impl AgentFields {
    /// The first field set, if any: `response_format: {"type": "text"}` sets nothing.
    pub fn first_field(&self) -> Option<&'static str> {
        let format = !matches!(self.response_format, None | Some(ResponseFormat::Text));
        [
            (format, "response_format"),
            (self.structured_outputs.is_some(), "structured_outputs"),
            (!self.logit_bias.is_empty(), "logit_bias"),
        ]
        .into_iter()
        .find_map(|(set, field)| set.then_some(field))
        .or(self.logprobs.map(|(_, field)| field))
    }

    fn options(self) -> AgentOptions {
        AgentOptions {
            response_format: self.response_format,
            structured_outputs: self.structured_outputs,
            logprobs: self.logprobs.map(|(top, _)| top),
            logit_bias: self.logit_bias,
        }
    }
}
