//! The OpenAI request bodies: read into typed bodies, checked against the wire schema, and
//! turned into the typed requests the guest's `openai` export takes.
//!
//! Fields this server implements are passed on (agent clients' fields are read in `agent`).
//! Fields it does not implement are refused with a 400 naming them when their value would
//! change the result (`n: 2`, `tools`, ...), and accepted when it would not (`n: 1`,
//! `echo: false`). Fields nobody
//! here knows are refused too, except a few that only label a request (`user`, `metadata`):
//! an unknown sampling field silently ignored would change the answer without saying so.
//!
//! A body is read in two steps: the route's own fields (`prompt`, `messages`), then, from
//! what they left, the fields both routes share ([`SharedFields`]); what is left after both
//! is checked against the lists of unserved fields and labels ([`Leftovers`]). One struct
//! with `#[serde(flatten)]` would read it in one step, but serde buffers a flattened
//! struct's fields, and their errors lose the field's name. An error names the field at
//! fault by its path (`messages[2].content`), which is also its `param`.

use std::fmt;

use axum::http::StatusCode;
use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::agent::{LogprobsField, RawAgentFields};
use super::error::OpenAiError;
use super::tools::{self, RawToolFields};
use crate::guest::{
    AgentChatRequest, AgentFields, AgentMessage, AgentRole, CompletionRequest, GenerationOptions,
    OpenAiCall, OpenAiRequest,
};
use crate::http::params::{StopStrings, TEMPERATURE};

/// OpenAI allows up to 4 stop sequences.
const MAX_STOP: usize = 4;

/// The most choices (`n`) one request may ask for: each is a sequence of the batch and a
/// guest call of its own.
pub const MAX_CHOICES: u32 = 16;

