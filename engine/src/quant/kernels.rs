//! The per-row kernels behind [`super::BlockMatrix`]: a weight row (in blocks) dotted with the
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
//! 8 bits instead (half the multiply instructions). Rounded that way here, SmolLM2's greedy
//! tokens left the transformers reference within five tokens on four of its six prompts,
//! and at the first token on one; 16 bits keeps all six whole, for one more multiply per
//! block and input.
//!
//! Q4_1 blocks use `Σ (d·q + m)·x = d·sₓ·Σ q·xq + m·Σ x`, with the f32 block sums `Σ x`
//! kept beside the i16 values. Their rows are regrouped at load (same bytes, same size):
//! ggml interleaves each block's f16 `d` and `m` with its nibbles, which costs a conversion
//! and a shuffle per block; here each group of 8 blocks stores its 8 `d`s, then its 8 `m`s,
//! then the 8 × 16 nibble bytes, so one instruction converts 8 scales, one multiply forms
//! the 8 products `d·sₓ`, and one FMA adds the 8 `m·Σx` terms.
//!
//! Each kernel has a portable version (the reference, and what non-x86 CPUs run) and an
//! AVX2/FMA/F16C one picked at run time; the tests hold them to each other. Where the CPU also
//! has AVX-VNNI, the dots add the second half of each block's products with `vpdpwssd`
//! (multiply pairs and accumulate, exact in i32 as `vpmaddwd` + `vpaddd`), one instruction
//! fewer per block and input: the same sums, from the same body.

pub const BLOCK: usize = 32;
/// Bytes of one Q4_1 block: f16 `d`, f16 `m`, 16 bytes of nibbles.
pub const Q4_1_BYTES: usize = 20;
/// Blocks per group in the regrouped Q4_1 row layout.
const GROUP: usize = 8;

/// Which kernels this CPU runs, detected once per matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Portable,
    /// AVX2, FMA and F16C; `vnni`: AVX-VNNI too (the dots' pair sums in one instruction).
    #[cfg(target_arch = "x86_64")]
    Avx2 {
        vnni: bool,
    },
}

impl Simd {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Simd::Avx2 {
                vnni: std::arch::is_x86_feature_detected!("avxvnni"),
            };
        }
        Simd::Portable
    }

    /// Every kernel set this CPU can run, for tests that hold them to each other.
    #[cfg(test)]
    pub fn available() -> Vec<Self> {
        let mut sets = vec![Simd::Portable];
        #[cfg(target_arch = "x86_64")]
        if let Simd::Avx2 { vnni } = Simd::detect() {
            sets.push(Simd::Avx2 { vnni: false });
            if vnni {
                sets.push(Simd::Avx2 { vnni: true });
            }
        }
        sets
    }
}

/// One input row prepared for the integer kernels.
pub struct QuantizedRow {
    /// `x` rounded to i16 per block: `x ≈ values · scale`.
    values: Vec<i16>,
    /// One per block, then zeros up to a whole group of 8 (so a row's short last group is
    /// read eight lanes at a time, its missing blocks adding 0).
    scales: Vec<f32>,
    /// `Σ x` per block, from the f32 values (Q4_1's `m` term); padded as `scales`.
    sums: Vec<f32>,
}

