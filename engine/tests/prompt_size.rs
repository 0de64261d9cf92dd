//! Text too long to ever fit in the context is refused before it is tokenized, so a caller
//! that sends megabytes costs what the context can hold, not what it sent.

mod common;

use std::time::{Duration, Instant};

use common::{greedy, tiny_llama};
use rbee_engine::{EngineError, Prompt, PromptPart};

#[test]
fn the_bound_is_the_context_times_the_longest_token() {
    let engine = tiny_llama();
    // tiny-llama: a 256-token context, and its longest vocabulary entry is 13 bytes.
    assert_eq!(engine.max_prompt_bytes(), 256 * 13);
}

#[test]
fn text_beyond_the_bound_is_refused_at_once() {
    let engine = tiny_llama();
    let huge = "word ".repeat(10 << 20);
    let started = Instant::now();
    let refused = engine.tokenize(&huge).unwrap_err();
    assert!(
        matches!(&refused, EngineError::InvalidInput(message) if message.contains("can ever fit")),
        "{refused}"
    );
    let prompt = Prompt::Parts(vec![PromptPart::Text(huge.clone())]);
    assert!(matches!(
        engine.encode_prompt(&prompt),
        Err(EngineError::InvalidInput(_))
    ));
    assert!(matches!(
        engine.generate(huge.as_str(), &greedy(1), &mut |_| {
            std::ops::ControlFlow::Continue(())
        }),
        Err(EngineError::InvalidInput(_))
    ));
    // Tokenizing 50 MiB takes tens of seconds; refusing it takes no time.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn text_within_the_bound_is_tokenized_as_before() {
    let engine = tiny_llama();
    let most = engine.max_prompt_bytes();
    // The longest text allowed is tokenized (and is far more tokens than the context holds,
    // which the generation's own check reports).
    let ids = engine.tokenize(&"a".repeat(most)).unwrap();
    assert!(!ids.is_empty());
    assert!(matches!(
        engine.tokenize(&"a".repeat(most + 1)),
        Err(EngineError::InvalidInput(_))
    ));
}
