//! Constrained decoding, logit bias and log-probabilities, on the random-weight tiny model:
//! the worst writer there is, so a valid output is the constraint's doing, never the model's.

mod common;

use std::ops::ControlFlow;

use common::{greedy, tiny_llama};
use rbee_engine::{Constraint, EngineError, FinishReason, Piece, SamplingParams};
use serde_json::Value;

const PROMPT: &str = "The quick brown fox";

fn sampled(seed: u64, max_tokens: u32, constraint: Constraint) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        constraint: Some(constraint),
        ..SamplingParams::greedy(max_tokens)
    }
}

/// A schema with what typed clients use: required fields, an enum, a bounded integer, a
/// pattern, an array with bounds on its length, a nested object, `anyOf`.
const SCHEMA: &str = r#"{
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "age": {"type": "integer", "minimum": 1, "maximum": 12},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"},
        "tags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}},
            "required": ["x"],
            "additionalProperties": false
        },
        "note": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0, "maximum": 9}]}
    },
    "required": ["name", "kind", "age", "code", "tags", "home", "note"],
    "additionalProperties": false
}"#;

/// Checks `value` against [`SCHEMA`] by hand, field by field.
fn check_schema(value: &Value) -> Result<(), String> {
    let object = value.as_object().ok_or("not an object")?;
    let mut keys: Vec<_> = object.keys().map(String::as_str).collect();
    keys.sort();
    if keys != ["age", "code", "home", "kind", "name", "note", "tags"] {
        return Err(format!("keys {keys:?}"));
    }
    let name = object["name"].as_str().ok_or("name")?;
    if name.chars().count() > 6 {
        return Err(format!("name {name:?} longer than 6"));
    }
    if !["cat", "dog", "fox"].contains(&object["kind"].as_str().ok_or("kind")?) {
        return Err("kind".into());
    }
    let age = object["age"].as_i64().ok_or("age not an integer")?;
    if !(1..=12).contains(&age) {
        return Err(format!("age {age}"));
    }
    let code = object["code"].as_str().ok_or("code")?.as_bytes();
    if !(code.len() == 3
        && code[..2].iter().all(u8::is_ascii_uppercase)
        && code[2].is_ascii_digit())
    {
        return Err("code".into());
    }
    let tags = object["tags"].as_array().ok_or("tags")?;
    if !(1..=3).contains(&tags.len()) || !tags.iter().all(Value::is_boolean) {
        return Err(format!("tags {tags:?}"));
    }
    let home = object["home"].as_object().ok_or("home")?;
    let x = home.get("x").and_then(Value::as_i64).ok_or("home.x")?;
    if home.len() != 1 || !(-5..=5).contains(&x) {
        return Err(format!("home {home:?}"));
    }
    match &object["note"] {
        Value::Null => {}
        note if note.as_i64().is_some_and(|n| (0..=9).contains(&n)) => {}
        note => return Err(format!("note {note}")),
    }
    Ok(())
}

#[test]
fn every_sampled_output_of_a_random_model_is_valid_under_a_json_schema() {
    let engine = tiny_llama();
    for seed in 0..8 {
        let params = sampled(seed, 240, Constraint::JsonSchema(SCHEMA.into()));
        let completion = engine
            .generate(PROMPT, &params, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(
            completion.finish_reason,
            FinishReason::Eos,
            "seed {seed}: {:?}",
            completion.text
        );
        let value: Value = serde_json::from_str(&completion.text)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}: {:?}", completion.text));
        check_schema(&value).unwrap_or_else(|e| panic!("seed {seed}: {e}: {}", completion.text));
    }
}

/// A schema asked for again starts from the shape kept from the first request, whose lexer
/// that request's masks have grown: the outputs are the ones a freshly compiled shape gives.
#[test]
fn a_kept_shape_constrains_as_a_freshly_compiled_one() {
    let generate = |engine: &rbee_engine::Engine, seed| {
        let params = sampled(seed, 240, Constraint::JsonSchema(SCHEMA.into()));
        engine
            .generate(PROMPT, &params, &mut |_| ControlFlow::Continue(()))
            .unwrap()
            .text
    };
    let engine = tiny_llama();
    let first = generate(&engine, 0);
    for seed in [0, 1, 2] {
        let kept = generate(&engine, seed);
        assert_eq!(kept, generate(&tiny_llama(), seed), "seed {seed}");
        if seed == 0 {
            assert_eq!(kept, first);
        }
    }
}