impl QuantizedRow {
    pub fn new(x: &[f32]) -> Self {
        match Simd::detect() {
            // SAFETY: `Simd::Avx2` means the CPU has AVX2 and FMA. (Written out: the compiler
            // left the portable loop scalar, a libm rounding per value, which was a sixth of
            // the thread that runs a batched step's serial part.)
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 { .. } => unsafe { Self::new_avx2(x) },
            Simd::Portable => Self::quantize(x),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn new_avx2(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut values = vec![0i16; blocks * BLOCK];
        let mut scales = vec![0f32; blocks.next_multiple_of(GROUP)];
        let mut sums = vec![0f32; blocks.next_multiple_of(GROUP)];
        for b in 0..blocks {
            // SAFETY: block `b` is inside `x` and `values`.
            unsafe {
                let (scale, sum) = avx2::quantize_block(
                    x.as_ptr().add(b * BLOCK),
                    values.as_mut_ptr().add(b * BLOCK),
                );
                scales[b] = scale;
                sums[b] = sum;
            }
        }
        Self {
            values,
            scales,
            sums,
        }
    }

    #[inline(always)]
    fn quantize(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut values = vec![0i16; x.len()];
        let mut scales = Vec::with_capacity(blocks.next_multiple_of(GROUP));
        let mut sums = Vec::with_capacity(blocks.next_multiple_of(GROUP));
        for (block, q) in x.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / i16::MAX as f32;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            for (q, v) in q.iter_mut().zip(block) {
                *q = (v * inv).round_ties_even() as i16;
            }
            scales.push(scale);
            sums.push(block.iter().sum());
        }
        scales.resize(blocks.next_multiple_of(GROUP), 0.0);
        sums.resize(blocks.next_multiple_of(GROUP), 0.0);
        Self {
            values,
            scales,
            sums,
        }
    }

    fn blocks(&self) -> usize {
        self.values.len() / BLOCK
    }
}

/// Where group `g` of a regrouped Q4_1 row starts, and how many blocks it has.
#[inline]
fn group(blocks: usize, g: usize) -> (usize, usize) {
    let first = g * GROUP;
    (first * Q4_1_BYTES, GROUP.min(blocks - first))
}

/// ggml's Q4_1 row (blocks of `d`, `m`, nibbles) in the grouped layout (module docs).
pub fn regroup_q4_1(row: &[u8], out: &mut [u8]) {
    let blocks = row.len() / Q4_1_BYTES;
    for g in 0..blocks.div_ceil(GROUP) {
        let (start, n) = group(blocks, g);
        let src = &row[start..start + n * Q4_1_BYTES];
        let dst = &mut out[start..start + n * Q4_1_BYTES];
        for (i, block) in src.chunks_exact(Q4_1_BYTES).enumerate() {
            dst[2 * i..2 * i + 2].copy_from_slice(&block[0..2]);
            dst[2 * n + 2 * i..2 * n + 2 * i + 2].copy_from_slice(&block[2..4]);
            dst[4 * n + 16 * i..4 * n + 16 * (i + 1)].copy_from_slice(&block[4..]);
        }
    }
}

/// Block `i` of a group of `n` starting at `group`: `(d, m, nibbles)`.
fn q4_1_block(group: &[u8], n: usize, i: usize) -> (f32, f32, &[u8]) {
    let f16 = |at: usize| half::f16::from_le_bytes([group[at], group[at + 1]]).to_f32();
    (
        f16(2 * i),
        f16(2 * n + 2 * i),
        &group[4 * n + 16 * i..4 * n + 16 * (i + 1)],
    )
}

/// `Σ_k w_k x_k` for each of `R` regrouped rows of Q4_1 blocks (element k < 16 of a block is
/// byte k's low nibble, element k + 16 its high nibble; w = d·q + m).
#[inline]
pub fn dot_q4_1<const R: usize>(simd: Simd, rows: [&[u8]; R], x: &QuantizedRow) -> [f32; R] {
    for row in rows {
        assert_eq!(row.len(), x.blocks() * Q4_1_BYTES, "dot_q4_1: row length");
    }
    match simd {
        // SAFETY: `Simd::Avx2` is only constructed when the CPU has AVX2, FMA and F16C; the
        // lengths agree (the assert above).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: false } => unsafe { avx2::dot_q4_1(rows, x) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: true } => unsafe { avx2::dot_q4_1_vnni(rows, x) },
        Simd::Portable => rows.map(|row| dot_q4_1_portable(row, x)),
    }
}

/// `Σ_k w_k x_k` of one regrouped Q4_1 row with each of `M` input rows: each block is
/// unpacked once for all inputs (a batch of decode rows costs little more than one). Every
/// result is bit-identical to [`dot_q4_1`]'s for that input alone: the same operations on
/// it in the same order.
#[inline]
pub fn dot_q4_1_inputs<const M: usize>(simd: Simd, row: &[u8], xs: [&QuantizedRow; M]) -> [f32; M] {
    for x in xs {
        assert_eq!(
            row.len(),
            x.blocks() * Q4_1_BYTES,
            "dot_q4_1_inputs: row length"
        );
    }
    match simd {
        // SAFETY: as in `dot_q4_1`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: false } => unsafe { avx2::dot_q4_1_inputs(row, xs) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: true } => unsafe { avx2::dot_q4_1_inputs_vnni(row, xs) },
        Simd::Portable => xs.map(|x| dot_q4_1_portable(row, x)),
    }
}

/// `Σ_k w_k x_k` for one row of Q8_0 values (`quants`) with one scale per 32, and each of
/// `M` inputs; an input's result does not depend on `M`.
#[inline]
pub fn dot_q8_0_inputs<const M: usize>(
    simd: Simd,
    quants: &[i8],
    scales: &[f32],
    xs: [&QuantizedRow; M],
) -> [f32; M] {
    for x in xs {
        assert_eq!(quants.len(), x.values.len(), "dot_q8_0_inputs: row length");
        assert_eq!(scales.len(), x.blocks(), "dot_q8_0_inputs: scales");
    }
    match simd {
        // SAFETY: as in `dot_q4_1`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: false } => unsafe { avx2::dot_q8_0_inputs(quants, scales, xs) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: true } => unsafe { avx2::dot_q8_0_inputs_vnni(quants, scales, xs) },
        Simd::Portable => xs.map(|x| dot_q8_0_portable(quants, scales, x)),
    }
}

fn dot_q4_1_portable(row: &[u8], x: &QuantizedRow) -> f32 {
    let blocks = x.blocks();
    let mut total = 0f32;
    for g in 0..blocks.div_ceil(GROUP) {
        let (start, n) = group(blocks, g);
        for i in 0..n {
            let b = g * GROUP + i;
            let (d, m, nibbles) = q4_1_block(&row[start..], n, i);
            let xq = &x.values[b * BLOCK..(b + 1) * BLOCK];
            let qx: i32 = nibbles
                .iter()
                .enumerate()
                .map(|(k, &byte)| {
                    (byte & 0x0F) as i32 * xq[k] as i32 + (byte >> 4) as i32 * xq[k + 16] as i32
                })
                .sum();
            total += d * x.scales[b] * qx as f32 + m * x.sums[b];
        }
    }
    total
}

fn dot_q8_0_portable(quants: &[i8], scales: &[f32], x: &QuantizedRow) -> f32 {
    let mut total = 0f32;
    for (((q, d), xq), scale) in quants
        .chunks_exact(BLOCK)
        .zip(scales)
        .zip(x.values.chunks_exact(BLOCK))
        .zip(&x.scales)
    {
        let qx: i32 = q.iter().zip(xq).map(|(&q, &x)| q as i32 * x as i32).sum();
        total += d * scale * qx as f32;
    }
    total
}

/// One regrouped row of Q4_1 blocks as f32 values.
pub fn expand_q4_1(row: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Simd::Avx2 { .. } = Simd::detect() {
        // SAFETY: `Simd::Avx2` means the CPU has AVX2 and F16C.
        return unsafe { avx2::expand_q4_1(row, out) };
    }
    expand_q4_1_portable(row, out)
}

fn expand_q4_1_portable(row: &[u8], out: &mut [f32]) {
    let blocks = out.len() / BLOCK;
    for g in 0..blocks.div_ceil(GROUP) {
        let (start, n) = group(blocks, g);
        for i in 0..n {
            let (d, m, nibbles) = q4_1_block(&row[start..], n, i);
            let b = g * GROUP + i;
            let (lo, hi) = out[b * BLOCK..(b + 1) * BLOCK].split_at_mut(16);
            for ((&byte, lo), hi) in nibbles.iter().zip(lo).zip(hi) {
                *lo = (byte & 0x0F) as f32 * d + m;
                *hi = (byte >> 4) as f32 * d + m;
            }
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

    use super::{BLOCK, GROUP, QuantizedRow, group};

    /// How far ahead of the row being multiplied its successors are asked into cache. Rows
    /// are contiguous and read in order, yet the hardware's own prefetching left one input
    /// row against a 100 MB Q4_1 matrix (two cores, this VM reads ~11.5 GB/s) at 17.0–18.8
    /// ms; asking for the bytes 4 KiB ahead (about ten SmolLM2 rows) took 12.8–14.2 ms in
    /// the same run (2 KiB: 12.6–14.3, 8 KiB: 13.8–14.2). Batched rows are bound by the
    /// arithmetic, not the reads, and gain nothing either way.
    const PREFETCH_AHEAD: usize = 4096;

    /// Asks for `len` bytes from `PREFETCH_AHEAD` past `row` (addresses past the weights are
    /// fine: a prefetch never faults).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prefetch_ahead(row: *const u8, len: usize) {
        let ahead = row.wrapping_add(PREFETCH_AHEAD);
        for offset in (0..len).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(offset) as *const i8);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One block of 32 f32 at `x` rounded to i16 at `q` (`x ≈ q · scale`, ties to even, as
    /// the portable loop): returns `(scale, Σ x)`.
    ///
    /// # Safety
    /// 32 values are readable at `x` and writable at `q`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_block(x: *const f32, q: *mut i16) -> (f32, f32) {
        // SAFETY: the caller's contract; unaligned loads and stores.
        unsafe {
            let v = [0, 8, 16, 24].map(|at| _mm256_loadu_ps(x.add(at)));
            let sign = _mm256_set1_ps(-0.0);
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let max = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
            let scale = max / i16::MAX as f32;
            let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            // Rounded to the nearest, ties to even (the default rounding mode).
            let i = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
            // `packs` interleaves 128-bit halves; the permute puts the 16 values back in order.
            for (k, pair) in [(i[0], i[1]), (i[2], i[3])].into_iter().enumerate() {
                let packed =
                    _mm256_permute4x64_epi64(_mm256_packs_epi32(pair.0, pair.1), 0b11_01_10_00);
                _mm256_storeu_si256(q.add(16 * k) as *mut __m256i, packed);
            }
            let sum = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
            (scale, hsum(sum))
        }
    }

    /// One Q4_1 block's 16 nibble bytes at `nibbles` widened to i16: elements 0..16 (low
    /// nibbles) and 16..32 (high nibbles). The bytes are widened once, to 16 words, and one
    /// mask and one shift split them. Written with intrinsics, LLVM moves the mask and the
    /// shift ahead of the widening (onto the bytes), which then takes two widenings: two
    /// port-5 shuffles per block where one does. The widening is therefore an `asm!`
    /// instruction the compiler cannot reorder around. A lone decode row (two rows per
    /// call, one input) went x1.15-1.18 faster for it in one process, alternating; four
    /// inputs, whose multiplies bound them, x1.00.
    ///
    /// # Safety
    /// 16 bytes at `nibbles` are readable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn q4_1_unpack(nibbles: *const u8) -> (__m256i, __m256i) {
        let bytes: __m256i;
        // SAFETY: the caller's contract; the instruction reads exactly those 16 bytes
        // (unaligned) and touches no flags or stack.
        unsafe {
            std::arch::asm!(
                "vpmovzxbw {bytes}, xmmword ptr [{nibbles}]",
                bytes = out(ymm_reg) bytes,
                nibbles = in(reg) nibbles,
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        (
            _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F)),
            _mm256_srli_epi16(bytes, 4),
        )
    }

    /// `Σ q·xq` of an unpacked block (Q4_1 or Q8_0, as 32 i16) with 32 i16 at `xq`, as
    /// eight f32 partial sums. `VNNI`: the second half's pairs are multiplied and added to
    /// the first's in one `vpdpwssd` (the same exact i32 sums).
    ///
    /// # Safety
    /// 32 i16 at `xq` are readable; `VNNI` only where the CPU has AVX-VNNI.
    #[inline(always)]
    unsafe fn dot_unpacked<const VNNI: bool>(
        (lo, hi): (__m256i, __m256i),
        xq: *const i16,
    ) -> __m256 {
        // SAFETY: the caller's contract; unaligned loads.
        unsafe {
            let xq = xq as *const __m256i;
            let first = _mm256_madd_epi16(lo, _mm256_loadu_si256(xq));
            let second = _mm256_loadu_si256(xq.add(1));
            _mm256_cvtepi32_ps(if VNNI {
                _mm256_dpwssd_avx_epi32(first, hi, second)
            } else {
                _mm256_add_epi32(first, _mm256_madd_epi16(hi, second))
            })
        }
    }

    /// A group's 8 `d`s and 8 `m`s as f32 (`n` < 8: the short last group of a row, its
    /// missing lanes 0).
    ///
    /// # Safety
    /// The group of `n` blocks at `grp` is readable.
    #[inline(always)]
    unsafe fn group_scales(grp: *const u8, n: usize) -> (__m256, __m256) {
        /// `[n..n + 8]` keeps the first `8 - n` lanes of eight u16.
        const KEEP: [u16; 16] = [
            0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        // SAFETY: the caller's contract: `d`s at 0..2n, `m`s at 2n..4n. Both 16-byte loads
        // stay inside the group's 20n bytes (2n + 16 <= 20n for n >= 1); for a short group
        // they also read the next bytes, whose lanes the mask clears before they are
        // converted (a nibble byte pair can be an f16 NaN). The loads are direct: the short
        // group was copied into a zeroed array first, and loading 16 bytes over those small
        // stores stalled (a store not forwarded), twice per SmolLM2 row.
        unsafe {
            let d = _mm_loadu_si128(grp as *const __m128i);
            let m = _mm_loadu_si128(grp.add(2 * n) as *const __m128i);
            let (d, m) = if n == GROUP {
                (d, m)
            } else {
                let keep = _mm_loadu_si128(KEEP.as_ptr().add(GROUP - n) as *const __m128i);
                (_mm_and_si128(d, keep), _mm_and_si128(m, keep))
            };
            (_mm256_cvtph_ps(d), _mm256_cvtph_ps(m))
        }
    }

    /// Group `g` (of `n` blocks) of `R` rows (at `grps`) against `M` inputs, each block of a
    /// row unpacked once for all inputs and the rows interleaved block by block (their FMA
    /// chains are independent, so the core overlaps them): per (row, input), `m·Σx` of the 8
    /// lanes into `offsets`, and `d·sₓ·Σq·xq` of each block into `acc`, in block order. The
    /// one body every Q4_1 kernel runs, so a (row, input) value is the same whichever kernel
    /// and batch computed it.
    ///
    /// # Safety
    /// The group is inside every row, and its blocks (and lanes up to 8) inside every input.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn q4_1_group<const R: usize, const M: usize, const VNNI: bool>(
        grps: [*const u8; R],
        n: usize,
        first: usize,
        xs: [&QuantizedRow; M],
        acc: &mut [[__m256; M]; R],
        offsets: &mut [[__m256; M]; R],
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            let mut factors = [[[0f32; GROUP]; M]; R];
            for r in 0..R {
                let (d, m) = group_scales(grps[r], n);
                for j in 0..M {
                    let xs_ = _mm256_loadu_ps(xs[j].scales.as_ptr().add(first));
                    let sums = _mm256_loadu_ps(xs[j].sums.as_ptr().add(first));
                    offsets[r][j] = _mm256_fmadd_ps(m, sums, offsets[r][j]);
                    _mm256_storeu_ps(factors[r][j].as_mut_ptr(), _mm256_mul_ps(d, xs_));
                }
            }
            for i in 0..n {
                for r in 0..R {
                    let unpacked = q4_1_unpack(grps[r].add(4 * n + 16 * i));
                    for j in 0..M {
                        let xq = xs[j].values.as_ptr().add((first + i) * BLOCK);
                        let p = dot_unpacked::<VNNI>(unpacked, xq);
                        let factor = _mm256_broadcast_ss(&factors[r][j][i]);
                        acc[r][j] = _mm256_fmadd_ps(factor, p, acc[r][j]);
                    }
                }
            }
        }
    }

