//! The default rbee guest: the upstream `/v1/infer` contract on the model as it is, and the
//! OpenAI-compatible routes (`/v1/completions`, `/v1/chat/completions`) with the model's own
//! chat template.
//!
//! Policy lives here; the wire formats are the host's:
//! - defaults: `/v1/infer` as the rbee API documents it (max_tokens 256 or what the context
//!   leaves, temperature 0.7, top-p 0.95); the OpenAI routes as OpenAI documents them
//!   (temperature 1, top-p 1; a completion 16 tokens, a chat answer what the context leaves);
//! - prompts: `/v1/infer` and `/v1/completions` send the prompt to the model unchanged; a chat
//!   is rendered with the checkpoint's chat template (`template`), ChatML when it has none,
//!   and the clients' words go to the model as text that cannot become special tokens;
//! - agent clients' options (`openai-agents`): `response_format` and vLLM's
//!   `structured_outputs` become the engine's constraint (`json_object` is any JSON object;
//!   both at once is the client's mistake), log-probabilities and logit biases pass through.
//!
//! Ranges are not checked here: the host has already refused a request outside its route's
//! schema, and the engine refuses what it cannot run (see `sampling-params` in the WIT).

mod template;

wit_bindgen::generate!({ path: "../../wit", world: "agent-worker" });

use exports::rbee::worker::{handler, openai, openai_agents};
use rbee::worker::inference::{self, PieceItem, StreamItem};
use rbee::worker::log::{Level, log};
use rbee::worker::output;
use rbee::worker::types::Generation;
use rbee::worker::types::{
    AgentOptions, ChatRequest, Completion, CompletionRequest, Constraint, Decoding,
    GenerationOptions, InferError, InferRequest, InferResponse, PromptPart, ResponseFormat, Role,
    SamplingParams,
};

use template::{Message, Part, SpecialTokens};

/// `/v1/infer`'s defaults (the rbee API's documentation).
const INFER_MAX_TOKENS: u32 = 256;
const INFER_TEMPERATURE: f32 = 0.7;
const INFER_TOP_P: f32 = 0.95;
/// OpenAI's documented defaults.
const OPENAI_COMPLETION_MAX_TOKENS: u32 = 16;
const OPENAI_TEMPERATURE: f32 = 1.0;
const OPENAI_TOP_P: f32 = 1.0;

struct Llm;

impl handler::Guest for Llm {
    fn handle(request: InferRequest) -> Result<InferResponse, InferError> {
        let max_tokens = match request.max_tokens {
            Some(max_tokens) => max_tokens,
            None => room_after(
                &request.prompt,
                inference::model().context_length,
                INFER_MAX_TOKENS,
            )?,
        };
        let params = SamplingParams {
            max_tokens,
            temperature: request.temperature.unwrap_or(INFER_TEMPERATURE),
            top_k: request.top_k.unwrap_or(0),
            top_p: request.top_p.unwrap_or(INFER_TOP_P),
            repeat_penalty: request.repeat_penalty.unwrap_or(1.0),
            seed: request.seed,
            stop: request.stop,
        };
        debug_log("infer", request.prompt.len(), &params, request.stream);
        let completion =
            generate(Prompt::Text(&request.prompt), &params, None, request.stream)?.completion;
        Ok(InferResponse {
            text: completion.text,
            tokens_generated: completion.tokens_generated,
        })
    }
}

impl openai::Guest for Llm {
    fn complete(request: CompletionRequest) -> Result<Completion, InferError> {
        complete(request, None).map(|generation| generation.completion)
    }

    fn chat(request: ChatRequest) -> Result<Completion, InferError> {
        chat(request, None).map(|generation| generation.completion)
    }
}

impl openai_agents::Guest for Llm {
    fn complete(request: CompletionRequest, agent: AgentOptions) -> Result<Generation, InferError> {
        complete(request, decoding(agent)?)
    }

    fn chat(request: ChatRequest, agent: AgentOptions) -> Result<Generation, InferError> {
        chat(request, decoding(agent)?)
    }
}

