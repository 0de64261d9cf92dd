//! 8-bit weights for the CPU (the default `WeightFormat` there).
//!
//! Decoding one token reads every weight once, so on a CPU its speed is set by how many bytes
//! the weights take. Burn's Flex backend multiplies f32 (and f16, by widening to f32 inside
//! gemm); its quantized tensors are dequantized to f32 before a matmul, so neither reads
//! fewer bytes than f32 does. This module keeps each projection as Q8_0 blocks (32 int8
//! values and one f32 scale, as llama.cpp's Q8_0), quantizes the activations the same way,
//! and multiplies them with f32 activations: 4× (Q8_0) to 6.4× (Q4_1) fewer weight bytes
//! than f32, on all cores. Each weight row is expanded into an f32 row in L1 cache and dotted
//! there.
//! (Quantizing the activations too, as llama.cpp does, was tried: it flipped SmolLM2's first
//! greedy token on one prompt, so activations stay f32.)
//! It is used for the linear layers only; everything else stays in Burn.

use std::fmt;

use rayon::prelude::*;

pub const BLOCK: usize = 32;

/// A `[rows, cols]` matrix in 32-value blocks, row-major (`cols` a multiple of 32): Q8_0
/// (requantized from floats, or a GGUF's own Q8_0), or a GGUF's Q4_1 blocks kept as they are
/// so the engine multiplies exactly the checkpoint's weights.
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    quants: Vec<i8>,
    /// One per block: `rows * cols / 32`.
    scales: Vec<f32>,
    /// Q4_1 blocks as in the file (f16 d, f16 m, 16 bytes of nibbles); `quants` is empty.
    q4_1: Vec<u8>,
}

const Q4_1_BYTES: usize = 20;
const Q8_0_BYTES: usize = 34;

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
        if !cols.is_multiple_of(BLOCK) || values.len() != rows * cols {
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
            q4_1: Vec::new(),
        })
    }

    /// A GGUF Q4_1 tensor's bytes, kept as they are.
    pub fn from_q4_1(raw: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || raw.len() != rows * cols / BLOCK * Q4_1_BYTES {
            return None;
        }
        Some(Self {
            rows,
            cols,
            quants: Vec::new(),
            scales: Vec::new(),
            q4_1: raw.to_vec(),
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
        Some(Self {
            rows,
            cols,
            quants,
            scales,
            q4_1: Vec::new(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x · Wᵀ` for `x` `[m, cols]`: returns `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "Q8Matrix::matmul: input shape");
        let blocks = self.cols / BLOCK;

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
                // Each weight row is expanded once into an f32 scratch row (in L1), then dotted
                // with every input row: the unpacking is not repeated per input.
                let mut scratch = vec![0f32; self.cols];
                for (i, out_row) in out.chunks_exact_mut(m).enumerate() {
                    let r = first + i;
                    if self.quants.is_empty() {
                        let row =
                            &self.q4_1[r * blocks * Q4_1_BYTES..(r + 1) * blocks * Q4_1_BYTES];
                        dequant_q4_1_row(row, &mut scratch);
                    } else {
                        let wq = &self.quants[r * self.cols..(r + 1) * self.cols];
                        let ws = &self.scales[r * blocks..(r + 1) * blocks];
                        dequant_q8_row(wq, ws, &mut scratch);
                    }
                    for (j, o) in out_row.iter_mut().enumerate() {
                        *o = dot_f32(&scratch, &x[j * self.cols..(j + 1) * self.cols]);
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

fn dequant_q8_row(wq: &[i8], ws: &[f32], out: &mut [f32]) {
    for ((q, d), o) in wq
        .chunks_exact(BLOCK)
        .zip(ws)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        for k in 0..BLOCK {
            o[k] = q[k] as f32 * d;
        }
    }
}

/// ggml's Q4_1 layout: element k < 16 is the low nibble of byte k, element k + 16 its high
/// nibble; value = d * q + m.
fn dequant_q4_1_row(row: &[u8], out: &mut [f32]) {
    for (block, o) in row
        .chunks_exact(Q4_1_BYTES)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        let m = half::f16::from_le_bytes([block[2], block[3]]).to_f32();
        let qs = &block[4..Q4_1_BYTES];
        for k in 0..16 {
            o[k] = (qs[k] & 0x0F) as f32 * d + m;
            o[k + 16] = (qs[k] >> 4) as f32 * d + m;
        }
    }
}

/// f32 dot product, AVX2/FMA where the CPU has them.
#[inline]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { dot_f32_avx2(a, b) };
        }
    }
    dot_f32_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_portable(a, b)
}

#[inline(always)]
fn dot_f32_portable(a: &[f32], b: &[f32]) -> f32 {
    // 32 partial sums (four 8-wide registers), so the loop vectorizes without reassociating.
    let mut acc = [0f32; 32];
    for (x, y) in a.chunks_exact(32).zip(b.chunks_exact(32)) {
        for k in 0..32 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum()
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
                assert!(
                    (g - want).abs() < 0.05 * (cols as f32).sqrt(),
                    "{g} vs {want}"
                );
            }
        }
        assert!(
            Q8Matrix::quantize(&w, rows * 2, cols / 2).is_none(),
            "48 is not whole blocks"
        );
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
        let q = Q8Matrix::from_q4_1(&raw, 2, 32).unwrap();
        let x: Vec<f32> = (0..32).map(|k| k as f32 * 0.25 - 3.0).collect();
        let w: Vec<f32> = (0..32)
            .map(|k| if k < 16 { k as f32 } else { (31 - k) as f32 } * 0.5 - 1.0)
            .collect();
        let want: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
        let got = q.matmul(&x, 1);
        assert!(
            (got[0] - want).abs() < 1e-4 && (got[1] - want).abs() < 1e-4,
            "{got:?} vs {want}"
        );
    }
}