/// What the HTTP layer needs besides the guest's request.
#[derive(Debug)]
pub struct Envelope {
    /// The model the client named, if it named one.
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage`: one more chunk with the usage before `[DONE]`.
    pub include_usage: bool,
    /// How many choices (`n`), 1 to [`MAX_CHOICES`].
    pub choices: u32,
}

/// `POST /v1/completions`.
pub fn completion(body: &[u8]) -> Result<(Envelope, OpenAiRequest), OpenAiError> {
    let body: CompletionBody = read_body(body)?;
    let prompt = match body.prompt {
        Some(Prompt::One(prompt) | Prompt::Listed([prompt])) => prompt,
        Some(Prompt::Other(prompt)) if prompt.is_array() => {
            return Err(OpenAiError::unsupported(
                "prompt",
                "give one prompt as a string (lists of prompts and token ids are not served)",
            ));
        }
        Some(Prompt::Other(_)) => {
            return Err(OpenAiError::invalid("prompt", "`prompt` must be a string"));
        }
        None => return Err(OpenAiError::invalid("prompt", "`prompt` is required")),
    };
    let (envelope, options, agent) =
        shared(body.rest, &COMPLETION_LEFTOVERS, LogprobsField::Count)?;
    let call = OpenAiCall::Completion(CompletionRequest { prompt, options });
    Ok((envelope, OpenAiRequest { call, agent }))
}

/// `POST /v1/chat/completions`.
pub fn chat(body: &[u8]) -> Result<(Envelope, OpenAiRequest), OpenAiError> {
    let body: ChatBody = read_body(body)?;
    let messages = match body.messages {
        Some(messages) if messages.is_empty() => {
            return Err(OpenAiError::invalid("messages", "`messages` is empty"));
        }
        Some(messages) => messages
            .into_iter()
            .enumerate()
            .map(|(i, message)| message.into_agent_message(i))
            .collect::<Result<Vec<_>, _>>()?,
        None => return Err(OpenAiError::invalid("messages", "`messages` is required")),
    };
    let tools = RawToolFields {
        tools: body.tools,
        tool_choice: body.tool_choice,
        parallel_tool_calls: body.parallel_tool_calls,
    }
    .read()?;
    let (envelope, options, agent) = shared(body.rest, &CHAT_LEFTOVERS, LogprobsField::Flag)?;
    let call = OpenAiCall::Chat(AgentChatRequest {
        messages,
        options,
        tools: tools.tools,
        tool_choice: tools.tool_choice,
        parallel_tool_calls: tools.parallel_tool_calls,
    });
    Ok((envelope, OpenAiRequest { call, agent }))
}

/// `POST /v1/completions`' own fields; [`SharedFields`] reads the rest.
#[derive(Deserialize)]
struct CompletionBody {
    #[serde(default, deserialize_with = "null_as_value")]
    prompt: Option<Prompt>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// `prompt`: one string, or a list of one string (as SDKs send a single prompt). Anything
/// else is read to be refused: other lists (several prompts, token ids) as not served, the
/// rest as not a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Listed([String; 1]),
    Other(Value),
}

/// `POST /v1/chat/completions`' own fields; [`SharedFields`] reads the rest.
#[derive(Deserialize)]
struct ChatBody {
    #[serde(default, deserialize_with = "null_as_value")]
    messages: Option<Vec<Message>>,
    /// Tool calling (`tools`).
    #[serde(default)]
    tools: Value,
    #[serde(default)]
    tool_choice: Value,
    #[serde(default)]
    parallel_tool_calls: Value,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// One of `messages`.
#[derive(Deserialize)]
#[serde(expecting = "a message object")]
struct Message {
    role: Option<MessageRole>,
    /// Absent or `null` in an assistant turn that made a tool call: nothing to show.
    content: Option<Content>,
    /// An assistant turn's calls.
    #[serde(default)]
    tool_calls: Value,
    /// A tool turn's: the call it answers.
    tool_call_id: Option<String>,
    /// A participant's or a tool's name.
    name: Option<String>,
    /// Labels and unserved fields ([`MESSAGE_LEFTOVERS`]). Being flattened, it also has
    /// serde read a message from an object only, never from a list.
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl Message {
    fn into_agent_message(self, index: usize) -> Result<AgentMessage, OpenAiError> {
        let at = |field: &str| format!("messages[{index}].{field}");
        let role = match self.role {
            Some(MessageRole::Turn(role)) => role,
            Some(MessageRole::Function) => {
                return Err(OpenAiError::unsupported(
                    &at("role"),
                    "`function` turns are not served: use `tools` and `role: \"tool\"`",
                ));
            }
            None => return Err(OpenAiError::invalid(at("role"), "`role` must be a string")),
        };
        let tool_calls = tools::assistant_calls(self.tool_calls, &at("tool_calls"))?;
        if !tool_calls.is_empty() && !matches!(role, AgentRole::Assistant) {
            return Err(OpenAiError::invalid(
                at("tool_calls"),
                "only an assistant turn has `tool_calls`",
            ));
        }
        match (&role, &self.tool_call_id) {
            (AgentRole::Tool, None) => {
                return Err(OpenAiError::invalid(
                    at("tool_call_id"),
                    "a tool turn needs `tool_call_id`, the id of the call it answers",
                ));
            }
            (AgentRole::Tool, Some(_)) | (_, None) => {}
            (_, Some(_)) => {
                return Err(OpenAiError::invalid(
                    at("tool_call_id"),
                    "only a tool turn has `tool_call_id`",
                ));
            }
        }
        let content = match self.content {
            None => String::new(),
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => parts
                .into_iter()
                .enumerate()
                .map(|(j, part)| part.into_text(&at(&format!("content[{j}]"))))
                .collect::<Result<String, _>>()?,
        };
        MESSAGE_LEFTOVERS.check(&self.rest, at)?;
        Ok(AgentMessage {
            role,
            content,
            tool_calls,
            tool_call_id: self.tool_call_id,
            name: self.name,
        })
    }
}

/// A message's `role`; `developer` is the newer name of `system`. The deprecated
/// `function` turns are read to be refused by name.
#[derive(Deserialize)]
#[serde(try_from = "String")]
enum MessageRole {
    Turn(AgentRole),
    Function,
}

impl TryFrom<String> for MessageRole {
    type Error = String;