/// Jump-forward: the tokens a schema forces (its keys, its punctuation) go in as a draft the
/// model verifies, several per step. The outputs are the very ones decoded token by token,
/// sampled ones included (a forced token is never sampled); the counters show the drafts
/// were taken, so this cannot pass with jump-forward doing nothing.
#[test]
fn forced_tokens_skip_steps_and_change_no_output() {
    let load = |jump_forward| {
        rbee_engine::Engine::load(
            &common::fixtures().join("tiny-llama"),
            &rbee_engine::LoadOptions {
                device: rbee_engine::DeviceChoice::Cpu,
                // The CPU form, which verifies several rows in one step.
                weights: rbee_engine::WeightFormat::Auto,
                jump_forward,
                // Jump-forward alone: n-gram drafts would take steps off both.
                speculative: false,
                ..rbee_engine::LoadOptions::default()
            },
        )
        .unwrap()
    };
    let (jumping, stepping) = (load(true), load(false));
    for seed in 0..4 {
        let params = sampled(seed, 240, Constraint::JsonSchema(SCHEMA.into()));
        let generate = |engine: &rbee_engine::Engine| {
            engine
                .generate(PROMPT, &params, &mut |_| ControlFlow::Continue(()))
                .unwrap()
        };
        let (jumped, stepped) = (generate(&jumping), generate(&stepping));
        assert_eq!(jumped.text, stepped.text, "seed {seed}");
        assert_eq!(
            jumped.generated_tokens, stepped.generated_tokens,
            "seed {seed}"
        );
    }
    let (jumped, stepped) = (jumping.batch_stats(), stepping.batch_stats());
    assert!(
        jumped.forced_accepted > 0 && stepped.forced_tokens == 0,
        "{jumped:?}"
    );
    assert!(
        jumped.steps + jumped.forced_accepted <= stepped.steps,
        "{jumped:?} {stepped:?}"
    );
}

#[test]
fn a_regex_and_a_choice_hold_the_whole_output() {
    let engine = tiny_llama();
    let choices = vec!["yes".to_string(), "no".into(), "maybe (later)".into()];
    for seed in 0..6 {
        let params = sampled(seed, 40, Constraint::Regex("[0-9]{3}-[a-z]{2,4}".into()));
        let text = engine
            .generate(PROMPT, &params, &mut |_| ControlFlow::Continue(()))
            .unwrap()
            .text;
        let (digits, letters) = text.split_once('-').expect("a dash");
        assert!(
            digits.len() == 3 && digits.bytes().all(|b| b.is_ascii_digit()),
            "{text}"
        );
        assert!(
            (2..=4).contains(&letters.len()) && letters.bytes().all(|b| b.is_ascii_lowercase()),
            "{text}"
        );
        let params = sampled(seed, 40, Constraint::Choice(choices.clone()));
        let text = engine
            .generate(PROMPT, &params, &mut |_| ControlFlow::Continue(()))
            .unwrap()
            .text;
        assert!(choices.contains(&text), "{text:?}");
    }
}

