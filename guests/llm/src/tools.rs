//! Tool calling, as the model's own chat template does it: how tools and tool turns reach
//! the prompt, the grammar that makes `required` and a named function hold, and reading the
//! calls back out of the model's text.
//!
//! Three formats, told apart by the template's text:
//! - Hermes (Qwen 2.5, Hermes, SmolLM3): `<tool_call>\n{"name": ..., "arguments": {...}}\n
//!   </tool_call>`, one block per call;
//! - Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
//! - Llama 3.1+: the answer is one JSON object, `{"name": ..., "parameters": {...}}`.
//!
//! A template that does not render `tools` (SmolLM2's, ChatML) gets them as Qwen 2.5 puts
//! them: a `# Tools` section in the system message listing the functions in `<tools>`, and
//! Hermes blocks for calls; tool results go back as `<tool_response>` in a user turn.
//!
//! The constraint: `required` and a named function allow only calls (of the named function),
//! each call's arguments valid under its `parameters`; `auto` allows text or calls, and a
//! call, once begun, is valid too (text must not open with the format's first character).
//! `none` leaves the tools out of the prompt, as the answer must be text.

use serde_json::{Value, json};

use crate::rbee::worker::types::{AgentMessage, AgentRole, Tool, ToolCall, ToolChoice};
use crate::template::{Message, Part, python_json};

/// How a template's model writes calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Hermes,
    Mistral,
    Llama3,
}

/// How tools go into one template's prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub format: Format,
    /// Whether the template renders the `tools` variable itself; if not, the guest adds the
    /// Hermes system section.
    pub native: bool,
}

impl Style {
    /// Reads the style off the template's text.
    pub fn of(template: &str) -> Self {
        let native = template.contains("tools");
        let format = if template.contains("[TOOL_CALLS]") {
            Format::Mistral
        } else if template.contains("<tool_call>") || !native {
            Format::Hermes
        } else if template.contains("<|python_tag|>") || template.contains("\"parameters\"") {
            Format::Llama3
        } else {
            Format::Hermes
        };
        Self { format, native }
    }

    /// What begins a call in the model's text.
    fn opening(self) -> &'static str {
        match self.format {
            Format::Hermes => "<tool_call>",
            Format::Mistral => "[TOOL_CALLS]",
            Format::Llama3 => "{",
        }
    }
}

/// The conversation as template messages, and the `tools` variable, in `style`.
pub fn prompt(
    style: Style,
    messages: &[AgentMessage],
    tools: &[Tool],
    choice: &ToolChoice,
) -> (Vec<Message>, Option<Value>) {
    let offered = if matches!(choice, ToolChoice::None) {
        &[][..]
    } else {
        tools
    };
    if style.native {
        let tools =
            (!offered.is_empty()).then(|| Value::Array(offered.iter().map(tool_json).collect()));
        return (messages.iter().map(native_message).collect(), tools);
    }
    (hermes_messages(messages, offered), None)
}

/// OpenAI's shape of a tool, with the schema as an object.
fn tool_json(tool: &Tool) -> Value {
    let mut function = serde_json::Map::new();
    function.insert("name".into(), tool.name.clone().into());
    if let Some(description) = &tool.description {
        function.insert("description".into(), description.clone().into());
    }
    function.insert("parameters".into(), parse_or_text(&tool.parameters));
    json!({ "type": "function", "function": function })
}

/// JSON text as a value, or as the string itself when it is not JSON (a client's malformed
/// arguments are still what the model said).
fn parse_or_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

fn role_name(role: AgentRole) -> &'static str {
    match role {
        AgentRole::System => "system",
        AgentRole::User => "user",
        AgentRole::Assistant => "assistant",
        AgentRole::Tool => "tool",
    }
}

