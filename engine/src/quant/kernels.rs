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
//! kept beside the i16 values.
//!
//! **The layout: blocks side by side.** Weights and activations alike are stored in
//! *subgroups* of blocks: a row's blocks are cut into groups of 8, then the rest into 4, 2
//! and 1 (its binary digits). A subgroup of `p` blocks is a run of chunks of 16 values
//! (activations, Q8_0 weights) or 16 nibble bytes (Q4_1), chunk `c` holding `16/p`
//! consecutive units of each block in turn, from unit `c·16/p`. Widened to words and
//! multiplied pairwise, a chunk gives each block `8/p` of a register's eight i32 lanes, so a
//! subgroup's integer dot for one (row, input) builds up exactly in one register and is
//! converted and scaled once: one conversion and one FMA (with the blocks' `d·sₓ` spread over
//! their lanes) per subgroup, where a block per register paid them per block. (A Q8_0 lane
//! past 2^24 rounds to f32's 24 bits as it is converted, far below the activations' own
//! rounding; Q4_1 lanes stay under it.) A Q4_1 nibble chunk `k` widens to the low nibbles
//! (activation chunk `k`) and the high ones (chunk `p + k`). Each Q4_1 subgroup stores its
//! `p` f16 `d`s, then its `p` `m`s, then the nibble chunks (same bytes, same size as ggml's
//! blocks), so one instruction converts a subgroup's scales and one FMA adds its `m·Σx`
//! terms.
//!
//! **Two rows by up to four inputs per pass.** The kernel dots two weight rows with up to
//! four inputs at once: each weight chunk is widened once for all inputs and each activation
//! chunk loaded once for both rows, which leaves the multiplies as nearly all the work.
//! Against one block per register and one row per pass (a 256 KB matrix in cache, one
//! thread, the two builds alternating): ×1.47 (576 columns) and ×1.49 (1536) at four inputs,
//! ×0.98 and ×1.13 at one, which reads the weights from memory in a real step anyway. Every (row, input) value comes from the same operations in
//! the same order whatever the rows and inputs beside it, so a sequence decodes the same
//! alone or in any batch.
//!
//! The dot has a portable version, lane by lane (the reference, and what non-x86 CPUs run),
//! and an AVX2/FMA/F16C one picked at run time; the tests hold them to each other bit for
//! bit. Where the CPU also has AVX-VNNI, each chunk's products are accumulated with
//! `vpdpwssd` (multiply pairs and accumulate, exact in i32 as `vpmaddwd` + `vpaddd`): the
//! same sums, from the same body.

use std::ops::Range;

pub const BLOCK: usize = 32;
/// Bytes of one Q4_1 block: f16 `d`, f16 `m`, 16 bytes of nibbles.
pub const Q4_1_BYTES: usize = 20;
/// Blocks in a whole subgroup: one i32 lane each.
const GROUP: usize = 8;
/// Values (or nibble bytes) per chunk: one register of words.
const CHUNK: usize = 16;

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
#[derive(Clone)]
pub struct QuantizedRow {
    /// `x` rounded to i16 per block (`x ≈ values · scale`), in the subgroup layout (module
    /// docs).
    values: Vec<i16>,
    /// One per block, then `GROUP` zeros (a subgroup's scales are read eight lanes at a time
    /// from its first block).
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
        let mut scales = vec![0f32; blocks + GROUP];
        let mut sums = vec![0f32; blocks + GROUP];
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
            values: to_subgroups(&values),
            scales,
            sums,
        }
    }

    #[inline(always)]
    fn quantize(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut values = vec![0i16; x.len()];
        let mut scales = Vec::with_capacity(blocks + GROUP);
        let mut sums = Vec::with_capacity(blocks + GROUP);
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
        scales.resize(blocks + GROUP, 0.0);
        sums.resize(blocks + GROUP, 0.0);
        Self {
            values: to_subgroups(&values),
            scales,
            sums,
        }
    }

    fn blocks(&self) -> usize {
        self.values.len() / BLOCK
    }
}

