//! The KV cache as blocks: every running sequence's keys and values live in fixed-size blocks
//! of one pool, taken as the sequence reaches new positions (not reserved for `max_tokens` up
//! front), and full blocks are shared between sequences whose tokens begin alike (prefix
//! caching, as vLLM's automatic prefix caching).
//!
//! This module is the bookkeeping only, the same for every model form: a block's size and
//! name (`block`), which blocks are free, who holds each one, and which prefix a full block
//! holds (`pool`, keyed by `prefix`'s hash chain). Where a block's numbers live is the model's business (`model::cpu::kv_store` keeps
//! them in host memory); the scheduler (`run::scheduler`) admits, grows and preempts sequences
//! by blocks.

mod block;
mod pool;
mod prefix;

pub(crate) use block::{BLOCK_SIZE, BlockId, blocks_for};
pub(crate) use pool::BlockPool;
pub(crate) use prefix::{BlockContent, BlockHash};
