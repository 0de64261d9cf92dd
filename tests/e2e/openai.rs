//! The OpenAI-compatible routes and `/metrics`, over real HTTP against the real binary with
//! the default guest, parsed as OpenAI clients and Prometheus parse them (the official
//! `openai` Python client itself runs in `openai_python_client`).

use std::collections::HashMap;
use std::process::Command;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::harness::{Options, Worker, greedy, repo_root, smollm2};

/// The tiny fixture's name on the OpenAI routes: its folder's name.
const TINY: &str = "tiny-llama";

async fn post(worker: &Worker, path: &str, body: Value) -> (u16, Value) {
    worker.post_json(path, &body).await
}

/// The `data:` payloads of a stream, parsed as JSON, and whether it ended with `[DONE]`.
async fn chunks(worker: &Worker, path: &str, body: Value) -> (Vec<Value>, bool) {
    let response = worker.post(path, &body).await;
    assert_ok_with_type(&response, "text/event-stream");
    let mut events = response.bytes_stream().eventsource();
    let mut chunks = Vec::new();
    let mut done = false;
    while let Some(event) = events.next().await {
        let event = event.expect("malformed SSE");
        assert!(!done, "data after [DONE]: {}", event.data);
        if event.data == "[DONE]" {
            done = true;
        } else {
            chunks.push(serde_json::from_str(&event.data).expect("chunk is JSON"));
        }
    }
    (chunks, done)
}

fn assert_ok_with_type(response: &reqwest::Response, content_type: &str) {
    assert_eq!(response.status(), 200);
    let given = response.headers()["content-type"].to_str().unwrap();
    assert!(given.starts_with(content_type), "content-type {given}");
}

/// An error in OpenAI's shape, with its `param`.
fn assert_openai_error(status: u16, body: &Value, want_status: u16, param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("code").is_some(), "{body}");
    match param {
        Some(param) => assert_eq!(error["param"], param, "{body}"),
        None => assert!(error.get("param").is_some(), "{body}"),
    }
}

#[tokio::test]
async fn models_lists_the_served_model_under_its_file_name() {
    let worker = Worker::start(Options::new("llm")).await;
    let response = worker.get("/v1/models").await;
    assert_eq!(response.status(), 200);
    let models: Value = response.json().await.unwrap();
    assert_eq!(models["object"], "list");
    let data = models["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], TINY);
    assert_eq!(data[0]["object"], "model");
    assert!(data[0]["created"].as_u64().unwrap() > 1_700_000_000);
    assert!(data[0]["owned_by"].is_string());
    // /info and the heartbeats say the same name.
    assert_eq!(worker.info().await["model_id"], TINY);

    let renamed = Worker::start(Options::new("llm").arg("--served-model-name=my-model")).await;
    assert_eq!(renamed.info().await["model_id"], "my-model");
    let (status, body) = post(
        &renamed,
        "/v1/completions",
        json!({ "model": TINY, "prompt": "Hi", "max_tokens": 1 }),
    )
    .await;
    assert_openai_error(status, &body, 404, Some("model"));
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, body) = post(
        &renamed,
        "/v1/completions",
        json!({ "model": "my-model", "prompt": "Hi", "max_tokens": 1 }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "my-model");
}

#[tokio::test]
async fn completions_answer_in_openai_shape_with_the_text_of_v1_infer() {
    let worker = Worker::start(Options::new("llm")).await;
    let prompt = "The quick brown fox";
    let (status, body) = post(
        &worker,
        "/v1/completions",
        json!({ "model": TINY, "prompt": prompt, "max_tokens": 12, "temperature": 0 }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], TINY);
    assert!(body["created"].as_u64().is_some());
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "length");
    let text = choice["text"].as_str().unwrap();
    let usage = &body["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    assert!(usage["prompt_tokens"].as_u64().unwrap() >= 4);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + 12
    );

    // Greedy text equals /v1/infer's for the same prompt.
    let (status, infer) = worker.infer(greedy(prompt, 12)).await;
    assert_eq!(status, 200, "{infer}");
    assert_eq!(infer["text"], text);

    // Streamed text equals the whole answer; one id; exactly one finish reason; the usage
    // chunk last, with no choices.
    let (stream, done) = chunks(
        &worker,
        "/v1/completions",
        json!({ "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": true,
                "stream_options": { "include_usage": true } }),
    )
    .await;
    assert!(done, "no [DONE]");
    let ids: std::collections::HashSet<_> = stream.iter().map(|c| c["id"].clone()).collect();
    assert_eq!(ids.len(), 1, "{stream:?}");
    assert!(stream.iter().all(|c| c["object"] == "text_completion"));
    let (usage_chunk, text_chunks) = stream.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(&usage_chunk["usage"], usage);
    assert!(text_chunks.iter().all(|c| c["usage"].is_null()));
    let finishes: Vec<_> = text_chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finishes.len(), 1);
    assert_eq!(finishes[0]["choices"][0]["finish_reason"], "length");
    let streamed: String = text_chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
}