    /// `R` rows against `M` inputs: [`q4_1_group`] over the rows' groups.
    ///
    /// # Safety
    /// Each row holds exactly `x.blocks()` regrouped Q4_1 blocks for every input `x`.
    #[inline(always)]
    unsafe fn dot_q4_1_rows_inputs<const R: usize, const M: usize, const VNNI: bool>(
        rows: [&[u8]; R],
        xs: [&QuantizedRow; M],
    ) -> [[f32; M]; R] {
        // SAFETY: group `g` spans `row[start..start + n * 20]` of every row, and blocks
        // `g * 8..g * 8 + n` (lanes up to 8, padded) of every input (the caller's contract);
        // a whole group is passed as the constant 8, so it is unrolled. The callers enable
        // AVX2, FMA and F16C.
        unsafe {
            let blocks = xs.first().map_or(0, |x| x.blocks());
            let mut acc = [[_mm256_setzero_ps(); M]; R];
            let mut offsets = [[_mm256_setzero_ps(); M]; R];
            for g in 0..blocks.div_ceil(GROUP) {
                let (start, n) = group(blocks, g);
                let grps = rows.map(|row| row.as_ptr().add(start));
                if n == GROUP {
                    q4_1_group::<R, M, VNNI>(grps, GROUP, g * GROUP, xs, &mut acc, &mut offsets);
                } else {
                    q4_1_group::<R, M, VNNI>(grps, n, g * GROUP, xs, &mut acc, &mut offsets);
                }
            }
            std::array::from_fn(|r| {
                std::array::from_fn(|j| hsum(_mm256_add_ps(acc[r][j], offsets[r][j])))
            })
        }
    }

