//! Admission control: how many requests the engine serves at once, and how many may wait.
//!
//! A request first takes a place (in service or in the queue); when every place is taken it
//! is turned away at once with 503 rather than left to time out. A place is released when
//! its guard drops, including when a waiting client disconnects.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Admission {
    slots: Arc<Semaphore>,
    concurrent: usize,
    queue: usize,
    taken: Arc<AtomicUsize>,
}

/// Held for the whole request: a slot in service, and its place.
pub struct Admitted {
    _slot: OwnedSemaphorePermit,
    _place: Place,
}

struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the worker is at capacity ({concurrent} running, {queue} waiting); retry later")]
pub struct Full {
    pub concurrent: usize,
    pub queue: usize,
}

impl Admission {
    pub fn new(concurrent: usize, queue: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(concurrent)),
            concurrent,
            queue,
            taken: Arc::default(),
        }
    }

    /// Waits for a slot, or fails at once when every slot and queue place is taken.
    pub async fn admit(&self) -> Result<Admitted, Full> {
        let ahead = self.taken.fetch_add(1, Ordering::AcqRel);
        let place = Place(self.taken.clone());
        if ahead >= self.concurrent + self.queue {
            return Err(Full {
                concurrent: self.concurrent,
                queue: self.queue,
            });
        }
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the admission semaphore is never closed");
        Ok(Admitted {
            _slot: slot,
            _place: place,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queues_then_refuses() {
        let admission = Admission::new(1, 1);
        let first = admission.admit().await.unwrap();
        // The second waits for the slot; the third finds the queue full.
        let mut second = Box::pin(admission.admit());
        assert!(futures::poll!(&mut second).is_pending());
        assert!(admission.admit().await.is_err());
        drop(first);
        let _second = second.await.unwrap();
        // A waiting request that gives up frees its place.
        let waiting = Box::pin(admission.admit());
        drop(waiting);
        let mut again = Box::pin(admission.admit());
        assert!(futures::poll!(&mut again).is_pending());
    }
}