    fn try_from(role: String) -> Result<Self, String> {
        match role.as_str() {
            "system" | "developer" => Ok(Self::Turn(AgentRole::System)),
            "user" => Ok(Self::Turn(AgentRole::User)),
            "assistant" => Ok(Self::Turn(AgentRole::Assistant)),
            "tool" => Ok(Self::Turn(AgentRole::Tool)),
            "function" => Ok(Self::Function),
            other => Err(format!(
                "unknown role `{other}` (system, developer, user, assistant, tool)"
            )),
        }
    }
}

/// A message's `content`: a string, or a list of parts of which only text is served.
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// Written out rather than derived as `untagged`, which would answer an error in a part with
/// one about the whole content; this one names the part (`messages[0].content[1].text`).
impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(content: D) -> Result<Self, D::Error> {
        struct ContentVisitor;

        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = Content;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a string or a list of text parts")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Content, E> {
                Ok(Content::Text(text.to_owned()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<Content, E> {
                Ok(Content::Text(text))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut parts = Vec::new();
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(Content::Parts(parts))
            }
        }

        content.deserialize_any(ContentVisitor)
    }
}

/// One part of a list `content`.
#[derive(Deserialize)]
#[serde(expecting = "a content part object")]
struct ContentPart {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<String>,
    /// The part's other fields (those of the part types not served: `image_url`, ...),
    /// ignored. Being flattened, it also has serde read a part from an object only.
    #[serde(flatten)]
    _other: IgnoredAny,
}

impl ContentPart {
    /// The part's text; `at` is the part's path.
    fn into_text(self, at: &str) -> Result<String, OpenAiError> {
        match (self.kind.as_deref(), self.text) {
            (Some("text"), Some(text)) => Ok(text),
            (Some("text"), None) => Err(OpenAiError::invalid(at, "a text part needs `text`")),
            (Some(other), _) => Err(OpenAiError::unsupported(
                &format!("{at}.type"),
                &format!("`{other}` parts are not served, only `text`"),
            )),
            (None, _) => Err(OpenAiError::invalid(at, "a content part needs `type`")),
        }
    }
}

/// The fields both routes share, read from what the route's own fields left.
#[derive(Deserialize)]
struct SharedFields {
    model: Option<String>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    /// The newer name of `max_tokens`; it wins when both are given.
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// OpenAI's seed is a signed integer; the same seed must give the same text, so a
    /// negative one is reinterpreted, not refused.
    seed: Option<i64>,
    #[serde(default)]
    stop: StopStrings,
    top_k: Option<u32>,
    repeat_penalty: Option<f32>,
    n: Option<u32>,
    /// Agent clients' fields (`agent`).
    #[serde(default)]
    response_format: Value,
    #[serde(default)]
    structured_outputs: Value,
    #[serde(default)]
    logprobs: Value,
    #[serde(default)]
    top_logprobs: Value,
    #[serde(default)]
    logit_bias: Value,
    /// Unserved fields, labels and unknown ones, for [`Leftovers::check`].
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// `stream_options`: the usage chunk, asked for or not. vLLM's `continuous_usage_stats` is
/// read and ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
    #[serde(default, rename = "continuous_usage_stats")]
    _continuous_usage_stats: Option<bool>,
}

