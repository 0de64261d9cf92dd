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
//!   both at once is the client's mistake), log-probabilities and logit biases pass through;
//! - tools (`tools`): rendered by the model's own template, or as Qwen 2.5 does for a
//!   template without them; calls read back in the template's format, with `required` and a
//!   named function held by a grammar (see `tools`).
//!
//! Ranges are not checked here: the host has already refused a request outside its route's
//! schema, and the engine refuses what it cannot run (see `sampling-params` in the WIT).

mod template;
mod tools;

wit_bindgen::generate!({ path: "../../wit", world: "agent-worker" });

use exports::rbee::worker::{handler, openai, openai_agents};
use rbee::worker::inference::{self, PieceItem, StreamItem};
use rbee::worker::log::{Level, log};
use rbee::worker::output;
use rbee::worker::types::{
    AgentAnswer, AgentChatRequest, AgentMessage, AgentOptions, AgentRole, ChatRequest, Completion,
    CompletionRequest, Constraint, Decoding, Generation, GenerationOptions, InferError,
    InferRequest, InferResponse, Piece, PromptPart, ResponseFormat, Role, SamplingParams,
    ToolChoice,
};

use template::{Part, SpecialTokens};

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
        let messages = request
            .messages
            .into_iter()
            .map(|message| AgentMessage {
                role: match message.role {
                    Role::System => AgentRole::System,
                    Role::User => AgentRole::User,
                    Role::Assistant => AgentRole::Assistant,
                },
                content: message.content,
                tool_calls: Vec::new(),
                tool_call_id: None,
                name: None,
            })
            .collect();
        let request = AgentChatRequest {
            messages,
            options: request.options,
            tools: Vec::new(),
            tool_choice: ToolChoice::None,
            parallel_tool_calls: false,
        };
        chat(request, None).map(|answer| answer.generation.completion)
    }
}

impl openai_agents::Guest for Llm {
    fn complete(request: CompletionRequest, agent: AgentOptions) -> Result<Generation, InferError> {
        complete(request, decoding(agent)?)
    }

