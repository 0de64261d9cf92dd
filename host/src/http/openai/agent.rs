//! The fields agent clients add to an OpenAI request — `response_format`, vLLM's
//! `structured_outputs`, `logprobs`/`top_logprobs`, `logit_bias` — read and checked against
//! the wire schema here, and their schemas and grammars compiled against the model before any
//! guest runs, so that a mistake is a 400 naming the field (`response_format.json_schema.schema`).
//! What the guest does with them is its policy.

use rbee_engine::{Engine, limits};
use serde_json::{Map, Value};

use super::error::OpenAiError;
use crate::guest::{AgentFields, Constraint, JsonSchemaFormat, ResponseFormat};

/// The agent fields as the client sent them (`null` is the same as left out).
pub struct RawAgentFields {
    pub response_format: Value,
    pub structured_outputs: Value,
    pub logprobs: Value,
    pub top_logprobs: Value,
    pub logit_bias: Value,
}

/// Which route's meaning `logprobs` has: a flag beside `top_logprobs` (chat), or the number
/// of alternatives (completions).
#[derive(Clone, Copy)]
pub enum LogprobsField {
    Flag,
    Count,
}

impl RawAgentFields {
    pub fn read(self, logprobs: LogprobsField) -> Result<AgentFields, OpenAiError> {
        Ok(AgentFields {
            response_format: response_format(self.response_format)?,
            structured_outputs: structured_outputs(self.structured_outputs)?,
            logprobs: match logprobs {
                LogprobsField::Flag => chat_logprobs(&self.logprobs, &self.top_logprobs)?,
                LogprobsField::Count => {
                    if !self.top_logprobs.is_null() {
                        return Err(OpenAiError::invalid(
                            "top_logprobs",
                            "`top_logprobs` is a chat field; completions take `logprobs: N`",
                        ));
                    }
                    count("logprobs", &self.logprobs)?.map(|top| (top, "logprobs"))
                }
            },
            logit_bias: logit_bias(&self.logit_bias)?,
        })
    }
}

/// Compiles the schemas and grammars of `fields` against the model's vocabulary: what the
/// guest will be able to pass on is known to compile.
pub fn check_against(model: &Engine, fields: &AgentFields) -> Result<(), OpenAiError> {
    let check = |param: &str, constraint: rbee_engine::Constraint| {
        model
            .check_constraint(&constraint)
            .map_err(|error| OpenAiError::invalid(param, error.to_string()))
    };
    if let Some(ResponseFormat::JsonSchema(format)) = &fields.response_format {
        check(
            "response_format.json_schema.schema",
            rbee_engine::Constraint::JsonSchema(format.schema.clone()),
        )?;
    }
    if let Some(constraint) = &fields.structured_outputs {
        let (param, constraint) = match constraint.clone() {
            Constraint::JsonSchema(schema) => (
                "structured_outputs.json",
                rbee_engine::Constraint::JsonSchema(schema),
            ),
            Constraint::Regex(regex) => (
                "structured_outputs.regex",
                rbee_engine::Constraint::Regex(regex),
            ),
            Constraint::Grammar(grammar) => (
                "structured_outputs.grammar",
                rbee_engine::Constraint::Grammar(grammar),
            ),
            Constraint::Choice(choices) => (
                "structured_outputs.choice",
                rbee_engine::Constraint::Choice(choices),
            ),
        };
        check(param, constraint)?;
    }
    Ok(())
}

/// `response_format`: `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
fn response_format(value: Value) -> Result<Option<ResponseFormat>, OpenAiError> {
    let Value::Object(mut format) = value else {
        return match value {
            Value::Null => Ok(None),
            _ => Err(OpenAiError::invalid(
                "response_format",
                "`response_format` must be an object",
            )),
        };
    };
    let format = match format.get("type").and_then(Value::as_str) {
        Some("text") => ResponseFormat::Text,
        Some("json_object") => ResponseFormat::JsonObject,
        Some("json_schema") => {
            let Some(Value::Object(mut spec)) = format.remove("json_schema") else {
                return Err(OpenAiError::invalid(
                    "response_format.json_schema",
                    "`response_format.json_schema` (an object with `name` and `schema`) is \
                     required with `type: json_schema`",
                ));
            };
            let name = match spec.remove("name") {
                Some(Value::String(name)) => name,
                None | Some(Value::Null) => String::new(),
                Some(_) => {
                    return Err(OpenAiError::invalid(
                        "response_format.json_schema.name",
                        "`name` must be a string",
                    ));
                }
            };
            let schema = match spec.remove("schema") {
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => schema.to_string(),
                _ => {
                    return Err(OpenAiError::invalid(
                        "response_format.json_schema.schema",
                        "`schema` must be a JSON Schema object",
                    ));
                }
            };
            let strict = match spec.remove("strict") {
                Some(Value::Bool(strict)) => strict,
                None | Some(Value::Null) => false,
                Some(_) => {
                    return Err(OpenAiError::invalid(
                        "response_format.json_schema.strict",
                        "`strict` must be a boolean",
                    ));
                }
            };
            ResponseFormat::JsonSchema(JsonSchemaFormat {
                name,
                schema,
                strict,
            })
        }
        _ => {
            return Err(OpenAiError::invalid(
                "response_format.type",
                "`response_format.type` must be `text`, `json_object` or `json_schema`",
            ));
        }
    };
    Ok(Some(format))
}

