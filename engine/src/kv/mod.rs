//! The KV cache as blocks: every running sequence's keys and values live in fixed-size blocks
//! of one pool, taken as the sequence reaches new positions (not reserved for `max_tokens` up
//! front), and full blocks are shared between sequences whose tokens begin alike (prefix
//! caching, as vLLM's automatic prefix caching).
//!
//! This module is the bookkeeping only, the same for every model form: which blocks are free,
//! who holds each one, and which prefix a full block holds (`pool`, keyed by `prefix`'s hash
//! chain). Where a block's numbers live is the model's business (`model::cpu::kv_store` keeps
//! them in host memory); the scheduler (`run::scheduler`) admits, grows and preempts sequences
//! by blocks.

mod pool;
mod prefix;

pub(crate) use pool::BlockPool;
pub(crate) use prefix::{BlockContent, BlockHash};

/// Positions per block. Small enough that a prefix hit loses at most 15 positions at its end
/// (a chat turn, a shared system prompt), a multiple of eight so the CPU attention's
/// eight-keys-at-a-time kernel walks a sequence's blocks in the same order as one contiguous
/// buffer (paging changes no number).
pub(crate) const BLOCK_SIZE: usize = 16;

/// A block's index in the pool.
pub(crate) type BlockId = u32;

/// Blocks that hold `positions` positions.
pub(crate) fn blocks_for(positions: usize) -> usize {
    positions.div_ceil(BLOCK_SIZE)
}
