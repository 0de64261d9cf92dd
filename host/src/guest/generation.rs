//! The `token-stream` resource: a generation running on its own thread, read piece by piece by
//! the guest.
//!
//! The model runs on a dedicated thread so the guest can interleave its own work (stop rules,
//! emitting to the client) with generation. A small bounded channel between them gives
//! back-pressure: a guest that stops reading stalls the model instead of buffering text, and
//! dropping the stream stops the model at its next token.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use rbee_engine::{Completion, Engine, EngineError, SamplingParams};

use super::host::Cancellation;

/// Pieces of text buffered between the model thread and the guest.
const STREAM_BUFFER: usize = 16;

enum Generated {
    Text(String),
    Finished(Result<Completion, EngineError>),
}

/// What `next` hands out, before conversion to WIT types.
pub enum Next {
    Text(String),
    Done(Completion),
    Failed(EngineError),
}

pub struct TokenStream {
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

impl TokenStream {
    pub fn start(
        model: Arc<Engine>,
        prompt: String,
        params: SamplingParams,
        cancellation: Cancellation,
        count: &GenerationCount,
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
                    &prompt,
                    &params,
                    &sender,
                    &thread_stop,
                    &cancellation,
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
    pub fn next(&mut self) -> Next {
        if let Some(done) = &self.finished {
            return Next::Done(done.clone());
        }
        let received = self.events.as_ref().and_then(|events| events.recv().ok());
        match received {
            Some(Generated::Text(text)) => Next::Text(text),
            Some(Generated::Finished(Ok(done))) => {
                self.finished = Some(done.clone());
                Next::Done(done)
            }
            Some(Generated::Finished(Err(error))) => Next::Failed(error),
            None => Next::Failed(EngineError::Model(
                "the generation thread ended unexpectedly".into(),
            )),
        }
    }
}

impl Drop for TokenStream {
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

fn generate(
    model: &Engine,
    prompt: &str,
    params: &SamplingParams,
    sender: &SyncSender<Generated>,
    stop: &AtomicBool,
    cancellation: &Cancellation,
) {
    let result = model.generate(prompt, params, &mut |text| {
        if stop.load(Ordering::Acquire) || cancellation.is_cancelled() {
            return ControlFlow::Break(());
        }
        match sender.send(Generated::Text(text.to_owned())) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    });
    let _ = sender.send(Generated::Finished(result));
}
