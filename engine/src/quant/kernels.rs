//! The per-row kernels behind [`super::Q8Matrix`]: a weight row (in blocks) dotted with the
//! activations, and a weight row expanded to f32 (for the tiled path that hands whole tiles
//! to gemm).
//!
//! A decode step reads every weight once and does two flops per weight, so the row dot is
//! the whole cost of a token, and what bounds it on a CPU is the instructions spent turning
//! packed weights into numbers. The dot therefore works in integers: the activations are
//! quantized once per input row to **i16** per 32-block (one f32 scale each; the rounding is
//! 1/65534 of the block's largest value, far below the weights' own 4- or 8-bit rounding, so
//! greedy output matches the f32 kernel's), and each weight block is widened to i16 and
//! multiplied-and-added pairwise (`vpmaddwd`) into i32. llama.cpp quantizes activations to
//! 8 bits instead, which was tried here and flipped a greedy token of SmolLM2 against the
//! reference; 16 bits costs one extra widening per block.
//!
//! Q4_1 blocks use `Σ (d·q + m)·x = d·sₓ·Σ q·xq + m·Σ x`, with the f32 block sums `Σ x`
//! kept beside the i16 values.
//!
//! Each kernel has a portable version (the reference, and what non-x86 CPUs run) and an
//! AVX2/FMA/F16C one picked at run time; the tests hold them to each other.

pub const BLOCK: usize = 32;
pub const Q4_1_BYTES: usize = 20;

/// Which kernels this CPU runs, detected once per matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Simd {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Simd::Avx2;
        }
        Simd::Portable
    }
}

/// One input row prepared for the integer kernels.
pub struct QuantizedRow {
    /// `x` rounded to i16 per block: `x ≈ values · scale`.
    values: Vec<i16>,
    /// Per block, `[scale, Σ x]` (the sum from the f32 values, for Q4_1's `m` term): one
    /// 8-byte load in the kernel.
    scale_sum: Vec<[f32; 2]>,
}

impl QuantizedRow {
    pub fn new(x: &[f32]) -> Self {
        let mut values = vec![0i16; x.len()];
        let scale_sum = x
            .chunks_exact(BLOCK)
            .zip(values.chunks_exact_mut(BLOCK))
            .map(|(block, q)| {
                let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = max / i16::MAX as f32;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (q, v) in q.iter_mut().zip(block) {
                    *q = (v * inv).round() as i16;
                }
                [scale, block.iter().sum()]
            })
            .collect();
        Self { values, scale_sum }
    }

    fn blocks(&self) -> usize {
        self.scale_sum.len()
    }
}

/// `Σ_k w_k x_k` for one row of Q4_1 blocks (`d` f16, `m` f16, 16 bytes of nibbles: element
/// k < 16 is byte k's low nibble, element k + 16 its high nibble; w = d·q + m).
#[inline]
pub fn dot_q4_1(simd: Simd, row: &[u8], x: &QuantizedRow) -> f32 {
    assert_eq!(row.len(), x.blocks() * Q4_1_BYTES, "dot_q4_1: row length");
    match simd {
        // SAFETY: `Simd::Avx2` is only constructed when the CPU has AVX2, FMA and F16C; the
        // lengths agree (the assert above).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2::dot_q4_1(row, x) },
        Simd::Portable => dot_q4_1_portable(row, x),
    }
}

/// `Σ_k w_k x_k` for one row of Q8_0 values (`quants`) with one scale per 32.
#[inline]
pub fn dot_q8_0(simd: Simd, quants: &[i8], scales: &[f32], x: &QuantizedRow) -> f32 {
    assert_eq!(quants.len(), x.values.len(), "dot_q8_0: row length");
    assert_eq!(scales.len(), x.blocks(), "dot_q8_0: scales");
    match simd {
        // SAFETY: as in `dot_q4_1`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2::dot_q8_0(quants, scales, x) },
        Simd::Portable => dot_q8_0_portable(quants, scales, x),
    }
}

fn f16_pair(block: &[u8]) -> (f32, f32) {
    let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
    let m = half::f16::from_le_bytes([block[2], block[3]]).to_f32();
    (d, m)
}

