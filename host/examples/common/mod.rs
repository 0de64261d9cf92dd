//! What the guest benchmarks (`guest_bench`, `guest_overhead`) share: the prompt and a
//! greedy request for it, so both compare the same work.

use rbee_host::guest::InferRequest;

pub const PROMPT: &str = "The guest decides the prompt and the policy;";

/// A greedy request for [`PROMPT`] of `tokens` tokens, streamed or not.
pub fn greedy_request(tokens: u32, stream: bool) -> InferRequest {
    InferRequest {
        prompt: PROMPT.into(),
        max_tokens: Some(tokens),
        temperature: Some(0.0),
        top_k: None,
        top_p: Some(1.0),
        repeat_penalty: None,
        seed: None,
        stop: Vec::new(),
        stream,
    }
}
