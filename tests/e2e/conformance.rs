//! Conformance of the chat guests: `chat` (Rust, the reference), `chat-py`, `chat-js` and
//! `chat-c`, each served by the real `rbee-host` on the tiny model, get the same requests
//! (JSON and SSE, temperature 0 or a fixed seed) and must give the same answers, piece for
//! piece, and the same HTTP errors. The behaviour they share is specified in guests/README.md
//! ("The chat guest"). Guests are built by `guests/build.sh`; a language whose toolchain was
//! not available there is skipped with a message, but the Rust reference must exist.

use crate::harness::{Options, Worker, greedy, repo_root};
use serde_json::{Value, json};

const REFERENCE: &str = "chat";
const OTHERS: [&str; 3] = ["chat-py", "chat-js", "chat-c"];

/// What a client saw for one request, in a form that can be compared across guests.
#[derive(Debug, PartialEq)]
enum Seen {
    Json {
        status: u16,
        body: Value,
    },
    Sse {
        status: u16,
        tokens: Vec<String>,
        done: bool,
        error: Option<String>,
    },
}

async fn ask(worker: &Worker, body: &Value) -> Seen {
    if body["stream"] == true {
        let streamed = worker.infer_stream(body.clone()).await;
        Seen::Sse {
            status: streamed.status,
            tokens: streamed.tokens,
            done: streamed.done,
            error: streamed.error,
        }
    } else {
        let (status, mut body) = worker.infer(body.clone()).await;
        // The only field that may differ: how long it took.
        if let Some(object) = body.as_object_mut() {
            object.remove("duration_ms");
        }
        Seen::Json { status, body }
    }
}

fn streamed(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body
}

fn with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

fn text_of(seen: &Seen) -> String {
    match seen {
        Seen::Json { body, .. } => body["text"].as_str().unwrap_or_default().to_owned(),
        Seen::Sse { tokens, .. } => tokens.concat(),
    }
}

