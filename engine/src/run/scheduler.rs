//! Continuous batching: one thread owns the stepping of every running sequence. Each step is
//! one forward pass over all of them — a decode row per sequence that is generating, plus a
//! prompt chunk of each that is still reading its prompt — so the weights are read once per
//! step, not once per sequence. Sequences join at any step boundary (when there is room in
//! the batch and in the KV budget) and leave at the one after they finish, are cancelled or
//! their client goes away; nobody waits for the batch to drain.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::core::Core;
use super::sampling::Sampler;
use super::stop::StopSignals;
use super::text::TextStream;
use crate::model::{BatchItem, Cache};
use crate::{Completion, EngineError, FinishReason, SamplingParams};

/// What a generation reports, in order: text as it becomes final, then one `Done`.
pub(crate) enum Event {
    Text(String),
    Done(Result<(Completion, Vec<u32>), EngineError>),
}

/// How many sequences run together, and how much KV cache they may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub max_batch: usize,
    /// Positions (prompt + max_tokens) of all running sequences together.
    pub kv_budget: usize,
    /// Prompt tokens a sequence feeds per step (where the model takes chunks): the other
    /// sequences wait at most one chunk per step. A sequence's chunks are the same alone or
    /// in a batch, so batching never changes its numbers.
    pub prompt_chunk: usize,
}

/// A generation asked for: everything the scheduler needs to run it.
pub(crate) struct Submission {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub events: Sender<Event>,
    pub stop_signals: StopSignals,
}

impl Submission {
    fn capacity(&self) -> usize {
        self.prompt.len() + self.params.max_tokens as usize
    }

    fn is_cancelled(&self) -> bool {
        self.stop_signals.is_set()
    }

    fn cancelled_before_start(self) {
        let completion = Completion {
            text: String::new(),
            prompt_tokens: self.prompt.len() as u32,
            generated_tokens: 0,
            finish_reason: FinishReason::Cancelled,
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
        };
        self.finish(Ok((completion, Vec::new())));
    }

    fn finish(self, result: Result<(Completion, Vec<u32>), EngineError>) {
        // The reader may be gone; then nobody needs the answer.
        let _ = self.events.send(Event::Done(result));
    }
}

/// The scheduler thread; dropping it lets the thread finish the work it has and exit.
pub(crate) struct Scheduler {
    submit: Option<Sender<Submission>>,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    pub fn start(core: Arc<Core>, limits: BatchLimits) -> std::io::Result<Self> {
        let (submit, submissions) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("rbee-scheduler".into())
            .spawn(move || run(&core, limits, submissions))?;
        Ok(Self {
            submit: Some(submit),
            thread: Some(thread),
        })
    }

    pub fn submit(&self, submission: Submission) -> Result<(), EngineError> {
        self.submit
            .as_ref()
            .and_then(|submit| submit.send(submission).ok())
            .ok_or_else(|| EngineError::Model("the scheduler has stopped".into()))
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.submit = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A sequence in the batch.
struct Sequence<'t> {
    request: Submission,
    /// Prompt positions already in the cache.
    prefilled: usize,
    /// The last sampled token, fed at the next step.
    next_input: Option<u32>,
    cache: Cache,
    sampler: Sampler,
    text: TextStream<'t>,
    /// Prompt and generated ids, for the repeat penalty.
    history: Vec<u32>,
    generated: u32,
    started: Instant,
    prefill: Option<Duration>,
}

impl Sequence<'_> {
    fn decoding(&self) -> bool {
        self.next_input.is_some()
    }

    /// Ends the sequence: flushes the text held back (for a natural end) and reports.
    fn finish(mut self, mut reason: FinishReason) {
        if matches!(reason, FinishReason::Eos | FinishReason::Length) {
            match self.text.finish() {
                Ok(rest) if !rest.is_empty() => {
                    if self.request.events.send(Event::Text(rest)).is_err() {
                        reason = FinishReason::Cancelled;
                    }
                }
                Ok(_) => {}
                Err(error) => return self.request.finish(Err(error)),
            }
        }
        let prefill = self.prefill.unwrap_or_else(|| self.started.elapsed());
        let prompt_tokens = self.request.prompt.len();
        let completion = Completion {
            text: self.text.text().to_string(),
            prompt_tokens: prompt_tokens as u32,
            generated_tokens: self.generated,
            finish_reason: reason,
            prefill,
            decode: self.started.elapsed().saturating_sub(prefill),
        };
        let ids = self.history.split_off(prompt_tokens);
        self.request.finish(Ok((completion, ids)));
    }

