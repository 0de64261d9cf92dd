//! Tool calling on `/v1/chat/completions`: `tools`, `tool_choice`, `parallel_tool_calls`, and
//! the tool turns of a conversation (an assistant's `tool_calls`, `role: "tool"` results),
//! read and checked against the wire schema here; each function's `parameters` schema is
//! compiled against the model before any guest runs. How tools reach the prompt, and how
//! calls are read out of the model's text, is the guest's policy.

use rbee_engine::Engine;
use serde_json::{Map, Value};

use super::error::OpenAiError;
use crate::guest::{Tool, ToolCall, ToolChoice};

/// OpenAI's limit on a function's name: letters, digits, `_` and `-`, at most 64.
const MAX_NAME: usize = 64;

/// OpenAI's limit on the number of tools in one request.
const MAX_TOOLS: usize = 128;

/// The tool fields of a chat body as the client sent them (`null` is left out).
pub struct RawToolFields {
    pub tools: Value,
    pub tool_choice: Value,
    pub parallel_tool_calls: Value,
}

/// The tool fields, read.
pub struct ToolFields {
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    pub parallel_tool_calls: bool,
}

impl RawToolFields {
    pub fn read(self) -> Result<ToolFields, OpenAiError> {
        let tools = tools(self.tools)?;
        let tool_choice = tool_choice(&self.tool_choice, &tools)?;
        let parallel_tool_calls = match self.parallel_tool_calls {
            Value::Null => true,
            Value::Bool(parallel) => parallel,
            _ => {
                return Err(OpenAiError::invalid(
                    "parallel_tool_calls",
                    "`parallel_tool_calls` must be a boolean",
                ));
            }
        };
        Ok(ToolFields {
            tools,
            tool_choice,
            parallel_tool_calls,
        })
    }
}

/// Compiles each function's `parameters` against the model's vocabulary: a schema the
/// guest may constrain a call with is known to compile.
pub fn check_against(model: &Engine, tools: &[Tool]) -> Result<(), OpenAiError> {
    for (i, tool) in tools.iter().enumerate() {
        model
            .check_constraint(&rbee_engine::Constraint::JsonSchema(
                tool.parameters.clone(),
            ))
            .map_err(|error| {
                OpenAiError::invalid(format!("tools[{i}].function.parameters"), error.to_string())
            })?;
    }
    Ok(())
}

/// `tools`: `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
fn tools(value: Value) -> Result<Vec<Tool>, OpenAiError> {
    let tools = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Array(tools) => tools,
        _ => return Err(OpenAiError::invalid("tools", "`tools` must be a list")),
    };
    if tools.len() > MAX_TOOLS {
        return Err(OpenAiError::invalid(
            "tools",
            format!("at most {MAX_TOOLS} tools, got {}", tools.len()),
        ));
    }
    let mut read: Vec<Tool> = Vec::with_capacity(tools.len());
    for (i, tool) in tools.into_iter().enumerate() {
        let at = |field: &str| format!("tools[{i}]{field}");
        let Value::Object(mut tool) = tool else {
            return Err(OpenAiError::invalid(at(""), "a tool is an object"));
        };
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                return Err(OpenAiError::unsupported(
                    &at(".type"),
                    &format!("`{other}` tools are not served, only `function`"),
                ));
            }
            None => {
                return Err(OpenAiError::invalid(
                    at(".type"),
                    "a tool needs `type: \"function\"`",
                ));
            }
        }
        let Some(Value::Object(mut function)) = tool.remove("function") else {
            return Err(OpenAiError::invalid(
                at(".function"),
                "a tool needs `function`, an object with its `name`",
            ));
        };
        let name = function_name(function.remove("name"), &at(".function.name"))?;
        if read.iter().any(|tool| tool.name == name) {
            return Err(OpenAiError::invalid(
                at(".function.name"),
                format!("two tools are named `{name}`"),
            ));
        }
        let description = match function.remove("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(description)) => Some(description),
            Some(_) => {
                return Err(OpenAiError::invalid(
                    at(".function.description"),
                    "`description` must be a string",
                ));
            }
        };
        let parameters = match function.remove("parameters") {
            None | Some(Value::Null) => r#"{"type": "object", "properties": {}}"#.to_owned(),
            Some(schema @ Value::Object(_)) => schema.to_string(),
            Some(_) => {
                return Err(OpenAiError::invalid(
                    at(".function.parameters"),
                    "`parameters` must be a JSON Schema object",
                ));
            }
        };
        read.push(Tool {
            name,
            description,
            parameters,
        });
    }
    Ok(read)
}