    /// One row against `M` inputs (a batch of rows): each block unpacked once for all of
    /// them.
    ///
    /// # Safety
    /// The row holds exactly `x.blocks()` regrouped Q4_1 blocks for every input `x`; `VNNI`
    /// only where the CPU has AVX-VNNI.
    #[inline(always)]
    unsafe fn q4_1_inputs<const M: usize, const VNNI: bool>(
        row: &[u8],
        xs: [&QuantizedRow; M],
    ) -> [f32; M] {
        // SAFETY: the caller's contract (and a prefetch never faults).
        unsafe {
            prefetch_ahead(row.as_ptr(), row.len());
            let [out] = dot_q4_1_rows_inputs::<1, M, VNNI>([row], xs);
            out
        }
    }

    /// `R` rows with one input (decoding one sequence): every activation block loaded is
    /// used `R` times, and the rows' chains overlap.
    ///
    /// # Safety
    /// Each row holds exactly `x.blocks()` regrouped Q4_1 blocks; `VNNI` only where the CPU
    /// has AVX-VNNI.
    #[inline(always)]
    unsafe fn q4_1_rows<const R: usize, const VNNI: bool>(
        rows: [&[u8]; R],
        x: &QuantizedRow,
    ) -> [f32; R] {
        // SAFETY: the caller's contract (and a prefetch never faults).
        unsafe {
            for row in rows {
                prefetch_ahead(row.as_ptr(), row.len());
            }
            dot_q4_1_rows_inputs::<R, 1, VNNI>(rows, [x]).map(|[value]| value)
        }
    }

