//! 8-bit weights for the CPU (the default `WeightFormat` there).
//!
//! Decoding one token reads every weight once, so on a CPU its speed is set by how many bytes
//! the weights take. Burn's Flex backend multiplies f32 (and f16, by widening to f32 inside
//! gemm); its quantized tensors are dequantized to f32 before a matmul, so neither reads
//! fewer bytes than f32 does. This module keeps each projection as Q8_0 blocks (32 int8
//! values and one f32 scale, as llama.cpp's Q8_0), quantizes the activations the same way,
//! and does the dot products in integers: 4.1× fewer weight bytes than f32, on all cores.
//! It is used for the linear layers only; everything else stays in Burn.

use std::fmt;

use rayon::prelude::*;

pub const BLOCK: usize = 32;

/// A `[rows, cols]` matrix in Q8_0 blocks, row-major (`cols` a multiple of 32).
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    quants: Vec<i8>,
    /// One per block: `rows * cols / 32`.
    scales: Vec<f32>,
}

impl fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Q8Matrix[{}, {}]", self.rows, self.cols)
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

impl Q8Matrix {
    /// `None` when a row is not a whole number of blocks.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if cols % BLOCK != 0 || values.len() != rows * cols {
            return None;
        }
        let mut quants = vec![0i8; values.len()];
        let mut scales = vec![0f32; values.len() / BLOCK];
        quants
            .par_chunks_mut(cols * 64)
            .zip(scales.par_chunks_mut(cols / BLOCK * 64))
            .zip(values.par_chunks(cols * 64))
            .for_each(|((q, s), v)| quantize_into(v, q, s));
        Some(Self {
            rows,
            cols,
            quants,
            scales,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x · Wᵀ` for `x` `[m, cols]`: returns `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "Q8Matrix::matmul: input shape");
        let blocks = self.cols / BLOCK;
        let mut xq = vec![0i8; x.len()];
        let mut xs = vec![0f32; x.len() / BLOCK];
        quantize_into(x, &mut xq, &mut xs);

        // Work is split by weight rows, so each thread streams its own slice of the matrix
        // once for all `m` inputs; the result is written transposed (`[rows, m]`) and turned
        // around at the end when `m > 1`.
        const ROWS_PER_TASK: usize = 16;
        let mut out_t = vec![0f32; self.rows * m];
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * ROWS_PER_TASK;
                for (i, out_row) in out.chunks_exact_mut(m).enumerate() {
                    let r = first + i;
                    let wq = &self.quants[r * self.cols..(r + 1) * self.cols];
                    let ws = &self.scales[r * blocks..(r + 1) * blocks];
                    for (j, o) in out_row.iter_mut().enumerate() {
                        let aq = &xq[j * self.cols..(j + 1) * self.cols];
                        let as_ = &xs[j * blocks..(j + 1) * blocks];
                        *o = dot(wq, ws, aq, as_);
                    }
                }
            });
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; m * self.rows];
        for r in 0..self.rows {
            for j in 0..m {
                out[j * self.rows + r] = out_t[r * m + j];
            }
        }
        out
    }
}

/// Dot product of two Q8_0 rows.
#[inline]
fn dot(wq: &[i8], ws: &[f32], xq: &[i8], xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { dot_avx2(wq, ws, xq, xs) };
        }
    }
    dot_portable(wq, ws, xq, xs)
}

/// The same loop compiled with AVX2 enabled, so LLVM vectorizes the int8 products with
/// 256-bit registers (the crate itself is built for baseline x86-64).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(wq: &[i8], ws: &[f32], xq: &[i8], xs: &[f32]) -> f32 {
    dot_portable(wq, ws, xq, xs)
}

#[inline(always)]
fn dot_portable(wq: &[i8], ws: &[f32], xq: &[i8], xs: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (((w, x), sw), sx) in wq
        .chunks_exact(BLOCK)
        .zip(xq.chunks_exact(BLOCK))
        .zip(ws)
        .zip(xs)
    {
        let mut acc = 0i32;
        for k in 0..BLOCK {
            acc += w[k] as i32 * x[k] as i32;
        }
        sum += acc as f32 * (sw * sx);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f32_matmul_closely() {
        let (rows, cols, m) = (40, 96, 3);
        // Deterministic pseudo-random values in [-1, 1).
        let mut state = 12345u32;
        let mut next = || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        };
        let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
        let x: Vec<f32> = (0..m * cols).map(|_| next()).collect();
        let q = Q8Matrix::quantize(&w, rows, cols).unwrap();
        let got = q.matmul(&x, m);
        for j in 0..m {
            for r in 0..rows {
                let want: f32 = (0..cols).map(|k| x[j * cols + k] * w[r * cols + k]).sum();
                let g = got[j * rows + r];
                // Two 8-bit roundings: error well under 1% of the row's magnitude.
                assert!((g - want).abs() < 0.05 * (cols as f32).sqrt(), "{g} vs {want}");
            }
        }
        assert!(Q8Matrix::quantize(&w, rows * 2, cols / 2).is_none(), "48 is not whole blocks");
    }
}
