//! Why a request's generation should end early. Its own module because three parties share
//! it and none owns it: the HTTP layer raises it when the client goes away, the worker when
//! the shutdown grace period ends, and the model thread and the guest's host calls read it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A request's cancellation: its client went away, or the worker is shutting down past its
/// grace period. Cheap to clone; every clone sees the same flags.
#[derive(Clone, Default)]
pub struct Cancellation {
    client_gone: Arc<AtomicBool>,
    shutdown: Arc<AtomicBool>,
}

impl Cancellation {
    /// A cancellation for one request that also observes the worker-wide `shutdown` flag.
    pub fn for_request(shutdown: Arc<AtomicBool>) -> Self {
        Self {
            client_gone: Arc::default(),
            shutdown,
        }
    }

    pub fn client_gone(&self) {
        self.client_gone.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.client_gone.load(Ordering::Acquire) || self.shutdown.load(Ordering::Acquire)
    }

    /// The same flags as the engine's cancellation, which its scheduler checks at every
    /// step: a generation stops even while it is still reading its prompt.
    pub fn for_engine(&self) -> rbee_engine::Cancelled {
        let cancellation = self.clone();
        Arc::new(move || cancellation.is_cancelled())
    }
}
