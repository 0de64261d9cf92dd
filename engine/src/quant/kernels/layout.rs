//! The subgroup layout: how weight rows and prepared input rows are stored for the kernels.
//!
//! **Blocks side by side.** Weights and activations alike are stored in *subgroups* of
//! blocks: a row's blocks are cut into groups of 8, then the rest into 4, 2 and 1 (its binary
//! digits). A subgroup of `p` blocks is a run of chunks of 16 values (activations, Q8_0
//! weights) or 16 nibble bytes (Q4_1), chunk `c` holding `16/p` consecutive units of each
//! block in turn, from unit `c·16/p`. Widened to words and multiplied pairwise, a chunk gives
//! each block `8/p` of a register's eight i32 lanes, so a subgroup's integer dot for one
//! (row, input) builds up exactly in one register and is converted and scaled once: one
//! conversion and one FMA (with the blocks' `d·sₓ` spread over their lanes) per subgroup,
//! where a block per register paid them per block. (A Q8_0 lane past 2^24 rounds to f32's 24
//! bits as it is converted, far below the activations' own rounding; Q4_1 lanes stay under
//! it.) A Q4_1 nibble chunk `k` widens to the low nibbles (activation chunk `k`) and the high
//! ones (chunk `p + k`). Each Q4_1 subgroup stores its `p` f16 `d`s, then its `p` `m`s, then
//! the nibble chunks (same bytes, same size as ggml's blocks), so one instruction converts a
//! subgroup's scales and one FMA adds its `m·Σx` terms.

pub const BLOCK: usize = 32;
/// Bytes of one Q4_1 block: f16 `d`, f16 `m`, 16 bytes of nibbles.
pub const Q4_1_BYTES: usize = 20;
/// Blocks in a whole subgroup: one i32 lane each.
pub(super) const GROUP: usize = 8;
/// Values (or nibble bytes) per chunk: one register of words.
pub(super) const CHUNK: usize = 16;

/// One input row prepared for the integer kernels (rounded by `portable::quantize_row` or
/// its vector twin; `QuantizedRow::new` picks which).
#[derive(Clone)]
pub struct QuantizedRow {
    /// `x` rounded to i16 per block (`x ≈ values · scale`), in the subgroup layout (module
    /// docs).
    pub(super) values: Vec<i16>,
    /// One per block, then `GROUP` zeros (a subgroup's scales are read eight lanes at a time
    /// from its first block).
    pub(super) scales: Vec<f32>,
    /// `Σ x` per block, from the f32 values (Q4_1's `m` term); padded as `scales`.
    pub(super) sums: Vec<f32>,
}

impl QuantizedRow {
    pub(super) fn blocks(&self) -> usize {
        self.values.len() / BLOCK
    }
}

/// A row of `blocks` blocks as subgroups, `(first block, blocks in it)`: whole groups of 8,
/// then the rest as 4, 2 and 1.
pub(super) fn subgroups(blocks: usize) -> impl Iterator<Item = (usize, usize)> {
    let whole = blocks - blocks % GROUP;
    let rest = [4, 2, 1]
        .into_iter()
        .filter(move |p| (blocks % GROUP) & p != 0)
        .scan(whole, |first, p| {
            let at = *first;
            *first += p;
            Some((at, p))
        });
    (0..whole)
        .step_by(GROUP)
        .map(|first| (first, GROUP))
        .chain(rest)
}

/// One subgroup of `p` blocks from block order (`blocks`, `p` blocks of equal width) to
/// chunk order (`chunks`): chunk `c` holds `16/p` units of each block in turn, from unit
/// `c·16/p`.
fn interleave<T: Copy>(blocks: &[T], chunks: &mut [T], p: usize) {
    move_subgroup(blocks, chunks, p, true);
}

/// The inverse of [`interleave`].
pub(super) fn deinterleave<T: Copy>(chunks: &[T], blocks: &mut [T], p: usize) {
    move_subgroup(chunks, blocks, p, false);
}

