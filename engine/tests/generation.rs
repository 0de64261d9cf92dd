//! Generation behaviour on the tiny fixture model: streaming, seeds, stop strings, limits,
//! cancellation, and load errors.

mod common;

use std::ops::ControlFlow;

use common::{fixtures, greedy, scratch, tiny_llama};
use rbee_engine::{DeviceChoice, Engine, EngineError, FinishReason, LoadOptions, SamplingParams};

fn collect(
    engine: &Engine,
    prompt: &str,
    params: &SamplingParams,
) -> (String, Vec<String>, FinishReason) {
    let mut pieces = Vec::new();
    let done = engine
        .generate(prompt, params, &mut |piece| {
            pieces.push(piece.to_string());
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(
        pieces.concat(),
        done.text,
        "streamed pieces add up to the text"
    );
    (done.text, pieces, done.finish_reason)
}

#[test]
fn info_describes_the_model() {
    let engine = tiny_llama();
    let info = engine.info();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.format, "hf");
    assert_eq!(info.device, "CPU-0");
    assert_eq!(info.context_length, 256);
    assert_eq!(info.vocab_size, 384);
    assert!(info.eos_tokens.contains(&"<|im_end|>".to_string()));
    assert!(
        info.chat_template
            .as_deref()
            .unwrap()
            .contains("<|im_start|>")
    );
}

#[test]
fn greedy_streams_and_counts() {
    let engine = tiny_llama();
    let done = engine
        .generate("Hello, world!", &greedy(12), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(
        done.prompt_tokens,
        engine.tokenize("Hello, world!").unwrap().len() as u32
    );
    assert!(done.generated_tokens >= 1 && done.generated_tokens <= 12);
    if done.finish_reason == FinishReason::Length {
        assert_eq!(done.generated_tokens, 12);
    }
    assert!(done.prefill > std::time::Duration::ZERO);
}

#[test]
fn same_seed_same_text_other_seed_other_text() {
    let engine = tiny_llama();
    let params = |seed| SamplingParams {
        max_tokens: 24,
        temperature: 1.0,
        top_k: 50,
        top_p: 0.95,
        repeat_penalty: 1.1,
        seed: Some(seed),
        ..greedy(24)
    };
    let (a, _, _) = collect(&engine, "Once upon a time", &params(7));
    let (b, _, _) = collect(&engine, "Once upon a time", &params(7));
    assert_eq!(a, b);
    let others: Vec<String> = (8..11)
        .map(|s| collect(&engine, "Once upon a time", &params(s)).0)
        .collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds gave identical text"
    );
}

#[test]
fn stop_string_ends_generation_and_is_never_emitted() {
    let engine = tiny_llama();
    let (full, _, _) = collect(&engine, "The quick brown fox", &greedy(24));
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 8, "need some text to cut: {full:?}");
    // A stop string from the middle of the greedy text: generation must end right before it.
    let stop: String = chars[5..8].iter().collect();
    let cut = full.find(&stop).unwrap();
    let params = SamplingParams {
        stop: vec![stop.clone(), "never-appears".into()],
        ..greedy(24)
    };
    let (text, pieces, finish) = collect(&engine, "The quick brown fox", &params);
    assert_eq!(finish, FinishReason::Stop);
    assert_eq!(text, full[..cut]);
    assert!(pieces.iter().all(|p| !p.contains(&stop)));
}