/// A row of `blocks` blocks as subgroups, `(first block, blocks in it)`: whole groups of 8,
/// then the rest as 4, 2 and 1.
fn subgroups(blocks: usize) -> impl Iterator<Item = (usize, usize)> {
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
fn deinterleave<T: Copy>(chunks: &[T], blocks: &mut [T], p: usize) {
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
fn to_subgroups<T: Copy + Default>(row: &[T]) -> Vec<T> {
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

/// A Q4_1 subgroup's `d`s and `m`s (lanes from `p` zero).
fn q4_1_scales(sub: &[u8], p: usize) -> ([f32; GROUP], [f32; GROUP]) {
    let f16 = |at: usize| half::f16::from_le_bytes([sub[at], sub[at + 1]]).to_f32();
    (
        std::array::from_fn(|i| if i < p { f16(2 * i) } else { 0.0 }),
        std::array::from_fn(|i| if i < p { f16(2 * p + 2 * i) } else { 0.0 }),
    )
}

/// Rows `rows` of a Q4_1 matrix (`bytes`: rows of `xs[0].blocks()` blocks in the subgroup
/// layout) dotted with every input into `out` (`[rows, inputs]`), `Σ_k w_k x_k`. The vector
/// kernel takes tiles of two rows by up to four inputs (what it keeps in registers); a (row,
/// input) value does not depend on the tile it is in.
pub fn dot_q4_1(
    simd: Simd,
    bytes: &[u8],
    rows: Range<usize>,
    xs: &[QuantizedRow],
    out: &mut [f32],
) {
    let len = check_tiles(rows.clone(), xs, out) * Q4_1_BYTES;
    assert!(
        bytes.len() >= rows.end * len,
        "dot_q4_1: rows past the matrix"
    );
    match simd {
        // SAFETY: `Simd::Avx2` is only constructed when the CPU has AVX2, FMA and F16C (and
        // `vnni: true` AVX-VNNI); the shapes agree (the asserts above).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: false } => unsafe { avx2::dot_q4_1(bytes, rows, xs, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: true } => unsafe { avx2::dot_q4_1_vnni(bytes, rows, xs, out) },
        Simd::Portable => each_value(rows, xs, out, |r, x| {
            dot_q4_1_portable(&bytes[r * len..(r + 1) * len], x)
        }),
    }
}

/// Rows `rows` of a Q8_0 matrix (`quants` in the subgroup layout, one scale per block) dotted
/// with every input into `out` (`[rows, inputs]`), as [`dot_q4_1`].
pub fn dot_q8_0(
    simd: Simd,
    quants: &[i8],
    scales: &[f32],
    rows: Range<usize>,
    xs: &[QuantizedRow],
    out: &mut [f32],
) {
    let blocks = check_tiles(rows.clone(), xs, out);
    assert!(
        quants.len() >= rows.end * blocks * BLOCK && scales.len() >= rows.end * blocks,
        "dot_q8_0: rows past the matrix"
    );
    match simd {
        // SAFETY: as in `dot_q4_1`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: false } => unsafe { avx2::dot_q8_0(quants, scales, rows, xs, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: true } => unsafe { avx2::dot_q8_0_vnni(quants, scales, rows, xs, out) },
        Simd::Portable => each_value(rows, xs, out, |r, x| {
            let (q, s) = (r * blocks * BLOCK, r * blocks);
            dot_q8_0_portable(&quants[q..q + blocks * BLOCK], &scales[s..s + blocks], x)
        }),
    }
}

/// The blocks every input has (all the same), and `out` is `[rows, inputs]`.
fn check_tiles(rows: Range<usize>, xs: &[QuantizedRow], out: &[f32]) -> usize {
    let blocks = xs.first().map_or(0, |x| x.blocks());
    assert!(
        xs.iter().all(|x| x.blocks() == blocks),
        "inputs of different lengths"
    );
    assert_eq!(out.len(), rows.len() * xs.len(), "output shape");
    blocks
}

/// `out[row, input] = value(row, input)`, one at a time.
fn each_value(
    rows: Range<usize>,
    xs: &[QuantizedRow],
    out: &mut [f32],
    value: impl Fn(usize, &QuantizedRow) -> f32,
) {
    for (out, r) in out.chunks_exact_mut(xs.len().max(1)).zip(rows) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = value(r, x);
        }
    }
}

/// The vector kernels' arithmetic, lane by lane (the reference they are held to, bit for
/// bit, and what non-x86 CPUs run). `words(first, p, c)`: the weights meeting activation
/// chunk `c` of the subgroup at block `first`; `scales(first, p)`: its `d`s and `m`s (lanes
/// from `p` zero).
fn dot_lanes(
    x: &QuantizedRow,
    words: impl Fn(usize, usize, usize) -> [i16; CHUNK],
    scales: impl Fn(usize, usize) -> ([f32; GROUP], [f32; GROUP]),
) -> f32 {
    let mut acc = [0f32; GROUP];
    let mut offsets = [0f32; GROUP];
    for (first, p) in subgroups(x.blocks()) {
        let mut sums = [0i32; GROUP];
        for c in 0..2 * p {
            let xq = &x.values[first * BLOCK + c * CHUNK..][..CHUNK];
            for (i, (w, xq)) in words(first, p, c).iter().zip(xq).enumerate() {
                sums[i / 2] += *w as i32 * *xq as i32;
            }
        }
        let (d, m) = scales(first, p);
        for lane in 0..GROUP {
            let b = lane * p / GROUP;
            let factor = d[b] * x.scales[first + b];
            acc[lane] = factor.mul_add(sums[lane] as f32, acc[lane]);
            offsets[lane] = m[lane].mul_add(x.sums[first + lane], offsets[lane]);
        }
    }
    // As `avx2::hsum` adds the lanes.
    let v: [f32; GROUP] = std::array::from_fn(|i| acc[i] + offsets[i]);
    let s: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
    (s[0] + s[2]) + (s[1] + s[3])
}

fn dot_q4_1_portable(row: &[u8], x: &QuantizedRow) -> f32 {
    let sub = |first: usize, p: usize| &row[first * Q4_1_BYTES..(first + p) * Q4_1_BYTES];
    dot_lanes(
        x,
        |first, p, c| {
            let nibbles = &sub(first, p)[4 * p + CHUNK * (c % p)..][..CHUNK];
            std::array::from_fn(|i| if c < p { nibbles[i] & 0x0F } else { nibbles[i] >> 4 } as i16)
        },
        |first, p| q4_1_scales(sub(first, p), p),
    )
}

fn dot_q8_0_portable(quants: &[i8], scales: &[f32], x: &QuantizedRow) -> f32 {
    dot_lanes(
        x,
        |first, _, c| std::array::from_fn(|i| quants[first * BLOCK + c * CHUNK + i] as i16),
        |first, p| {
            let d = std::array::from_fn(|i| if i < p { scales[first + i] } else { 0.0 });
            (d, [0.0; GROUP])
        },
    )
}

/// One row of Q4_1 blocks (subgroup layout) as f32 values, `d·q + m` (a multiply, then an
/// add).
pub fn expand_q4_1(row: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    let avx2 = matches!(Simd::detect(), Simd::Avx2 { .. });
    for (first, p) in subgroups(out.len() / BLOCK) {
        let sub = &row[first * Q4_1_BYTES..(first + p) * Q4_1_BYTES];
        let out = &mut out[first * BLOCK..(first + p) * BLOCK];
        #[cfg(target_arch = "x86_64")]
        if avx2 && p == GROUP {
            // SAFETY: `Simd::Avx2` means the CPU has AVX2 and F16C; a whole group in, its 256
            // values out.
            unsafe { avx2::expand_q4_1_group(sub, out) };
            continue;
        }
        let (d, m) = q4_1_scales(sub, p);
        let mut nibbles = [0u8; GROUP * CHUNK];
        deinterleave(&sub[4 * p..], &mut nibbles[..CHUNK * p], p);
        for ((out, nibbles), (d, m)) in out
            .chunks_exact_mut(BLOCK)
            .zip(nibbles.chunks_exact(CHUNK))
            .zip(d.into_iter().zip(m))
        {
            let (lo, hi) = out.split_at_mut(CHUNK);
            for ((&byte, lo), hi) in nibbles.iter().zip(lo).zip(hi) {
                *lo = (byte & 0x0F) as f32 * d + m;
                *hi = (byte >> 4) as f32 * d + m;
            }
        }
    }
}

/// One row of Q8_0 values (subgroup layout) as f32.
pub fn expand_q8_0(quants: &[i8], scales: &[f32], out: &mut [f32]) {
    let mut values = [0i8; GROUP * BLOCK];
    for (first, p) in subgroups(scales.len()) {
        let values = &mut values[..p * BLOCK];
        deinterleave(&quants[first * BLOCK..(first + p) * BLOCK], values, p);
        for ((q, d), o) in values
            .chunks_exact(BLOCK)
            .zip(&scales[first..first + p])
            .zip(out[first * BLOCK..].chunks_exact_mut(BLOCK))
        {
            for (o, &q) in o.iter_mut().zip(q) {
                *o = q as f32 * d;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use std::ops::Range;

    use super::{BLOCK, CHUNK, GROUP, Q4_1_BYTES, QuantizedRow, subgroups};

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

    /// A Q4_1 nibble chunk's 16 bytes at `nibbles` widened to i16: the low nibbles and the
    /// high ones. The bytes are widened once, to 16 words, and one mask and one shift split
    /// them. Written with intrinsics, LLVM moves the mask and the shift ahead of the widening
    /// (onto the bytes), which then takes two widenings: two port-5 shuffles per chunk where
    /// one does. The widening is therefore an `asm!` instruction the compiler cannot reorder
    /// around. (Measured with the earlier kernel, one block per register: a lone decode row
    /// went x1.15-1.18 faster for it in one process, alternating; four inputs x1.00.)
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

    /// `acc + Σ` of the pairwise products of `w` and `x` (i16 pairs into i32 lanes, exact).
    /// `VNNI`: one `vpdpwssd`; otherwise `vpmaddwd` and an add, the same sums.
    #[inline(always)]
    unsafe fn dot_add<const VNNI: bool>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: the callers enable AVX2, and AVX-VNNI where `VNNI`.
        unsafe {
            if VNNI {
                _mm256_dpwssd_avx_epi32(acc, w, x)
            } else {
                _mm256_add_epi32(acc, _mm256_madd_epi16(w, x))
            }
        }
    }

    /// A Q4_1 subgroup's `n` `d`s and `n` `m`s as f32, the lanes from `n` 0.
    ///
    /// # Safety
    /// The subgroup of `n` blocks at `grp` is readable.
    #[inline(always)]
    unsafe fn group_scales(grp: *const u8, n: usize) -> (__m256, __m256) {
        /// `[n..n + 8]` keeps the first `8 - n` lanes of eight u16.
        const KEEP: [u16; 16] = [
            0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        // SAFETY: the caller's contract: `d`s at 0..2n, `m`s at 2n..4n. Both 16-byte loads
        // stay inside the subgroup's 20n bytes (2n + 16 <= 20n for n >= 1); for n < 8 they
        // also read the next bytes, whose lanes the mask clears before they are
        // converted (a nibble byte pair can be an f16 NaN). The loads are direct: copying a
        // short group into a zeroed array first and loading 16 bytes over those small stores
        // stalled (a store not forwarded).
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

    /// Lane `i` takes element `i·p/8` (the block it belongs to in a subgroup of `p`), for `p`
    /// = 1, 2 and 4.
    const SPREAD: [[i32; GROUP]; 3] = [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 1, 1, 2, 2, 3, 3],
    ];
    /// `[8 - n..16 - n]` enables the first `n` of eight i32 lanes.
    const FIRST_LANES: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

    /// A weight row as the kernel reads it, subgroup by subgroup.
    trait WeightRow: Copy {
        /// The words of the subgroup at block `first` (of `p`) that meet activation chunks
        /// `k` and `p + k`.
        unsafe fn words(self, first: usize, p: usize, k: usize) -> (__m256i, __m256i);
        /// The subgroup's `d`s (lanes from `p` 0) and its `m`s where the format has them.
        unsafe fn scales(self, first: usize, p: usize) -> (__m256, Option<__m256>);
        /// Asks for the row's bytes ahead (`PREFETCH_AHEAD`).
        unsafe fn prefetch(self);
    }

    #[derive(Clone, Copy)]
    struct Q4_1Row(*const u8, usize);

    impl WeightRow for Q4_1Row {
        #[inline(always)]
        unsafe fn words(self, first: usize, p: usize, k: usize) -> (__m256i, __m256i) {
            // SAFETY: the subgroup's nibble chunk `k` (the caller's contract).
            unsafe { q4_1_unpack(self.0.add(first * Q4_1_BYTES + 4 * p + CHUNK * k)) }
        }

        #[inline(always)]
        unsafe fn scales(self, first: usize, p: usize) -> (__m256, Option<__m256>) {
            // SAFETY: the subgroup is inside the row (the caller's contract).
            let (d, m) = unsafe { group_scales(self.0.add(first * Q4_1_BYTES), p) };
            (d, Some(m))
        }

        #[inline(always)]
        unsafe fn prefetch(self) {
            // SAFETY: a prefetch never faults; the callers enable AVX2.
            unsafe { prefetch_ahead(self.0, self.1) }
        }
    }

    #[derive(Clone, Copy)]
    struct Q8_0Row(*const i8, *const f32, usize);

    impl WeightRow for Q8_0Row {
        #[inline(always)]
        unsafe fn words(self, first: usize, p: usize, k: usize) -> (__m256i, __m256i) {
            // SAFETY: chunks `k` and `p + k` of the subgroup (the caller's contract).
            unsafe {
                let chunk = |c: usize| {
                    let at = self.0.add(first * BLOCK + CHUNK * c) as *const __m128i;
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(at))
                };
                (chunk(k), chunk(p + k))
            }
        }

        #[inline(always)]
        unsafe fn scales(self, first: usize, p: usize) -> (__m256, Option<__m256>) {
            // SAFETY: the subgroup's `p` scales (the caller's contract); a masked load reads
            // none of the others.
            unsafe {
                let at = self.1.add(first);
                let d = if p == GROUP {
                    _mm256_loadu_ps(at)
                } else {
                    let lanes =
                        _mm256_loadu_si256(FIRST_LANES.as_ptr().add(GROUP - p) as *const __m256i);
                    _mm256_maskload_ps(at, lanes)
                };
                (d, None)
            }
        }

        #[inline(always)]
        unsafe fn prefetch(self) {
            // SAFETY: a prefetch never faults; the callers enable AVX2.
            unsafe {
                prefetch_ahead(self.0 as *const u8, self.2 * BLOCK);
                prefetch_ahead(self.1 as *const u8, self.2 * size_of::<f32>());
            }
        }
    }

    /// One subgroup (at block `first`, of `p`) of `R` rows against `M` inputs: the integer
    /// dots build up in one register per (row, input), each weight chunk widened once for
    /// all inputs and each activation chunk loaded once for all rows, then each is converted
    /// and scaled into `acc` and the `m·Σx` terms added into `offsets`.
    ///
    /// # Safety
    /// The subgroup is inside every row and every input; the callers enable AVX2, FMA and
    /// F16C, and AVX-VNNI where `VNNI`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn subgroup<W: WeightRow, const R: usize, const M: usize, const VNNI: bool>(
        rows: [W; R],
        (first, p): (usize, usize),
        xs: [&QuantizedRow; M],
        acc: &mut [[__m256; M]; R],
        offsets: &mut [[__m256; M]; R],
    ) {
        // SAFETY: the caller's contract; chunks `k` and `p + k` of the subgroup are inside
        // each input's values, and its eight lanes inside each input's padded scales.
        unsafe {
            let mut sums = [[_mm256_setzero_si256(); M]; R];
            for k in 0..p {
                let words = rows.map(|w| w.words(first, p, k));
                for j in 0..M {
                    let x = xs[j].values.as_ptr().add(first * BLOCK) as *const __m256i;
                    let (lo, hi) = (
                        _mm256_loadu_si256(x.add(k)),
                        _mm256_loadu_si256(x.add(p + k)),
                    );
                    for r in 0..R {
                        sums[r][j] = dot_add::<VNNI>(sums[r][j], words[r].0, lo);
                        sums[r][j] = dot_add::<VNNI>(sums[r][j], words[r].1, hi);
                    }
                }
            }
            for r in 0..R {
                let (d, m) = rows[r].scales(first, p);
                for j in 0..M {
                    let sx = _mm256_loadu_ps(xs[j].scales.as_ptr().add(first));
                    if let Some(m) = m {
                        let sums = _mm256_loadu_ps(xs[j].sums.as_ptr().add(first));
                        offsets[r][j] = _mm256_fmadd_ps(m, sums, offsets[r][j]);
                    }
                    let mut factor = _mm256_mul_ps(d, sx);
                    if p < GROUP {
                        let spread = SPREAD[p.trailing_zeros() as usize];
                        factor = _mm256_permutevar8x32_ps(
                            factor,
                            _mm256_loadu_si256(spread.as_ptr() as *const __m256i),
                        );
                    }
                    let dots = _mm256_cvtepi32_ps(sums[r][j]);
                    acc[r][j] = _mm256_fmadd_ps(factor, dots, acc[r][j]);
                }
            }
        }
    }

    /// `R` rows against `M` inputs, subgroup by subgroup ([`subgroup`]).
    ///
    /// # Safety
    /// Every row holds `xs[0].blocks()` blocks, as does every input; as for [`subgroup`].
    #[inline(always)]
    unsafe fn dot<W: WeightRow, const R: usize, const M: usize, const VNNI: bool>(
        rows: [W; R],
        xs: [&QuantizedRow; M],
    ) -> [[f32; M]; R] {
        // SAFETY: the caller's contract; a whole group is passed as the constant 8, so it is
        // unrolled.
        unsafe {
            for row in rows {
                row.prefetch();
            }
            let mut acc = [[_mm256_setzero_ps(); M]; R];
            let mut offsets = [[_mm256_setzero_ps(); M]; R];
            for (first, p) in subgroups(xs[0].blocks()) {
                if p == GROUP {
                    subgroup::<W, R, M, VNNI>(rows, (first, GROUP), xs, &mut acc, &mut offsets);
                } else {
                    subgroup::<W, R, M, VNNI>(rows, (first, p), xs, &mut acc, &mut offsets);
                }
            }
            std::array::from_fn(|r| {
                std::array::from_fn(|j| hsum(_mm256_add_ps(acc[r][j], offsets[r][j])))
            })
        }
    }

    /// Rows `rows` (`row(r)`) against every input into `out` (`[rows, inputs]`), in tiles of
    /// two rows ([`inputs`]), an odd last row alone.
    ///
    /// # Safety
    /// As for [`dot`], for every row and input.
    #[inline(always)]
    unsafe fn tiles<W: WeightRow, const VNNI: bool>(
        row: impl Fn(usize) -> W,
        rows: Range<usize>,
        xs: &[QuantizedRow],
        out: &mut [f32],
    ) {
        let m = xs.len();
        let mut r = rows.start;
        // SAFETY: the caller's contract.
        unsafe {
            while r < rows.end {
                let out = &mut out[(r - rows.start) * m..];
                if r + 1 < rows.end {
                    inputs::<W, 2, VNNI>([row(r), row(r + 1)], xs, out);
                    r += 2;
                } else {
                    inputs::<W, 1, VNNI>([row(r)], xs, out);
                    r += 1;
                }
            }
        }
    }

    /// `R` rows against every input, four inputs per [`dot`], into the first `R` rows of
    /// `out` (rows of `xs.len()`).
    ///
    /// # Safety
    /// As for [`dot`].
    #[inline(always)]
    unsafe fn inputs<W: WeightRow, const R: usize, const VNNI: bool>(
        rows: [W; R],
        xs: &[QuantizedRow],
        out: &mut [f32],
    ) {
        /// `values` (`[row][input]`) into `out` (rows of `m`) from input `at`.
        #[inline(always)]
        fn put<const R: usize, const M: usize>(
            out: &mut [f32],
            m: usize,
            at: usize,
            values: [[f32; M]; R],
        ) {
            for (r, values) in values.iter().enumerate() {
                out[r * m + at..r * m + at + M].copy_from_slice(values);
            }
        }
        let m = xs.len();
        // SAFETY: the caller's contract.
        unsafe {
            for (c, four) in xs.chunks(4).enumerate() {
                let at = 4 * c;
                match four {
                    [a, b, c, d] => put(out, m, at, dot::<W, R, 4, VNNI>(rows, [a, b, c, d])),
                    [a, b, c] => put(out, m, at, dot::<W, R, 3, VNNI>(rows, [a, b, c])),
                    [a, b] => put(out, m, at, dot::<W, R, 2, VNNI>(rows, [a, b])),
                    [a] => put(out, m, at, dot::<W, R, 1, VNNI>(rows, [a])),
                    _ => {}
                }
            }
        }
    }

    /// Q4_1 rows of `xs[0].blocks()` blocks from `bytes`.
    ///
    /// # Safety
    /// `bytes` holds rows up to `rows.end`; the callers enable the instruction sets.
    #[inline(always)]
    unsafe fn q4_1<const VNNI: bool>(
        bytes: &[u8],
        rows: Range<usize>,
        xs: &[QuantizedRow],
        out: &mut [f32],
    ) {
        let len = xs.first().map_or(0, |x| x.blocks()) * Q4_1_BYTES;
        // SAFETY: the caller's contract: row `r` is `bytes[r * len..(r + 1) * len]`.
        unsafe { tiles::<_, VNNI>(|r| Q4_1Row(bytes.as_ptr().add(r * len), len), rows, xs, out) }
    }

    /// Q8_0 rows of `xs[0].blocks()` blocks from `quants` and `scales`.
    ///
    /// # Safety
    /// `quants` and `scales` hold rows up to `rows.end`; the callers enable the instruction
    /// sets.
    #[inline(always)]
    unsafe fn q8_0<const VNNI: bool>(
        quants: &[i8],
        scales: &[f32],
        rows: Range<usize>,
        xs: &[QuantizedRow],
        out: &mut [f32],
    ) {
        let blocks = xs.first().map_or(0, |x| x.blocks());
        // SAFETY: the caller's contract: row `r`'s values start at `r * blocks * 32`, its
        // scales at `r * blocks`.
        unsafe {
            tiles::<_, VNNI>(
                |r| {
                    Q8_0Row(
                        quants.as_ptr().add(r * blocks * BLOCK),
                        scales.as_ptr().add(r * blocks),
                        blocks,
                    )
                },
                rows,
                xs,
                out,
            )
        }
    }

    // The entry points, one per instruction set: a `#[target_feature]` cannot depend on a
    // const parameter. SAFETY (each): as for the body it calls.

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1(bytes: &[u8], rows: Range<usize>, xs: &[QuantizedRow], out: &mut [f32]) {
        unsafe { q4_1::<false>(bytes, rows, xs, out) }
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub unsafe fn dot_q4_1_vnni(
        bytes: &[u8],
        rows: Range<usize>,
        xs: &[QuantizedRow],
        out: &mut [f32],
    ) {
        unsafe { q4_1::<true>(bytes, rows, xs, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0(
        quants: &[i8],
        scales: &[f32],
        rows: Range<usize>,
        xs: &[QuantizedRow],
        out: &mut [f32],
    ) {
        unsafe { q8_0::<false>(quants, scales, rows, xs, out) }
    }

    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub unsafe fn dot_q8_0_vnni(
        quants: &[i8],
        scales: &[f32],
        rows: Range<usize>,
        xs: &[QuantizedRow],
        out: &mut [f32],
    ) {
        unsafe { q8_0::<true>(quants, scales, rows, xs, out) }
    }

    /// A whole Q4_1 group (`sub`: 8 `d`s, 8 `m`s, 8 nibble chunks) as 256 f32, `q·d + m`
    /// (a multiply, then an add, as the portable loop rounds them), eight at a time. The
    /// tiled prefill expands every weight once per call (the portable loop was a fifth of a
    /// short prompt's prefill). Chunk `k` holds bytes `2k, 2k + 1` of each block, so the
    /// blocks' bytes are an 8 × 8 transpose of 16-bit units away.
    ///
    /// # Safety
    /// `sub` holds a whole group's 160 bytes and `out` 256 values.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn expand_q4_1_group(sub: &[u8], out: &mut [f32]) {
        /// `lo` and `hi` of the pairs (0, 1), (2, 3), ... of `v`, in turn.
        #[inline(always)]
        fn pairs(
            lo: impl Fn(__m128i, __m128i) -> __m128i,
            hi: impl Fn(__m128i, __m128i) -> __m128i,
            v: [__m128i; 8],
        ) -> [__m128i; 8] {
            std::array::from_fn(|i| {
                let (a, b) = (v[i / 2 * 2], v[i / 2 * 2 + 1]);
                if i % 2 == 0 { lo(a, b) } else { hi(a, b) }
            })
        }
        // SAFETY: the caller's contract; unaligned loads and stores.
        unsafe {
            let at = |i: usize| sub.as_ptr().add(i) as *const __m128i;
            let mut d = [0f32; GROUP];
            let mut m = [0f32; GROUP];
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(at(0))));
            _mm256_storeu_ps(m.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(at(16))));
            let c: [__m128i; GROUP] = std::array::from_fn(|k| _mm_loadu_si128(at(32 + 16 * k)));
            // t: blocks 0-3 / 4-7 of chunks (0, 1), (2, 3), ...; u: blocks 0-1, 2-3, ... of
            // chunks 0-3 and 4-7; then each block whole.
            let t = pairs(
                |a, b| _mm_unpacklo_epi16(a, b),
                |a, b| _mm_unpackhi_epi16(a, b),
                c,
            );
            let u = pairs(
                |a, b| _mm_unpacklo_epi32(a, b),
                |a, b| _mm_unpackhi_epi32(a, b),
                [t[0], t[2], t[1], t[3], t[4], t[6], t[5], t[7]],
            );
            let blocks = pairs(
                |a, b| _mm_unpacklo_epi64(a, b),
                |a, b| _mm_unpackhi_epi64(a, b),
                [u[0], u[4], u[1], u[5], u[2], u[6], u[3], u[7]],
            );
            let mask = _mm_set1_epi8(0x0F);
            for (i, bytes) in blocks.into_iter().enumerate() {
                let (di, mi) = (_mm256_set1_ps(d[i]), _mm256_set1_ps(m[i]));
                let lo = _mm_and_si128(bytes, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                let dst = out.as_mut_ptr().add(i * BLOCK);
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

    /// A ggml-order Q4_1 row.
    fn q4_1_row(blocks: usize, seed: u32) -> Vec<u8> {
        let bytes = pseudo_random(blocks * 16, seed);
        let scales = pseudo_random(blocks * 2, seed + 2);
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

    /// A Q8_0 row in block order (values, scales).
    fn q8_0_row(blocks: usize, seed: u32) -> (Vec<i8>, Vec<f32>) {
        let quants = pseudo_random(blocks * BLOCK, seed)
            .iter()
            .map(|v| (v * 127.0) as i8)
            .collect();
        (quants, pseudo_random(blocks, seed + 6))
    }

    /// `got` is `Σ w·x` up to the i16 rounding of `x`: at most half a step of 1/32767 of a
    /// block's largest |x| per term, so well under 1e-4 of `Σ |w·x|`.
    fn close(got: f32, w: &[f32], x: &[f32]) -> bool {
        let want: f32 = w.iter().zip(x).map(|(a, b)| a * b).sum();
        let magnitude: f32 = w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
        (got - want).abs() <= 1e-4 * magnitude
    }

    /// Every subgroup shape: whole groups, and every remainder of 4, 2 and 1.
    const BLOCK_COUNTS: [usize; 9] = [1, 2, 3, 5, 7, 8, 9, 18, 23];

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

    #[test]
    fn q4_1_dot_equals_the_dot_of_the_expanded_row() {
        for blocks in BLOCK_COUNTS {
            let ggml = q4_1_row(blocks, 7);
            let mut row = vec![0u8; ggml.len()];
            regroup_q4_1(&ggml, &mut row);
            let x = pseudo_random(blocks * BLOCK, 3);
            // The reference values: gguf's own dequantization of the ggml-order blocks.
            let mut w = vec![0f32; x.len()];
            crate::gguf::dequantize_q4_1(&ggml, &mut w).unwrap();
            let mut expanded = vec![0f32; x.len()];
            expand_q4_1(&row, &mut expanded);
            assert_eq!(
                expanded, w,
                "{blocks} blocks: the layout expands to the same values"
            );
            let xq = [QuantizedRow::new(&x)];
            for simd in Simd::available() {
                let mut got = [0f32];
                dot_q4_1(simd, &row, 0..1, &xq, &mut got);
                assert!(close(got[0], &w, &x), "{simd:?}, {blocks} blocks: {got:?}");
            }
        }
    }

    #[test]
    fn q8_0_dot_equals_the_dot_of_the_expanded_row() {
        for blocks in BLOCK_COUNTS {
            let (plain, scales) = q8_0_row(blocks, 5);
            let mut quants = plain.clone();
            interleave_q8_0(&mut quants);
            let mut w = vec![0f32; blocks * BLOCK];
            expand_q8_0(&quants, &scales, &mut w);
            let want: Vec<f32> = plain
                .iter()
                .enumerate()
                .map(|(k, &q)| q as f32 * scales[k / BLOCK])
                .collect();
            assert_eq!(
                w, want,
                "{blocks} blocks: the layout expands to the same values"
            );
            let x = pseudo_random(blocks * BLOCK, 13);
            let xq = [QuantizedRow::new(&x)];
            for simd in Simd::available() {
                let mut got = [0f32];
                dot_q8_0(simd, &quants, &scales, 0..1, &xq, &mut got);
                assert!(close(got[0], &w, &x), "{simd:?}, {blocks} blocks: {got:?}");
            }
        }
    }

    /// A (row, input) value is the same bit for bit from every kernel set and whatever rows
    /// and inputs share its pass: batch equivalence rests on it.
    #[test]
    fn a_value_is_the_same_in_every_kernel_set_and_every_pass() {
        for blocks in BLOCK_COUNTS {
            let q4_1: Vec<u8> = (0..3)
                .flat_map(|r| {
                    let ggml = q4_1_row(blocks, 31 + r);
                    let mut row = vec![0u8; ggml.len()];
                    regroup_q4_1(&ggml, &mut row);
                    row
                })
                .collect();
            let (mut quants, mut scales) = (Vec::new(), Vec::new());
            for r in 0..3 {
                let (mut q, s) = q8_0_row(blocks, 41 + r);
                interleave_q8_0(&mut q);
                quants.extend(q);
                scales.extend(s);
            }
            let inputs: Vec<QuantizedRow> = (0..5)
                .map(|j| QuantizedRow::new(&pseudo_random(blocks * BLOCK, 51 + j)))
                .collect();
            let row_bytes = blocks * Q4_1_BYTES;
            let alone_q4 = |r: usize, j: usize| {
                dot_q4_1_portable(&q4_1[r * row_bytes..][..row_bytes], &inputs[j])
            };
            let alone_q8 = |r: usize, j: usize| {
                let (q, s) = (&quants[r * blocks * BLOCK..], &scales[r * blocks..]);
                dot_q8_0_portable(&q[..blocks * BLOCK], &s[..blocks], &inputs[j])
            };
            // Rows 0..3 (a pair and an odd row) by inputs in passes of 4 + 1, 3, 2 and 1.
            for picks in [&[0, 1, 2, 3, 4][..], &[2, 0, 2], &[3, 1], &[4]] {
                let xs: Vec<QuantizedRow> = picks.iter().map(|&j| inputs[j].clone()).collect();
                let want = |alone: &dyn Fn(usize, usize) -> f32| -> Vec<f32> {
                    (0..3)
                        .flat_map(|r| picks.iter().map(move |&j| alone(r, j)))
                        .collect()
                };
                let (want_q4, want_q8) = (want(&alone_q4), want(&alone_q8));
                for simd in Simd::available() {
                    let what = format!("{simd:?}, {blocks} blocks, inputs {picks:?}");
                    let mut got = vec![0f32; 3 * picks.len()];
                    dot_q4_1(simd, &q4_1, 0..3, &xs, &mut got);
                    assert_eq!(got, want_q4, "{what}: Q4_1");
                    dot_q8_0(simd, &quants, &scales, 0..3, &xs, &mut got);
                    assert_eq!(got, want_q8, "{what}: Q8_0");
                    let mut alone = vec![0f32; picks.len()];
                    dot_q4_1(simd, &q4_1, 1..2, &xs, &mut alone);
                    let row_1 = &want_q4[picks.len()..2 * picks.len()];
                    assert_eq!(alone, row_1, "{what}: row 1 alone");
                }
            }
        }
    }

    #[test]
    fn a_short_subgroup_reads_only_its_own_scales() {
        // 9 blocks: a whole group and a subgroup of one block, whose nibbles are all 0xFF (as
        // f16, NaN) right after its `m`: the vector kernels load 16 bytes from its scales.
        let mut ggml = q4_1_row(9, 7);
        ggml[8 * Q4_1_BYTES + 4..].fill(0xFF);
        let mut row = vec![0u8; ggml.len()];
        regroup_q4_1(&ggml, &mut row);
        let x = QuantizedRow::new(&pseudo_random(9 * BLOCK, 29));
        let want = dot_q4_1_portable(&row, &x);
        assert!(want.is_finite());
        let two_rows = [row.clone(), row].concat();
        for simd in Simd::available() {
            let mut got = [0f32; 4];
            dot_q4_1(simd, &two_rows, 0..2, &[x.clone(), x.clone()], &mut got);
            assert_eq!(got, [want; 4], "{simd:?}");
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
        assert_eq!(detected.scales.len(), 5 + GROUP, "padded by a group");
        for (a, b) in portable.sums.iter().zip(&detected.sums) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }
}
