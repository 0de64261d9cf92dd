//! What a generation asks for ([`SamplingParams`], checked against [`limits`]; the output's
//! shape as a [`Constraint`]) and what it gets back ([`Completion`], ended for a
//! [`FinishReason`]; each token's [`TokenLogprob`] when asked).

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
    /// What the output must match: tokens that would leave it are never chosen.
    pub constraint: Option<Constraint>,
    /// Added to the logits of these token ids before anything else sees them (OpenAI's
    /// `logit_bias`: -100 bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each generated token's log-probability and this many most likely
    /// alternatives (0: the chosen token's only). `None`: no log-probabilities.
    pub logprobs: Option<u32>,
}

/// A shape the generated text must have, in one of llguidance's grammar languages. A
/// generation that reaches the end of the shape ends (`eos`); one that runs out of
/// `max_tokens` first ends with `length` and a prefix of a valid text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// A JSON Schema (draft 2020-12, as JSON text): the output is one JSON value valid under it.
    JsonSchema(String),
    /// A regular expression the whole output matches.
    Regex(String),
    /// A grammar in llguidance's Lark syntax.
    Grammar(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

/// One generated token's log-probability under the distribution it was drawn from (the
/// model's, after `logit_bias` and the constraint; before temperature and repeat penalty),
/// and the most likely tokens there.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: TokenText,
    pub logprob: f32,
    /// Most likely first, as many as asked (`SamplingParams::logprobs`).
    pub top: Vec<(TokenText, f32)>,
}

/// A token as a client sees it: its id and its bytes (a token may hold part of a
/// multi-byte character, so its text alone cannot say what it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenText {
    pub id: u32,
    pub bytes: Vec<u8>,
}

impl TokenText {
    /// Its text, with bytes that are part of a character shown as U+FFFD.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// A piece of the text as it is streamed: whole UTF-8, with the log-probabilities of the
/// tokens that produced it when they were asked for.
#[derive(Debug, Clone, Default)]
pub struct Piece {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
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
            constraint: None,
            logit_bias: Vec::new(),
            logprobs: None,
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
    /// Alternatives reported per token (OpenAI's `top_logprobs` maximum).
    pub const MAX_TOP_LOGPROBS: u32 = 20;
    /// Tokens with a logit bias per generation.
    pub const MAX_LOGIT_BIAS: usize = 1024;
    /// The range of one logit bias (OpenAI's).
    pub const LOGIT_BIAS_RANGE: std::ops::RangeInclusive<f32> = -100.0..=100.0;
    /// Strings in a `Constraint::Choice`.
    pub const MAX_CHOICES: usize = 1024;
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
        if let Some(top) = self.logprobs
            && top > limits::MAX_TOP_LOGPROBS
        {
            return invalid(format!(
                "top_logprobs must be at most {}, got {top}",
                limits::MAX_TOP_LOGPROBS
            ));
        }
        if self.logit_bias.len() > limits::MAX_LOGIT_BIAS {
            return invalid(format!(
                "logit_bias holds at most {} tokens, got {}",
                limits::MAX_LOGIT_BIAS,
                self.logit_bias.len()
            ));
        }
        if let Some((token, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, bias)| !limits::LOGIT_BIAS_RANGE.contains(bias))
        {
            return invalid(format!(
                "logit_bias for token {token} must be in -100..=100, got {bias}"
            ));
        }
        if let Some(Constraint::Choice(choices)) = &self.constraint
            && (choices.is_empty() || choices.len() > limits::MAX_CHOICES)
        {
            return invalid(format!(
                "a choice constraint needs 1..={} strings, got {}",
                limits::MAX_CHOICES,
                choices.len()
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
    /// Each generated token's, in order, when they were asked for (`SamplingParams::logprobs`).
    pub logprobs: Vec<TokenLogprob>,
    pub prefill: Duration,
    pub decode: Duration,
}
