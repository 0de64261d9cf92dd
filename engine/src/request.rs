//! What a generation asks for ([`SamplingParams`], checked against [`limits`]) and what it
//! gets back ([`Completion`], ended for a [`FinishReason`]).

use std::time::Duration;

use crate::EngineError;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 1.0 = off.
    pub top_p: f32,
    /// 1.0 = off.
    pub repeat_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens, every other setting off: what
    /// verification and benchmarks compare.
    pub fn greedy(max_tokens: u32) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
        }
    }
}

/// What the engine can run: the limits its one check, [`SamplingParams::validate`], holds a
/// request to. Ranges of a wire format (an HTTP API's `max_tokens` cap) belong to that API.
pub mod limits {
    /// Stop strings per generation: each is searched for after every token.
    pub const MAX_STOP_SEQUENCES: usize = 16;
    /// Bytes per stop string.
    pub const MAX_STOP_BYTES: usize = 256;
}

impl SamplingParams {
    /// The engine's one check of what it can run (the prompt's fit in the context is checked
    /// where the prompt is tokenized). Every generation passes through it; callers that want
    /// to fail before starting a generation (a stream) may call it early.
    pub fn validate(&self) -> Result<(), EngineError> {
        use limits::{MAX_STOP_BYTES, MAX_STOP_SEQUENCES};
        let invalid = |message: String| Err(EngineError::InvalidInput(message));
        if self.max_tokens == 0 {
            return invalid("max_tokens must be at least 1".into());
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return invalid(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return invalid(format!(
                "repeat_penalty must be a finite number > 0, got {}",
                self.repeat_penalty
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return invalid(format!(
                "at most {MAX_STOP_SEQUENCES} stop sequences, got {}",
                self.stop.len()
            ));
        }
        if self
            .stop
            .iter()
            .any(|stop| stop.is_empty() || stop.len() > MAX_STOP_BYTES)
        {
            return invalid(format!(
                "stop sequences must be 1..={MAX_STOP_BYTES} bytes long"
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Length,
    Stop,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub finish_reason: FinishReason,
    pub prefill: Duration,
    pub decode: Duration,
}