/// vLLM's `structured_outputs`: exactly one of `json` (a schema, as an object or as JSON
/// text), `regex`, `choice` or `grammar`.
fn structured_outputs(value: Value) -> Result<Option<Constraint>, OpenAiError> {
    let fields: Map<String, Value> = match value {
        Value::Null => return Ok(None),
        Value::Object(fields) => fields
            .into_iter()
            .filter(|(_, value)| !value.is_null())
            .collect(),
        _ => {
            return Err(OpenAiError::invalid(
                "structured_outputs",
                "`structured_outputs` must be an object",
            ));
        }
    };
    let mut fields = fields.into_iter();
    let (Some((kind, value)), None) = (fields.next(), fields.next()) else {
        return Err(OpenAiError::invalid(
            "structured_outputs",
            "`structured_outputs` takes exactly one of `json`, `regex`, `choice`, `grammar`",
        ));
    };
    let at = format!("structured_outputs.{kind}");
    let constraint = match (kind.as_str(), value) {
        ("json", Value::String(schema)) => Constraint::JsonSchema(schema),
        ("json", schema @ (Value::Object(_) | Value::Bool(_))) => {
            Constraint::JsonSchema(schema.to_string())
        }
        ("regex", Value::String(regex)) => Constraint::Regex(regex),
        ("grammar", Value::String(grammar)) => Constraint::Grammar(grammar),
        ("choice", Value::Array(choices)) => Constraint::Choice(
            choices
                .into_iter()
                .map(|choice| match choice {
                    Value::String(choice) => Ok(choice),
                    _ => Err(OpenAiError::invalid(&at, "each choice must be a string")),
                })
                .collect::<Result<_, _>>()?,
        ),
        ("json" | "regex" | "grammar" | "choice", _) => {
            return Err(OpenAiError::invalid(
                &at,
                format!("`{at}` has the wrong type"),
            ));
        }
        _ => {
            return Err(OpenAiError::unsupported(
                &at,
                "`structured_outputs` takes `json`, `regex`, `choice` or `grammar`",
            ));
        }
    };
    Ok(Some(constraint))
}

/// Chat's `logprobs` (a flag) and `top_logprobs` (0..=20, only with the flag set).
fn chat_logprobs(flag: &Value, top: &Value) -> Result<Option<(u32, &'static str)>, OpenAiError> {
    let flag = match flag {
        Value::Null => false,
        Value::Bool(flag) => *flag,
        _ => {
            return Err(OpenAiError::invalid(
                "logprobs",
                "`logprobs` must be a boolean",
            ));
        }
    };
    let top = count("top_logprobs", top)?;
    match (flag, top) {
        (false, Some(top)) if top > 0 => Err(OpenAiError::invalid(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        )),
        (false, _) => Ok(None),
        (true, top) => Ok(Some((top.unwrap_or(0), "logprobs"))),
    }
}

/// A count of alternatives: an integer in 0..=20.
fn count(field: &str, value: &Value) -> Result<Option<u32>, OpenAiError> {
    if value.is_null() {
        return Ok(None);
    }
    match value.as_u64() {
        Some(n) if n <= u64::from(limits::MAX_TOP_LOGPROBS) => Ok(Some(n as u32)),
        _ => Err(OpenAiError::invalid(
            field,
            format!(
                "`{field}` must be an integer from 0 to {}",
                limits::MAX_TOP_LOGPROBS
            ),
        )),
    }
}

/// `logit_bias`: token ids (as strings, JSON keys) to biases in -100..=100.
fn logit_bias(value: &Value) -> Result<Vec<(u32, f32)>, OpenAiError> {
    let biases = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Object(biases) => biases,
        _ => {
            return Err(OpenAiError::invalid(
                "logit_bias",
                "`logit_bias` must be an object of token ids to numbers",
            ));
        }
    };
    if biases.len() > limits::MAX_LOGIT_BIAS {
        return Err(OpenAiError::invalid(
            "logit_bias",
            format!(
                "`logit_bias` holds at most {} tokens",
                limits::MAX_LOGIT_BIAS
            ),
        ));
    }
    biases
        .iter()
        .map(|(token, bias)| {
            let at = format!("logit_bias.{token}");
            let token: u32 = token
                .parse()
                .map_err(|_| OpenAiError::invalid(&at, "a `logit_bias` key is a token id"))?;
            match bias.as_f64() {
                Some(bias) if limits::LOGIT_BIAS_RANGE.contains(&(bias as f32)) => {
                    Ok((token, bias as f32))
                }
                _ => Err(OpenAiError::invalid(
                    &at,
                    "a bias is a number from -100 to 100",
                )),
            }
        })
        .collect()
}
