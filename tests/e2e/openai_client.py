"""The official `openai` Python client and `prometheus_client`'s parser against a running
rbee-host (the `openai_python_client` test in tests/e2e/openai.rs starts it with SmolLM2, the
default guest and `--api-key`). Exits non-zero at the first check that fails."""

import argparse
import urllib.request

import openai
from prometheus_client.openmetrics.parser import text_string_to_metric_families

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", required=True)
parser.add_argument("--api-key", required=True)
args = parser.parse_args()

client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)

# Models: one, under the GGUF file's stem.
models = client.models.list().data
assert len(models) == 1, models
model = models[0].id
assert model == "SmolLM2-135M-Instruct.Q4_1", model

# A wrong key is the SDK's AuthenticationError.
try:
    openai.OpenAI(base_url=args.base_url, api_key="sk-wrong", max_retries=0).models.list()
    raise AssertionError("a wrong API key was accepted")
except openai.AuthenticationError:
    pass

# Completions: greedy, with a stop string, and the same text streamed.
prompt = "Count: 1, 2, 3,"
whole = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
assert whole.object == "text_completion" and whole.id.startswith("cmpl-"), whole
text = whole.choices[0].text
assert whole.choices[0].finish_reason == "length", whole
assert whole.usage.completion_tokens == 16, whole.usage
stopped = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stop=[" 6"])
assert stopped.choices[0].finish_reason == "stop", stopped
assert " 6" not in stopped.choices[0].text and text.startswith(stopped.choices[0].text), (text, stopped)
pieces, usage, finishes = [], None, []
for chunk in client.completions.create(
    model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices:
        pieces.append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    if chunk.usage:
        usage = chunk.usage
assert "".join(pieces) == text, ("".join(pieces), text)
assert finishes == ["length"], finishes
assert usage is not None and usage.completion_tokens == 16, usage

# Chat: the model's own template, a seeded sample reproducible, a stream with usage.
messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
answer = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0)
assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-"), answer
assert answer.choices[0].message.role == "assistant"
assert "Paris" in answer.choices[0].message.content, answer.choices[0].message.content
seeded = [
    client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0.9, seed=42
    ).choices[0].message.content
    for _ in range(2)
]
assert seeded[0] == seeded[1], seeded
roles, pieces, finishes, usage, ids = [], [], [], None, set()
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=32, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    ids.add(chunk.id)
    if chunk.choices:
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        if delta.content:
            pieces.append(delta.content)
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    if chunk.usage:
        usage = chunk.usage
assert len(ids) == 1, ids
assert roles == ["assistant"], roles
assert "".join(pieces) == answer.choices[0].message.content, pieces
assert len(finishes) == 1, finishes
assert usage.prompt_tokens == answer.usage.prompt_tokens, (usage, answer.usage)

# Errors are the SDK's typed exceptions.
try:
    client.chat.completions.create(model="gpt-4o", messages=messages)
    raise AssertionError("another model was served")
except openai.NotFoundError:
    pass
try:
    client.chat.completions.create(model=model, messages=messages, n=17)
    raise AssertionError("n=17 was accepted")
except openai.BadRequestError as error:
    assert error.body["param"] == "n", error.body
try:
    client.completions.create(model=model, prompt="x " * 9000, max_tokens=1)
    raise AssertionError("a prompt longer than the context was accepted")
except openai.BadRequestError:
    pass

# /metrics parses (OpenMetrics, as Prometheus scrapes it), and its token counters cover what the API returned.
root = args.base_url.removesuffix("/v1")
with urllib.request.urlopen(root + "/metrics") as response:
    metrics = response.read().decode()
families = {family.name: family for family in text_string_to_metric_families(metrics)}
generated = sum(s.value for s in families["rbee:generation_tokens"].samples if s.name.endswith("_total"))
assert generated >= 16 * 3 + answer.usage.completion_tokens, generated
for name in ["rbee:time_to_first_token_seconds", "rbee:e2e_request_latency_seconds",
             "rbee:inter_token_latency_seconds", "rbee:num_requests_running", "rbee:request_success",
             "rbee:kv_cache_usage_perc", "rbee:prefix_cache_queries", "rbee:prefix_cache_hits",
             "rbee:num_preemptions", "rbee:spec_decode_num_drafts", "rbee:spec_decode_num_accepted_tokens"]:
    assert name in families, (name, sorted(families))
print("all checks passed")