    /// Takes the logits of this step's last position: samples, streams, and tells whether
    /// the sequence has ended.
    fn advance(
        &mut self,
        logits: &mut [f32],
        eos_ids: &[u32],
    ) -> Result<Option<FinishReason>, EngineError> {
        let next = self.sampler.sample(logits, &self.history);
        if eos_ids.contains(&next) {
            return Ok(Some(FinishReason::Eos));
        }
        self.generated += 1;
        self.history.push(next);
        let step = self.text.push(next)?;
        if !step.emit.is_empty() && self.request.events.send(Event::Text(step.emit)).is_err() {
            return Ok(Some(FinishReason::Cancelled));
        }
        if step.stopped {
            return Ok(Some(FinishReason::Stop));
        }
        if self.generated >= self.request.params.max_tokens {
            return Ok(Some(FinishReason::Length));
        }
        self.next_input = Some(next);
        Ok(None)
    }
}

fn run(core: &Core, limits: BatchLimits, submissions: Receiver<Submission>) {
    let mut waiting: VecDeque<Submission> = VecDeque::new();
    let mut running: Vec<Sequence<'_>> = Vec::new();
    loop {
        // Idle: sleep until work arrives (or every sender is gone: exit).
        if running.is_empty() && waiting.is_empty() {
            match submissions.recv() {
                Ok(submission) => waiting.push_back(submission),
                Err(_) => return,
            }
        }
        waiting.extend(submissions.try_iter());

        // Leave at the step boundary: cancelled ones, waiting or running.
        for request in std::mem::take(&mut waiting) {
            if request.is_cancelled() {
                request.cancelled_before_start();
            } else {
                waiting.push_back(request);
            }
        }
        let mut index = 0;
        while index < running.len() {
            if running[index].request.is_cancelled() {
                running.swap_remove(index).finish(FinishReason::Cancelled);
            } else {
                index += 1;
            }
        }

        // Join: first come, first served, while the batch and the KV budget have room.
        let mut in_use: usize = running.iter().map(|s| s.request.capacity()).sum();
        while let Some(request) = waiting.front() {
            let need = request.capacity();
            if running.len() >= limits.max_batch || in_use + need > limits.kv_budget {
                break;
            }
            let request = waiting.pop_front().expect("a front element");
            in_use += need;
            running.push(Sequence {
                prefilled: 0,
                next_input: None,
                cache: core.model.new_cache(need),
                sampler: Sampler::new(&request.params),
                text: TextStream::new(core.prompts.tokenizer(), &request.params.stop),
                history: request.prompt.clone(),
                generated: 0,
                started: Instant::now(),
                prefill: None,
                request,
            });
        }
        if running.is_empty() {
            continue;
        }
        // A panic in a step (a bug in a kernel) fails the sequences of that step, not the
        // worker: the scheduler goes on with the next ones.
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step(core, limits, &mut running)
        }));
        if let Err(panic) = stepped {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!("a forward step panicked: {what}");
            for sequence in running.drain(..) {
                let error = EngineError::Model(format!("the forward step failed: {what}"));
                sequence.request.finish(Err(error));
            }
        }
    }
}

/// Prompt tokens a step reads (or one prompt chunk, where that is longer). Prompts that
/// arrive together are read shortest first, as many per step as fit, instead of all in one
/// step that each of them waits for: four 20-token prompts give their first tokens after
/// one, two, three and four prompts' work rather than all after four (the median first
/// token about twice as soon, the same work in all). A long prompt's chunk runs alone, and a
/// short prompt that arrives meanwhile goes before its next one. Deferring a chunk does not
/// change it, so a sequence's numbers are still those it gets alone.
const PROMPT_TOKENS_PER_STEP: usize = 32;

/// How many of a step's prompt chunks (their lengths, in the step's order) it reads: the
/// first always, then each that keeps the step within `PROMPT_TOKENS_PER_STEP`.
fn prompt_chunks_admitted(chunks: impl IntoIterator<Item = usize>) -> usize {
    let mut admitted = 0;
    let mut rows = 0;
    for chunk in chunks {
        if admitted > 0 && rows + chunk > PROMPT_TOKENS_PER_STEP {
            break;
        }
        rows += chunk;
        admitted += 1;
    }
    admitted
}