    // The entry points, one per instruction set: a `#[target_feature]` cannot depend on a
    // const parameter. SAFETY (each): the caller's contract, as for the body it calls.

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1_inputs<const M: usize>(row: &[u8], xs: [&QuantizedRow; M]) -> [f32; M] {
        unsafe { q4_1_inputs::<M, false>(row, xs) }
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub unsafe fn dot_q4_1_inputs_vnni<const M: usize>(
        row: &[u8],
        xs: [&QuantizedRow; M],
    ) -> [f32; M] {
        unsafe { q4_1_inputs::<M, true>(row, xs) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1<const R: usize>(rows: [&[u8]; R], x: &QuantizedRow) -> [f32; R] {
        unsafe { q4_1_rows::<R, false>(rows, x) }
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub unsafe fn dot_q4_1_vnni<const R: usize>(rows: [&[u8]; R], x: &QuantizedRow) -> [f32; R] {
        unsafe { q4_1_rows::<R, true>(rows, x) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0_inputs<const M: usize>(
        quants: &[i8],
        scales: &[f32],
        xs: [&QuantizedRow; M],
    ) -> [f32; M] {
        unsafe { q8_0_inputs::<M, false>(quants, scales, xs) }
    }

    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub unsafe fn dot_q8_0_inputs_vnni<const M: usize>(
        quants: &[i8],
        scales: &[f32],
        xs: [&QuantizedRow; M],
    ) -> [f32; M] {
        unsafe { q8_0_inputs::<M, true>(quants, scales, xs) }
    }

    /// [`super::expand_q4_1`]: the same values (a multiply, then an add, as the portable
    /// loop rounds them), eight at a time. The tiled prefill expands every weight once per
    /// call, and the portable loop took about a fifth of a short prompt's prefill.
    ///
    /// # Safety
    /// `row` holds the regrouped blocks of `out.len() / 32` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn expand_q4_1(row: &[u8], out: &mut [f32]) {
        let blocks = out.len() / BLOCK;
        let whole = blocks / GROUP;
        for g in 0..whole {
            let (start, _) = group(blocks, g);
            let mut d = [0f32; GROUP];
            let mut m = [0f32; GROUP];
            // SAFETY: group `g` is whole and inside `row`, its 256 values inside `out` (the
            // caller's contract).
            unsafe {
                let grp = row.as_ptr().add(start);
                _mm256_storeu_ps(
                    d.as_mut_ptr(),
                    _mm256_cvtph_ps(_mm_loadu_si128(grp as *const __m128i)),
                );
                _mm256_storeu_ps(
                    m.as_mut_ptr(),
                    _mm256_cvtph_ps(_mm_loadu_si128(grp.add(16) as *const __m128i)),
                );
                for i in 0..GROUP {
                    let (di, mi) = (_mm256_set1_ps(d[i]), _mm256_set1_ps(m[i]));
                    let bytes = _mm_loadu_si128(grp.add(4 * GROUP + 16 * i) as *const __m128i);
                    let mask = _mm_set1_epi8(0x0F);
                    let lo = _mm_and_si128(bytes, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                    let dst = out.as_mut_ptr().add((g * GROUP + i) * BLOCK);
                    for (k, eight) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
                        .into_iter()
                        .enumerate()
                    {
                        let q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight));
                        _mm256_storeu_ps(dst.add(8 * k), _mm256_add_ps(_mm256_mul_ps(q, di), mi));
                    }
                }
            }
        }
        if whole * GROUP < blocks {
            let (start, _) = group(blocks, whole);
            super::expand_q4_1_portable(&row[start..], &mut out[whole * GROUP * BLOCK..]);
        }
    }

    /// One Q8_0 block's 32 i8 at `q` widened to i16 (two halves of 16).
    ///
    /// # Safety
    /// 32 i8 at `q` are readable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn q8_0_unpack(q: *const i8) -> (__m256i, __m256i) {
        // SAFETY: the caller's contract; unaligned loads.
        unsafe {
            let q = q as *const __m128i;
            (
                _mm256_cvtepi8_epi16(_mm_loadu_si128(q)),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(1))),
            )
        }
    }

    /// One Q8_0 row with `M` inputs: each block widened once for all of them (the output
    /// head of a batch of decode rows). A lone input is `M` = 1, so an input's result is the
    /// same with any `M`. Blocks alternate between two accumulators per input, so one input
    /// is not held up by a single FMA chain.
    ///
    /// # Safety
    /// `quants` and `scales` hold exactly `x.blocks()` blocks for every input `x`; `VNNI`
    /// only where the CPU has AVX-VNNI.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn q8_0_inputs<const M: usize, const VNNI: bool>(
        quants: &[i8],
        scales: &[f32],
        xs: [&QuantizedRow; M],
    ) -> [f32; M] {
        // SAFETY: every block read is below `blocks` (the caller's contract); the callers
        // enable the instruction sets.
        unsafe {
            prefetch_ahead(quants.as_ptr() as *const u8, quants.len());
            prefetch_ahead(scales.as_ptr() as *const u8, size_of_val(scales));
            let blocks = scales.len();
            let q = quants.as_ptr();
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            let mut products = [[0f32; GROUP]; M];
            let mut b = 0;
            while b + GROUP <= blocks {
                let d = _mm256_loadu_ps(scales.as_ptr().add(b));
                for j in 0..M {
                    let ds = _mm256_mul_ps(d, _mm256_loadu_ps(xs[j].scales.as_ptr().add(b)));
                    _mm256_storeu_ps(products[j].as_mut_ptr(), ds);
                }
                for i in 0..GROUP {
                    let unpacked = q8_0_unpack(q.add(BLOCK * (b + i)));
                    for j in 0..M {
                        let xq = xs[j].values.as_ptr().add(BLOCK * (b + i));
                        let p = dot_unpacked::<VNNI>(unpacked, xq);
                        let scale = _mm256_broadcast_ss(&products[j][i]);
                        acc[j][i % 2] = _mm256_fmadd_ps(scale, p, acc[j][i % 2]);
                    }
                }
                b += GROUP;
            }
            while b < blocks {
                let unpacked = q8_0_unpack(q.add(BLOCK * b));
                for j in 0..M {
                    let p = dot_unpacked::<VNNI>(unpacked, xs[j].values.as_ptr().add(BLOCK * b));
                    let scale = _mm256_set1_ps(scales[b] * xs[j].scales[b]);
                    acc[j][0] = _mm256_fmadd_ps(scale, p, acc[j][0]);
                }
                b += 1;
            }
            std::array::from_fn(|j| hsum(_mm256_add_ps(acc[j][0], acc[j][1])))
        }
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
        let ggml = q4_1_row(blocks);
        let mut row = vec![0u8; ggml.len()];
        regroup_q4_1(&ggml, &mut row);
        let x = pseudo_random(blocks * BLOCK, 3);
        // The reference values: gguf's own dequantization of the ggml-order blocks.
        let mut w = vec![0f32; x.len()];
        crate::gguf::dequantize_q4_1(&ggml, &mut w).unwrap();
        let mut expanded = vec![0f32; x.len()];
        expand_q4_1(&row, &mut expanded);
        assert_eq!(expanded, w, "regrouped blocks expand to the same values");
        let xq = QuantizedRow::new(&x);
        for simd in Simd::available() {
            let [got] = dot_q4_1(simd, [&row], &xq);
            let [a, b] = dot_q4_1(simd, [&row, &row], &xq);
            assert_eq!([a, b], [got, got], "{simd:?}: two rows at once");
            let other = QuantizedRow::new(&pseudo_random(blocks * BLOCK, 17));
            let [alone_other] = dot_q4_1(simd, [&row], &other);
            let together = dot_q4_1_inputs(simd, &row, [&xq, &other, &xq]);
            assert_eq!(
                together,
                [got, alone_other, got],
                "{simd:?}: several inputs at once"
            );
            assert!(close(got, &w, &x), "{simd:?}: {got}");
        }
    }

