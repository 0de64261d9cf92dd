//! The OpenAI request bodies: parsed, checked against the wire schema, and turned into the
//! typed requests the guest's `openai` export takes.
//!
//! Fields this server implements are passed on. Fields it does not implement are refused
//! with a 400 naming them when their value would change the result (`n: 2`, `logprobs`,
//! `tools`, ...), and accepted when it would not (`n: 1`, `echo: false`). Fields nobody
//! here knows are refused too, except a few that only label a request (`user`, `metadata`):
//! an unknown sampling field silently ignored would change the answer without saying so.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::OpenAiError;
use crate::guest::{ChatMessage, ChatRequest, CompletionRequest, GenerationOptions, Role};

/// The range the wire schema allows for `temperature` (OpenAI's).
const TEMPERATURE: std::ops::RangeInclusive<f32> = 0.0..=2.0;
/// OpenAI allows up to 4 stop sequences.
const MAX_STOP: usize = 4;
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

/// What the HTTP layer needs besides the guest's request.
#[derive(Debug)]
pub struct Envelope {
    /// The model the client named, if it named one.
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage`: one more chunk with the usage before `[DONE]`.
    pub include_usage: bool,
}

/// `POST /v1/completions`.
pub fn completion(body: &[u8]) -> Result<(Envelope, CompletionRequest), OpenAiError> {
    let mut fields = object(body)?;
    let prompt = match fields.remove("prompt") {
        Some(Value::String(prompt)) => prompt,
        Some(Value::Array(prompts)) => match <[Value; 1]>::try_from(prompts) {
            Ok([Value::String(prompt)]) => prompt,
            _ => {
                return Err(OpenAiError::unsupported(
                    "prompt",
                    "give one prompt as a string (lists of prompts and token ids are not served)",
                ));
            }
        },
        Some(_) => return Err(OpenAiError::invalid("prompt", "`prompt` must be a string")),
        None => return Err(OpenAiError::invalid("prompt", "`prompt` is required")),
    };
    refuse_unless(
        &mut fields,
        "echo",
        &Value::Bool(false),
        "the prompt is not echoed",
    )?;
    refuse_unless_null(&mut fields, "suffix", "insertion is not served")?;
    refuse_unless_one(&mut fields, "best_of")?;
    let (envelope, options) = common(fields)?;
    Ok((envelope, CompletionRequest { prompt, options }))
}

/// `POST /v1/chat/completions`.
pub fn chat(body: &[u8]) -> Result<(Envelope, ChatRequest), OpenAiError> {
    let mut fields = object(body)?;
    let messages = match fields.remove("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => messages
            .into_iter()
            .enumerate()
            .map(|(i, message)| chat_message(i, message))
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Array(_)) => {
            return Err(OpenAiError::invalid("messages", "`messages` is empty"));
        }
        Some(_) => {
            return Err(OpenAiError::invalid(
                "messages",
                "`messages` must be a list",
            ));
        }
        None => return Err(OpenAiError::invalid("messages", "`messages` is required")),
    };
    for field in ["tools", "functions"] {
        refuse_unless_empty(&mut fields, field, "tool calls are not served")?;
    }
    for field in ["tool_choice", "function_call"] {
        match fields.remove(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(choice)) if choice == "none" || choice == "auto" => {}
            Some(_) => return Err(OpenAiError::unsupported(field, "tool calls are not served")),
        }
    }
    match fields.remove("response_format") {
        None | Some(Value::Null) => {}
        Some(format) if format.get("type") == Some(&Value::String("text".into())) => {}
        Some(_) => {
            return Err(OpenAiError::unsupported(
                "response_format",
                "only `{\"type\": \"text\"}` is served",
            ));
        }
    }
    refuse_unless_null(&mut fields, "audio", "audio is not served")?;
    match fields.remove("modalities") {
        None | Some(Value::Null) => {}
        Some(Value::Array(modalities)) if modalities == [Value::String("text".into())] => {}
        Some(_) => {
            return Err(OpenAiError::unsupported(
                "modalities",
                "only text is served",
            ));
        }
    }
    let (envelope, options) = common(fields)?;
    Ok((envelope, ChatRequest { messages, options }))
}

