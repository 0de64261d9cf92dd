//! Constrained decoding: the output held to a shape (a JSON schema, a regex, a Lark grammar,
//! a list of choices) by masking, before each token is chosen, every token that would leave
//! it. llguidance does the per-token work (an Earley parser over a lexer of derivatives,
//! walking a trie of the vocabulary's bytes), so a mask costs tens of microseconds, not a
//! pass over the whole vocabulary per grammar state.
//!
//! The vocabulary is read once, on the first generation that needs it (its trie takes a few
//! tens of milliseconds to build); it also gives each token's bytes to log-probabilities.
//!
//! A compiled shape is kept for the next request that asks for the same one: agents send the
//! same schema or tool list with every call. Its clones share its lexer, whose automaton
//! llguidance builds lazily as masks visit new states, so a later request's masks find most
//! of their states built (and it skips the compilation, milliseconds for a schema).

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock, PoisonError};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use tokenizers::Tokenizer;
use toktrie_hf_tokenizers::ByteTokenizer;

use super::stats::MaskTimings;
use crate::{Constraint, EngineError};

/// How many compiled shapes are kept, the most recently asked for: a worker's clients use a
/// few schemas over and over, and each kept one holds its lexer's automaton (some MB at most).
const SHAPES_KEPT: usize = 16;
/// How many requests start from one kept shape before it is compiled afresh. Its lexer holds
/// the union of the states its requests' masks visited, and llguidance fails a mask once a
/// lexer holds `max_lexer_states` (250,000): for the usual schema the union stops growing
/// long before, but a shape whose states keep growing must not end up failing every request.
const SHAPE_USES: u32 = 64;

/// A compiled shape in its start state, and how many requests started from it.
struct KeptShape {
    constraint: Constraint,
    start: Matcher,
    uses: u32,
}

/// The model's vocabulary in byte form, and the grammar compiler built on it.
pub(crate) struct Vocabulary {
    tokenizer: Tokenizer,
    eos_ids: Vec<u32>,
    vocab_size: usize,
    compiler: OnceLock<Result<ParserFactory, String>>,
    /// Compiled shapes in their start state, the most recently used first.
    shapes: Mutex<VecDeque<KeptShape>>,
}

impl Vocabulary {
    pub fn new(tokenizer: Tokenizer, eos_ids: Vec<u32>, vocab_size: usize) -> Self {
        Self {
            tokenizer,
            eos_ids,
            vocab_size,
            compiler: OnceLock::new(),
            shapes: Mutex::new(VecDeque::new()),
        }
    }

    /// The grammar compiler, built on first use.
    fn compiler(&self) -> Result<&ParserFactory, EngineError> {
        self.compiler
            .get_or_init(|| self.build().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|why| {
                EngineError::Model(format!(
                    "this model's tokenizer cannot be read for constrained decoding: {why}"
                ))
            })
    }

    fn build(&self) -> anyhow::Result<ParserFactory> {
        // Read from its JSON: `toktrie_hf_tokenizers` links an older `tokenizers` than ours.
        let json = self
            .tokenizer
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut tokenizer = ByteTokenizer::from_json_bytes(json.as_bytes())?;
        // Generation ends at the model's own end tokens (an instruct model's `<|im_end|>`,
        // not only the tokenizer's `<|endoftext|>`): a finished shape allows exactly those.
        if !self.eos_ids.is_empty() {
            tokenizer.set_eos_tokens(&self.eos_ids);
        }
        let env: TokEnv = tokenizer.into_tok_env(Some(self.vocab_size))?;
        let mut compiler = ParserFactory::new_simple(&env)?;
        // Its own logging goes nowhere: a grammar's errors come back as values.
        compiler.quiet();
        Ok(compiler)
    }

    /// `token`'s bytes as the model writes them (a special token's name).
    pub fn token_bytes(&self, token: u32) -> Result<Vec<u8>, EngineError> {
        Ok(self
            .compiler()?
            .tok_env()
            .tok_trie()
            .decode_ext(&[token], true))
    }

    /// Compiles `constraint` into the state that follows one generation, or starts from the
    /// compiled shape kept from an earlier request. An invalid schema, regex or grammar is the
    /// caller's error, with llguidance's reason.
    pub fn compile(&self, constraint: &Constraint) -> Result<Constrained, EngineError> {
        let matcher = match self.kept(constraint) {
            Some(matcher) => matcher,
            None => {
                let matcher = self.compile_new(constraint)?;
                let mut shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
                shapes.push_front(KeptShape {
                    constraint: constraint.clone(),
                    start: matcher.clone(),
                    uses: 1,
                });
                shapes.truncate(SHAPES_KEPT);
                matcher
            }
        };
        Ok(Constrained {
            matcher,
            ready: VecDeque::new(),
            ahead: VecDeque::new(),
        })
    }

    /// A start of the kept shape of `constraint` (sharing its lexer), moved to the front; none
    /// when it is not kept, or has been used `SHAPE_USES` times (it is then dropped, for the
    /// caller to compile afresh).
    fn kept(&self, constraint: &Constraint) -> Option<Matcher> {
        let mut shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        let at = shapes
            .iter()
            .position(|kept| kept.constraint == *constraint)?;
        let mut shape = shapes.remove(at)?;
        if shape.uses >= SHAPE_USES {
            return None;
        }
        shape.uses += 1;
        let matcher = shape.start.clone();
        shapes.push_front(shape);
        Some(matcher)
    }