/// Reads and checks the fields both routes share from `rest`, then checks what is left with
/// the route's `leftovers`.
fn shared(
    rest: Map<String, Value>,
    leftovers: &Leftovers,
    logprobs: LogprobsField,
) -> Result<(Envelope, GenerationOptions, AgentFields), OpenAiError> {
    let mut fields: SharedFields = read(Value::Object(rest))?;
    let agent = RawAgentFields {
        response_format: fields.response_format.take(),
        structured_outputs: fields.structured_outputs.take(),
        logprobs: fields.logprobs.take(),
        top_logprobs: fields.top_logprobs.take(),
        logit_bias: fields.logit_bias.take(),
    }
    .read(logprobs)?;
    let stream = fields.stream.unwrap_or(false);
    let include_usage = fields.include_usage(stream)?;
    let max_tokens = fields.max_tokens()?;
    fields.check_ranges()?;
    let choices = fields.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&choices) {
        return Err(OpenAiError::invalid(
            "n",
            format!("`n` must be from 1 to {MAX_CHOICES}, got {choices}"),
        ));
    }
    let stop = stop_sequences(fields.stop)?;
    leftovers.check(&fields.rest, str::to_owned)?;
    let envelope = Envelope {
        model: fields.model,
        stream,
        include_usage,
        choices,
    };
    let options = GenerationOptions {
        max_tokens,
        temperature: fields.temperature,
        top_k: fields.top_k,
        top_p: fields.top_p,
        repeat_penalty: fields.repeat_penalty,
        seed: fields.seed.map(|seed| seed as u64),
        stop,
        stream,
    };
    Ok((envelope, options, agent))
}

impl SharedFields {
    /// `stream_options.include_usage`; `stream_options` needs `stream: true`.
    fn include_usage(&self, stream: bool) -> Result<bool, OpenAiError> {
        match &self.stream_options {
            None => Ok(false),
            Some(_) if !stream => Err(OpenAiError::invalid(
                "stream_options",
                "`stream_options` is only allowed with `stream: true`",
            )),
            Some(options) => Ok(options.include_usage.unwrap_or(false)),
        }
    }

    /// `max_completion_tokens`, or else `max_tokens`: at least 1.
    fn max_tokens(&self) -> Result<Option<u32>, OpenAiError> {
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if max_tokens == Some(0) {
            let field = if self.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            return Err(OpenAiError::invalid(
                field,
                format!("`{field}` must be at least 1"),
            ));
        }
        Ok(max_tokens)
    }

    /// The ranges of `temperature` and `top_p`.
    fn check_ranges(&self) -> Result<(), OpenAiError> {
        if let Some(temperature) = self.temperature
            && !TEMPERATURE.contains(&temperature)
        {
            return Err(OpenAiError::invalid(
                "temperature",
                format!(
                    "`temperature` must be between {} and {}, got {temperature}",
                    TEMPERATURE.start(),
                    TEMPERATURE.end()
                ),
            ));
        }
        if let Some(top_p) = self.top_p
            && !(top_p > 0.0 && top_p <= 1.0)
        {
            return Err(OpenAiError::invalid(
                "top_p",
                format!("`top_p` must be in (0, 1], got {top_p}"),
            ));
        }
        Ok(())
    }
}

/// `stop`: at most [`MAX_STOP`] sequences, none empty.
fn stop_sequences(stop: StopStrings) -> Result<Vec<String>, OpenAiError> {
    let stop = stop.into_vec();
    if stop.len() > MAX_STOP {
        return Err(OpenAiError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop sequences, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(OpenAiError::invalid("stop", "a stop sequence is empty"));
    }
    Ok(stop)
}

/// What one level of a body (its top, or a message) takes besides its typed fields.
struct Leftovers {
    /// Fields this server does not implement, accepted when harmless.
    unserved: &'static [&'static [Unserved]],
    /// Fields that label the request or message and never change its answer.
    labels: &'static [&'static str],
    /// Why any other field is refused.
    unknown: &'static str,
}

impl Leftovers {
    /// Checks the fields in `rest`; an error names a field by `path(field)`.
    fn check(
        &self,
        rest: &Map<String, Value>,
        path: impl Fn(&str) -> String,
    ) -> Result<(), OpenAiError> {
        for (field, value) in rest {
            let mut unserved = self.unserved.iter().copied().flatten();
            match unserved.find(|unserved| unserved.field == field) {
                Some(unserved) if value.is_null() || (unserved.harmless)(value) => {}
                Some(unserved) => {
                    return Err(OpenAiError::unsupported(&path(field), unserved.why));
                }
                None if self.labels.contains(&field.as_str()) => {}
                None => return Err(OpenAiError::unsupported(&path(field), self.unknown)),
            }
        }
        Ok(())
    }
}