fn chat_message(index: usize, message: Value) -> Result<ChatMessage, OpenAiError> {
    let at = |field: &str| format!("messages[{index}].{field}");
    let Value::Object(mut message) = message else {
        return Err(OpenAiError::invalid(
            format!("messages[{index}]"),
            "a message must be an object",
        ));
    };
    let role = match message.remove("role") {
        Some(Value::String(role)) => match role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" | "function" => {
                return Err(OpenAiError::unsupported(
                    &at("role"),
                    "tool calls are not served",
                ));
            }
            other => {
                return Err(OpenAiError::invalid(
                    at("role"),
                    format!("unknown role `{other}` (system, developer, user, assistant)"),
                ));
            }
        },
        _ => return Err(OpenAiError::invalid(at("role"), "`role` must be a string")),
    };
    if message
        .remove("tool_calls")
        .is_some_and(|calls| !is_empty(&calls))
    {
        return Err(OpenAiError::unsupported(
            &at("tool_calls"),
            "tool calls are not served",
        ));
    }
    let content = match message.remove("content") {
        Some(Value::String(content)) => content,
        // An assistant turn without content (it made a tool call) has nothing to show.
        None | Some(Value::Null) => String::new(),
        Some(Value::Array(parts)) => {
            let mut content = String::new();
            for (j, part) in parts.into_iter().enumerate() {
                let field = at(&format!("content[{j}]"));
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(text))) => content.push_str(text),
                    (Some("text"), _) => {
                        return Err(OpenAiError::invalid(field, "a text part needs `text`"));
                    }
                    (Some(other), _) => {
                        return Err(OpenAiError::unsupported(
                            &format!("{field}.type"),
                            &format!("`{other}` parts are not served, only `text`"),
                        ));
                    }
                    (None, _) => {
                        return Err(OpenAiError::invalid(field, "a content part needs `type`"));
                    }
                }
            }
            content
        }
        Some(_) => {
            return Err(OpenAiError::invalid(
                at("content"),
                "`content` must be a string or a list of text parts",
            ));
        }
    };
    // `name` labels a participant; nothing else may hide here.
    message.remove("name");
    message.remove("refusal");
    if let Some(field) = message.keys().next() {
        return Err(OpenAiError::unsupported(
            &at(field),
            "unknown message field",
        ));
    }
    Ok(ChatMessage { role, content })
}

