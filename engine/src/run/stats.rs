//! Counting the scheduler's work: recorded by its thread at every step, read by anyone.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts of the scheduler's work, for tests and metrics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    steps: AtomicU64,
    rows: AtomicU64,
    batched_steps: AtomicU64,
    most_sequences: AtomicU64,
}

/// What the scheduler has done since the model loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Forward passes.
    pub steps: u64,
    /// Token positions fed, prompt and generated.
    pub rows: u64,
    /// Passes that served more than one sequence.
    pub batched_steps: u64,
    /// The most sequences one pass served.
    pub most_sequences: u64,
}

impl Counters {
    /// One forward pass over `sequences` sequences, `rows` token positions in all.
    pub fn record(&self, sequences: usize, rows: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        if sequences > 1 {
            self.batched_steps.fetch_add(1, Ordering::Relaxed);
        }
        self.most_sequences
            .fetch_max(sequences as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BatchStats {
        BatchStats {
            steps: self.steps.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            batched_steps: self.batched_steps.load(Ordering::Relaxed),
            most_sequences: self.most_sequences.load(Ordering::Relaxed),
        }
    }
}
