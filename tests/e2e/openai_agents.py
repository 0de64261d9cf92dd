"""What agent clients ask of a server, with the official `openai` Python SDK against a running
rbee-host (the `openai_agent_clients` test in tests/e2e/openai.rs starts it with SmolLM2 and
the default guest): structured output through `chat.completions.parse` and `response_format`
(every sampled answer validated with `jsonschema`), vLLM's `structured_outputs`,
log-probabilities on both routes, `logit_bias`, `n` choices, and the errors of each. Exits non-zero at the
first check that fails."""

import argparse
import json
import urllib.request
from typing import Literal, Optional

import jsonschema
import openai
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", required=True)
parser.add_argument("--api-key", default="none")
args = parser.parse_args()

client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
model = client.models.list().data[0].id


def ask(content, **options):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **options
    )


def json_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# `parse` with pydantic models: the SDK sends the model's schema and parses the answer.
class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: int = Field(ge=0, le=50)
    capital: bool


parsed = client.chat.completions.parse(
    model=model,
    messages=[{"role": "user", "content": "Describe Paris as JSON."}],
    response_format=City,
    temperature=0,
    max_tokens=120,
)
city = parsed.choices[0].message.parsed
assert isinstance(city, City), parsed
assert parsed.choices[0].finish_reason == "stop", parsed


class Step(BaseModel):
    verb: Literal["add", "remove", "keep"]
    count: int = Field(ge=1, le=9)


class Plan(BaseModel):
    title: str = Field(max_length=16)
    steps: list[Step] = Field(min_length=1, max_length=3)
    note: Optional[str] = Field(default=None, max_length=12)


plan = client.chat.completions.parse(
    model=model,
    messages=[{"role": "user", "content": "Plan a shopping list."}],
    response_format=Plan,
    temperature=0.7,
    seed=5,
    max_tokens=200,
).choices[0].message.parsed
assert isinstance(plan, Plan) and 1 <= len(plan.steps) <= 3, plan

# Schemas with what typed clients use; every sampled answer must validate.
SCHEMAS = [
    {  # required fields, an enum, a numeric range
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "count": {"type": "integer", "minimum": 3, "maximum": 7},
        },
        "required": ["colour", "score", "count"],
        "additionalProperties": False,
    },
    {  # nested objects and an array with bounds on its length
        "type": "object",
        "properties": {
            "owner": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 18, "maximum": 99}},
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "pets": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2, "maxItems": 3},
        },
        "required": ["owner", "pets"],
        "additionalProperties": False,
    },
    {  # a pattern and anyOf
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "value": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"type": "boolean"}, {"type": "null"}]},
        },
        "required": ["code", "value"],
        "additionalProperties": False,
    },
    {  # an array at the top
        "type": "array",
        "items": {"type": "integer", "minimum": 10, "maximum": 20},
        "minItems": 1,
        "maxItems": 4,
    },
]
checked = 0
for index, schema in enumerate(SCHEMAS):
    for seed in range(3):
        answer = ask(
            "Answer with JSON.", response_format=json_format(schema), temperature=0.7, seed=seed, max_tokens=160
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (index, seed, choice)
        jsonschema.validate(json.loads(choice.message.content), schema)
        checked += 1
    # The same streamed: the pieces assemble to a valid answer.
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in ask(
            "Answer with JSON.", response_format=json_format(schema), temperature=0.7, seed=9, max_tokens=160, stream=True
        )
        if chunk.choices
    ]
    jsonschema.validate(json.loads("".join(pieces)), schema)
    checked += 1

# `json_object`: any JSON object.
anything = ask("Give me a JSON object about cats.", response_format={"type": "json_object"}, temperature=0, max_tokens=80)
assert isinstance(json.loads(anything.choices[0].message.content), dict), anything

# vLLM's `structured_outputs`, on both routes.
choice = ask("Is the sky blue?", extra_body={"structured_outputs": {"choice": ["yes", "no"]}}, temperature=0)
assert choice.choices[0].message.content in ("yes", "no"), choice
regex = client.completions.create(
    model=model, prompt="Phone:", max_tokens=20, temperature=0.8, seed=1,
    extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}},
)
text = regex.choices[0].text
assert len(text) == 8 and text[3] == "-" and (text[:3] + text[4:]).isdigit(), text

# Chat log-probabilities: sorted, never above 0, the greedy choice first, spelling the text.
greedy = ask("Name three colours.", logprobs=True, top_logprobs=3, temperature=0, max_tokens=12)
content = greedy.choices[0].logprobs.content
assert len(content) == greedy.usage.completion_tokens, (len(content), greedy.usage)
assert "".join(entry.token for entry in content) == greedy.choices[0].message.content, greedy
for entry in content:
    assert entry.logprob <= 0 and len(entry.top_logprobs) == 3, entry
    assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob, entry
    tops = [top.logprob for top in entry.top_logprobs]
    assert tops == sorted(tops, reverse=True), entry
    assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or entry.token == "\ufffd", entry
