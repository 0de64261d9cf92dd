//! Block-quantized weights for the CPU (the default `WeightFormat` there).
//!
//! Decoding one token reads every weight once, so on a CPU its speed is set by how many bytes
//! the weights take. Burn's Flex backend multiplies f32 (and f16, by widening to f32 inside
//! gemm); its quantized tensors are dequantized to f32 before a matmul, so neither reads
//! fewer bytes than f32 does. This module keeps each projection in 32-value blocks — a GGUF's
//! Q4_1 blocks exactly as stored, or Q8_0 (32 int8 values and one scale, as llama.cpp's) — and
//! multiplies them with f32 activations: 4× (Q8_0) to 6.4× (Q4_1) fewer weight bytes than f32,
//! on all cores.
//!
//! Two paths, by the number of input rows:
//! - a few rows (decoding): each weight row is unpacked in registers and dotted with the
//!   activations, rounded to i16 per block, in integers (`kernels`), rows split across the
//!   rayon pool;
//! - many rows (prefill): tiles of weight rows are expanded to f32 once and multiplied with
//!   all input rows by gemm, so the unpacking is paid once per tile, not once per token.
//!
//! The CPU layers (`model::cpu`) run every projection and the output head through it; the
//! embedding lookup expands single rows (`BlockMatrix::expand_row`).

mod kernels;

use std::fmt;
use std::ops::Range;

use rayon::prelude::*;

use kernels::QuantizedRow;
pub use kernels::Simd;
pub use kernels::{BLOCK, Q4_1_BYTES};

const Q8_0_BYTES: usize = 34;

/// Input rows from which the tiled gemm path beats the integer dots. The gemm path expands
/// every weight to f32 once per call, whatever the row count; the integer path widens each
/// chunk of weights once for two rows and four inputs and pays the multiplications per input.
/// Measured on SmolLM2 Q4_1 (this 2-core machine, one prompt's prefill, the integer path for
/// every row against gemm from 28 rows, alternating binaries): 32 rows x1.13 as fast, 48
/// x1.01, 64 x1.08, 96 x0.81, so they meet at about 48 (at 28, before the kernel took two
/// rows and blocks side by side). A chunk's own length picks its path (a row's arithmetic
/// must not depend on its batch), so several short prompts arriving together each take the
/// integer path even where one gemm call for all of them would be cheaper.
pub(crate) const GEMM_MIN_ROWS: usize = 48;
/// The f32 expansion of weight rows handed to gemm at once: big enough that gemm's packing of
/// `x` is amortised over many rows (a whole SmolLM2 projection), small enough to stay in a
/// typical L3 and not to allocate a whole f32 copy of a large output matrix.
const GEMM_TILE_BYTES: usize = 4 << 20;
/// Input rows from which the row kernel's work per input — rounding it to i16, gathering its
/// values from the threads' pieces — is spread over the pool (a prompt chunk's hundreds); a
/// decode step's few are not worth the pool's hand-off, ~150 matmuls a step.
const PARALLEL_INPUT_ROWS: usize = 16;

/// A `[rows, cols]` weight matrix in 32-value blocks (Q8_0 or Q4_1), row-major (`cols` a
/// multiple of 32).
pub struct BlockMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

enum Blocks {
    /// Requantized from floats (absmax / 127 per block), or a GGUF's own Q8_0 unpacked.
    Q8_0 {
        quants: Vec<i8>,
        /// One per block: `rows * cols / 32`.
        scales: Vec<f32>,
    },
    /// A GGUF's Q4_1 blocks (f16 d, f16 m, 16 bytes of nibbles), so the engine multiplies
    /// exactly the checkpoint's weights; each row regrouped for the kernel (`kernels`).
    Q4_1(Vec<u8>),
}

impl fmt::Debug for BlockMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.blocks {
            Blocks::Q8_0 { .. } => "Q8_0",
            Blocks::Q4_1(_) => "Q4_1",
        };
        write!(f, "{kind}[{}, {}]", self.rows, self.cols)
    }
}

/// Quantizes `values` into `quants` / `scales`, block by block (absmax / 127).
fn quantize_into(values: &[f32], quants: &mut [i8], scales: &mut [f32]) {
    for ((block, q), scale) in values
        .chunks_exact(BLOCK)
        .zip(quants.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut())
    {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in q.iter_mut().zip(block) {
            *q = (v * inv).round() as i8;
        }
        *scale = d;
    }
}

