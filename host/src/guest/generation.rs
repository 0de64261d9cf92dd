//! A generation running on its own thread: what a guest's `token-stream` handle stands for.
//!
//! The generation runs in the engine's batch; a thread follows it so the guest can
//! interleave its own work (stop rules, emitting to the client) with generation. A small
//! bounded channel to the guest holds back that thread, not the batch: a guest that stops
//! reading leaves its text waiting in the engine (at most `max_tokens` pieces) while the
//! other sequences go on. Dropping the generation stops it at the next step and joins the
//! thread.
//!
//! This module speaks the engine's types only; `imports::token_stream` turns them into WIT
//! values. That keeps the dependency one way: the bindings name [`Generation`] as the
//! resource's host type, and nothing here needs the bindings.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use rbee_engine::{Completion, Engine, EngineError, Piece, Prompt, SamplingParams};

use super::cancellation::Cancellation;
use crate::metrics::RequestMetrics;

/// Pieces of text buffered between the model thread and the guest.
const STREAM_BUFFER: usize = 16;

/// What the model thread sends and [`Generation::next`] hands out: a piece of text (with
/// its tokens' log-probabilities when they were asked for), or the end of the generation.
pub enum Generated {
    Piece(Piece),
    Finished(Result<Completion, EngineError>),
}

pub struct Generation {
    events: Option<Receiver<Generated>>,
    stop: Arc<AtomicBool>,
    model_thread: Option<JoinHandle<()>>,
    /// Set once the generation ended, so later `next` calls repeat the summary.
    finished: Option<Completion>,
}

/// Counts the generations a request has running (the WIT allows one at a time); the count
/// drops when the model thread ends, not when the guest drops its handle.
#[derive(Clone, Default)]
pub struct GenerationCount(Arc<AtomicUsize>);

impl GenerationCount {
    pub fn running(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    fn enter(&self) -> GenerationGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        GenerationGuard(self.0.clone())
    }
}

struct GenerationGuard(Arc<AtomicUsize>);

impl Drop for GenerationGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Generation {
    /// Starts generating on a new thread, counted in `count` until that thread ends.
    pub fn start(
        model: Arc<Engine>,
        prompt: Prompt,
        params: SamplingParams,
        cancellation: Cancellation,
        count: &GenerationCount,
        metrics: Option<Arc<RequestMetrics>>,
    ) -> std::io::Result<Self> {
        let (sender, events) = mpsc::sync_channel(STREAM_BUFFER);
        let stop = Arc::new(AtomicBool::new(false));
        let running = count.enter();
        let thread_stop = stop.clone();
        let model_thread = std::thread::Builder::new()
            .name("rbee-generate".into())
            .spawn(move || {
                let _running = running;
                generate(
                    &model,
                    prompt,
                    &params,
                    &sender,
                    &thread_stop,
                    &cancellation,
                    metrics.as_deref(),
                );
            })?;
        Ok(Self {
            events: Some(events),
            stop,
            model_thread: Some(model_thread),
            finished: None,
        })
    }

    /// Blocks until the model produced more text or finished.
    pub fn next(&mut self) -> Generated {
        if let Some(done) = &self.finished {
            return Generated::Finished(Ok(done.clone()));
        }
        let received = self.events.as_ref().and_then(|events| events.recv().ok());
        match received {
            Some(Generated::Finished(Ok(done))) => {
                self.finished = Some(done.clone());
                Generated::Finished(Ok(done))
            }
            Some(generated) => generated,
            None => Generated::Finished(Err(EngineError::Model(
                "the generation thread ended unexpectedly".into(),
            ))),
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Stop the model, unblock a pending send by dropping the receiver, then wait for the
        // thread so the request's generation count is exact when the guest starts another.
        self.stop.store(true, Ordering::Release);
        self.events = None;
        if let Some(thread) = self.model_thread.take() {
            let _ = thread.join();
        }
    }
}

/// The following thread: each piece of text goes into the channel as the engine produces it
/// (a full channel holds this thread), then the outcome. The engine checks the request's
/// cancellation at every step, prompt chunks included.
fn generate(
    model: &Engine,
    prompt: Prompt,
    params: &SamplingParams,
    sender: &SyncSender<Generated>,
    stop: &AtomicBool,
    cancellation: &Cancellation,
    metrics: Option<&RequestMetrics>,
) {
    let cancelled = Some(cancellation.for_engine());
    let result = model.generate_pieces(prompt, params, cancelled, &mut |piece| {
        if let Some(metrics) = metrics {
            metrics.token();
        }
        if stop.load(Ordering::Acquire) {
            return ControlFlow::Break(());
        }
        match sender.send(Generated::Piece(piece.clone())) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    });
    if let (Some(metrics), Ok(done)) = (metrics, &result) {
        metrics.generation(
            done.prompt_tokens,
            done.generated_tokens,
            done.finish_reason,
        );
    }
    let _ = sender.send(Generated::Finished(result));
}