streamed = [
    entry
    for chunk in ask("Name three colours.", logprobs=True, top_logprobs=3, temperature=0, max_tokens=12, stream=True)
    if chunk.choices and chunk.choices[0].logprobs
    for entry in chunk.choices[0].logprobs.content
]
assert [entry.token for entry in streamed] == [entry.token for entry in content], streamed
assert ask("Hi", temperature=0, max_tokens=4).choices[0].logprobs is None

# Completions log-probabilities, in the legacy shape.
legacy = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=6, temperature=0, logprobs=2)
lp = legacy.choices[0].logprobs
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6, lp
assert "".join(lp.tokens) == legacy.choices[0].text, lp
assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0, lp
assert all(len(top) <= 2 and max(top.values()) == logprob for top, logprob in zip(lp.top_logprobs, lp.token_logprobs)), lp

# `logit_bias`: token 1000 pushed up by 100 is every token of the answer.
forced = client.completions.create(
    model=model, prompt="Count: 1, 2, 3,", max_tokens=5, temperature=0, logprobs=1, logit_bias={"1000": 100}
)
assert len(set(forced.choices[0].logprobs.tokens)) == 1, forced.choices[0].logprobs
assert forced.choices[0].logprobs.tokens != lp.tokens[:5], forced.choices[0].logprobs

# `n`: several choices, numbered, each valid under the schema; the usage counts the prompt
# once and the tokens of every choice (llama-server counts one choice's); the same seed gives
# the same choices again; streamed, each choice ends once and the chunks assemble to the
# same texts.
n_schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 12}},
            "required": ["word"], "additionalProperties": False}
options = dict(max_tokens=40, temperature=1.0, seed=7, logprobs=True, response_format=json_format(n_schema))
several = ask("Say a word as JSON.", n=3, **options)
assert [choice.index for choice in several.choices] == [0, 1, 2], several
for choice in several.choices:
    jsonschema.validate(json.loads(choice.message.content), n_schema)
assert several.usage.completion_tokens == sum(len(c.logprobs.content) for c in several.choices), several
single = ask("Say a word as JSON.", **options)
assert several.usage.prompt_tokens == single.usage.prompt_tokens, (several.usage, single.usage)
again = ask("Say a word as JSON.", n=3, **options)
assert [c.message.content for c in again.choices] == [c.message.content for c in several.choices]
texts, finishes, usage = {}, {}, None
for chunk in ask("Say a word as JSON.", n=3, stream=True, stream_options={"include_usage": True}, **options):
    if chunk.usage:
        usage = chunk.usage
    for choice in chunk.choices:
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        if choice.finish_reason:
            assert choice.index not in finishes, chunk
            finishes[choice.index] = choice.finish_reason
assert sorted(finishes) == [0, 1, 2], finishes
assert [texts[i] for i in range(3)] == [c.message.content for c in several.choices], texts
assert usage.completion_tokens == several.usage.completion_tokens, usage
completions = client.completions.create(model=model, prompt="Once upon", max_tokens=4, n=2, temperature=1.0, seed=3)
assert [choice.index for choice in completions.choices] == [0, 1], completions
assert completions.usage.completion_tokens <= 8, completions.usage


def prefix_cache_hits():
    with urllib.request.urlopen(args.base_url.removesuffix("/v1") + "/metrics") as response:
        families = text_string_to_metric_families(response.read().decode())
    family = next(f for f in families if f.name == "rbee:prefix_cache_hits")
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


# The choices share their prompt: a prompt no earlier request sent, three choices; the first
# reads it, the other two find its full blocks (16 tokens each, within all but the last
# token) in the prefix cache, whether they joined after its reading or in the same turn
# (then they wait for it: the scheduler's `choices_of_one_prompt_read_it_once`).
before = prefix_cache_hits()
novel = "Zebras, quartz and violins: " + " ".join(f"item {i} of a list nobody sent before" for i in range(8))
shared = client.completions.create(model=model, prompt=novel, max_tokens=2, n=3, temperature=1.0, seed=5)
full_blocks = (shared.usage.prompt_tokens - 1) // 16 * 16
assert full_blocks >= 32, shared.usage
assert prefix_cache_hits() - before == 2 * full_blocks, (prefix_cache_hits() - before, full_blocks)

# Errors name the field.
for kwargs, param in [
    ({"response_format": json_format({"type": "no-such-type"})}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs.regex"),
    ({"n": 17}, "n"),
]:
    try:
        ask("Hi", max_tokens=4, **kwargs)
        raise AssertionError(f"accepted: {kwargs}")
    except openai.BadRequestError as error:
        assert error.param == param, (kwargs, error.param, error.message)

print(f"all checks passed ({checked} constrained answers validated)")