    #[test]
    fn a_short_group_reads_only_its_own_scales() {
        // 9 blocks: a whole group and one of a single block, whose nibbles are all 0xFF (as
        // f16, NaN) right after its `m`: the vector kernels load 16 bytes from its scales.
        let mut ggml = q4_1_row(9);
        ggml[8 * Q4_1_BYTES + 4..].fill(0xFF);
        let mut row = vec![0u8; ggml.len()];
        regroup_q4_1(&ggml, &mut row);
        let x = QuantizedRow::new(&pseudo_random(9 * BLOCK, 29));
        let want = dot_q4_1_portable(&row, &x);
        assert!(want.is_finite());
        for simd in Simd::available() {
            assert_eq!(dot_q4_1(simd, [&row], &x), [want], "{simd:?}");
            assert_eq!(dot_q4_1_inputs(simd, &row, [&x, &x]), [want; 2], "{simd:?}");
        }
    }

    #[test]
    fn activations_round_the_same_with_every_kernel_set() {
        let mut x = pseudo_random(5 * BLOCK, 23);
        x[40] = 0.5 / i16::MAX as f32 * x[33].abs(); // near a tie
        x[64..96].fill(0.0); // an all-zero block
        let portable = QuantizedRow::quantize(&x);
        let detected = QuantizedRow::new(&x);
        assert_eq!(portable.values, detected.values);
        assert_eq!(portable.scales, detected.scales);
        assert_eq!(detected.scales.len(), 8, "padded to a whole group");
        for (a, b) in portable.sums.iter().zip(&detected.sums) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
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
        for simd in Simd::available() {
            let [got] = dot_q8_0_inputs(simd, &quants, &scales, [&xq]);
            assert!(close(got, &w, &x), "{simd:?}: {got}");
            let other = QuantizedRow::new(&pseudo_random(blocks * BLOCK, 19));
            let [alone_other] = dot_q8_0_inputs(simd, &quants, &scales, [&other]);
            let together = dot_q8_0_inputs(simd, &quants, &scales, [&xq, &other, &xq]);
            assert_eq!(
                together,
                [got, alone_other, got],
                "{simd:?}: several inputs at once"
            );
        }
    }
}