#[test]
fn context_overflow_is_an_error() {
    let engine = tiny_llama();
    let err = engine
        .generate("Hello", &greedy(300), &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    match err {
        EngineError::ContextOverflow {
            context_length,
            max_tokens,
            ..
        } => {
            assert_eq!(context_length, 256);
            assert_eq!(max_tokens, 300);
        }
        other => panic!("expected ContextOverflow, got {other}"),
    }
    // Exactly filling the context is fine.
    let n = engine.tokenize("Hello").unwrap().len() as u32;
    let done = engine
        .generate(
            "Hello",
            &greedy(256 - n),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert!(done.prompt_tokens + done.generated_tokens <= 256);
}

#[test]
fn cancelling_from_the_callback() {
    let engine = tiny_llama();
    let mut calls = 0;
    let done = engine
        .generate("Hello", &greedy(24), &mut |_| {
            calls += 1;
            ControlFlow::Break(())
        })
        .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
}

#[test]
fn bad_parameters_are_rejected() {
    let engine = tiny_llama();
    let bad = SamplingParams {
        top_p: 0.0,
        ..greedy(4)
    };
    assert!(matches!(
        engine.generate("Hi", &bad, &mut |_| ControlFlow::Continue(())),
        Err(EngineError::InvalidInput(_))
    ));
    assert!(matches!(
        engine.generate("", &greedy(4), &mut |_| ControlFlow::Continue(())),
        Err(EngineError::InvalidInput(_))
    ));
}

/// The reason of the load error for `path`, checking that the error names `names`.
fn load_err_naming(path: &std::path::Path, names: &std::path::Path) -> String {
    match Engine::load(
        path,
        &LoadOptions {
            device: DeviceChoice::Cpu,
            ..Default::default()
        },
    ) {
        Err(EngineError::Load { path: p, reason }) => {
            assert_eq!(p, names, "{reason}");
            reason
        }
        Err(other) => panic!("expected a load error, got {other}"),
        Ok(_) => panic!("loading {} should fail", path.display()),
    }
}

fn load_err(path: &std::path::Path) -> String {
    load_err_naming(path, path)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn bad_paths_and_files_give_load_errors() {
    let missing = fixtures().join("no-such-model");
    assert!(load_err(&missing).contains("no such"));

    let empty = scratch("empty");
    assert!(load_err(&empty).contains("config.json"));

    let not_gguf = scratch("not-gguf").join("model.gguf");
    std::fs::write(&not_gguf, b"hello, this is not a model").unwrap();
    assert!(load_err(&not_gguf).contains("GGUF"));

    // A safetensors file cut in half.
    let truncated = scratch("truncated-hf");
    copy_dir(&fixtures().join("tiny-llama"), &truncated);
    let weights = truncated.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let reason = load_err_naming(&truncated, &weights);
    assert!(reason.contains("truncated"), "{reason}");

    // A GGUF file cut in half.
    let gguf = scratch("truncated-gguf").join("tiny.gguf");
    let bytes = std::fs::read(fixtures().join("tiny-llama.gguf")).unwrap();
    std::fs::write(&gguf, &bytes[..bytes.len() / 2]).unwrap();
    load_err(&gguf);

    // An architecture the engine does not run.
    let gpt2 = scratch("gpt2");
    copy_dir(&fixtures().join("tiny-llama"), &gpt2);
    let config = std::fs::read_to_string(gpt2.join("config.json")).unwrap();
    std::fs::write(
        gpt2.join("config.json"),
        config.replace("\"llama\"", "\"gpt2\""),
    )
    .unwrap();
    let reason = load_err_naming(&gpt2, &gpt2.join("config.json"));
    assert!(reason.contains("unsupported architecture"), "{reason}");
}

#[test]
fn gguf_and_hf_give_the_same_text() {
    let hf = tiny_llama();
    let gguf = common::load(
        &fixtures().join("tiny-llama.gguf"),
        rbee_engine::WeightFormat::F32,
    );
    assert_eq!(gguf.info().format, "gguf");
    assert!(gguf.info().eos_tokens.contains(&"<|im_end|>".to_string()));
    let prompt = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(hf.tokenize(prompt).unwrap(), gguf.tokenize(prompt).unwrap());
    let a = collect(&hf, prompt, &greedy(20)).0;
    let b = collect(&gguf, prompt, &greedy(20)).0;
    assert_eq!(a, b);
}
