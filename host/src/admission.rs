//! Admission control: how many requests the engine serves at once, and how many may wait.
//!
//! A request first takes a place (in service or in the queue); when every place is taken it
//! is turned away at once with 503 rather than left to time out, and a request that waits in
//! the queue longer than the queue timeout is turned away with 503 too, rather than hang
//! behind work that does not end. A place is released when its guard drops, including when
//! a waiting client disconnects.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Admission {
    slots: Arc<Semaphore>,
    concurrent: usize,
    queue: usize,
    queue_timeout: Duration,
    taken: Arc<AtomicUsize>,
}

/// Held for the whole request: a slot in service, and its ticket.
pub struct Admitted {
    _slot: OwnedSemaphorePermit,
    _ticket: Ticket,
}

/// A request's count among those served or waiting, given back when it drops.
struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a request was not admitted (both answered 503: retry later, or elsewhere).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the worker is at capacity ({concurrent} running, {queue} waiting); retry later")]
    Full { concurrent: usize, queue: usize },
    #[error(
        "the request waited {} in the queue for a free slot; retry later",
        humantime::format_duration(*waited)
    )]
    QueueTimeout { waited: Duration },
}

impl Admission {
    pub fn new(concurrent: usize, queue: usize, queue_timeout: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(concurrent)),
            concurrent,
            queue,
            queue_timeout,
            taken: Arc::default(),
        }
    }

    /// Requests being served and requests waiting for a slot, now.
    pub fn counts(&self) -> (usize, usize) {
        let running = self.concurrent - self.slots.available_permits().min(self.concurrent);
        let taken = self.taken.load(Ordering::Acquire);
        (running, taken.saturating_sub(running))
    }

    /// Waits for a slot, at most the queue timeout; fails at once when every slot and queue
    /// place is taken.
    pub async fn admit(&self) -> Result<Admitted, Refused> {
        let ahead = self.taken.fetch_add(1, Ordering::AcqRel);
        let ticket = Ticket(self.taken.clone());
        if ahead >= self.concurrent + self.queue {
            return Err(Refused::Full {
                concurrent: self.concurrent,
                queue: self.queue,
            });
        }
        let slot = tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| Refused::QueueTimeout {
                waited: self.queue_timeout,
            })?
            .expect("the admission semaphore is never closed");
        Ok(Admitted {
            _slot: slot,
            _ticket: ticket,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queues_then_refuses() {
        let admission = Admission::new(1, 1, Duration::from_secs(3600));
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

    #[tokio::test]
    async fn a_request_waits_in_the_queue_no_longer_than_the_timeout() {
        let admission = Admission::new(1, 4, Duration::from_millis(200));
        let _running = admission.admit().await.unwrap();
        let started = std::time::Instant::now();
        let refused = admission
            .admit()
            .await
            .err()
            .expect("admitted past a held slot");
        assert!(matches!(refused, Refused::QueueTimeout { .. }), "{refused}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(2));
        // Its place was given back: the queue is as long as before.
        let waiting: Vec<_> = (0..4).map(|_| Box::pin(admission.admit())).collect();
        let mut waiting = futures::future::join_all(waiting);
        assert!(futures::poll!(&mut waiting).is_pending());
        assert!(matches!(
            admission.admit().await.err(),
            Some(Refused::Full { .. })
        ));
    }
}
