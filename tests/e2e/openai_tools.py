"""Tool calling as agent clients do it, with the official `openai` Python SDK against a running
rbee-host (the `openai_tool_clients` test in tests/e2e/openai.rs starts it with SmolLM2 and the
default guest): `tool_choice` required, named and auto over sampled seeds, every call's
arguments validated with `jsonschema` against its tool's `parameters`; `parallel_tool_calls`;
streamed calls assembled by the SDK's stream helper to the same answer as the whole one;
`pydantic_function_tool` with `parse`; a second turn with the call and its result; and the
errors. Exits non-zero at the first check that fails."""

import argparse
import json

import jsonschema
import openai
from pydantic import BaseModel, Field

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", required=True)
parser.add_argument("--api-key", default="none")
args = parser.parse_args()

client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
model = client.models.list().data[0].id

# Bounded, as strict-mode schemas are: every string has a length or a closed pattern. An
# unbounded string lets a 135M model ramble inside it until `max_tokens` cuts the call short
# (a valid prefix, finish_reason `length`), which says nothing about the server.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}/[A-Z][a-z]{1,11}$"}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast for a city.",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "The time in a timezone.", "parameters": TIME},
    },
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris, and the time in Tokyo?"}]


def ask(messages=QUESTION, **options):
    options.setdefault("max_tokens", 160)
    return client.chat.completions.create(model=model, messages=messages, tools=TOOLS, **options)


def check_calls(choice, names=SCHEMAS):
    """The choice is a turn of calls, each of a tool on offer, with valid arguments."""
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls, choice
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_"), call
        assert call.function.name in names, call
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({call.id for call in calls}) == len(calls), calls
    return calls


# `required`: a call, valid, whatever the seed.
for seed in range(6):
    check_calls(ask(tool_choice="required", temperature=0.7, seed=seed).choices[0])

# A named function: calls of that function only.
named = {"type": "function", "function": {"name": "get_time"}}
for seed in range(4):
    calls = check_calls(ask(tool_choice=named, temperature=0.7, seed=seed).choices[0], ["get_time"])

# `n` choices: each its own turn of a valid call.
several = ask(tool_choice="required", parallel_tool_calls=False, n=3, temperature=0.8, seed=11)
assert [choice.index for choice in several.choices] == [0, 1, 2], several
for choice in several.choices:
    check_calls(choice)

# `parallel_tool_calls: false`: one call at most.
for seed in range(4):
    answer = ask(tool_choice="required", parallel_tool_calls=False, temperature=0.9, seed=seed)
    assert len(check_calls(answer.choices[0])) == 1, answer

# `auto`: text, or calls that are valid.
for seed in range(4):
    choice = ask(tool_choice="auto", temperature=0.7, seed=seed).choices[0]
    if choice.message.tool_calls:
        check_calls(choice)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content, choice

# `none`: text only, no calls.
choice = ask(tool_choice="none", temperature=0, max_tokens=24).choices[0]
assert not choice.message.tool_calls and choice.message.content, choice

# Streamed: the SDK's helper assembles the `delta.tool_calls` chunks into the same answer.
whole = ask(tool_choice="required", temperature=0, seed=1).choices[0]
with client.chat.completions.stream(
    model=model, messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, seed=1,
    max_tokens=160,
) as stream:
    streamed = stream.get_final_completion().choices[0]
assert streamed.finish_reason == "tool_calls", streamed
assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == [
    (c.function.name, c.function.arguments) for c in whole.message.tool_calls
], (streamed, whole)
# And raw chunks: indices count up from 0, each call's first chunk has its id and name.
indices = []
for chunk in ask(tool_choice="required", temperature=0, seed=1, stream=True):
    for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
        assert delta.id.startswith("call_") and delta.function.name, delta
        indices.append(delta.index)
assert indices == list(range(len(whole.message.tool_calls))), indices


# `parse` with a pydantic tool: strict schema, arguments parsed into the model.
class GetWeather(BaseModel):
    city: str = Field(max_length=20)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


parsed = client.chat.completions.parse(
    model=model,
    messages=QUESTION,
    tools=[openai.pydantic_function_tool(GetWeather)],
    tool_choice="required",
    temperature=0,
    max_tokens=80,
)
call = parsed.choices[0].message.tool_calls[0]
assert isinstance(call.function.parsed_arguments, GetWeather), parsed

# The next turn: the call and its result go back through the template; the answer is text.
first = whole.message.tool_calls[0]
follow_up = QUESTION + [
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": first.id, "type": "function",
             "function": {"name": first.function.name, "arguments": first.function.arguments}}
        ],
    },
    {"role": "tool", "tool_call_id": first.id, "content": "18 degrees and sunny"},
]
choice = ask(follow_up, tool_choice="none", temperature=0, max_tokens=24).choices[0]
assert choice.message.content and not choice.message.tool_calls, choice

# Errors name the field.
for options, param in [
    ({"tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools[0].function.name"),
]:
    request = {"model": model, "messages": QUESTION, "tools": TOOLS, **options}
    try:
        client.chat.completions.create(**request)
    except openai.BadRequestError as error:
        assert error.body["param"] == param, error.body
    else:
        raise AssertionError(f"{options} was accepted")
try:
    ask(tool_choice="required", response_format={"type": "json_object"})
except openai.BadRequestError as error:
    assert "response_format" in error.body["message"], error.body
else:
    raise AssertionError("a required call with a response_format was accepted")

print("all checks passed")
