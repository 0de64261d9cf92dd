//! What a guest may use: time, memory and nothing ambient.
//!
//! Time is the guest's own computing time. An epoch ticker wakes every store every
//! [`EPOCH_TICK`]; the store's callback subtracts the time spent inside host calls (waiting
//! for the model or for a slow client is not the guest's fault) and interrupts the guest once
//! its own time passes the limit. Memory is capped per instance by a `ResourceLimiter`. Both
//! record which limit was hit, so the client gets a precise error instead of a bare trap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wasmtime::{ResourceLimiter, UpdateDeadline};

/// How often running guests are checked against their time limit.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Table growth beyond this many elements is refused (language runtimes use tens of thousands).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The guest's own computing time per request.
    pub time: Duration,
    /// Linear memory per instance, all memories together.
    pub memory_bytes: usize,
}

/// Which limit stopped a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Time,
    Memory,
}

/// Per-request accounting, kept in the store.
pub struct Sandbox {
    limits: Limits,
    started: Instant,
    host_time: Duration,
    memory_in_use: usize,
    pub exceeded: Option<Exceeded>,
}

impl Sandbox {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            started: Instant::now(),
            host_time: Duration::ZERO,
            memory_in_use: 0,
            exceeded: None,
        }
    }

    /// Runs a host call, keeping its duration off the guest's clock.
    pub fn off_the_clock<R>(&mut self, call: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let result = call();
        self.host_time += start.elapsed();
        result
    }

    /// Time the guest itself has computed so far.
    pub fn guest_time(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.host_time)
    }

    /// The epoch callback: keep going while the guest is within its time.
    pub fn on_epoch(&mut self) -> wasmtime::Result<UpdateDeadline> {
        if self.guest_time() > self.limits.time {
            self.exceeded = Some(Exceeded::Time);
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::Continue(1))
    }
}

impl ResourceLimiter for Sandbox {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Components hold several core memories (the language runtime, the WASI adapter…):
        // the cap applies to their sum.
        let after = self.memory_in_use - current.min(self.memory_in_use) + desired;
        if after > self.limits.memory_bytes {
            self.exceeded = Some(Exceeded::Memory);
            return Ok(false);
        }
        self.memory_in_use = after;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub fn start(engine: wasmtime::Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rbee-epoch".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(memory_bytes: usize) -> Sandbox {
        Sandbox::new(Limits {
            time: Duration::from_millis(50),
            memory_bytes,
        })
    }

    #[test]
    fn memory_cap_counts_every_memory() {
        let mut sandbox = sandbox(100);
        // Two memories grow from nothing: 60 + 30 fits, a further 20 does not.
        assert!(sandbox.memory_growing(0, 60, None).unwrap());
        assert!(sandbox.memory_growing(0, 30, None).unwrap());
        assert!(!sandbox.memory_growing(30, 50, None).unwrap());
        assert_eq!(sandbox.exceeded, Some(Exceeded::Memory));
    }

    #[test]
    fn host_time_is_not_guest_time() {
        let mut sandbox = sandbox(1);
        sandbox.off_the_clock(|| std::thread::sleep(Duration::from_millis(80)));
        assert!(sandbox.guest_time() < Duration::from_millis(50));
        assert!(matches!(
            sandbox.on_epoch(),
            Ok(UpdateDeadline::Continue(1))
        ));
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(sandbox.on_epoch(), Ok(UpdateDeadline::Interrupt)));
        assert_eq!(sandbox.exceeded, Some(Exceeded::Time));
    }
}