fn dot_q4_1_portable(row: &[u8], x: &QuantizedRow) -> f32 {
    let mut total = 0f32;
    for ((block, xq), &[scale, sum]) in row
        .chunks_exact(Q4_1_BYTES)
        .zip(x.values.chunks_exact(BLOCK))
        .zip(&x.scale_sum)
    {
        let (d, m) = f16_pair(block);
        let qx: i32 = block[4..]
            .iter()
            .enumerate()
            .map(|(k, &byte)| {
                (byte & 0x0F) as i32 * xq[k] as i32 + (byte >> 4) as i32 * xq[k + 16] as i32
            })
            .sum();
        total += d * scale * qx as f32 + m * sum;
    }
    total
}

fn dot_q8_0_portable(quants: &[i8], scales: &[f32], x: &QuantizedRow) -> f32 {
    let mut total = 0f32;
    for ((q, d), (xq, &[scale, _])) in quants
        .chunks_exact(BLOCK)
        .zip(scales)
        .zip(x.values.chunks_exact(BLOCK).zip(&x.scale_sum))
    {
        let qx: i32 = q.iter().zip(xq).map(|(&q, &x)| q as i32 * x as i32).sum();
        total += d * scale * qx as f32;
    }
    total
}

/// One row of Q4_1 blocks as f32 values.
pub fn expand_q4_1(row: &[u8], out: &mut [f32]) {
    for (block, o) in row
        .chunks_exact(Q4_1_BYTES)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let (d, m) = f16_pair(block);
        let (lo, hi) = o.split_at_mut(16);
        for ((&byte, lo), hi) in block[4..].iter().zip(lo).zip(hi) {
            *lo = (byte & 0x0F) as f32 * d + m;
            *hi = (byte >> 4) as f32 * d + m;
        }
    }
}