#[test]
fn a_constraint_cut_short_by_max_tokens_ends_with_length_and_a_valid_prefix() {
    let engine = tiny_llama();
    let params = sampled(3, 5, Constraint::Regex("a{20}".into()));
    let completion = engine
        .generate(PROMPT, &params, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(completion.finish_reason, FinishReason::Length);
    assert!(
        completion.text.bytes().all(|b| b == b'a'),
        "{:?}",
        completion.text
    );
}

#[test]
fn an_invalid_schema_regex_or_grammar_is_refused_before_generating() {
    let engine = tiny_llama();
    for constraint in [
        Constraint::JsonSchema("{not json".into()),
        Constraint::JsonSchema(r#"{"type": "no-such-type"}"#.into()),
        Constraint::Regex("(unclosed".into()),
        Constraint::Grammar("start: undefined_rule".into()),
        Constraint::Choice(vec![]),
    ] {
        let params = sampled(0, 8, constraint.clone());
        match engine.generate(PROMPT, &params, &mut |_| ControlFlow::Continue(())) {
            Err(EngineError::InvalidInput(message)) => assert!(!message.is_empty()),
            other => panic!("{constraint:?}: {other:?}"),
        }
    }
}

#[test]
fn a_lark_grammar_holds_the_output() {
    let engine = tiny_llama();
    let grammar = r#"
        start: sum
        sum: num ("+" num)*
        num: /[1-9][0-9]?/
    "#;
    for seed in 0..4 {
        let params = sampled(seed, 30, Constraint::Grammar(grammar.into()));
        let completion = engine
            .generate(PROMPT, &params, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        let text = completion.text;
        assert!(!text.is_empty());
        for num in text.split('+') {
            let n: u32 = num
                .parse()
                .unwrap_or_else(|_| panic!("{num:?} in {text:?}"));
            assert!((1..=99).contains(&n) && !num.starts_with('0'), "{text:?}");
        }
    }
}

#[test]
fn greedy_logprobs_put_the_chosen_token_first_and_spell_the_text() {
    let engine = tiny_llama();
    let params = SamplingParams {
        logprobs: Some(5),
        ..greedy(24)
    };
    let mut streamed: Vec<Piece> = Vec::new();
    let completion = engine
        .generate_pieces(PROMPT, &params, None, &mut |piece| {
            streamed.push(piece.clone());
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(
        completion.logprobs.len(),
        completion.generated_tokens as usize
    );
    let bytes: Vec<u8> = completion
        .logprobs
        .iter()
        .flat_map(|l| l.token.bytes.clone())
        .collect();
    // A random model writes bytes that are not UTF-8: the text shows them as U+FFFD.
    assert_eq!(String::from_utf8_lossy(&bytes), completion.text);
    for logprob in &completion.logprobs {
        assert_eq!(logprob.top.len(), 5);
        assert_eq!(
            logprob.top[0].0, logprob.token,
            "greedy takes the most likely"
        );
        assert_eq!(logprob.top[0].1, logprob.logprob);
        assert!(logprob.top.windows(2).all(|w| w[0].1 >= w[1].1), "sorted");
        assert!(logprob.top.iter().all(|(_, l)| *l <= 0.0));
        let mass: f32 = logprob.top.iter().map(|(_, l)| l.exp()).sum();
        assert!(mass <= 1.0 + 1e-4, "{mass}");
    }
    // Streamed, each piece carries the tokens that made it: the same ones, in order.
    let streamed_logprobs: Vec<_> = streamed.iter().flat_map(|p| p.logprobs.clone()).collect();
    assert_eq!(streamed_logprobs, completion.logprobs);
    let streamed_text: String = streamed.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(streamed_text, completion.text);
}

#[test]
fn a_constrained_token_has_its_probability_among_the_allowed_tokens() {
    let engine = tiny_llama();
    let params = SamplingParams {
        logprobs: Some(3),
        constraint: Some(Constraint::Choice(vec!["ab".into(), "ac".into()])),
        ..greedy(8)
    };
    let completion = engine
        .generate(PROMPT, &params, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    // Whatever the model prefers, at most two tokens are possible at any step, and their
    // probabilities add up to one.
    for logprob in &completion.logprobs {
        assert!(logprob.top.len() <= 2, "{logprob:?}");
        let mass: f32 = logprob.top.iter().map(|(_, l)| l.exp()).sum();
        assert!((mass - 1.0).abs() < 1e-4, "{mass}");
    }
}

#[test]
fn a_logit_bias_bans_or_forces_tokens() {
    let engine = tiny_llama();
    let ids = engine.tokenize(PROMPT).unwrap();
    let (_, free) = engine.generate_ids(&ids, &greedy(6)).unwrap();
    let banned = SamplingParams {
        logit_bias: vec![(free[0], -100.0)],
        ..greedy(6)
    };
    let (_, without_first) = engine.generate_ids(&ids, &banned).unwrap();
    assert!(!without_first.contains(&free[0]), "{without_first:?}");
    let forced = SamplingParams {
        logit_bias: vec![(200, 100.0)],
        ..greedy(6)
    };
    let (_, all_forced) = engine.generate_ids(&ids, &forced).unwrap();
    assert_eq!(all_forced, vec![200; 6]);
    let outside = SamplingParams {
        logit_bias: vec![(1_000_000, 1.0)],
        ..greedy(6)
    };
    assert!(matches!(
        engine.generate_ids(&ids, &outside),
        Err(EngineError::InvalidInput(_))
    ));
}
