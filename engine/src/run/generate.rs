//! A generation from its caller's side: the checks before it joins the scheduler's queue,
//! and the reader of what the scheduler reports, which stops the generation when the caller
//! stops reading or goes away.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use super::core::Core;
use super::scheduler::{BatchLimits, Event, Scheduler, Submission};
use super::stop::{Cancelled, StopSignals};
use crate::kv::blocks_for;
use crate::{Completion, EngineError, FinishReason, Piece, SamplingParams};

/// Checks a generation of `prompt` (ids) and hands it to the scheduler.
pub(crate) fn start_generation(
    core: &Core,
    scheduler: &Scheduler,
    limits: BatchLimits,
    prompt: Vec<u32>,
    params: &SamplingParams,
    cancelled: Option<Cancelled>,
) -> Result<EventReader, EngineError> {
    params.validate()?;
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
    // A sequence can grow to its whole context alone (others are preempted for it), but not
    // past the pool.
    if blocks_for(needed) > limits.kv_blocks {
        return Err(EngineError::InvalidInput(format!(
            "prompt ({} tokens) plus max_tokens ({}) needs {needed} KV-cache positions; \
             this worker's KV pool holds {} (--kv-budget-tokens)",
            prompt.len(),
            params.max_tokens,
            limits.kv_positions()
        )));
    }
    if let Some((token, _)) = params
        .logit_bias
        .iter()
        .find(|(token, _)| *token as usize >= core.vocab_size)
    {
        return Err(EngineError::InvalidInput(format!(
            "logit_bias names token {token}, outside the vocabulary (0..{})",
            core.vocab_size
        )));
    }
    // Compiled here, on the caller's thread: a large schema never holds up the batch, and
    // an invalid one is refused before the generation is queued.
    let constraint = params
        .constraint
        .as_ref()
        .map(|constraint| core.vocabulary.compile(constraint))
        .transpose()?;
    if constraint.is_some() {
        core.stats.constrained();
    }
    let (events, receiver) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    scheduler.submit(Submission {
        prompt,
        params: params.clone(),
        constraint,
        events,
        stop_signals: StopSignals {
            stop: stop.clone(),
            cancelled,
        },
    })?;
    Ok(EventReader {
        events: receiver,
        stop,
        done: false,
    })
}

/// The caller's end of a generation running in the scheduler: its events, read in order.
/// Dropping it before the end cancels the generation and waits until it has left the batch,
/// so whoever holds a place for it releases the place only once the work has stopped.
pub(crate) struct EventReader {
    events: mpsc::Receiver<Event>,
    stop: Arc<AtomicBool>,
    done: bool,
}

impl EventReader {
    /// Hands each piece of text to `on_piece` until the generation ends; `Break` cancels it.
    pub fn follow(
        mut self,
        on_piece: &mut dyn FnMut(&Piece) -> ControlFlow<()>,
    ) -> Result<(Completion, Vec<u32>), EngineError> {
        loop {
            match self.events.recv() {
                Ok(Event::Text(piece)) => {
                    if !self.stop.load(Ordering::Acquire) && on_piece(&piece).is_break() {
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

impl Drop for EventReader {
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