impl BlockMatrix {
    /// `None` when a row is not a whole number of blocks.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || values.len() != rows * cols {
            return None;
        }
        let mut quants = vec![0i8; values.len()];
        let mut scales = vec![0f32; values.len() / BLOCK];
        quants
            .par_chunks_mut(cols * 64)
            .zip(scales.par_chunks_mut(cols / BLOCK * 64))
            .zip(values.par_chunks(cols * 64))
            .for_each(|((q, s), v)| {
                quantize_into(v, q, s);
                q.chunks_exact_mut(cols).for_each(kernels::interleave_q8_0);
            });
        Some(Self {
            rows,
            cols,
            blocks: Blocks::Q8_0 { quants, scales },
        })
    }

    /// A GGUF Q4_1 tensor's bytes, kept as they are up to their order within a row.
    pub fn from_q4_1(raw: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || raw.len() != rows * cols / BLOCK * Q4_1_BYTES {
            return None;
        }
        let mut regrouped = vec![0u8; raw.len()];
        let row_bytes = cols / BLOCK * Q4_1_BYTES;
        for (src, dst) in raw
            .chunks_exact(row_bytes)
            .zip(regrouped.chunks_exact_mut(row_bytes))
        {
            kernels::regroup_q4_1(src, dst);
        }
        Some(Self {
            rows,
            cols,
            blocks: Blocks::Q4_1(regrouped),
        })
    }

    /// A GGUF Q8_0 tensor (f16 scale + 32 int8 per block), unpacked losslessly.
    pub fn from_q8_0(raw: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || raw.len() != rows * cols / BLOCK * Q8_0_BYTES {
            return None;
        }
        let mut quants = Vec::with_capacity(rows * cols);
        let mut scales = Vec::with_capacity(rows * cols / BLOCK);
        for block in raw.chunks_exact(Q8_0_BYTES) {
            scales.push(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
            quants.extend(block[2..].iter().map(|&b| b as i8));
        }
        quants
            .chunks_exact_mut(cols)
            .for_each(kernels::interleave_q8_0);
        Some(Self {
            rows,
            cols,
            blocks: Blocks::Q8_0 { quants, scales },
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Rows `rows` dotted with each prepared input row into `out` (`[rows, inputs]`), two
    /// rows by up to four inputs per pass of the kernel. A (row, input) value is the same
    /// whichever rows and inputs share its pass.
    fn dot_rows(&self, simd: Simd, rows: Range<usize>, xs: &[QuantizedRow], out: &mut [f32]) {
        match &self.blocks {
            Blocks::Q8_0 { quants, scales } => {
                kernels::dot_q8_0(simd, quants, scales, rows, xs, out)
            }
            Blocks::Q4_1(bytes) => kernels::dot_q4_1(simd, bytes, rows, xs, out),
        }
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` as f32 values.
    pub fn expand_row(&self, r: usize, out: &mut [f32]) {
        let blocks = self.cols / BLOCK;
        match &self.blocks {
            Blocks::Q4_1(bytes) => kernels::expand_q4_1(
                &bytes[r * blocks * Q4_1_BYTES..(r + 1) * blocks * Q4_1_BYTES],
                out,
            ),
            Blocks::Q8_0 { quants, scales } => kernels::expand_q8_0(
                &quants[r * self.cols..(r + 1) * self.cols],
                &scales[r * blocks..(r + 1) * blocks],
                out,
            ),
        }
    }

    /// `x · Wᵀ` for `x` `[m, cols]`: returns `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let [out] = Self::matmul_many([self], x, m);
        out
    }

    /// `x · Wᵢᵀ` for several matrices of the same width and one input `x` `[m, cols]` (a
    /// layer's q/k/v, or gate/up): in decoding, one dispatch to the pool and one rounding of
    /// `x` for all of them.
    pub fn matmul_many<const N: usize>(mats: [&Self; N], x: &[f32], m: usize) -> [Vec<f32>; N] {
        check_shapes(mats, x, m);
        if Self::row_kernel_for(m) {
            Self::matmul_rows(mats, x, m)
        } else {
            mats.map(|w| w.matmul_tiled(x, m))
        }
    }

    /// `x · Wᵢᵀ` through the tiled gemm path whatever `m` is: for rows that must take the
    /// path they took before in a longer chunk (gemm sums each output over the inner
    /// dimension in the same order whatever the number of rows).
    pub fn matmul_gemm<const N: usize>(mats: [&Self; N], x: &[f32], m: usize) -> [Vec<f32>; N] {
        check_shapes(mats, x, m);
        mats.map(|w| w.matmul_tiled(x, m))
    }

    /// Whether [`BlockMatrix::matmul_many`] multiplies `m` input rows with the row kernel
    /// ([`BlockMatrix::matmul_rows`]), whose result for a row does not depend on the others.
    pub fn row_kernel_for(m: usize) -> bool {
        m < GEMM_MIN_ROWS
    }

    /// One integer dot per (weight row, input row) (see `kernels`). The matrices' rows are
    /// taken as one stacked matrix and split across the pool in a few chunks per thread (a
    /// chunk is microseconds of work, so finer splits cost more in scheduling than they gain
    /// in balance); each chunk is dotted with every input row while it is in cache, so a
    /// batch of rows reads the weights from memory once and dispatches once. A row's result
    /// does not depend on the other rows: a sequence decodes the same alone or in a batch.
    pub fn matmul_rows<const N: usize>(mats: [&Self; N], x: &[f32], m: usize) -> [Vec<f32>; N] {
        let simd = Simd::detect();
        let cols = check_shapes(mats, x, m);
        if m == 0 {
            return std::array::from_fn(|_| Vec::new());
        }
        // `starts[i]`: the first stacked row of matrix `i`.
        let mut starts = [0; N];
        let mut total = 0;
        for (start, w) in starts.iter_mut().zip(mats) {
            *start = total;
            total += w.rows;
        }
        let chunk = total
            .div_ceil(4 * rayon::current_num_threads())
            .next_multiple_of(8);
        let inputs: Vec<QuantizedRow> = if m >= PARALLEL_INPUT_ROWS {
            x.par_chunks_exact(cols.max(1))
                .map(QuantizedRow::new)
                .collect()
        } else {
            x.chunks_exact(cols.max(1)).map(QuantizedRow::new).collect()
        };
        // Each chunk of stacked rows owns one contiguous slice: its rows of each matrix as
        // a piece `[inputs, piece rows]`, the pieces in row order.
        let mut stacked = vec![0f32; total * m];
        stacked
            .par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(c, out)| {
                let first = c * chunk;
                let len = out.len() / m;
                for (&start, mat) in starts.iter().zip(mats) {
                    let lo = start.max(first);
                    let hi = (start + mat.rows).min(first + len);
                    if lo < hi {
                        let out = &mut out[(lo - first) * m..(hi - first) * m];
                        mat.dot_rows(simd, lo - start..hi - start, &inputs, out);
                    }
                }
            });
        // Each input's values of a matrix gathered from the pieces: runs of a piece's rows
        // copied whole (a transposition value by value, on one thread, was an eighth of a
        // prompt's read).
        let gather = |w: usize, j: usize, out: &mut [f32]| {
            let (start, rows) = (starts[w], mats[w].rows);
            let mut lo = start;
            while lo < start + rows {
                let hi = ((lo / chunk + 1) * chunk).min(start + rows);
                let len = hi - lo;
                let piece = &stacked[lo * m..hi * m];
                out[lo - start..hi - start].copy_from_slice(&piece[j * len..][..len]);
                lo = hi;
            }
        };
        std::array::from_fn(|w| {
            let rows = mats[w].rows.max(1);
            let mut out = vec![0f32; m * mats[w].rows];
            if m >= PARALLEL_INPUT_ROWS {
                let each = out.par_chunks_mut(rows).enumerate();
                each.for_each(|(j, out)| gather(w, j, out));
            } else {
                let each = out.chunks_mut(rows).enumerate();
                each.for_each(|(j, out)| gather(w, j, out));
            }
            out
        })
    }

    fn matmul_tiled(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let tile_rows = (GEMM_TILE_BYTES / (cols * 4)).clamp(1, rows);
        // One tile buffer per calling thread, kept between calls: a fresh 4 MiB one was
        // zeroed for every projection (about a tenth of a short prompt's prefill), and every
        // value of it is written before it is read.
        thread_local! {
            static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let mut tile = TILE.take();
        tile.resize(tile.len().max(tile_rows * cols), 0.0);
        let mut out = vec![0f32; m * rows];
        for first in (0..rows).step_by(tile_rows) {
            let n = tile_rows.min(rows - first);
            tile[..n * cols]
                .par_chunks_mut(cols)
                .enumerate()
                .for_each(|(i, row)| self.expand_row(first + i, row));
            // out[:, first..first + n] = x [m, cols] · tileᵀ [cols, n], in (column, row)
            // strides: element (k, i) of tileᵀ is tile[i * cols + k].
            // SAFETY: every pointer/stride pair addresses only elements inside its slice
            // (`out` is m × rows and first + n <= rows, `tile` holds n × cols, `x` m × cols).
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    cols,
                    out.as_mut_ptr().add(first),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    tile.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
        TILE.set(tile);
        out
    }
}

/// The common width of `mats`, which `x` `[m, cols]` must have.
fn check_shapes<const N: usize>(mats: [&BlockMatrix; N], x: &[f32], m: usize) -> usize {
    let cols = mats.first().map_or(0, |w| w.cols);
    for w in mats {
        assert_eq!(w.cols, cols, "BlockMatrix: widths differ");
    }
    assert_eq!(x.len(), m * cols, "BlockMatrix: input shape");
    cols
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f32_matmul_closely() {
        // m = 1, 3 and 7 take the row-dot path, the last the tiled one.
        for m in [1, 3, 7, GEMM_MIN_ROWS + 1] {
            matches_f32_matmul_closely_for(40, 96, m);
        }
    }

    fn matches_f32_matmul_closely_for(rows: usize, cols: usize, m: usize) {
        // Deterministic pseudo-random values in [-1, 1).
        let mut state = 12345u32;
        let mut next = || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        };
        let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
        let x: Vec<f32> = (0..m * cols).map(|_| next()).collect();
        let q = BlockMatrix::quantize(&w, rows, cols).unwrap();
        let got = q.matmul(&x, m);
        for j in 0..m {
            for r in 0..rows {
                let want: f32 = (0..cols).map(|k| x[j * cols + k] * w[r * cols + k]).sum();
                let g = got[j * rows + r];
                // Two 8-bit roundings: error well under 1% of the row's magnitude.
                assert!(
                    (g - want).abs() < 0.05 * (cols as f32).sqrt(),
                    "{g} vs {want}"
                );
            }
        }
        assert!(
            BlockMatrix::quantize(&w, rows * 2, cols / 2).is_none(),
            "half a row is not whole blocks"
        );
    }

    #[test]
    fn several_matrices_at_once_equal_each_alone() {
        // Q4_1 (odd row count: a pair path and a single row) beside Q8_0, split over chunks
        // that straddle the two.
        let bytes: Vec<u8> = (0..37 * 3 * Q4_1_BYTES)
            .map(|i| (i * 7 % 251) as u8 & 0x3b)
            .collect();
        let a = BlockMatrix::from_q4_1(&bytes, 37, 96).unwrap();
        let w: Vec<f32> = (0..50 * 96)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let b = BlockMatrix::quantize(&w, 50, 96).unwrap();
        let x: Vec<f32> = (0..96).map(|i| (i as f32 * 0.37).sin()).collect();
        let [got_a, got_b] = BlockMatrix::matmul_many([&a, &b], &x, 1);
        assert_eq!(got_a, a.matmul(&x, 1));
        assert_eq!(got_b, b.matmul(&x, 1));
    }

    #[test]
    fn a_row_gives_the_same_result_alone_or_in_a_batch() {
        let bytes: Vec<u8> = (0..45 * 3 * Q4_1_BYTES)
            .map(|i| (i * 11 % 253) as u8 & 0x3b)
            .collect();
        let a = BlockMatrix::from_q4_1(&bytes, 45, 96).unwrap();
        let w: Vec<f32> = (0..70 * 96)
            .map(|i| ((i * 7 % 31) as f32 - 15.0) / 9.0)
            .collect();
        let b = BlockMatrix::quantize(&w, 70, 96).unwrap();
        let m = 6;
        let x: Vec<f32> = (0..m * 96).map(|i| (i as f32 * 0.21).cos()).collect();
        let [batch_a, batch_b] = BlockMatrix::matmul_rows([&a, &b], &x, m);
        for j in 0..m {
            let row = &x[j * 96..(j + 1) * 96];
            let [alone_a, alone_b] = BlockMatrix::matmul_rows([&a, &b], row, 1);
            assert_eq!(alone_a, batch_a[j * 45..(j + 1) * 45], "row {j} of a");
            assert_eq!(alone_b, batch_b[j * 70..(j + 1) * 70], "row {j} of b");
        }
    }

    #[test]
    fn q4_1_blocks_multiply_like_their_dequantized_values() {
        // Two rows of one block each: d = 0.5, m = -1, nibbles 0..15 (low) and 15..0 (high).
        let mut raw = Vec::new();
        for _ in 0..2 {
            raw.extend(half::f16::from_f32(0.5).to_le_bytes());
            raw.extend(half::f16::from_f32(-1.0).to_le_bytes());
            raw.extend((0..16u8).map(|k| k | ((15 - k) << 4)));
        }
        let q = BlockMatrix::from_q4_1(&raw, 2, 32).unwrap();
        let x: Vec<f32> = (0..32).map(|k| k as f32 * 0.25 - 3.0).collect();
        let w: Vec<f32> = (0..32)
            .map(|k| if k < 16 { k as f32 } else { (31 - k) as f32 } * 0.5 - 1.0)
            .collect();
        let want: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
        let got = q.matmul(&x, 1);
        let tiled = q.matmul(&x.repeat(GEMM_MIN_ROWS), GEMM_MIN_ROWS);
        assert_eq!(tiled.len(), 2 * GEMM_MIN_ROWS);
        assert!(tiled.iter().all(|t| (t - want).abs() < 1e-4), "{tiled:?}");
        assert!(
            (got[0] - want).abs() < 1e-4 && (got[1] - want).abs() < 1e-4,
            "{got:?} vs {want}"
        );
    }
}
