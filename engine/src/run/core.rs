//! What every generation shares — the model and what turns text into its input — and the
//! checks and one-off passes that need nothing else (tokenizing, a prompt's ids, logits).

use std::sync::OnceLock;

use tokenizers::Tokenizer;

use super::constraint::Vocabulary;
use super::prompt::{Prompt, PromptEncoder};
use super::stats::Counters;
use crate::EngineError;
use crate::model::Model;

/// What every generation shares: the model and what turns text into its input and back.
pub(crate) struct Core {
    pub model: Model,
    pub prompts: PromptEncoder,
    pub eos_ids: Vec<u32>,
    pub context_length: usize,
    pub vocab_size: usize,
    pub stats: Counters,
    /// Each token's bytes, and the grammars of constrained generations over them.
    pub vocabulary: Vocabulary,
    /// Bytes of text one token stands for, at most; found on first use.
    max_token_bytes: OnceLock<usize>,
}

impl Core {
    pub fn new(
        model: Model,
        tokenizer: Tokenizer,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
        context_length: usize,
        vocab_size: usize,
    ) -> Result<Self, EngineError> {
        Ok(Self {
            model,
            vocabulary: Vocabulary::new(tokenizer.clone(), eos_ids.clone(), vocab_size),
            prompts: PromptEncoder::new(tokenizer, bos_id)?,
            eos_ids,
            context_length,
            vocab_size,
            stats: Counters::default(),
            max_token_bytes: OnceLock::new(),
        })
    }

    /// A forward pass over one token, at load: `ready` then means the model answers. A
    /// device that cannot run the model's kernels (a number type its shader compiler lacks,
    /// a driver fault) fails the start here, with the reason, rather than every request
    /// later with an empty answer: its kernels panic (caught) or leave the logits unwritten
    /// (all one value) or not numbers.
    pub fn probe(&self, token: u32) -> Result<(), EngineError> {
        let failed = |why: String| {
            EngineError::Model(format!(
                "the model did not answer a probe forward pass on its device: {why}"
            ))
        };
        let logits =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.model.logits(&[token])))
                .map_err(|panic| failed(panic_message(&panic)))??;
        check_logits(&logits).map_err(|e| failed(e.to_string()))?;
        if logits.windows(2).all(|pair| pair[0] == pair[1]) {
            return Err(failed(format!(
                "every one of its {} logits is {}",
                logits.len(),
                logits.first().copied().unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Token ids of `text`, without special tokens.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.check_text_size(text.len())?;
        self.prompts.encode_text(text, false)
    }

    /// The ids a generation of `prompt` starts from.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        self.check_text_size(prompt.len())?;
        self.prompts.encode(prompt)
    }

    /// The logits of one forward pass over `ids`, in a KV of its own.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        if ids.is_empty() {
            return Err(EngineError::InvalidInput("no tokens".into()));
        }
        self.check_ids(ids)?;
        if ids.len() > self.context_length {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: ids.len() as u32,
                max_tokens: 0,
                context_length: self.context_length as u32,
            });
        }
        self.model.logits(ids)
    }

    /// The longest text, in bytes, whose tokens could fit in the context. A token stands for
    /// at most as many bytes as its vocabulary entry holds (byte-level BPE spells a byte as
    /// one or two; SentencePiece a space as three, a fallback byte as six), so more text than
    /// the context's worth of the longest entry is more tokens than the context holds. This
    /// assumes normalization does not shrink text, as for the byte-level and SentencePiece
    /// tokenizers of LLMs.
    pub fn max_prompt_bytes(&self) -> usize {
        let token_bytes = *self.max_token_bytes.get_or_init(|| {
            let vocabulary = self.prompts.tokenizer().get_vocab(true);
            vocabulary.keys().map(String::len).max().unwrap_or(1).max(1)
        });
        self.context_length.saturating_mul(token_bytes)
    }

    fn check_text_size(&self, bytes: usize) -> Result<(), EngineError> {
        let most = self.max_prompt_bytes();
        if bytes > most {
            return Err(EngineError::InvalidInput(format!(
                "the text is {bytes} bytes, more than can ever fit in the model's context of \
                 {} tokens (at most {most} bytes)",
                self.context_length
            )));
        }
        Ok(())
    }

    /// An error naming the first of `ids` outside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), EngineError> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(id) => Err(EngineError::InvalidInput(format!(
                "token id {id} is outside the model's vocabulary ({})",
                self.vocab_size
            ))),
            None => Ok(()),
        }
    }
}

/// Logits that no model computes: a NaN comes from a device or kernel fault, never from the
/// weights of a model that loaded (`-inf` is a masked token, and stays allowed).
pub(crate) fn check_logits(logits: &[f32]) -> Result<(), EngineError> {
    match logits.iter().position(|x| x.is_nan()) {
        None => Ok(()),
        Some(token) => Err(EngineError::Model(format!(
            "the forward pass gave NaN logits (token {token} first): a device or kernel fault"
        ))),
    }
}

/// What a caught panic says.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