#[tokio::test]
async fn chat_streams_a_role_then_content_then_one_finish() {
    let worker = Worker::start(Options::new("llm")).await;
    let messages = json!([
        { "role": "system", "content": "Be brief." },
        { "role": "user", "content": [{ "type": "text", "text": "Hello" }] },
    ]);
    let (status, whole) = post(
        &worker,
        "/v1/chat/completions",
        json!({ "messages": messages, "max_completion_tokens": 8, "temperature": 0, "seed": 7 }),
    )
    .await;
    assert_eq!(status, 200, "{whole}");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(whole["object"], "chat.completion");
    let message = &whole["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    let content = message["content"].as_str().unwrap();

    let (stream, done) = chunks(
        &worker,
        "/v1/chat/completions",
        json!({ "messages": messages, "max_completion_tokens": 8, "temperature": 0,
                "stream": true }),
    )
    .await;
    assert!(done);
    assert!(
        stream
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert!(
        stream.iter().all(|c| c.get("usage").is_none()),
        "usage without include_usage"
    );
    assert_eq!(stream[0]["choices"][0]["delta"]["role"], "assistant");
    let finishes: Vec<_> = stream
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finishes.len(), 1);
    assert_eq!(
        stream.last().unwrap()["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    let streamed: String = stream
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
}

#[tokio::test]
async fn bad_requests_are_openai_errors_naming_the_field() {
    let worker = Worker::start(Options::new("llm")).await;
    let response = worker
        .client
        .post(worker.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_openai_error(status, &body, 400, None);
    for (body, param) in [
        (json!({ "prompt": "x", "n": 0 }), "n"),
        (json!({ "prompt": "x", "logprobs": 50 }), "logprobs"),
        (
            json!({ "prompt": "x", "response_format": { "type": "json_schema",
                    "json_schema": { "name": "a", "schema": { "type": "no-such-type" } } } }),
            "response_format.json_schema.schema",
        ),
        (
            json!({ "prompt": "x", "temperature": "warm" }),
            "temperature",
        ),
        (json!({ "prompt": "x", "min_p": 0.05 }), "min_p"),
        (json!({ "prompt": ["a", "b"] }), "prompt"),
    ] {
        let (status, answer) = post(&worker, "/v1/completions", body).await;
        assert_openai_error(status, &answer, 400, Some(param));
    }
    let (status, answer) = post(
        &worker,
        "/v1/chat/completions",
        json!({ "messages": [{ "role": "user", "content": "x" }], "tools": [{ "type": "function" }] }),
    )
    .await;
    assert_openai_error(status, &answer, 400, Some("tools[0].function"));
    // A prompt that cannot fit the context (the tiny model's is small) is the client's fault.
    let (status, answer) = post(
        &worker,
        "/v1/completions",
        json!({ "prompt": "word ".repeat(5000), "max_tokens": 4 }),
    )
    .await;
    assert_openai_error(status, &answer, 400, None);
}

#[tokio::test]
async fn the_api_key_guards_the_openai_routes_only() {
    let worker = Worker::start(Options::new("llm").arg("--api-key=sk-test")).await;
    let models = |key: Option<&str>| {
        let mut request = worker.client.get(worker.url("/v1/models"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let refused = models(None).await.unwrap();
    assert_eq!(refused.status(), 401);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(models(Some("sk-wrong")).await.unwrap().status(), 401);
    assert_eq!(models(Some("sk-test")).await.unwrap().status(), 200);
    // /health, /info and the rbee contract stay open.
    let health = worker.get("/health").await;
    assert_eq!(health.status(), 200);
    assert_eq!(worker.infer(greedy("Hi", 2)).await.0, 200);
}

#[tokio::test]
async fn a_guest_without_the_openai_export_is_named_in_the_error() {
    let worker = Worker::start(Options::new("chat")).await;
    let (status, body) = post(
        &worker,
        "/v1/chat/completions",
        json!({ "messages": [{ "role": "user", "content": "Hi" }] }),
    )
    .await;
    assert_openai_error(status, &body, 501, None);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("`chat`"), "{message}");
    // It keeps serving the rbee contract.
    assert_eq!(worker.infer(greedy("Hi", 2)).await.0, 200);
}

/// Samples of a Prometheus text exposition, keyed by name and labels as written.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (key, value) = line.rsplit_once(' ').expect("sample line");
            (key.to_owned(), value.parse().expect("sample value"))
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_what_the_api_returned() {
    let worker = Worker::start(Options::new("llm")).await;
    let scrape = || async {
        let response = worker.get("/metrics").await;
        assert_ok_with_type(&response, "application/openmetrics-text; version=1.0.0");
        samples(&response.text().await.unwrap())
    };
    let label = format!("{{model_name=\"{TINY}\"}}");
    let before = scrape().await;
    assert_eq!(before[&format!("rbee:generation_tokens_total{label}")], 0.0);
    assert_eq!(before[&format!("rbee:guest_generation{label}")], 1.0);

    let (_, whole) = post(
        &worker,
        "/v1/completions",
        json!({ "prompt": "One two", "max_tokens": 5, "temperature": 0 }),
    )
    .await;
    let (stream, _) = chunks(
        &worker,
        "/v1/chat/completions",
        json!({ "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 6,
                "temperature": 0, "stream": true, "stream_options": { "include_usage": true } }),
    )
    .await;
    let streamed_usage = &stream.last().unwrap()["usage"];
    let after = scrape().await;
    let usage = |field: &str| {
        whole["usage"][field].as_f64().unwrap() + streamed_usage[field].as_f64().unwrap()
    };
    assert_eq!(
        after[&format!("rbee:prompt_tokens_total{label}")],
        usage("prompt_tokens")
    );
    assert_eq!(
        after[&format!("rbee:generation_tokens_total{label}")],
        usage("completion_tokens")
    );
    let finished = |reason: &str| {
        after
            .get(&format!(
                "rbee:request_success_total{{model_name=\"{TINY}\",finished_reason=\"{reason}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
    };
    assert_eq!(finished("length") + finished("stop"), 2.0);
    assert_eq!(
        after[&format!("rbee:e2e_request_latency_seconds_count{label}")],
        2.0
    );
    assert_eq!(
        after[&format!("rbee:time_to_first_token_seconds_count{label}")],
        2.0
    );
    assert_eq!(after[&format!("rbee:num_requests_running{label}")], 0.0);

    // The same long prompt twice: the second starts from the first's full KV blocks.
    let prompt = "one two three four five six seven eight nine ten ".repeat(4);
    for _ in 0..2 {
        let (status, body) = post(
            &worker,
            "/v1/completions",
            json!({ "prompt": prompt, "max_tokens": 2, "temperature": 0 }),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let cached = scrape().await;
    let grew = |name: &str| {
        let name = format!("rbee:{name}_total{label}");
        cached[&name] - after[&name]
    };
    assert!(grew("prefix_cache_queries") >= 2.0 * 40.0, "{cached:?}");
    assert!(grew("prefix_cache_hits") >= 32.0, "{cached:?}");
    assert_eq!(cached[&format!("rbee:num_preemptions_total{label}")], 0.0);
    // Nothing runs: no block is held (cached ones nobody holds count as free).
    assert_eq!(cached[&format!("rbee:kv_cache_usage_perc{label}")], 0.0);
    assert_eq!(cached[&format!("rbee:num_requests_waiting{label}")], 0.0);
}

#[tokio::test]
#[ignore = "needs SmolLM2 (scripts/fetch-model.sh; scripts/test.sh runs it when present)"]
async fn smollm2_answers_a_chat_with_its_own_template() {
    let mut options = Options::new("llm");
    options.model = smollm2();
    let worker = Worker::start(options).await;
    let (status, body) = post(
        &worker,
        "/v1/chat/completions",
        json!({ "messages": [{ "role": "user", "content": "What is the capital of France?" }],
                "max_tokens": 24, "temperature": 0 }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{answer}");
    // The template's end of turn ends the answer, not max_tokens.
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
}

/// `--speculative ngram` on the real binary: a chat whose answer copies its input gets the
/// same answer as from a worker without it, greedy and sampled with a seed, whole and
/// streamed (a chunk may carry several tokens), and `/metrics` counts the drafts verified
/// and the tokens accepted, so the answers cannot agree by drafting nothing.
#[tokio::test]
#[ignore = "needs SmolLM2 (scripts/fetch-model.sh; scripts/test.sh runs it when present)"]
async fn speculation_serves_the_answers_served_without_it() {
    let start = |speculative: &str| {
        // Every match drafted: the answers must agree whatever is drafted, and how much
        // is drafted must not hang on how fast this machine runs a step.
        let mut options = Options::new("llm")
            .arg(format!("--speculative={speculative}"))
            .arg("--draft-length=max");
        options.model = smollm2();
        Worker::start(options)
    };
    let (on, off) = (start("ngram").await, start("off").await);
    let list = "apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon";
    let request = |temperature: f64, stream: bool| {
        json!({ "messages": [{ "role": "user", "content": format!("Repeat this list exactly: {list}.") }],
                "max_tokens": 40, "temperature": temperature, "seed": 7, "stream": stream })
    };
    for temperature in [0.0, 0.8] {
        let (status, want) = post(&off, "/v1/chat/completions", request(temperature, false)).await;
        assert_eq!(status, 200, "{want}");
        let want = &want["choices"][0]["message"]["content"];
        let (status, got) = post(&on, "/v1/chat/completions", request(temperature, false)).await;
        assert_eq!(status, 200, "{got}");
        assert_eq!(
            &got["choices"][0]["message"]["content"], want,
            "temperature {temperature}"
        );
        let (stream, done) = chunks(&on, "/v1/chat/completions", request(temperature, true)).await;
        assert!(done);
        let streamed: String = stream
            .iter()
            .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(
            streamed,
            want.as_str().unwrap(),
            "temperature {temperature}"
        );
    }
    let label = "{model_name=\"SmolLM2-135M-Instruct.Q4_1\"}";
    let counted = |text: &str, name: &str| samples(text)[&format!("rbee:{name}_total{label}")];
    let metrics = on.get("/metrics").await.text().await.unwrap();
    assert!(
        counted(&metrics, "spec_decode_num_drafts") > 0.0,
        "{metrics}"
    );
    assert!(
        counted(&metrics, "spec_decode_num_accepted_tokens") > 0.0,
        "{metrics}"
    );
    let metrics = off.get("/metrics").await.text().await.unwrap();
    assert_eq!(
        counted(&metrics, "spec_decode_num_drafts"),
        0.0,
        "{metrics}"
    );
}

/// The official `openai` Python client and `prometheus_client`'s parser, against the real
/// binary (tests/e2e/openai_client.py). scripts/test.sh installs both into a virtual
/// environment and names its Python in RBEE_TEST_PYTHON.
#[tokio::test]
#[ignore = "needs SmolLM2 and the openai Python client (scripts/test.sh sets up both)"]
async fn openai_python_client() {
    run_python_client("tests/e2e/openai_client.py", Some("sk-rbee")).await;
}

/// What agent clients ask, with the official `openai` Python SDK against the real binary
/// (tests/e2e/openai_agents.py): `chat.completions.parse` with pydantic models, JSON schemas
/// whose every sampled answer is validated with `jsonschema`, `structured_outputs`,
/// log-probabilities on both routes, `logit_bias`, and errors that name the field.
#[tokio::test]
#[ignore = "needs SmolLM2 and the openai Python client (scripts/test.sh sets up both)"]
async fn openai_agent_clients() {
    run_python_client("tests/e2e/openai_agents.py", None).await;
}

/// Runs a Python client script (its checks end with "all checks passed") against a worker
/// serving SmolLM2 with the default guest, behind `api_key` when given.
async fn run_python_client(script: &str, api_key: Option<&str>) {
    let python = std::env::var("RBEE_TEST_PYTHON").expect(
        "RBEE_TEST_PYTHON is not set: scripts/test.sh installs the openai client and sets it",
    );
    let mut options = Options::new("llm");
    options.model = smollm2();
    if let Some(key) = api_key {
        options = options.arg(format!("--api-key={key}"));
    }
    let worker = Worker::start(options).await;
    let script = repo_root().join(script);
    let base_url = worker.url("/v1");
    let api_key = api_key.unwrap_or("none").to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args(["--base-url", &base_url, "--api-key", &api_key])
            .output()
            .expect("cannot run the Python client")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}\n{stderr}");
}

/// Tool calling with the official `openai` Python SDK (tests/e2e/openai_tools.py) against
/// SmolLM2, whose template has no tools (the guest adds them as Qwen 2.5 does): `required`,
/// named and `auto` over seeds with every call's arguments valid under its schema,
/// `parallel_tool_calls`, streamed calls assembled by the SDK, `pydantic_function_tool` with
/// `parse`, a tool turn rendered into the next prompt, and errors that name the field.
#[tokio::test]
#[ignore = "needs SmolLM2 and the openai Python client (scripts/test.sh sets up both)"]
async fn openai_tool_clients() {
    run_python_client("tests/e2e/openai_tools.py", None).await;
}

/// A guest built against the WIT as it was before structured output (guests/legacy, with its
/// own frozen copy of the file) serves unchanged on this host; agent clients' fields, which
/// it cannot honour, are refused naming the field.
#[tokio::test]
async fn a_guest_built_against_the_older_wit_serves_unchanged() {
    let worker = Worker::start(Options::new("legacy")).await;
    let (status, answer) = post(
        &worker,
        "/v1/completions",
        json!({ "prompt": "Once upon", "max_tokens": 5 }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let generated = answer["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=5).contains(&generated), "{answer}");
    assert_eq!(answer["choices"][0]["logprobs"], Value::Null, "{answer}");
    let (status, answer) = post(
        &worker,
        "/v1/infer",
        json!({ "prompt": "Once upon", "max_tokens": 5 }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    for (route, body, param) in [
        (
            "/v1/completions",
            json!({ "prompt": "x", "logprobs": 2 }),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": "x" }],
                    "response_format": { "type": "json_object" } }),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": "x" }], "logit_bias": { "5": 1 } }),
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": "x" }],
                    "tools": [{ "type": "function", "function": { "name": "f" } }] }),
            "tools",
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": "x" },
                                 { "role": "tool", "tool_call_id": "c", "content": "1" }] }),
            "messages",
        ),
    ] {
        let (status, answer) = post(&worker, route, body).await;
        assert_openai_error(status, &answer, 400, Some(param));
    }
    // What changes nothing is still served.
    let (status, answer) = post(
        &worker,
        "/v1/chat/completions",
        json!({ "messages": [{ "role": "user", "content": "x" }], "max_tokens": 3,
                "logprobs": false, "response_format": { "type": "text" } }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
}