/// One forward pass over the running sequences — every decode row, and the prompt chunks
/// that `PROMPT_TOKENS_PER_STEP` admits — then each one's token.
fn step(core: &Core, limits: BatchLimits, running: &mut Vec<Sequence<'_>>) {
    // Decode rows first (the model multiplies them together), then the prompts that have
    // the fewest tokens left to read.
    running.sort_by_key(|sequence| {
        (!sequence.decoding()).then(|| sequence.request.prompt.len() - sequence.prefilled)
    });
    let decoding = running.iter().filter(|s| s.decoding()).count();
    let chunk = core
        .model
        .takes_prompt_chunks()
        .then_some(limits.prompt_chunk.max(1));
    let next_chunk = |sequence: &Sequence<'_>| {
        let prompt = &sequence.request.prompt;
        let end = chunk.map_or(prompt.len(), |chunk| {
            (sequence.prefilled + chunk).min(prompt.len())
        });
        sequence.prefilled..end
    };
    // The step's sequences: `running[..stepping]`; the others wait for a later step.
    let stepping =
        decoding + prompt_chunks_admitted(running[decoding..].iter().map(|s| next_chunk(s).len()));
    let inputs: Vec<Vec<u32>> = running[..stepping]
        .iter()
        .map(|sequence| match sequence.next_input {
            Some(token) => vec![token],
            None => sequence.request.prompt[next_chunk(sequence)].to_vec(),
        })
        .collect();
    let stop_signals: Vec<_> = running[..stepping]
        .iter()
        .map(|sequence| sequence.request.stop_signals.clone())
        .collect();
    let mut batch: Vec<BatchItem<'_>> = running[..stepping]
        .iter_mut()
        .zip(&inputs)
        .map(|(sequence, ids)| BatchItem {
            ids,
            logits: sequence.decoding()
                || sequence.prefilled + ids.len() == sequence.request.prompt.len(),
            cache: &mut sequence.cache,
        })
        .collect();
    core.stats
        .record(batch.len(), inputs.iter().map(Vec::len).sum());
    // A step whose sequences have all been cancelled stops between layers rather than
    // finishing a prompt chunk nobody wants (seconds for a long one), so that whatever waits
    // behind it starts at once; the cancelled sequences then leave at the boundary.
    let abandoned = || stop_signals.iter().all(StopSignals::is_set);
    let outputs = core.model.forward_batch(&mut batch, decoding, &abandoned);
    drop(batch);
    let outputs = match outputs {
        Ok(Some(outputs)) => outputs,
        Ok(None) => return,
        Err(error) => {
            let message = error.to_string();
            for sequence in running.drain(..stepping) {
                sequence
                    .request
                    .finish(Err(EngineError::Model(message.clone())));
            }
            return;
        }
    };
    let mut ended = Vec::new();
    for (index, ((sequence, ids), logits)) in running[..stepping]
        .iter_mut()
        .zip(&inputs)
        .zip(outputs)
        .enumerate()
    {
        if !sequence.decoding() {
            sequence.prefilled += ids.len();
        }
        let Some(mut logits) = logits else { continue };
        if sequence.prefill.is_none() {
            sequence.prefill = Some(sequence.started.elapsed());
        }
        match sequence.advance(&mut logits, &core.eos_ids) {
            Ok(None) => {}
            Ok(Some(reason)) => ended.push((index, Ok(reason))),
            Err(error) => ended.push((index, Err(error))),
        }
    }
    // Highest index first, so the earlier indices stay valid.
    for (index, outcome) in ended.into_iter().rev() {
        let sequence = running.remove(index);
        match outcome {
            Ok(reason) => sequence.finish(reason),
            Err(error) => sequence.request.finish(Err(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_reads_prompt_chunks_up_to_its_budget_and_at_least_one() {
        assert_eq!(prompt_chunks_admitted([]), 0);
        // Shortest first: 10 and 20 fit in 32 tokens, 30 waits.
        assert_eq!(prompt_chunks_admitted([10, 20, 30]), 2);
        assert_eq!(prompt_chunks_admitted([8, 8, 8, 8, 8]), 4);
        // A chunk longer than the budget runs, alone.
        assert_eq!(prompt_chunks_admitted([256, 5]), 1);
        assert_eq!(prompt_chunks_admitted([PROMPT_TOKENS_PER_STEP, 1]), 1);
    }
}