/// A message as transformers passes it to a template that renders tools itself.
fn native_message(message: &AgentMessage) -> Message {
    let mut fields = serde_json::Map::new();
    if !message.tool_calls.is_empty() {
        let calls: Vec<Value> = message
            .tool_calls
            .iter()
            .map(|call| {
                json!({
                    "id": call.id,
                    "type": "function",
                    "function": { "name": call.name, "arguments": parse_or_text(&call.arguments) },
                })
            })
            .collect();
        fields.insert("tool_calls".into(), Value::Array(calls));
    }
    if let Some(id) = &message.tool_call_id {
        fields.insert("tool_call_id".into(), id.clone().into());
    }
    if let Some(name) = &message.name {
        fields.insert("name".into(), name.clone().into());
    }
    let content = if message.content.is_empty() && !message.tool_calls.is_empty() {
        None
    } else {
        Some(vec![Part::Text(message.content.clone())])
    };
    Message {
        role: role_name(message.role).to_owned(),
        content,
        fields,
    }
}

/// Qwen 2.5's words for the tools section.
const TOOLS_HEADER: &str = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
You are provided with function signatures within <tools></tools> XML tags:\n<tools>";
const TOOLS_FOOTER: &str = "\n</tools>\n\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";

/// The conversation for a template without tools: the tools section in the system message
/// (a new one when there is none), calls as Hermes blocks in the assistant's turns, and
/// tool results, consecutive ones together, as `<tool_response>` blocks in a user turn.
fn hermes_messages(messages: &[AgentMessage], tools: &[Tool]) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    let mut rest = messages;
    if !tools.is_empty() {
        let mut parts = Vec::new();
        if let Some((first, later)) = messages.split_first()
            && matches!(first.role, AgentRole::System)
        {
            parts.push(Part::Text(first.content.clone()));
            parts.push(Part::Markup("\n\n".into()));
            rest = later;
        }
        parts.push(Part::Markup(TOOLS_HEADER.into()));
        for tool in tools {
            parts.push(Part::Markup("\n".into()));
            parts.push(Part::Text(python_json(&tool_json(tool))));
        }
        parts.push(Part::Markup(TOOLS_FOOTER.into()));
        out.push(Message {
            role: "system".into(),
            content: Some(parts),
            fields: Default::default(),
        });
    }
    for message in rest {
        match message.role {
            AgentRole::Tool => {
                let response = [
                    Part::Markup("<tool_response>\n".into()),
                    Part::Text(message.content.clone()),
                    Part::Markup("\n</tool_response>".into()),
                ];
                match out.last_mut() {
                    Some(last) if last.fields.contains_key("tool_response") => {
                        let content = last.content.get_or_insert_with(Vec::new);
                        content.push(Part::Markup("\n".into()));
                        content.extend(response);
                    }
                    _ => {
                        // Marks the turn as one of results, for the next result to join;
                        // templates without tools never read it.
                        let mut fields = serde_json::Map::new();
                        fields.insert("tool_response".into(), true.into());
                        out.push(Message {
                            role: "user".into(),
                            content: Some(response.into()),
                            fields,
                        });
                    }
                }
            }
            AgentRole::Assistant if !message.tool_calls.is_empty() => {
                let mut parts = Vec::new();
                if !message.content.is_empty() {
                    parts.push(Part::Text(message.content.clone()));
                    parts.push(Part::Markup("\n".into()));
                }
                for (i, call) in message.tool_calls.iter().enumerate() {
                    if i > 0 {
                        parts.push(Part::Markup("\n".into()));
                    }
                    let body =
                        json!({ "name": call.name, "arguments": parse_or_text(&call.arguments) });
                    parts.push(Part::Markup("<tool_call>\n".into()));
                    parts.push(Part::Text(python_json(&body)));
                    parts.push(Part::Markup("\n</tool_call>".into()));
                }
                out.push(Message {
                    role: "assistant".into(),
                    content: Some(parts),
                    fields: Default::default(),
                });
            }
            role => out.push(Message::text(role_name(role), &message.content)),
        }
    }
    out
}