/// What the agent options ask of the engine; `None` when nothing.
fn decoding(agent: AgentOptions) -> Result<Option<Decoding>, InferError> {
    let format = match agent.response_format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => {
            Some(Constraint::JsonSchema(r#"{"type": "object"}"#.into()))
        }
        Some(ResponseFormat::JsonSchema(format)) => Some(Constraint::JsonSchema(format.schema)),
    };
    let constraint = match (format, agent.structured_outputs) {
        (Some(_), Some(_)) => {
            return Err(InferError::InvalidInput(
                "give either `response_format` or `structured_outputs`, not both".into(),
            ));
        }
        (format, structured) => format.or(structured),
    };
    if constraint.is_none() && agent.logprobs.is_none() && agent.logit_bias.is_empty() {
        return Ok(None);
    }
    Ok(Some(Decoding {
        constraint,
        logit_bias: agent.logit_bias,
        logprobs: agent.logprobs,
    }))
}

fn complete(
    request: CompletionRequest,
    decoding: Option<Decoding>,
) -> Result<Generation, InferError> {
    let options = request.options;
    let max_tokens = options.max_tokens.unwrap_or(OPENAI_COMPLETION_MAX_TOKENS);
    let params = openai_params(&options, max_tokens);
    debug_log("completions", request.prompt.len(), &params, options.stream);
    generate(
        Prompt::Text(&request.prompt),
        &params,
        decoding,
        options.stream,
    )
}

fn chat(request: ChatRequest, decoding: Option<Decoding>) -> Result<Generation, InferError> {
    let model = inference::model();
    let template = model.chat_template.as_deref().unwrap_or(template::CHATML);
    let messages: Vec<Message> = request
        .messages
        .iter()
        .map(|message| Message {
            role: match message.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
            },
            content: &message.content,
        })
        .collect();
    let tokens = SpecialTokens {
        bos: model.bos_token.as_deref().unwrap_or(""),
        eos: model.eos_tokens.first().map_or("", String::as_str),
    };
    let parts: Vec<PromptPart> = template::render(template, &messages, &tokens)
        .map_err(|error| {
            // The template's own refusal (`raise_exception`) is about the conversation.
            InferError::InvalidInput(format!("the model's chat template: {error:#}"))
        })?
        .into_iter()
        .map(|part| match part {
            Part::Markup(text) => PromptPart::Markup(text),
            Part::Text(text) => PromptPart::Text(text),
        })
        .collect();
    let text: String = parts.iter().map(part_text).collect();
    let options = request.options;
    let max_tokens = match options.max_tokens {
        Some(max_tokens) => max_tokens,
        // All the context leaves, counted on the prompt's whole text. That is its length
        // unless a client typed special-token text, which the engine reads as longer plain
        // text; such a prompt near the context's end then fails as `context-overflow`.
        None => room_after(&text, model.context_length, u32::MAX)?,
    };
    let params = openai_params(&options, max_tokens);
    debug_log("chat", text.len(), &params, options.stream);
    generate(Prompt::Parts(&parts), &params, decoding, options.stream)
}

enum Prompt<'a> {
    Text(&'a str),
    Parts(&'a [PromptPart]),
}

/// One generation, streamed through `output.emit` when the client asked for a stream;
/// with `decoding`, through the engine's `generate` (its pieces carry log-probabilities).
fn generate(
    prompt: Prompt,
    params: &SamplingParams,
    decoding: Option<Decoding>,
    stream: bool,
) -> Result<Generation, InferError> {
    if let Some(decoding) = decoding {
        let parts = match prompt {
            Prompt::Text(text) => &[PromptPart::Markup(text.to_owned())][..],
            Prompt::Parts(parts) => parts,
        };
        if !stream {
            return inference::generate(parts, params, &decoding);
        }
        let pieces = inference::generate_stream(parts, params, &decoding)?;
        loop {
            match pieces.next_piece()? {
                PieceItem::Piece(piece) => output::emit_piece(&piece)?,
                PieceItem::Done(generation) => return Ok(generation),
            }
        }
    }
    let completion = |completion| Generation {
        completion,
        logprobs: Vec::new(),
    };
    if !stream {
        return match prompt {
            Prompt::Text(text) => inference::infer(text, params),
            Prompt::Parts(parts) => inference::infer_parts(parts, params),
        }
        .map(completion);
    }
    let tokens = match prompt {
        Prompt::Text(text) => inference::infer_stream(text, params)?,
        Prompt::Parts(parts) => inference::infer_stream_parts(parts, params)?,
    };
    loop {
        match tokens.next()? {
            StreamItem::Text(text) => output::emit(&text)?,
            StreamItem::Done(done) => return Ok(completion(done)),
        }
    }
}

fn openai_params(options: &GenerationOptions, max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: options.temperature.unwrap_or(OPENAI_TEMPERATURE),
        top_k: options.top_k.unwrap_or(0),
        top_p: options.top_p.unwrap_or(OPENAI_TOP_P),
        repeat_penalty: options.repeat_penalty.unwrap_or(1.0),
        seed: options.seed,
        stop: options.stop.clone(),
    }
}

/// Up to `cap` tokens, but never more than the context leaves after the prompt (and a
/// beginning-of-sequence token), so a request without max_tokens does not fail on a small
/// model.
fn room_after(prompt: &str, context: u32, cap: u32) -> Result<u32, InferError> {
    let prompt_tokens = inference::tokenize(prompt)?.len() as u32 + 1;
    Ok(context.saturating_sub(prompt_tokens).clamp(1, cap))
}

fn part_text(part: &PromptPart) -> &str {
    match part {
        PromptPart::Markup(text) | PromptPart::Text(text) => text,
    }
}

fn debug_log(route: &str, prompt_bytes: usize, params: &SamplingParams, stream: bool) {
    log(
        Level::Debug,
        &format!(
            "llm {route}: {prompt_bytes} prompt bytes, max_tokens {}, temperature {}, stream {stream}",
            params.max_tokens, params.temperature,
        ),
    );
}

export!(Llm);
