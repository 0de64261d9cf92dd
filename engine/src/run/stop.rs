//! Stopping a generation before its end: the caller's own reason ([`Cancelled`]) and the
//! signals a step checks ([`StopSignals`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A caller's own reason to stop a generation (its client left, the worker is shutting
/// down), checked at every step, prompt chunks included.
pub type Cancelled = Arc<dyn Fn() -> bool + Send + Sync>;

/// Whether a generation's reader or caller has given up on it. Cloned by a step, which
/// holds it while the sequences' caches are lent to the model.
#[derive(Clone)]
pub(crate) struct StopSignals {
    /// Set by the generation's reader (it stopped reading or went away).
    pub stop: Arc<AtomicBool>,
    /// The caller's own cancellation, checked at every step.
    pub cancelled: Option<Cancelled>,
}

impl StopSignals {
    /// Whether either signal says stop.
    pub fn is_set(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.cancelled.as_ref().is_some_and(|c| c())
    }
}
