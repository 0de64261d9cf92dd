//! The upstream worker API, endpoint by endpoint, over real HTTP.

use serde_json::{Value, json};

use crate::harness::{Options, Worker, greedy, tiny_model};

#[tokio::test]
async fn health_is_plain_ok() {
    let worker = Worker::start(Options::new("llm")).await;
    let response = worker.get("/health").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(response.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn info_is_worker_info() {
    let worker = Worker::start(Options::new("llm").arg("--worker-id=worker-abc123")).await;
    let info = worker.info().await;
    assert_eq!(info["id"], "worker-abc123");
    assert_eq!(info["status"], "ready");
    assert_eq!(info["device"], "CPU-0");
    assert_eq!(info["port"], worker.port);
    assert_eq!(info["implementation"], "llm-worker-rbee");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert!(info["model_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(info["guest"]["active"]["name"], "llm");
    assert_eq!(
        info["guest"]["active"]["sha256"].as_str().unwrap().len(),
        64
    );
}

/// Upstream's hive spawns workers with a bare device index: `--device 0` is GPU 0 where
/// there is one, and the CPU on a machine without (as here and in CI).
#[tokio::test]
async fn the_hives_device_index_zero_is_accepted() {
    let worker = Worker::start(Options::new("llm").arg("--device=0")).await;
    let info = worker.info().await;
    assert_eq!(info["status"], "ready");
    assert!(
        info["device"] == "CPU-0" || info["device"] == "GPU-0",
        "{info}"
    );
    let (status, body) = worker.infer(greedy("Hello", 3)).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn infer_answers_json() {
    let worker = Worker::start(Options::new("llm")).await;
    let (status, body) = worker.infer(greedy("Once upon a time", 12)).await;
    assert_eq!(status, 200, "{body}");
    let tokens = body["tokens_generated"].as_u64().unwrap();
    assert!((1..=12).contains(&tokens), "{body}");
    assert!(body["text"].is_string());
    assert!(body["duration_ms"].is_u64());
    // Greedy decoding is deterministic.
    let (_, again) = worker.infer(greedy("Once upon a time", 12)).await;
    assert_eq!(again["text"], body["text"]);
}

/// A request that gives only the prompt (and a seed, to be deterministic) is served with the
/// `llm` guest's documented defaults (guests/llm): temperature 0.7, top-p 0.95, top-k and
/// repeat penalty off, and max_tokens 256 or what the context leaves after the prompt and a
/// beginning-of-sequence token, whichever is less (on the tiny model, with its 256-token
/// context, always the latter). The answer must be the one the same request gets with those
/// values spelled out, and not the one it gets with other values.
#[tokio::test]
async fn defaults_apply_when_only_the_prompt_is_given() {
    let prompt = "The bees flew over the meadow and the river, ".repeat(10);
    let model = rbee_engine::Engine::load(
        &tiny_model(),
        &rbee_engine::LoadOptions {
            device: rbee_engine::DeviceChoice::Cpu,
            ..Default::default()
        },
    )
    .unwrap();
    let context = model.info().context_length;
    let prompt_tokens = model.tokenize(&prompt).unwrap().len() as u32;
    let max_tokens = context.saturating_sub(prompt_tokens + 1).min(256);
    assert!(
        (4..=64).contains(&max_tokens),
        "pick a prompt that leaves a few tokens: {max_tokens}"
    );

    let worker = Worker::start(Options::new("llm")).await;
    let (status, defaults) = worker.infer(json!({ "prompt": prompt, "seed": 42 })).await;
    assert_eq!(status, 200, "{defaults}");
    assert_eq!(
        defaults["tokens_generated"], max_tokens,
        "the default max_tokens is what the context leaves (or the seed hit end-of-sequence \
         first: pick another): {defaults}"
    );
    let spelled_out = json!({
        "prompt": prompt, "seed": 42, "max_tokens": max_tokens, "temperature": 0.7,
        "top_p": 0.95, "top_k": 0, "repeat_penalty": 1.0,
    });
    let (_, explicit) = worker.infer(spelled_out.clone()).await;
    assert_eq!(defaults["text"], explicit["text"]);
    // Other values give other answers, so the comparison above could tell them apart.
    for (key, value) in [
        ("temperature", json!(0.0)),
        ("temperature", json!(1.5)),
        ("max_tokens", json!(max_tokens - 1)),
    ] {
        let mut other = spelled_out.clone();
        other[key] = value.clone();
        let (status, answer) = worker.infer(other).await;
        assert_eq!(status, 200, "{answer}");
        assert_ne!(answer["text"], defaults["text"], "{key} = {value}");
    }
}

#[tokio::test]
async fn infer_streams_sse_that_matches_json() {
    let worker = Worker::start(Options::new("llm")).await;
    let (_, whole) = worker.infer(greedy("The quick brown fox", 16)).await;
    let streamed = worker.infer_stream(greedy("The quick brown fox", 16)).await;
    assert_eq!(streamed.status, 200);
    assert!(streamed.content_type.starts_with("text/event-stream"));
    assert!(streamed.done, "no [DONE]: {streamed:?}");
    assert!(streamed.error.is_none());
    assert!(!streamed.tokens.is_empty());
    assert_eq!(streamed.text(), whole["text"].as_str().unwrap());
}

#[tokio::test]
async fn bad_input_is_a_400_json_error() {
    let worker = Worker::start(Options::new("llm")).await;
    let bad: Vec<Value> = vec![
        json!({}),
        json!({ "prompt": 42 }),
        json!({ "prompt": "x", "max_tokens": 0 }),
        json!({ "prompt": "x", "max_tokens": 4097 }),
        json!({ "prompt": "x", "max_tokens": -3 }),
        json!({ "prompt": "x", "temperature": 2.5 }),
        json!({ "prompt": "x", "temperature": -1 }),
        json!({ "prompt": "x", "top_p": 0 }),
        json!({ "prompt": "x", "stream": "yes" }),
        json!({ "prompt": "x", "stop": [""] }),
    ];
    for body in bad {
        let (status, answer) = worker.infer(body.clone()).await;
        assert_eq!(status, 400, "{body} → {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{answer}"
        );
    }
    // Not JSON at all.
    let response = worker
        .client
        .post(worker.url("/v1/infer"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"].is_string());
    // Streaming requests get the same errors before the stream starts.
    let streamed = worker
        .infer_stream(json!({ "prompt": "x", "max_tokens": 0 }))
        .await;
    assert_eq!(streamed.status, 400);
    assert!(streamed.error.is_some());
    // The worker is unharmed.
    let (status, _) = worker.infer(greedy("still here", 2)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_json() {
    let worker = Worker::start(Options::new("llm").arg("--max-body-kb=4")).await;
    let response = worker
        .client
        .post(worker.url("/v1/infer"))
        .json(&json!({ "prompt": "x".repeat(8192) }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"].is_string());
}

#[tokio::test]
async fn prompt_beyond_the_context_is_a_400() {
    let worker = Worker::start(Options::new("llm")).await;
    let (status, answer) = worker.infer(greedy(&"word ".repeat(4000), 8)).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("context"),
        "{answer}"
    );
}

#[tokio::test]
async fn concurrent_clients_all_get_answers() {
    let worker = Worker::start(Options::new("llm").arg("--max-concurrent=2")).await;
    let (_, reference) = worker.infer(greedy("In the beginning", 8)).await;
    let clients = (0..6).map(|i| {
        let worker = &worker;
        async move {
            if i % 2 == 0 {
                let (status, body) = worker.infer(greedy("In the beginning", 8)).await;
                assert_eq!(status, 200, "{body}");
                body["text"].as_str().unwrap().to_owned()
            } else {
                let streamed = worker.infer_stream(greedy("In the beginning", 8)).await;
                assert!(streamed.done, "{streamed:?}");
                streamed.text()
            }
        }
    });
    for text in futures::future::join_all(clients).await {
        assert_eq!(text, reference["text"].as_str().unwrap());
    }
}

#[tokio::test]
async fn a_full_queue_answers_503() {
    // One in service, none waiting: while a slow request runs, the next is refused.
    let worker = Worker::start(
        Options::new("chaos")
            .arg("--max-concurrent=1")
            .arg("--queue-size=0"),
    )
    .await;
    let slow = worker.infer(json!({ "prompt": "slow-1500", "max_tokens": 2 }));
    let refused = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(worker.info().await["status"], "busy");
        worker.infer(greedy("hello", 2)).await
    };
    let ((slow_status, _), (status, body)) = tokio::join!(slow, refused);
    assert_eq!(slow_status, 200);
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("capacity"));
    worker.wait_for_status("ready").await;
}

#[tokio::test]
async fn unknown_routes_are_404() {
    let worker = Worker::start(Options::new("llm")).await;
    let response = worker.get("/v1/nope").await;
    assert_eq!(response.status(), 404);
    // Admin endpoints do not exist without --admin-token.
    let response = worker
        .client
        .put(worker.url("/v1/admin/guest"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}