/// [`move_runs`] for a subgroup of `p` blocks (runs of `16/p` units).
fn move_subgroup<T: Copy>(from: &[T], to: &mut [T], p: usize, to_chunks: bool) {
    match p {
        8 => move_runs::<T, 2>(from, to, to_chunks),
        4 => move_runs::<T, 4>(from, to, to_chunks),
        2 => move_runs::<T, 8>(from, to, to_chunks),
        _ => move_runs::<T, 16>(from, to, to_chunks),
    }
}

/// Moves a subgroup of `16 / RUN` blocks between block order and chunk order (`to_chunks`)
/// or back: the `RUN` units of block `b` from unit `c·RUN` sit at `c·16 + b·RUN` in chunk
/// order. The run length is a constant so that each run is a few register moves: a run whose
/// length was known only at run time became a `memcpy` call, and laying out the activations
/// that way took 2 % of a 4-client decode step.
fn move_runs<T: Copy, const RUN: usize>(from: &[T], to: &mut [T], to_chunks: bool) {
    let p = CHUNK / RUN;
    let width = from.len() / p;
    for c in 0..width / RUN {
        for b in 0..p {
            let (block_at, chunk_at) = (b * width + c * RUN, c * CHUNK + b * RUN);
            let (src, dst) = if to_chunks {
                (block_at, chunk_at)
            } else {
                (chunk_at, block_at)
            };
            let run: [T; RUN] = from[src..src + RUN].try_into().expect("a whole run");
            to[dst..dst + RUN].copy_from_slice(&run);
        }
    }
}

/// A row of 32-value blocks (block order) in the subgroup layout.
pub(super) fn to_subgroups<T: Copy + Default>(row: &[T]) -> Vec<T> {
    let mut out = vec![T::default(); row.len()];
    for (first, p) in subgroups(row.len() / BLOCK) {
        let span = first * BLOCK..(first + p) * BLOCK;
        interleave(&row[span.clone()], &mut out[span], p);
    }
    out
}

/// One row of Q8_0 values from block order into the subgroup layout, in place.
pub fn interleave_q8_0(row: &mut [i8]) {
    let laid_out = to_subgroups(row);
    row.copy_from_slice(&laid_out);
}

/// ggml's Q4_1 row (blocks of `d`, `m`, nibbles) in the subgroup layout (module docs).
pub fn regroup_q4_1(row: &[u8], out: &mut [u8]) {
    let mut nibbles = [0u8; GROUP * CHUNK];
    for (first, p) in subgroups(row.len() / Q4_1_BYTES) {
        let src = &row[first * Q4_1_BYTES..(first + p) * Q4_1_BYTES];
        let dst = &mut out[first * Q4_1_BYTES..(first + p) * Q4_1_BYTES];
        for (i, block) in src.chunks_exact(Q4_1_BYTES).enumerate() {
            dst[2 * i..2 * i + 2].copy_from_slice(&block[0..2]);
            dst[2 * p + 2 * i..2 * p + 2 * i + 2].copy_from_slice(&block[2..4]);
            nibbles[CHUNK * i..CHUNK * (i + 1)].copy_from_slice(&block[4..]);
        }
        interleave(&nibbles[..CHUNK * p], &mut dst[4 * p..], p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_cut_into_groups_of_8_then_4_2_1() {
        let cut = |blocks| subgroups(blocks).collect::<Vec<_>>();
        assert_eq!(cut(18), [(0, 8), (8, 8), (16, 2)]);
        assert_eq!(cut(7), [(0, 4), (4, 2), (6, 1)]);
        assert_eq!(cut(8), [(0, 8)]);
        let mut values: Vec<u16> = (0..2 * BLOCK as u16).collect();
        let mut chunks = vec![0; values.len()];
        interleave(&values, &mut chunks, 2);
        // 2 blocks: chunk c holds 8 values of block 0, then 8 of block 1, from 8c.
        assert_eq!(
            chunks[..CHUNK],
            [0, 1, 2, 3, 4, 5, 6, 7, 32, 33, 34, 35, 36, 37, 38, 39]
        );
        deinterleave(&chunks, &mut values, 2);
        assert_eq!(values, (0..2 * BLOCK as u16).collect::<Vec<_>>());
    }
}