/// A function's name, as OpenAI restricts it (it is matched in the model's output).
fn function_name(value: Option<Value>, at: &str) -> Result<String, OpenAiError> {
    let Some(Value::String(name)) = value else {
        return Err(OpenAiError::invalid(
            at,
            "a function needs a `name` (a string)",
        ));
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(valid) {
        return Err(OpenAiError::invalid(
            at,
            format!(
                "a function's name is 1 to {MAX_NAME} letters, digits, `_` or `-`, got `{name}`"
            ),
        ));
    }
    Ok(name)
}

/// `tool_choice`: `none`, `auto`, `required`, or `{"type": "function", "function":
/// {"name"}}` naming one of `tools`. Without tools only `none` (and `auto`) mean anything.
fn tool_choice(value: &Value, tools: &[Tool]) -> Result<ToolChoice, OpenAiError> {
    let default = if tools.is_empty() {
        ToolChoice::None
    } else {
        ToolChoice::Auto
    };
    let choice = match value {
        Value::Null => return Ok(default),
        Value::String(choice) => match choice.as_str() {
            "none" => return Ok(ToolChoice::None),
            "auto" => return Ok(default),
            "required" => ToolChoice::Required,
            _ => {
                return Err(OpenAiError::invalid(
                    "tool_choice",
                    "`tool_choice` is `none`, `auto`, `required` or a function",
                ));
            }
        },
        Value::Object(choice) => {
            if choice.get("type").and_then(Value::as_str) != Some("function") {
                return Err(OpenAiError::invalid(
                    "tool_choice.type",
                    "a named `tool_choice` has `type: \"function\"`",
                ));
            }
            let name = choice
                .get("function")
                .and_then(|function| function.get("name"))
                .cloned();
            let name = function_name(name, "tool_choice.function.name")?;
            if !tools.iter().any(|tool| tool.name == name) {
                return Err(OpenAiError::invalid(
                    "tool_choice.function.name",
                    format!("`tool_choice` names `{name}`, which is not one of `tools`"),
                ));
            }
            ToolChoice::Function(name)
        }
        _ => {
            return Err(OpenAiError::invalid(
                "tool_choice",
                "`tool_choice` is a string or an object",
            ));
        }
    };
    if tools.is_empty() {
        return Err(OpenAiError::invalid(
            "tool_choice",
            "`tool_choice` asks for a call, but there are no `tools`",
        ));
    }
    Ok(choice)
}

/// An assistant message's `tool_calls`: `[{"id", "type": "function", "function": {"name",
/// "arguments"}}]`; `at` is the field's path. `arguments` is JSON text, as OpenAI sends it.
pub fn assistant_calls(value: Value, at: &str) -> Result<Vec<ToolCall>, OpenAiError> {
    let calls = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Array(calls) => calls,
        _ => return Err(OpenAiError::invalid(at, "`tool_calls` must be a list")),
    };
    calls
        .into_iter()
        .enumerate()
        .map(|(j, call)| {
            let at = format!("{at}[{j}]");
            let Value::Object(mut call) = call else {
                return Err(OpenAiError::invalid(&at, "a tool call is an object"));
            };
            let id = string(&mut call, "id", &at)?;
            let Some(Value::Object(mut function)) = call.remove("function") else {
                return Err(OpenAiError::invalid(
                    format!("{at}.function"),
                    "a tool call needs `function`, with `name` and `arguments`",
                ));
            };
            let at = format!("{at}.function");
            let name = string(&mut function, "name", &at)?;
            let arguments = match function.remove("arguments") {
                Some(Value::String(arguments)) => arguments,
                // Some clients send the object itself.
                Some(arguments @ Value::Object(_)) => arguments.to_string(),
                _ => {
                    return Err(OpenAiError::invalid(
                        format!("{at}.arguments"),
                        "`arguments` must be JSON text",
                    ));
                }
            };
            Ok(ToolCall {
                id,
                name,
                arguments,
            })
        })
        .collect()
}

fn string(object: &mut Map<String, Value>, field: &str, at: &str) -> Result<String, OpenAiError> {
    match object.remove(field) {
        Some(Value::String(value)) => Ok(value),
        _ => Err(OpenAiError::invalid(
            format!("{at}.{field}"),
            format!("`{field}` must be a string"),
        )),
    }
}