/// The grammar (llguidance's Lark) the answer must follow under `choice`, with `answer` the
/// rule a text answer follows (a `response_format`'s `%json`, say) or `None` for any text;
/// `None` when the answer is unconstrained (`none`, or no tools).
pub fn grammar(
    style: Style,
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
    answer: Option<&str>,
) -> Option<String> {
    let offered: Vec<&Tool> = match choice {
        ToolChoice::None => return None,
        ToolChoice::Function(name) => tools.iter().filter(|tool| &tool.name == name).collect(),
        ToolChoice::Auto | ToolChoice::Required => tools.iter().collect(),
    };
    if offered.is_empty() {
        return None;
    }
    let call = call_schema(style.format, &offered);
    let calls = match style.format {
        Format::Hermes if parallel => r#"call ("\n" call)*"#,
        Format::Mistral if parallel => r#""[TOOL_CALLS][" call (", " call)* "]""#,
        Format::Mistral => r#""[TOOL_CALLS][" call "]""#,
        Format::Hermes | Format::Llama3 => "call",
    };
    let call_rule = match style.format {
        Format::Hermes => format!("\"<tool_call>\\n\" %json {call} \"\\n</tool_call>\""),
        Format::Mistral | Format::Llama3 => format!("%json {call}"),
    };
    let start = match (choice, answer) {
        (ToolChoice::Auto, Some(answer)) => format!("start: answer | calls\nanswer: {answer}\n"),
        (ToolChoice::Auto, None) => {
            // Text that does not open like a call.
            let not_opening = match style.format {
                Format::Hermes => "[^<]",
                Format::Mistral => r"[^\[]",
                Format::Llama3 => "[^{]",
            };
            format!("start: TEXT | calls\nTEXT: /{not_opening}(.|\\n)*/\n")
        }
        _ => "start: calls\n".to_owned(),
    };
    Some(format!("{start}calls: {calls}\ncall: {call_rule}\n"))
}

/// The JSON schema of one call of any of `tools`: its name, then its arguments (Llama 3's
/// `parameters`) valid under the tool's schema, written as Python's `json.dumps` writes it
/// (the spacing of the examples models learned from).
fn call_schema(format: Format, tools: &[&Tool]) -> String {
    let arguments = match format {
        Format::Llama3 => "parameters",
        Format::Hermes | Format::Mistral => "arguments",
    };
    let variants: Vec<String> = tools
        .iter()
        .map(|tool| {
            // Written out, so the name comes first whatever a map's key order.
            format!(
                r#"{{"type": "object", "properties": {{"name": {{"const": {name}}}, "{arguments}": {parameters}}}, "required": ["name", "{arguments}"], "additionalProperties": false}}"#,
                name = Value::String(tool.name.clone()),
                parameters = tool.parameters,
            )
        })
        .collect();
    format!(
        r#"{{"anyOf": [{}], "x-guidance": {{"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}}}}"#,
        variants.join(", ")
    )
}

/// The calls in the model's `text`, and the text besides them (the answer's content); no
/// calls when the text holds none, or holds one that does not parse (then it is all text).
pub fn parse(format: Format, text: &str) -> (String, Vec<ToolCall>) {
    let calls = match format {
        Format::Hermes => hermes_calls(text),
        Format::Mistral => mistral_calls(text),
        Format::Llama3 => llama3_call(text),
    };
    match calls {
        Some((content, calls)) if !calls.is_empty() => (content, calls),
        _ => (text.to_owned(), Vec::new()),
    }
}

/// The start of a call in `text`, for streaming: the byte where text stops being content.
/// `None` when no call has begun; text that may still become an opening is held back by
/// the caller (see [`held_back`]).
pub fn call_start(format: Format, text: &str) -> Option<usize> {
    match format {
        Format::Hermes | Format::Mistral => {
            let opening = Style {
                format,
                native: true,
            }
            .opening();
            text.find(opening)
        }
        // Llama 3's call is the whole answer: it begins at its first non-space character.
        Format::Llama3 => {
            let start = text.len() - text.trim_start().len();
            text[start..].starts_with('{').then_some(start)
        }
    }
}