    fn chat(request: AgentChatRequest, agent: AgentOptions) -> Result<AgentAnswer, InferError> {
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

fn chat(request: AgentChatRequest, decoding: Option<Decoding>) -> Result<AgentAnswer, InferError> {
    let model = inference::model();
    let template = model.chat_template.as_deref().unwrap_or(template::CHATML);
    let style = tools::Style::of(template);
    let (messages, tools_variable) = tools::prompt(
        style,
        &request.messages,
        &request.tools,
        &request.tool_choice,
    );
    let tokens = SpecialTokens {
        bos: model.bos_token.as_deref().unwrap_or(""),
        eos: model.eos_tokens.first().map_or("", String::as_str),
    };
    let parts: Vec<PromptPart> =
        template::render(template, &messages, tools_variable.as_ref(), &tokens)
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
    let options = &request.options;
    let max_tokens = match options.max_tokens {
        Some(max_tokens) => max_tokens,
        // All the context leaves, counted on the prompt's whole text. That is its length
        // unless a client typed special-token text, which the engine reads as longer plain
        // text; such a prompt near the context's end then fails as `context-overflow`.
        None => room_after(&text, model.context_length, u32::MAX)?,
    };
    let params = openai_params(options, max_tokens);
    debug_log("chat", text.len(), &params, options.stream);
    let Some(grammar) = tool_grammar(style, &request, decoding.as_ref())? else {
        return generate(Prompt::Parts(&parts), &params, decoding, options.stream)
            .map(AgentAnswer::text);
    };
    let decoding = Decoding {
        constraint: Some(Constraint::Grammar(grammar)),
        ..decoding.unwrap_or(Decoding {
            constraint: None,
            logit_bias: Vec::new(),
            logprobs: None,
        })
    };
    generate_calls(style.format, &parts, &params, &decoding, options.stream)
}

impl AgentAnswer {
    fn text(generation: Generation) -> Self {
        Self {
            generation,
            tool_calls: Vec::new(),
        }
    }
}

/// The grammar of an answer that may hold calls; `None` when it may not (no tools, or
/// `tool_choice: none`). A JSON `response_format` is what a text answer must be under
/// `auto`; any other constraint cannot be combined with calls.
fn tool_grammar(
    style: tools::Style,
    request: &AgentChatRequest,
    decoding: Option<&Decoding>,
) -> Result<Option<String>, InferError> {
    if request.tools.is_empty() || matches!(request.tool_choice, ToolChoice::None) {
        return Ok(None);
    }
    let answer = match decoding.and_then(|decoding| decoding.constraint.as_ref()) {
        None => None,
        Some(Constraint::JsonSchema(schema)) => Some(format!("%json {}", compact_schema(schema)?)),
        Some(_) => {
            return Err(invalid(
                "`structured_outputs` other than `json` cannot be combined with tool calls",
            ));
        }
    };
    if answer.is_some() && !matches!(request.tool_choice, ToolChoice::Auto) {
        return Err(invalid(
            "a required tool call leaves no room for a `response_format`: use `tool_choice: \"auto\"`",
        ));
    }
    Ok(tools::grammar(
        style,
        &request.tools,
        &request.tool_choice,
        request.parallel_tool_calls,
        answer.as_deref(),
    ))
}

fn invalid(why: &str) -> InferError {
    InferError::InvalidInput(why.to_owned())
}

/// A JSON schema written without the whitespace a generated answer could otherwise wander
/// in, as the engine writes the `json-schema` constraint (unless the schema says otherwise).
fn compact_schema(schema: &str) -> Result<String, InferError> {
    let mut schema: serde_json::Value = serde_json::from_str(schema)
        .map_err(|error| InferError::InvalidInput(format!("the schema is not JSON: {error}")))?;
    if let Some(object) = schema.as_object_mut() {
        object
            .entry("x-guidance")
            .or_insert_with(|| serde_json::json!({ "whitespace_flexible": false }));
    }
    Ok(schema.to_string())
}

/// A generation that may hold calls in `format`: the calls are read out of it and the rest
/// is the answer's content. Streamed, the content goes out as it comes, up to where a call
/// begins (text that may still open one is held back a piece), and each call goes out whole
/// once the generation ends.
fn generate_calls(
    format: tools::Format,
    parts: &[PromptPart],
    params: &SamplingParams,
    decoding: &Decoding,
    stream: bool,
) -> Result<AgentAnswer, InferError> {
    if !stream {
        let mut generation = inference::generate(parts, params, decoding)?;
        let (content, tool_calls) = tools::parse(format, &generation.completion.text);
        generation.completion.text = content;
        return Ok(AgentAnswer {
            generation,
            tool_calls,
        });
    }
    let pieces = inference::generate_stream(parts, params, decoding)?;
    let mut text = String::new();
    // Bytes of `text` sent as content; where a call begins, once one has.
    let mut sent = 0;
    let mut call_start = None;
    let mut generation = loop {
        match pieces.next_piece()? {
            PieceItem::Piece(piece) => {
                text.push_str(&piece.text);
                if call_start.is_some() {
                    continue;
                }
                call_start = tools::call_start(format, &text);
                let until = call_start.unwrap_or(text.len() - tools::held_back(format, &text));
                if until > sent {
                    output::emit_piece(&Piece {
                        text: text[sent..until].to_owned(),
                        logprobs: piece.logprobs,
                    })?;
                    sent = until;
                }
            }
            PieceItem::Done(generation) => break generation,
        }
    };
    let (content, tool_calls) = match call_start {
        Some(_) => tools::parse(format, &text),
        None => (text.clone(), Vec::new()),
    };
    if tool_calls.is_empty() {
        // No call after all: what was held back is content.
        if sent < text.len() {
            output::emit(&text[sent..])?;
        }
    } else {
        for call in &tool_calls {
            output::emit_tool_call(call)?;
        }
    }
    generation.completion.text = content;
    Ok(AgentAnswer {
        generation,
        tool_calls,
    })
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
