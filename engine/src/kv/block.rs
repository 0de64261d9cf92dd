//! A block: its size and its name.

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