/// A field this server does not implement: accepted when `null` or `harmless` (then it
/// changes nothing), refused by name with `why` otherwise.
struct Unserved {
    field: &'static str,
    harmless: fn(&Value) -> bool,
    why: &'static str,
}

impl Unserved {
    const fn new(field: &'static str, harmless: fn(&Value) -> bool, why: &'static str) -> Self {
        Self {
            field,
            harmless,
            why,
        }
    }
}

const ONE_CHOICE: &str = "only one candidate per choice is served (ask for more with `n`)";
const OLD_FUNCTIONS: &str = "`functions` and `function_call` are not served: use `tools`";
const NO_PENALTY: &str = "only 0 is served (`repeat_penalty` is)";

const COMPLETION_UNSERVED: &[Unserved] = &[
    Unserved::new("echo", |echo| *echo == false, "the prompt is not echoed"),
    Unserved::new("suffix", |_| false, "insertion is not served"),
    Unserved::new("best_of", |best_of| *best_of == 1, ONE_CHOICE),
];

const CHAT_UNSERVED: &[Unserved] = &[
    Unserved::new("functions", is_empty, OLD_FUNCTIONS),
    Unserved::new("function_call", is_no_tool_choice, OLD_FUNCTIONS),
    Unserved::new("audio", |_| false, "audio is not served"),
    Unserved::new(
        "modalities",
        |modalities| *modalities == serde_json::json!(["text"]),
        "only text is served",
    ),
];

const SHARED_UNSERVED: &[Unserved] = &[
    Unserved::new("presence_penalty", is_zero, NO_PENALTY),
    Unserved::new("frequency_penalty", is_zero, NO_PENALTY),
];

/// Fields that label a request and never change its answer.
const LABELS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "parallel_tool_calls",
];

const COMPLETION_LEFTOVERS: Leftovers = Leftovers {
    unserved: &[COMPLETION_UNSERVED, SHARED_UNSERVED],
    labels: LABELS,
    unknown: "unknown field",
};

const CHAT_LEFTOVERS: Leftovers = Leftovers {
    unserved: &[CHAT_UNSERVED, SHARED_UNSERVED],
    labels: LABELS,
    unknown: "unknown field",
};

/// A message's: `refusal` is an assistant turn's refusal; nothing else may hide here.
const MESSAGE_LEFTOVERS: Leftovers = Leftovers {
    unserved: &[&[Unserved::new(
        "function_call",
        |call| call.is_null(),
        OLD_FUNCTIONS,
    )]],
    labels: &["refusal"],
    unknown: "unknown message field",
};

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Array(items) => items.is_empty(),
        Value::Object(items) => items.is_empty(),
        _ => false,
    }
}

fn is_zero(value: &Value) -> bool {
    value.as_f64() == Some(0.0)
}

fn is_no_tool_choice(choice: &Value) -> bool {
    matches!(choice.as_str(), Some("none" | "auto"))
}

/// For a required field: `null` is read as a value of the field's type (which refuses it,
/// naming what it wanted), not as the field left out.
fn null_as_value<'de, D, T>(value: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(value).map(Some)
}

/// Reads a whole body as `T`.
fn read_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, OpenAiError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let value = read(&mut json)?;
    json.end().map_err(not_json)?;
    Ok(value)
}

/// Reads `T` from `json`. A value of the wrong type is a 400 naming its path
/// (`messages[2].content`); so is a body that is not JSON, or not an object.
fn read<'de, T: Deserialize<'de>>(
    json: impl Deserializer<'de, Error = serde_json::Error>,
) -> Result<T, OpenAiError> {
    serde_path_to_error::deserialize(json).map_err(|error| {
        let path = error.path().clone();
        let error = error.into_inner();
        if !error.is_data() {
            not_json(error)
        } else if path.iter().next().is_none() {
            OpenAiError::new(StatusCode::BAD_REQUEST, "the body must be a JSON object")
        } else {
            OpenAiError::invalid(path.to_string(), format!("`{path}`: {error}"))
        }
    })
}