/// How many bytes at the end of `text` could be the beginning of a call's opening, and must
/// wait for the next piece before they are sent as content.
pub fn held_back(format: Format, text: &str) -> usize {
    let opening = match format {
        Format::Hermes => "<tool_call>",
        Format::Mistral => "[TOOL_CALLS]",
        // Until something other than space is seen, the answer may still be a call.
        Format::Llama3 => {
            return if text.trim().is_empty() {
                text.len()
            } else {
                0
            };
        }
    };
    (1..opening.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && opening.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// Hermes blocks. The last one may be cut short by `max_tokens` (the answer then ends with
/// `length`): it is not a call, and the whole calls before it still are.
fn hermes_calls(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let start = text.find("<tool_call>")?;
    let mut calls = Vec::new();
    let mut rest = &text[start..];
    while let Some(open) = rest.find("<tool_call>") {
        let body = &rest[open + "<tool_call>".len()..];
        let (json, after) = match body.find("</tool_call>") {
            Some(close) => (&body[..close], &body[close + "</tool_call>".len()..]),
            None => (body, ""),
        };
        match call_of(json.trim(), "arguments") {
            Some(call) => calls.push(call),
            None if after.is_empty() && !calls.is_empty() => break,
            None => return None,
        }
        rest = after;
    }
    Some((text[..start].trim().to_owned(), calls))
}

fn mistral_calls(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let start = text.find("[TOOL_CALLS]")?;
    let list: Vec<Value> =
        serde_json::from_str(text[start + "[TOOL_CALLS]".len()..].trim()).ok()?;
    let calls = list
        .iter()
        .map(|call| call_of(&call.to_string(), "arguments"))
        .collect::<Option<Vec<_>>>()?;
    Some((text[..start].trim().to_owned(), calls))
}

fn llama3_call(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let body = text.trim().trim_start_matches("<|python_tag|>");
    let call = call_of(body, "parameters")?;
    Some((String::new(), vec![call]))
}

/// One call from its JSON: `name`, and the arguments under `arguments` (or `parameters`,
/// which Llama 3 writes), as an object or as JSON text.
fn call_of(json: &str, arguments: &str) -> Option<ToolCall> {
    let Value::Object(mut call) = serde_json::from_str(json).ok()? else {
        return None;
    };
    let Some(Value::String(name)) = call.remove("name") else {
        return None;
    };
    let arguments = call
        .remove(arguments)
        .or_else(|| call.remove("arguments"))
        .or_else(|| call.remove("parameters"))
        .unwrap_or_else(|| json!({}));
    let arguments = match arguments {
        Value::String(text) => text,
        value => value.to_string(),
    };
    Some(ToolCall {
        id: String::new(),
        name,
        arguments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str) -> Tool {
        Tool {
            name: name.into(),
            description: Some("Looks it up.".into()),
            parameters: r#"{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}"#.into(),
        }
    }

    #[test]
    fn styles_follow_the_template() {
        let smollm2 =
            "{% for message in messages %}<|im_start|>{{ message['content'] }}{% endfor %}";
        assert_eq!(
            Style::of(smollm2),
            Style {
                format: Format::Hermes,
                native: false
            }
        );
        let qwen = "{% if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools><tool_call>{% endif %}";
        assert_eq!(
            Style::of(qwen),
            Style {
                format: Format::Hermes,
                native: true
            }
        );
        let mistral = "{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]";
        assert_eq!(Style::of(mistral).format, Format::Mistral);
        let llama = "{% if tools %}Respond in the format {\"name\": function name, \"parameters\": dictionary}{% endif %}<|python_tag|>";
        assert_eq!(Style::of(llama).format, Format::Llama3);
    }

    #[test]
    fn hermes_calls_parse_with_the_text_before_them() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
                    <tool_call>\n{\"name\": \"time\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = parse(Format::Hermes, text);
        assert_eq!(content, "Let me look.");
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].name.as_str(), calls[0].arguments.as_str()),
            ("weather", r#"{"city":"Paris"}"#)
        );
        assert_eq!(calls[1].arguments, "{}");
        // A last call cut short is dropped; a text whose only call is cut short stays text.
        let cut = format!("{text}\n<tool_call>\n{{\"name\": \"time\", \"argu");
        assert_eq!(parse(Format::Hermes, &cut).1.len(), 2);
        let broken = "<tool_call>\n{\"name\": \"weather\", \"argu";
        let (content, calls) = parse(Format::Hermes, broken);
        assert!(content == broken && calls.is_empty());
        assert_eq!(parse(Format::Hermes, "Paris.").1.len(), 0);
    }

    #[test]
    fn mistral_and_llama3_calls_parse() {
        let (_, calls) = parse(
            Format::Mistral,
            r#"[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]"#,
        );
        assert_eq!(
            calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let (content, calls) = parse(
            Format::Llama3,
            r#" {"name": "weather", "parameters": {"city": "Oslo"}}"#,
        );
        assert_eq!(
            (content.as_str(), calls[0].arguments.as_str()),
            ("", r#"{"city":"Oslo"}"#)
        );
    }

    #[test]
    fn streaming_holds_back_what_may_open_a_call() {
        assert_eq!(held_back(Format::Hermes, "Sure <tool"), 5);
        assert_eq!(held_back(Format::Hermes, "Sure <b>"), 0);
        assert_eq!(held_back(Format::Hermes, "a <"), 1);
        assert_eq!(call_start(Format::Hermes, "ok <tool_call>\n{"), Some(3));
        assert_eq!(held_back(Format::Llama3, "  "), 2);
        assert_eq!(call_start(Format::Llama3, " {\"na"), Some(1));
        assert_eq!(call_start(Format::Llama3, "Hi {"), None);
    }

    #[test]
    fn grammars_by_choice() {
        let tools = [tool("weather"), tool("time")];
        let style = Style {
            format: Format::Hermes,
            native: false,
        };
        assert_eq!(grammar(style, &tools, &ToolChoice::None, true, None), None);
        let required = grammar(style, &tools, &ToolChoice::Required, false, None).unwrap();
        assert!(
            required.starts_with("start: calls\ncalls: call\n"),
            "{required}"
        );
        assert!(
            required.contains(r#"{"const": "weather"}"#)
                && required.contains(r#"{"const": "time"}"#)
        );
        let named = grammar(
            style,
            &tools,
            &ToolChoice::Function("time".into()),
            true,
            None,
        )
        .unwrap();
        assert!(
            !named.contains("weather") && named.contains(r#"("\n" call)*"#),
            "{named}"
        );
        let auto = grammar(style, &tools, &ToolChoice::Auto, true, None).unwrap();
        assert!(
            auto.starts_with("start: TEXT | calls\nTEXT: /[^<](.|\\n)*/\n"),
            "{auto}"
        );
        let schema = grammar(
            style,
            &tools,
            &ToolChoice::Auto,
            true,
            Some(r#"%json {"type": "object"}"#),
        )
        .unwrap();
        assert!(
            schema.starts_with("start: answer | calls\nanswer: %json"),
            "{schema}"
        );
    }

    /// The fixture holds transformers' renderings of a template with tools
    /// (guests/llm/fixtures/make_chat_templates.py): the conversation as the client sent it
    /// renders here to the same text, and its client strings stay client text.
    #[test]
    fn a_native_template_renders_tools_as_transformers_does() {
        use crate::template::{self, SpecialTokens};
        let fixture: Value =
            serde_json::from_str(include_str!("../fixtures/chat_templates.json")).unwrap();
        let cases = fixture["tool_cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let template = case["template"].as_str().unwrap();
            let messages: Vec<AgentMessage> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| AgentMessage {
                    role: match m["role"].as_str().unwrap() {
                        "system" => AgentRole::System,
                        "user" => AgentRole::User,
                        "assistant" => AgentRole::Assistant,
                        _ => AgentRole::Tool,
                    },
                    content: m["content"].as_str().unwrap_or("").to_owned(),
                    tool_calls: m["tool_calls"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|call| ToolCall {
                            id: call["id"].as_str().unwrap().into(),
                            name: call["function"]["name"].as_str().unwrap().into(),
                            arguments: call["function"]["arguments"].as_str().unwrap().into(),
                        })
                        .collect(),
                    tool_call_id: m["tool_call_id"].as_str().map(Into::into),
                    name: None,
                })
                .collect();
            let tools: Vec<Tool> = case["tools"]
                .as_array()
                .unwrap()
                .iter()
                .map(|tool| Tool {
                    name: tool["function"]["name"].as_str().unwrap().into(),
                    description: tool["function"]["description"].as_str().map(Into::into),
                    parameters: tool["function"]["parameters"].to_string(),
                })
                .collect();
            let style = Style::of(template);
            assert_eq!(
                style,
                Style {
                    format: Format::Hermes,
                    native: true
                },
                "{name}"
            );
            let (messages, tools) = prompt(style, &messages, &tools, &ToolChoice::Auto);
            let tokens = SpecialTokens {
                bos: "",
                eos: "<|im_end|>",
            };
            let want = case["rendered"].as_str().unwrap();
            let plain =
                template::render_plain(template, &messages, tools.as_ref(), &tokens).unwrap();
            assert_eq!(plain, want, "{name}: plain");
            let parts = template::render(template, &messages, tools.as_ref(), &tokens).unwrap();
            let text: String = parts
                .iter()
                .map(|part| match part {
                    Part::Markup(t) | Part::Text(t) => t.as_str(),
                })
                .collect();
            assert_eq!(text, want, "{name}: parts");
            // The tool's description and the call's arguments are the client's text.
            let client: Vec<&str> = parts
                .iter()
                .filter_map(|part| match part {
                    Part::Text(t) => Some(t.as_str()),
                    Part::Markup(_) => None,
                })
                .collect();
            assert!(
                client.contains(&"The weather in a city, <b>now</b>."),
                "{name}: {client:?}"
            );
            assert!(
                !parts
                    .iter()
                    .any(|part| matches!(part, Part::Markup(m) if m.contains("<b>")))
            );
        }
    }

    #[test]
    fn a_template_without_tools_gets_the_hermes_section() {
        let messages = [
            AgentMessage {
                role: AgentRole::System,
                content: "Be brief.".into(),
                tool_calls: vec![],
                tool_call_id: None,
                name: None,
            },
            AgentMessage {
                role: AgentRole::User,
                content: "Weather in Paris?".into(),
                tool_calls: vec![],
                tool_call_id: None,
                name: None,
            },
            AgentMessage {
                role: AgentRole::Assistant,
                content: String::new(),
                tool_calls: vec![ToolCall {
                    id: "c1".into(),
                    name: "weather".into(),
                    arguments: r#"{"city": "Paris"}"#.into(),
                }],
                tool_call_id: None,
                name: None,
            },
            AgentMessage {
                role: AgentRole::Tool,
                content: "18 C".into(),
                tool_calls: vec![],
                tool_call_id: Some("c1".into()),
                name: None,
            },
            AgentMessage {
                role: AgentRole::Tool,
                content: "sunny".into(),
                tool_calls: vec![],
                tool_call_id: Some("c1".into()),
                name: None,
            },
        ];
        let style = Style {
            format: Format::Hermes,
            native: false,
        };
        let (out, tools) = prompt(style, &messages, &[tool("weather")], &ToolChoice::Auto);
        assert!(tools.is_none());
        let text = |m: &Message| -> String {
            m.content
                .iter()
                .flatten()
                .map(|p| match p {
                    Part::Markup(t) | Part::Text(t) => t.as_str(),
                })
                .collect()
        };
        assert_eq!(
            out.len(),
            4,
            "system, user, assistant, one user turn of results"
        );
        assert!(text(&out[0]).starts_with("Be brief.\n\n# Tools"));
        assert!(text(&out[0]).contains(r#"{"type": "function", "function": {"name": "weather""#));
        assert_eq!(
            text(&out[2]),
            "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
        );
        assert_eq!(
            text(&out[3]),
            "<tool_response>\n18 C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        );
        assert_eq!(out[3].role, "user");
        // `none` leaves the tools out.
        let (out, _) = prompt(
            style,
            &messages[1..2],
            &[tool("weather")],
            &ToolChoice::None,
        );
        assert_eq!(out.len(), 1);
    }
}