/// The fields both routes share, then a check that nothing unknown is left.
fn common(mut fields: Map<String, Value>) -> Result<(Envelope, GenerationOptions), OpenAiError> {
    let model = take::<Option<String>>(&mut fields, "model")?;
    let stream = take::<Option<bool>>(&mut fields, "stream")?.unwrap_or(false);
    let include_usage = match take::<Option<Value>>(&mut fields, "stream_options")? {
        None => false,
        Some(options) => {
            if !stream {
                return Err(OpenAiError::invalid(
                    "stream_options",
                    "`stream_options` is only allowed with `stream: true`",
                ));
            }
            let options: StreamOptions = serde_json::from_value(options).map_err(|error| {
                OpenAiError::invalid("stream_options", format!("`stream_options`: {error}"))
            })?;
            options.include_usage.unwrap_or(false)
        }
    };
    let max_tokens = take::<Option<u32>>(&mut fields, "max_tokens")?;
    let max_completion_tokens = take::<Option<u32>>(&mut fields, "max_completion_tokens")?;
    let max_tokens = max_completion_tokens.or(max_tokens);
    if max_tokens == Some(0) {
        let field = if max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        return Err(OpenAiError::invalid(
            field,
            format!("`{field}` must be at least 1"),
        ));
    }
    let temperature = take::<Option<f32>>(&mut fields, "temperature")?;
    if let Some(temperature) = temperature
        && !TEMPERATURE.contains(&temperature)
    {
        return Err(OpenAiError::invalid(
            "temperature",
            format!("`temperature` must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = take::<Option<f32>>(&mut fields, "top_p")?;
    if let Some(top_p) = top_p
        && !(top_p > 0.0 && top_p <= 1.0)
    {
        return Err(OpenAiError::invalid(
            "top_p",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    // OpenAI's seed is a signed integer; the same seed must give the same text, so a
    // negative one is reinterpreted, not refused.
    let seed = take::<Option<i64>>(&mut fields, "seed")?.map(|seed| seed as u64);
    let stop = match take::<Option<Stop>>(&mut fields, "stop")? {
        None => Vec::new(),
        Some(Stop::One(stop)) => vec![stop],
        Some(Stop::Many(stops)) => stops,
    };
    if stop.len() > MAX_STOP {
        return Err(OpenAiError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop sequences, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(OpenAiError::invalid("stop", "a stop sequence is empty"));
    }
    let top_k = take::<Option<u32>>(&mut fields, "top_k")?;
    let repeat_penalty = take::<Option<f32>>(&mut fields, "repeat_penalty")?;

    refuse_unless_one(&mut fields, "n")?;
    for penalty in ["presence_penalty", "frequency_penalty"] {
        match take::<Option<f64>>(&mut fields, penalty)? {
            None | Some(0.0) => {}
            Some(_) => {
                return Err(OpenAiError::unsupported(
                    penalty,
                    "only 0 is served (`repeat_penalty` is)",
                ));
            }
        }
    }
    refuse_unless_empty(&mut fields, "logit_bias", "token biases are not served")?;
    match fields.remove("logprobs") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(_) => {
            return Err(OpenAiError::unsupported(
                "logprobs",
                "log-probabilities are not served",
            ));
        }
    }
    match fields.remove("top_logprobs") {
        None | Some(Value::Null) => {}
        Some(value) if value == 0 => {}
        Some(_) => {
            return Err(OpenAiError::unsupported(
                "top_logprobs",
                "log-probabilities are not served",
            ));
        }
    }
    for label in LABELS {
        fields.remove(*label);
    }
    if let Some(field) = fields.keys().next() {
        return Err(OpenAiError::unsupported(field, "unknown field"));
    }
    let envelope = Envelope {
        model,
        stream,
        include_usage,
    };
    let options = GenerationOptions {
        max_tokens,
        temperature,
        top_k,
        top_p,
        repeat_penalty,
        seed,
        stop,
        stream,
    };
    Ok((envelope, options))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
    #[serde(default, rename = "continuous_usage_stats")]
    _continuous_usage_stats: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

fn object(body: &[u8]) -> Result<Map<String, Value>, OpenAiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(OpenAiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        )),
        Err(error) => Err(OpenAiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {error}"),
        )),
    }
}

/// Removes `field` and reads it as `T`, naming the field when its type is wrong.
fn take<T: DeserializeOwned>(
    fields: &mut Map<String, Value>,
    field: &str,
) -> Result<T, OpenAiError> {
    let value = fields.remove(field).unwrap_or(Value::Null);
    serde_json::from_value(value)
        .map_err(|error| OpenAiError::invalid(field, format!("`{field}`: {error}")))
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(items) => items.is_empty(),
        _ => false,
    }
}

fn refuse_unless(
    fields: &mut Map<String, Value>,
    field: &str,
    harmless: &Value,
    why: &str,
) -> Result<(), OpenAiError> {
    match fields.remove(field) {
        None | Some(Value::Null) => Ok(()),
        Some(value) if &value == harmless => Ok(()),
        Some(_) => Err(OpenAiError::unsupported(field, why)),
    }
}

fn refuse_unless_null(
    fields: &mut Map<String, Value>,
    field: &str,
    why: &str,
) -> Result<(), OpenAiError> {
    refuse_unless(fields, field, &Value::Null, why)
}

fn refuse_unless_empty(
    fields: &mut Map<String, Value>,
    field: &str,
    why: &str,
) -> Result<(), OpenAiError> {
    match fields.remove(field) {
        Some(value) if !is_empty(&value) => Err(OpenAiError::unsupported(field, why)),
        _ => Ok(()),
    }
}

fn refuse_unless_one(fields: &mut Map<String, Value>, field: &str) -> Result<(), OpenAiError> {
    refuse_unless(
        fields,
        field,
        &Value::from(1),
        "only one choice per request is served",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_fields() {
        let (envelope, request) = completion(
            br#"{"model":"m","prompt":"Hi","max_tokens":5,"temperature":0,"seed":-1,
                 "stop":"\n","stream":true,"stream_options":{"include_usage":true},
                 "n":1,"echo":false,"user":"u","top_k":3}"#,
        )
        .unwrap();
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
        assert!(envelope.model.is_none() && !envelope.stream);
        assert_eq!(request.messages.len(), 3);
        assert!(matches!(request.messages[0].role, Role::System));
        assert_eq!(request.messages[1].content, "ab");
        assert_eq!(request.options.max_tokens, Some(7));
    }

    /// Each refusal names the field at fault.
    #[test]
    fn refusals_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"prompt":"x","n":2}"#, "n"),
            (br#"{"prompt":"x","logprobs":1}"#, "logprobs"),
            (br#"{"prompt":"x","echo":true}"#, "echo"),
            (br#"{"prompt":"x","best_of":3}"#, "best_of"),
            (br#"{"prompt":"x","suffix":"y"}"#, "suffix"),
            (
                br#"{"prompt":"x","presence_penalty":0.5}"#,
                "presence_penalty",
            ),
            (br#"{"prompt":"x","logit_bias":{"1":5}}"#, "logit_bias"),
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
            (br#"{"messages":[{"role":"tool","content":"x"}]}"#, "messages[0].role"),
            (br#"{"messages":[{"role":"wizard","content":"x"}]}"#, "messages[0].role"),
            (
                br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
                "messages[0].content[0].type",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#,
                "tools",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#,
                "response_format",
            ),
        ];
        for (body, param) in chat_cases {
            let error = chat(body).unwrap_err();
            assert_eq!(error.status, 400, "{}", String::from_utf8_lossy(body));
            assert_eq!(error.param.as_deref(), Some(*param), "{}", error.message);
        }
    }

    #[test]
    fn invalid_json_is_a_400() {
        for body in [&b"not json"[..], b"[1]", b""] {
            assert_eq!(completion(body).unwrap_err().status, 400);
        }
    }
}