fn not_json(error: serde_json::Error) -> OpenAiError {
    OpenAiError::new(
        StatusCode::BAD_REQUEST,
        format!("the body is not valid JSON: {error}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{Constraint, ResponseFormat, ToolChoice};

    #[test]
    fn completion_fields() {
        let (envelope, request) = completion(
            br#"{"model":"m","prompt":"Hi","max_tokens":5,"temperature":0,"seed":-1,
                 "stop":"\n","stream":true,"stream_options":{"include_usage":true},
                 "n":1,"echo":false,"user":"u","top_k":3}"#,
        )
        .unwrap();
        let OpenAiCall::Completion(request) = request.call else {
            panic!("not a completion")
        };
        assert_eq!(envelope.model.as_deref(), Some("m"));
        assert!(envelope.stream && envelope.include_usage);
        assert_eq!(request.prompt, "Hi");
        assert_eq!(request.options.max_tokens, Some(5));
        assert_eq!(request.options.seed, Some(u64::MAX));
        assert_eq!(request.options.stop, vec!["\n".to_string()]);
        assert_eq!(request.options.top_k, Some(3));
        assert!(request.options.stream);
    }

    #[test]
    fn chat_fields() {
        let (envelope, request) = chat(
            br#"{"messages":[{"role":"developer","content":"Be brief."},
                 {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                 {"role":"assistant","content":null}],
                 "max_tokens":9,"max_completion_tokens":7}"#,
        )
        .unwrap();
        let OpenAiCall::Chat(request) = request.call else {
            panic!("not a chat")
        };
        assert!(envelope.model.is_none() && !envelope.stream);
        assert_eq!(request.messages.len(), 3);
        assert!(matches!(request.messages[0].role, AgentRole::System));
        assert_eq!(request.messages[1].content, "ab");
        assert_eq!(request.options.max_tokens, Some(7));
    }

    /// Each refusal names the field at fault.
    #[test]
    fn refusals_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"prompt":"x","n":0}"#, "n"),
            (br#"{"prompt":"x","n":17}"#, "n"),
            (br#"{"prompt":"x","logprobs":21}"#, "logprobs"),
            (br#"{"prompt":"x","logprobs":true}"#, "logprobs"),
            (br#"{"prompt":"x","top_logprobs":2}"#, "top_logprobs"),
            (br#"{"prompt":"x","echo":true}"#, "echo"),
            (br#"{"prompt":"x","best_of":3}"#, "best_of"),
            (br#"{"prompt":"x","suffix":"y"}"#, "suffix"),
            (
                br#"{"prompt":"x","presence_penalty":0.5}"#,
                "presence_penalty",
            ),
            (br#"{"prompt":"x","logit_bias":{"1":500}}"#, "logit_bias.1"),
            (
                br#"{"prompt":"x","logit_bias":{"one":5}}"#,
                "logit_bias.one",
            ),
            (
                br#"{"prompt":"x","structured_outputs":{"regex":"a","choice":["b"]}}"#,
                "structured_outputs",
            ),
            (
                br#"{"prompt":"x","structured_outputs":{"choice":[1]}}"#,
                "structured_outputs.choice",
            ),
            (
                br#"{"prompt":"x","structured_outputs":{"xml":"<a/>"}}"#,
                "structured_outputs.xml",
            ),
            (br#"{"prompt":"x","min_p":0.1}"#, "min_p"),
            (br#"{"prompt":"x","temperature":3}"#, "temperature"),
            (br#"{"prompt":"x","temperature":"hot"}"#, "temperature"),
            (br#"{"prompt":"x","max_tokens":0}"#, "max_tokens"),
            (br#"{"prompt":"x","top_p":0}"#, "top_p"),
            (br#"{"prompt":"x","stop":["a","b","c","d","e"]}"#, "stop"),
            (
                br#"{"prompt":"x","stream_options":{"include_usage":true}}"#,
                "stream_options",
            ),
            (br#"{"prompt":["a","b"]}"#, "prompt"),
            (br#"{"prompt":[1,2]}"#, "prompt"),
            (br#"{"max_tokens":3}"#, "prompt"),
        ];
        for (body, param) in cases {
            let error = completion(body).unwrap_err();
            assert_eq!(error.status, 400, "{}", String::from_utf8_lossy(body));
            assert_eq!(error.param.as_deref(), Some(*param), "{}", error.message);
        }
        let chat_cases: &[(&[u8], &str)] = &[
            (br#"{"messages":[]}"#, "messages"),
            (
                br#"{"messages":[{"role":"tool","content":"x"}]}"#,
                "messages[0].tool_call_id",
            ),
            (
                br#"{"messages":[{"role":"function","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x","tool_call_id":"c"}]}"#,
                "messages[0].tool_call_id",
            ),
            (br#"{"messages":[{"role":"wizard","content":"x"}]}"#, "messages[0].role"),
            (
                br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
                "messages[0].content[0].type",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#,
                "tools[0].function",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],
                     "tools":[{"type":"function","function":{"name":"a b"}}]}"#,
                "tools[0].function.name",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],
                     "tools":[{"type":"function","function":{"name":"f","parameters":[]}}]}"#,
                "tools[0].function.parameters",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],
                     "tools":[{"type":"function","function":{"name":"f"}}],
                     "tool_choice":{"type":"function","function":{"name":"g"}}}"#,
                "tool_choice.function.name",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"tool_choice":"required"}"#,
                "tool_choice",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"functions":[{"name":"f"}]}"#,
                "functions",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"xml"}}"#,
                "response_format.type",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema"}}"#,
                "response_format.json_schema",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],
                     "response_format":{"type":"json_schema","json_schema":{"name":"a","schema":3}}}"#,
                "response_format.json_schema.schema",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":3}"#,
                "top_logprobs",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#,
                "top_logprobs",
            ),
        ];
        for (body, param) in chat_cases {
            let error = chat(body).unwrap_err();
            assert_eq!(error.status, 400, "{}", String::from_utf8_lossy(body));
            assert_eq!(error.param.as_deref(), Some(*param), "{}", error.message);
        }
    }

    /// A value of the wrong type is named by its path, down into messages and their parts;
    /// a message or a part is read from an object only.
    #[test]
    fn type_errors_name_the_path() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"messages":null}"#, "messages"),
            (br#"{"messages":["hi"]}"#, "messages[0]"),
            (br#"{"messages":[["user","hi"]]}"#, "messages[0]"),
            (
                br#"{"messages":[{"role":3,"content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                br#"{"messages":[{"role":"user","content":"a"},{"role":"user","content":5}]}"#,
                "messages[1].content",
            ),
            (
                br#"{"messages":[{"role":"user","content":[{"type":"text","text":7}]}]}"#,
                "messages[0].content[0].text",
            ),
            (
                br#"{"messages":[{"role":"user","content":[["text","hi"]]}]}"#,
                "messages[0].content[0]",
            ),
            (
                br#"{"messages":[{"role":"assistant","content":"x","tool_calls":[{}]}]}"#,
                "messages[0].tool_calls[0].id",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x",
                     "tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]}]}"#,
                "messages[0].tool_calls",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x","name":"a","mood":1}]}"#,
                "messages[0].mood",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"stream":true,
                     "stream_options":{"include_usage":"yes"}}"#,
                "stream_options.include_usage",
            ),
        ];
        for (body, param) in cases {
            let error = chat(body).unwrap_err();
            assert_eq!(error.status, 400, "{}", String::from_utf8_lossy(body));
            assert_eq!(error.param.as_deref(), Some(*param), "{}", error.message);
        }
        // A wrong `stop` says what it takes, not which Rust type failed to match.
        let error = completion(br#"{"prompt":"x","stop":5}"#).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("stop"), "{}", error.message);
        assert!(
            error.message.contains("a string or a list of strings"),
            "{}",
            error.message
        );
    }

    /// Agent clients' fields, as the guest gets them.
    #[test]
    fn agent_fields() {
        let (_, request) = chat(
            br#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":2,
                 "logit_bias":{"7":-100,"9":2.5},
                 "response_format":{"type":"json_schema",
                                    "json_schema":{"name":"n","schema":{"type":"object"},"strict":true}}}"#,
        )
        .unwrap();
        let agent = request.agent;
        assert_eq!(agent.logprobs, Some((2, "logprobs")));
        assert_eq!(agent.logit_bias, vec![(7, -100.0), (9, 2.5)]);
        let Some(ResponseFormat::JsonSchema(ref format)) = agent.response_format else {
            panic!("{:?}", agent.response_format)
        };
        assert_eq!((format.name.as_str(), format.strict), ("n", true));
        assert_eq!(format.schema, r#"{"type":"object"}"#);
        assert_eq!(agent.first_field(), Some("response_format"));
        let (_, request) =
            completion(br#"{"prompt":"x","logprobs":3,"structured_outputs":{"choice":["a","b"]}}"#)
                .unwrap();
        assert_eq!(request.agent.logprobs, Some((3, "logprobs")));
        assert!(matches!(
            request.agent.structured_outputs,
            Some(Constraint::Choice(ref choices)) if choices == &["a", "b"]
        ));
        // `logprobs: false`, `response_format: text`: nothing an old guest cannot serve.
        let (_, request) = chat(
            br#"{"messages":[{"role":"user","content":"x"}],"logprobs":false,
                 "response_format":{"type":"text"}}"#,
        )
        .unwrap();
        assert_eq!(request.agent.first_field(), None);
    }

    /// Tools, the choice among them and tool turns, as the guest gets them.
    #[test]
    fn tool_fields() {
        let (_, request) = chat(
            br#"{"messages":[{"role":"user","content":"Weather in Paris?"},
                 {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
                   "function":{"name":"weather","arguments":"{\"city\":\"Paris\"}"}}]},
                 {"role":"tool","tool_call_id":"call_1","content":"18 C"}],
                 "tools":[{"type":"function","function":{"name":"weather","description":"Now",
                   "parameters":{"type":"object","properties":{"city":{"type":"string"}}}}},
                  {"type":"function","function":{"name":"time"}}],
                 "tool_choice":{"type":"function","function":{"name":"time"}},
                 "parallel_tool_calls":false}"#,
        )
        .unwrap();
        assert_eq!(request.first_agent_field(), Some("tools"));
        let OpenAiCall::Chat(call) = request.call else {
            panic!("not a chat")
        };
        assert_eq!(call.tools.len(), 2);
        assert_eq!(call.tools[0].description.as_deref(), Some("Now"));
        assert!(call.tools[0].parameters.contains(r#""city""#));
        assert!(call.tools[1].parameters.contains(r#""object""#));
        assert!(matches!(call.tool_choice, ToolChoice::Function(ref name) if name == "time"));
        assert!(!call.parallel_tool_calls);
        let made = &call.messages[1].tool_calls[0];
        assert_eq!(
            (made.id.as_str(), made.name.as_str()),
            ("call_1", "weather")
        );
        assert_eq!(made.arguments, r#"{"city":"Paris"}"#);
        assert!(matches!(call.messages[2].role, AgentRole::Tool));
        assert_eq!(call.messages[2].tool_call_id.as_deref(), Some("call_1"));
        // Without tools the choice is `none`; `auto` with tools is the default.
        let (_, request) =
            chat(br#"{"messages":[{"role":"user","content":"x"}],"tool_choice":"none"}"#).unwrap();
        assert_eq!(request.first_agent_field(), None);
        let (_, request) = chat(
            br#"{"messages":[{"role":"user","content":"x"}],
                 "tools":[{"type":"function","function":{"name":"f"}}]}"#,
        )
        .unwrap();
        let OpenAiCall::Chat(call) = request.call else {
            panic!("not a chat")
        };
        assert!(matches!(call.tool_choice, ToolChoice::Auto) && call.parallel_tool_calls);
    }

    #[test]
    fn invalid_json_is_a_400() {
        for body in [&b"not json"[..], b"[1]", b""] {
            assert_eq!(completion(body).unwrap_err().status, 400);
        }
    }
}