/// One row of Q8_0 values as f32.
pub fn expand_q8_0(quants: &[i8], scales: &[f32], out: &mut [f32]) {
    for ((q, d), o) in quants
        .chunks_exact(BLOCK)
        .zip(scales)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        for (o, &q) in o.iter_mut().zip(q) {
            *o = q as f32 * d;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BLOCK, Q4_1_BYTES, QuantizedRow};

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `[scale, Σx, 0, 0]` of block `b`.
    ///
    /// # Safety
    /// `b` is a block of `x`.
    #[target_feature(enable = "avx2")]
    unsafe fn scale_sum(x: &QuantizedRow, b: usize) -> __m128 {
        // SAFETY: the caller's contract; `[f32; 2]` is 8 bytes.
        unsafe { _mm_castpd_ps(_mm_load_sd(x.scale_sum.as_ptr().add(b) as *const f64)) }
    }

    /// Q4_1 block `b`: the eight i32 partial sums of `q · xq` as f32, and
    /// `[d·scale, m·Σx, 0, 0]`.
    ///
    /// # Safety
    /// `b` is a block of both `row` and `x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_block(row: *const u8, x: &QuantizedRow, b: usize) -> (__m256, __m128) {
        // SAFETY: the caller's contract; unaligned loads throughout.
        unsafe {
            let block = row.add(b * Q4_1_BYTES);
            // [d, m, 0, 0] from the two f16s at the start of the block.
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
            let qs = _mm_loadu_si128(block.add(4) as *const __m128i);
            let low_nibbles = _mm_set1_epi8(0x0F);
            let lo = _mm256_cvtepu8_epi16(_mm_and_si128(qs, low_nibbles));
            let hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(qs, 4), low_nibbles));
            let xq = x.values.as_ptr().add(b * BLOCK) as *const __m256i;
            let sums = _mm256_add_epi32(
                _mm256_madd_epi16(lo, _mm256_loadu_si256(xq)),
                _mm256_madd_epi16(hi, _mm256_loadu_si256(xq.add(1))),
            );
            (_mm256_cvtepi32_ps(sums), _mm_mul_ps(dm, scale_sum(x, b)))
        }
    }

    /// # Safety
    /// `row` holds exactly `x.blocks()` Q4_1 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1(row: &[u8], x: &QuantizedRow) -> f32 {
        let blocks = x.blocks();
        let row = row.as_ptr();
        // Two accumulators (even and odd blocks) so consecutive blocks' FMAs do not wait on
        // each other; the `m · Σx` terms gather in lane 1 of `m_acc`.
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut m_acc = _mm_setzero_ps();
        let mut b = 0;
        // SAFETY (every block below): b < blocks, the caller's contract.
        while b + 1 < blocks {
            let (p0, s0) = unsafe { q4_1_block(row, x, b) };
            let (p1, s1) = unsafe { q4_1_block(row, x, b + 1) };
            acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(s0), p0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_broadcastss_ps(s1), p1, acc1);
            m_acc = _mm_add_ps(m_acc, _mm_add_ps(s0, s1));
            b += 2;
        }
        if b < blocks {
            let (p0, s0) = unsafe { q4_1_block(row, x, b) };
            acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(s0), p0, acc0);
            m_acc = _mm_add_ps(m_acc, s0);
        }
        hsum(_mm256_add_ps(acc0, acc1)) + _mm_cvtss_f32(_mm_shuffle_ps(m_acc, m_acc, 1))
    }

    /// Q8_0 block `b`: the eight i32 partial sums of `q · xq` as f32.
    ///
    /// # Safety
    /// `b` is a block of both `quants` and `x`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn q8_0_block(quants: *const i8, x: &QuantizedRow, b: usize) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe {
            let q = quants.add(b * BLOCK) as *const __m128i;
            let xq = x.values.as_ptr().add(b * BLOCK) as *const __m256i;
            let sums = _mm256_add_epi32(
                _mm256_madd_epi16(
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(q)),
                    _mm256_loadu_si256(xq),
                ),
                _mm256_madd_epi16(
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(1))),
                    _mm256_loadu_si256(xq.add(1)),
                ),
            );
            _mm256_cvtepi32_ps(sums)
        }
    }

    /// # Safety
    /// `quants` and `scales` hold exactly `x.blocks()` blocks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0(quants: &[i8], scales: &[f32], x: &QuantizedRow) -> f32 {
        let blocks = x.blocks();
        let q = quants.as_ptr();
        let scale = |b: usize| scales[b] * x.scale_sum[b][0];
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut b = 0;
        // SAFETY (every block below): b < blocks, the caller's contract.
        while b + 1 < blocks {
            let p0 = unsafe { q8_0_block(q, x, b) };
            let p1 = unsafe { q8_0_block(q, x, b + 1) };
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(scale(b)), p0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(scale(b + 1)), p1, acc1);
            b += 2;
        }
        if b < blocks {
            let p0 = unsafe { q8_0_block(q, x, b) };
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(scale(b)), p0, acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn q4_1_row(blocks: usize) -> Vec<u8> {
        let bytes = pseudo_random(blocks * 16, 7);
        let scales = pseudo_random(blocks * 2, 9);
        let mut row = Vec::new();
        for b in 0..blocks {
            row.extend(half::f16::from_f32(scales[2 * b] * 0.1).to_le_bytes());
            row.extend(half::f16::from_f32(scales[2 * b + 1]).to_le_bytes());
            row.extend(
                bytes[b * 16..(b + 1) * 16]
                    .iter()
                    .map(|v| (v.abs() * 255.0) as u8),
            );
        }
        row
    }

    /// `got` is `Σ w·x` up to the i16 rounding of `x`: at most half a step of 1/32767 of a
    /// block's largest |x| per term, so well under 1e-4 of `Σ |w·x|`.
    fn close(got: f32, w: &[f32], x: &[f32]) -> bool {
        let want: f32 = w.iter().zip(x).map(|(a, b)| a * b).sum();
        let magnitude: f32 = w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
        (got - want).abs() <= 1e-4 * magnitude
    }

    #[test]
    fn q4_1_dot_equals_the_dot_of_the_expanded_row() {
        let blocks = 18;
        let row = q4_1_row(blocks);
        let x = pseudo_random(blocks * BLOCK, 3);
        let mut w = vec![0f32; x.len()];
        expand_q4_1(&row, &mut w);
        let xq = QuantizedRow::new(&x);
        for simd in [Simd::Portable, Simd::detect()] {
            let got = dot_q4_1(simd, &row, &xq);
            assert!(close(got, &w, &x), "{simd:?}: {got}");
        }
    }

    #[test]
    fn q8_0_dot_equals_the_dot_of_the_expanded_row() {
        let blocks = 18;
        let quants: Vec<i8> = pseudo_random(blocks * BLOCK, 5)
            .iter()
            .map(|v| (v * 127.0) as i8)
            .collect();
        let scales = pseudo_random(blocks, 11);
        let x = pseudo_random(blocks * BLOCK, 13);
        let mut w = vec![0f32; x.len()];
        expand_q8_0(&quants, &scales, &mut w);
        let xq = QuantizedRow::new(&x);
        for simd in [Simd::Portable, Simd::detect()] {
            let got = dot_q8_0(simd, &quants, &scales, &xq);
            assert!(close(got, &w, &x), "{simd:?}: {got}");
        }
    }
}
