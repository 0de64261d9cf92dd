//! Counting the scheduler's work and state: recorded by its thread at every step, read by
//! anyone (the host's `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counts of the scheduler's work, for tests and metrics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    steps: AtomicU64,
    rows: AtomicU64,
    batched_steps: AtomicU64,
    most_sequences: AtomicU64,
    running: AtomicU64,
    waiting: AtomicU64,
    kv_blocks_held: AtomicU64,
    kv_blocks: AtomicU64,
    prefix_queried_tokens: AtomicU64,
    prefix_hit_tokens: AtomicU64,
    preemptions: AtomicU64,
    drafts: AtomicU64,
    draft_tokens: AtomicU64,
    accepted_tokens: AtomicU64,
    forced_tokens: AtomicU64,
    forced_accepted: AtomicU64,
    constrained: AtomicU64,
    drawn_from_best: AtomicU64,
    drawn_from_row: AtomicU64,
    /// How long constrained generations' token masks took.
    pub masks: MaskTimings,
}

/// Upper bounds, in microseconds, of the buckets of [`MaskHistogram`]; one more bucket holds
/// the rest.
pub const MASK_BUCKETS_MICROS: [u64; 10] = [10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000];

/// Times of token masks, counted into [`MASK_BUCKETS_MICROS`] as they are recorded (from
/// the scheduler's thread and the thread that computes masks beside the forward pass).
#[derive(Debug, Default)]
pub(crate) struct MaskTimings {
    buckets: [AtomicU64; MASK_BUCKETS_MICROS.len() + 1],
    nanos: AtomicU64,
}

impl MaskTimings {
    pub fn record(&self, took: Duration) {
        let micros = took.as_micros() as u64;
        let bucket = MASK_BUCKETS_MICROS.partition_point(|&bound| bound < micros);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    fn snapshot(&self) -> MaskHistogram {
        MaskHistogram {
            buckets: self
                .buckets
                .each_ref()
                .map(|count| count.load(Ordering::Relaxed)),
            nanos: self.nanos.load(Ordering::Relaxed),
        }
    }
}

/// How long token masks took: counts per bucket of [`MASK_BUCKETS_MICROS`] (not cumulative;
/// the last bucket is everything slower), and their total time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaskHistogram {
    pub buckets: [u64; MASK_BUCKETS_MICROS.len() + 1],
    pub nanos: u64,
}

impl MaskHistogram {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The upper bound of the bucket that holds quantile `q` (0..=1): the `q` quantile is at
    /// most this. `None` with no masks, or when it falls in the last, unbounded bucket.
    pub fn quantile_bound(&self, q: f64) -> Option<Duration> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return MASK_BUCKETS_MICROS
                    .get(bucket)
                    .map(|&micros| Duration::from_micros(micros));
            }
        }
        None
    }
}

/// What the scheduler has done since the model loaded, and what it holds now.
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
    /// Sequences in the batch now.
    pub running: u64,
    /// Sequences waiting to join it (for KV blocks or a place in the batch), preempted ones
    /// included.
    pub waiting: u64,
    /// KV blocks some sequence holds now, of `kv_blocks`.
    pub kv_blocks_held: u64,
    pub kv_blocks: u64,
    /// Prompt tokens looked up in the prefix cache as sequences joined (vLLM's
    /// `prefix_cache_queries`).
    pub prefix_queried_tokens: u64,
    /// Of those, tokens found there and not computed again (`prefix_cache_hits`).
    pub prefix_hit_tokens: u64,
    /// Sequences preempted because the KV pool ran out (each resumed later).
    pub preemptions: u64,
    /// Drafts of guessed tokens verified (speculative decoding; vLLM's
    /// `spec_decode_num_drafts`), the tokens they held, and those accepted.
    pub drafts: u64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    /// Tokens a constraint forced, fed as a draft to skip steps (jump-forward), and those
    /// the model's own choice confirmed.
    pub forced_tokens: u64,
    pub forced_accepted: u64,
    /// Generations that ran with a constraint (structured output).
    pub constrained: u64,
    /// Tokens chosen from the best candidates a device handed back (sampled ones, and
    /// greedy ones in a step with sampled ones), and those whose draw walked past them and
    /// read the row's logits after all.
    pub drawn_from_best: u64,
    pub drawn_from_row: u64,
    /// How long their token masks took.
    pub mask_times: MaskHistogram,
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

    /// A sequence joined with `tokens` tokens, `hits` of them already in cached blocks.
    pub fn prefix_lookup(&self, tokens: usize, hits: usize) {
        self.prefix_queried_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        self.prefix_hit_tokens
            .fetch_add(hits as u64, Ordering::Relaxed);
    }

    /// A draft of `drafted` guessed tokens was verified; `accepted` of them were right.
    pub fn drafted(&self, drafted: usize, accepted: usize) {
        self.drafts.fetch_add(1, Ordering::Relaxed);
        self.draft_tokens
            .fetch_add(drafted as u64, Ordering::Relaxed);
        self.accepted_tokens
            .fetch_add(accepted as u64, Ordering::Relaxed);
    }

    /// A draft of `drafted` tokens a constraint forced was verified; `accepted` held.
    pub fn forced(&self, drafted: usize, accepted: usize) {
        self.forced_tokens
            .fetch_add(drafted as u64, Ordering::Relaxed);
        self.forced_accepted
            .fetch_add(accepted as u64, Ordering::Relaxed);
    }

    /// A token was chosen from a device's best candidates (`from_best`), or from the row's
    /// logits read back after them.
    pub fn drawn(&self, from_best: bool) {
        let counter = match from_best {
            true => &self.drawn_from_best,
            false => &self.drawn_from_row,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A generation with a constraint joined.
    pub fn constrained(&self) {
        self.constrained.fetch_add(1, Ordering::Relaxed);
    }

    pub fn preempted(&self) {
        self.preemptions.fetch_add(1, Ordering::Relaxed);
    }

    /// The batch and the pool as they are now.
    pub fn set_state(&self, running: usize, waiting: usize, held: usize, blocks: usize) {
        self.running.store(running as u64, Ordering::Relaxed);
        self.waiting.store(waiting as u64, Ordering::Relaxed);
        self.kv_blocks_held.store(held as u64, Ordering::Relaxed);
        self.kv_blocks.store(blocks as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BatchStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        BatchStats {
            steps: load(&self.steps),
            rows: load(&self.rows),
            batched_steps: load(&self.batched_steps),
            most_sequences: load(&self.most_sequences),
            running: load(&self.running),
            waiting: load(&self.waiting),
            kv_blocks_held: load(&self.kv_blocks_held),
            kv_blocks: load(&self.kv_blocks),
            prefix_queried_tokens: load(&self.prefix_queried_tokens),
            prefix_hit_tokens: load(&self.prefix_hit_tokens),
            preemptions: load(&self.preemptions),
            drafts: load(&self.drafts),
            draft_tokens: load(&self.draft_tokens),
            accepted_tokens: load(&self.accepted_tokens),
            forced_tokens: load(&self.forced_tokens),
            forced_accepted: load(&self.forced_accepted),
            constrained: load(&self.constrained),
            drawn_from_best: load(&self.drawn_from_best),
            drawn_from_row: load(&self.drawn_from_row),
            mask_times: self.masks.snapshot(),
        }
    }
}