#[tokio::test]
async fn chat_guests_answer_alike() {
    let reference = Worker::start(Options::new(REFERENCE)).await;
    let mut others = Vec::new();
    for name in OTHERS {
        if repo_root()
            .join("guests")
            .join(format!("{name}.wasm"))
            .exists()
        {
            others.push((name, Worker::start(Options::new(name)).await));
        } else {
            eprintln!(
                "skipped: guests/{name}.wasm is missing (its toolchain was unavailable to guests/build.sh)"
            );
        }
    }

    // A stop string taken from the middle of the reference's own greedy answer, so that it is
    // certain to occur; and one that begins like it but never completes.
    let base = greedy("Once upon a time", 24);
    let free = text_of(&ask(&reference, &base).await);
    let chars: Vec<char> = free.chars().collect();
    assert!(
        chars.len() >= 8,
        "the reference answered too little to pick a stop string: {free:?}"
    );
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let never = format!("{stop}\u{1F41D}never");

    let mut requests = vec![
        base.clone(),
        greedy("", 6),
        greedy("héllo wörld ✓ 🐝 <b>", 10),
        with(base.clone(), "stop", json!([stop])),
        with(base.clone(), "stop", json!([never, stop])),
        with(base.clone(), "stop", json!(never)),
        // The default temperature (0.7) and top_p (0.95), with a fixed seed.
        json!({ "prompt": "Tell me a story", "seed": 42, "max_tokens": 16 }),
        json!({ "prompt": "Tell me a story", "seed": 7, "max_tokens": 16, "top_k": 5, "repeat_penalty": 1.3 }),
        // Refused by the engine when the guest calls it (the guests check no ranges).
        with(base.clone(), "top_p", json!(0.0)),
        with(base.clone(), "top_p", json!(1.5)),
        with(base.clone(), "repeat_penalty", json!(0.0)),
        with(base.clone(), "repeat_penalty", json!(-1.0)),
        with(base.clone(), "stop", json!(["a", ""])),
        // Refused by the host before a guest runs.
        with(base.clone(), "max_tokens", json!(0)),
        with(base.clone(), "temperature", json!(2.5)),
        // More than the tiny model's context: the engine's context-overflow, through the guest.
        with(base.clone(), "max_tokens", json!(4096)),
    ];
    requests.extend(requests.clone().into_iter().map(streamed));

    let mut failures = Vec::new();
    let mut answers = Vec::new();
    for body in &requests {
        let expected = ask(&reference, body).await;
        for (name, worker) in &others {
            let seen = ask(worker, body).await;
            if seen != expected {
                failures.push(format!(
                    "{name} on {body}:\n  chat: {expected:?}\n  {name}: {seen:?}"
                ));
            }
        }
        answers.push(expected);
    }
    assert!(
        failures.is_empty(),
        "{} disagreement(s):\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The reference's answers, checked against the specification.
    let half = requests.len() / 2;
    for (index, (json_answer, sse_answer)) in
        answers[..half].iter().zip(&answers[half..]).enumerate()
    {
        let body = &requests[index];
        match (json_answer, sse_answer) {
            (
                Seen::Json {
                    status: 200,
                    body: answer,
                },
                Seen::Sse {
                    status: 200,
                    tokens,
                    done: true,
                    error: None,
                },
            ) => {
                assert_eq!(
                    answer["text"].as_str().unwrap(),
                    tokens.concat(),
                    "stream != JSON for {body}"
                );
                assert!(
                    tokens.iter().all(|token| !token.is_empty()),
                    "an empty SSE token for {body}"
                );
            }
            (
                Seen::Json {
                    status,
                    body: answer,
                },
                Seen::Sse {
                    status: sse_status,
                    error,
                    ..
                },
            ) => {
                assert!(*status == 400, "{body}: {status} {answer}");
                assert_eq!(sse_status, status, "{body}: streamed error status");
                assert_eq!(
                    error.as_deref(),
                    answer["error"].as_str(),
                    "{body}: streamed error text"
                );
            }
            other => panic!("{body}: unexpected {other:?}"),
        }
    }
    let text = |index: usize| text_of(&answers[index]);
    assert_eq!(
        text(3),
        free[..free.find(&stop).unwrap()],
        "cut at the stop string"
    );
    assert_eq!(
        text(4),
        text(3),
        "a stop string that never completes changes nothing"
    );
    assert_eq!(
        text(5),
        free,
        "only a stop string that completes ends the text"
    );
    let error = |index: usize| match &answers[index] {
        Seen::Json { status, body } => (
            *status,
            body["error"].as_str().unwrap_or_default().to_owned(),
        ),
        other => panic!("{other:?}"),
    };
    // The engine's refusals reach the client as 400s that name the field.
    for (index, field) in [
        (8, "top_p"),
        (9, "top_p"),
        (10, "repeat_penalty"),
        (11, "repeat_penalty"),
        (12, "stop"),
    ] {
        let (status, message) = error(index);
        assert_eq!(status, 400, "{}: {message}", requests[index]);
        assert!(
            message.replace('-', "_").contains(field),
            "{}: the error does not name {field}: {message}",
            requests[index]
        );
    }
    assert_eq!(error(13).0, 400);
    assert_eq!(error(14).0, 400);
    assert_eq!(error(15).0, 400);
}

/// The chat guests wrap the prompt in ChatML when the model's template uses it: at temperature 0
/// the chat guest's answer to `X` is the plain `llm` guest's answer to the wrapped `X`.
#[tokio::test]
async fn chat_applies_the_chatml_template() {
    let chat = Worker::start(Options::new(REFERENCE)).await;
    let llm = Worker::start(Options::new("llm")).await;
    let prompt = "What is a bee?";
    let wrapped = format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n");
    let (status, answer) = chat.infer(greedy(prompt, 16)).await;
    assert_eq!(status, 200, "{answer}");
    let (status, plain) = llm
        .infer(with(greedy(&wrapped, 16), "stop", json!(["<|im_end|>"])))
        .await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(answer["text"], plain["text"]);
    assert_eq!(answer["tokens_generated"], plain["tokens_generated"]);
}
