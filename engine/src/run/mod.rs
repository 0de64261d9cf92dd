//! Running the model: checking and tokenizing requests, the scheduler that puts every
//! running generation into each forward pass (`scheduler`), choosing tokens (`sampling`)
//! and streaming text (`text`).

mod prompt;
mod sampling;
mod scheduler;
mod text;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use crate::model::Model;
use crate::{Completion, Engine, EngineError, FinishReason, SamplingParams};
pub(crate) use prompt::PromptEncoder;
pub use prompt::{Prompt, PromptPart};
pub use scheduler::BatchStats;
pub(crate) use scheduler::{Cancellation, Counters, Limits, Scheduler};
use scheduler::{Event, Submission};

/// A caller's own reason to stop a generation (its client left, the worker is shutting
/// down), checked at every step, prompt chunks included.
pub type Cancelled = Arc<dyn Fn() -> bool + Send + Sync>;

/// What every generation shares: the model and what turns text into its input and back.
pub(crate) struct Core {
    pub model: Model,
    pub prompts: PromptEncoder,
    pub eos_ids: Vec<u32>,
    pub context_length: usize,
    pub vocab_size: usize,
    pub stats: Counters,
    /// Bytes of text one token stands for, at most; found on first use.
    pub max_token_bytes: OnceLock<usize>,
}

impl Engine {
    /// What the scheduler has done so far.
    pub fn batch_stats(&self) -> BatchStats {
        self.core.stats.snapshot()
    }

    /// Token ids of `text`, without special tokens.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.core.check_text_size(text.len())?;
        self.core.prompts.encode_text(text, false)
    }

    /// The longest text, in bytes, whose tokens could fit in the context: longer text is
    /// refused before tokenizing, so its cost is bounded by the context, not by the caller.
    pub fn max_prompt_bytes(&self) -> usize {
        self.core.max_prompt_bytes()
    }

    /// The ids a generation of `prompt` starts from, the beginning-of-sequence token
    /// included where the model expects one.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        self.core.check_text_size(prompt.len())?;
        self.core.prompts.encode(prompt)
    }

    /// The logits (`[ids.len(), vocab_size]`, row-major) of one forward pass over `ids`.
    /// For verification against a reference implementation.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        let core = &self.core;
        if ids.is_empty() {
            return Err(EngineError::InvalidInput("no tokens".into()));
        }
        core.check_ids(ids)?;
        if ids.len() > core.context_length {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: ids.len() as u32,
                max_tokens: 0,
                context_length: core.context_length as u32,
            });
        }
        let mut cache = core.model.new_cache(ids.len());
        core.model.forward(ids, &mut cache, false)
    }

    /// Generates a completion of `prompt`. `on_text` receives each piece of text as it is
    /// produced (whole UTF-8, stop strings withheld); returning `Break` cancels the generation
    /// (finish reason `Cancelled`). Blocking: call it from a blocking thread. The generation
    /// runs in the shared batch with every other one.
    pub fn generate(
        &self,
        prompt: impl Into<Prompt>,
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, EngineError> {
        self.generate_cancellable(prompt, params, None, on_text)
    }

    /// [`Engine::generate`], also stopped at the next step once `cancelled` says so — even
    /// while the prompt is still being read, when no text is produced to refuse.
    pub fn generate_cancellable(
        &self,
        prompt: impl Into<Prompt>,
        params: &SamplingParams,
        cancelled: Option<Cancelled>,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, EngineError> {
        let prompt_ids = self.encode_prompt(&prompt.into())?;
        let generation = self.start(prompt_ids, params, cancelled)?;
        Ok(generation.follow(on_text)?.0)
    }

    /// Like [`Engine::generate`] from token ids (no bos added), also returning the generated
    /// ids. For verification against a reference implementation.
    pub fn generate_ids(
        &self,
        prompt_ids: &[u32],
        params: &SamplingParams,
    ) -> Result<(Completion, Vec<u32>), EngineError> {
        self.start(prompt_ids.to_vec(), params, None)?
            .follow(&mut |_| ControlFlow::Continue(()))
    }

    /// Checks a generation and hands it to the scheduler.
    fn start(
        &self,
        prompt: Vec<u32>,
        params: &SamplingParams,
        cancelled: Option<Cancelled>,
    ) -> Result<Generation, EngineError> {
        params.validate()?;
        let core = &self.core;
        if prompt.is_empty() {
            return Err(EngineError::InvalidInput(
                "the prompt is empty (no tokens to condition on)".into(),
            ));
        }
        core.check_ids(&prompt)?;
        let needed = prompt.len() + params.max_tokens as usize;
        if needed > core.context_length {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: prompt.len() as u32,
                max_tokens: params.max_tokens,
                context_length: core.context_length as u32,
            });
        }
        if needed > self.limits.kv_budget {
            return Err(EngineError::InvalidInput(format!(
                "prompt ({} tokens) plus max_tokens ({}) needs {needed} KV-cache positions; \
                 this worker's budget is {}",
                prompt.len(),
                params.max_tokens,
                self.limits.kv_budget
            )));
        }
        let (events, receiver) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        self.scheduler.submit(Submission {
            prompt,
            params: params.clone(),
            events,
            cancellation: Cancellation {
                stop: stop.clone(),
                cancelled,
            },
        })?;
        Ok(Generation {
            events: receiver,
            stop,
            done: false,
        })
    }
}

/// A generation running in the scheduler, read from its events. Dropping it before the end
/// cancels the generation and waits until it has left the batch, so whoever holds a place
/// for it releases the place only once the work has stopped.
struct Generation {
    events: mpsc::Receiver<Event>,
    stop: Arc<AtomicBool>,
    done: bool,
}

impl Generation {
    /// Hands each piece of text to `on_text` until the generation ends; `Break` cancels it.
    fn follow(
        mut self,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(Completion, Vec<u32>), EngineError> {
        loop {
            match self.events.recv() {
                Ok(Event::Text(text)) => {
                    if !self.stop.load(Ordering::Acquire) && on_text(&text).is_break() {
                        self.stop.store(true, Ordering::Release);
                    }
                }
                Ok(Event::Done(result)) => {
                    self.done = true;
                    return result.map(|(mut completion, ids)| {
                        if self.stop.load(Ordering::Acquire) {
                            completion.finish_reason = FinishReason::Cancelled;
                        }
                        (completion, ids)
                    });
                }
                Err(_) => {
                    self.done = true;
                    return Err(EngineError::Model("the scheduler stopped".into()));
                }
            }
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            self.stop.store(true, Ordering::Release);
            while let Ok(event) = self.events.recv() {
                if matches!(event, Event::Done(_)) {
                    break;
                }
            }
        }
    }
}

impl Core {
    /// [`Engine::max_prompt_bytes`]. A token stands for at most as many bytes as its
    /// vocabulary entry holds (byte-level BPE spells a byte as one or two; SentencePiece a
    /// space as three, a fallback byte as six), so more text than the context's worth of the
    /// longest entry is more tokens than the context holds. This assumes normalization does
    /// not shrink text, as for the byte-level and SentencePiece tokenizers of LLMs.
    fn max_prompt_bytes(&self) -> usize {
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

    fn check_ids(&self, ids: &[u32]) -> Result<(), EngineError> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(id) => Err(EngineError::InvalidInput(format!(
                "token id {id} is outside the model's vocabulary ({})",
                self.vocab_size
            ))),
            None => Ok(()),
        }
    }
}