    fn compile_new(&self, constraint: &Constraint) -> Result<Matcher, EngineError> {
        let invalid = |what: &str, why: String| {
            EngineError::InvalidInput(format!("invalid {what} constraint: {why}"))
        };
        let (what, grammar) = match constraint {
            Constraint::JsonSchema(schema) => {
                let schema: Value = serde_json::from_str(schema)
                    .map_err(|e| invalid("JSON schema", format!("not JSON: {e}")))?;
                (
                    "JSON schema",
                    TopLevelGrammar::from_json_schema(compact(schema)),
                )
            }
            Constraint::Regex(regex) => ("regex", TopLevelGrammar::from_regex(regex)),
            Constraint::Grammar(lark) => ("grammar", TopLevelGrammar::from_lark(lark.clone())),
            Constraint::Choice(choices) => {
                let alternatives: Vec<String> =
                    choices.iter().map(|c| regex_syntax::escape(c)).collect();
                let regex = format!("({})", alternatives.join("|"));
                ("choice", TopLevelGrammar::from_regex(&regex))
            }
        };
        let parser = self
            .compiler()?
            .create_parser(grammar)
            .map_err(|e| invalid(what, format!("{e:#}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(invalid(what, error));
        }
        Ok(matcher)
    }
}

/// JSON as models write it best: no whitespace between tokens. llguidance allows any amount
/// by default, and a small model given that freedom can spend its whole budget on spaces.
/// A schema that sets its own `x-guidance` options keeps them.
fn compact(mut schema: Value) -> Value {
    if let Value::Object(fields) = &mut schema {
        fields
            .entry("x-guidance")
            .or_insert_with(|| serde_json::json!({ "whitespace_flexible": false }));
    }
    schema
}

/// One generation's place in its shape.
pub(crate) struct Constrained {
    matcher: Matcher,
    /// Masks computed ahead (`prepare`) while the forward pass runs: the next token's, then,
    /// for a draft, the one after each drafted token in turn.
    ready: VecDeque<SimpleVob>,
    /// The drafted tokens the masks after the first assume, in order.
    ahead: VecDeque<u32>,
}

/// What a constraint allows next.
pub(crate) enum Allowed {
    /// Exactly this token: taken without sampling.
    Only(u32),
    /// These tokens (the others' logits are now `-inf`).
    Some,
}

impl Constrained {
    /// Computes the next token's mask ahead of `mask`, which then only applies it, and, for
    /// a `draft` the step verifies, the mask after each of its tokens (on a copy of the
    /// shape moved along the draft; a token the shape refuses ends it): called beside the
    /// forward pass that computes the logits, so verifying a draft computes no mask after
    /// it. A failure is left for `mask` to report.
    pub fn prepare(&mut self, draft: &[u32], timings: &MaskTimings) {
        if self.ready.is_empty() {
            match compute(&mut self.matcher, timings) {
                Ok(mask) => self.ready.push_back(mask),
                Err(_) => return,
            }
        }
        if draft.is_empty() || self.ready.len() > 1 {
            return;
        }
        let mut along = self.matcher.clone();
        for &token in draft {
            if along.consume_token(token).is_err() {
                break;
            }
            match compute(&mut along, timings) {
                Ok(mask) => self.ready.push_back(mask),
                Err(_) => break,
            }
            self.ahead.push_back(token);
        }
    }

    /// Masks the logits of every token the shape forbids now. Once the shape is complete
    /// only the end tokens are allowed.
    pub fn mask(
        &mut self,
        logits: &mut [f32],
        timings: &MaskTimings,
    ) -> Result<Allowed, EngineError> {
        let allowed = match self.ready.pop_front() {
            Some(allowed) => allowed,
            None => compute(&mut self.matcher, timings)?,
        };
        // One bit per token, 32 to a word; most words of a mask are all one way. Logits past
        // the mask (a model's vocabulary padded past its tokenizer's) are never allowed.
        let words = allowed.as_slice();
        let (masked, past) = logits.split_at_mut((words.len() * 32).min(logits.len()));
        for (logits, &word) in masked.chunks_mut(32).zip(words) {
            if word == u32::MAX {
                continue;
            }
            for (bit, logit) in logits.iter_mut().enumerate() {
                if word >> bit & 1 == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        past.fill(f32::NEG_INFINITY);
        match allowed.num_set() {
            0 => Err(failed("no token can continue the output".into())),
            1 => Ok(Allowed::Only(
                allowed.first_bit_set().expect("one bit is set") as u32,
            )),
            _ => Ok(Allowed::Some),
        }
    }

    /// The tokens the shape forces next, whatever the model would prefer (a JSON object's
    /// fixed keys, a grammar's literals), in the tokenizer's own spelling; empty when the
    /// next token is free. The model verifies them as a draft, so an answer is the one it
    /// would have chosen token by token.
    pub fn forced(&mut self) -> Vec<u32> {
        self.matcher.compute_ff_tokens()
    }

    /// Moves past `token`, which the last mask allowed.
    pub fn consume(&mut self, token: u32) -> Result<(), EngineError> {
        // The masks prepared after a drafted token hold only if that token is taken.
        if self.ahead.pop_front() != Some(token) {
            self.ready.clear();
            self.ahead.clear();
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| failed(format!("{e:#}")))
    }
}

/// The mask of `matcher`'s next token, timed.
fn compute(matcher: &mut Matcher, timings: &MaskTimings) -> Result<SimpleVob, EngineError> {
    let started = std::time::Instant::now();
    let mask = matcher
        .compute_mask_or_eos()
        .map_err(|e| failed(format!("{e:#}")));
    timings.record(started.elapsed());
    mask
}

fn failed(why: String) -> EngineError {
    EngineError::Model(format!("constrained decoding failed: {why}"))
}
