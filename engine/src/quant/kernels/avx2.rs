//! The AVX2/FMA/F16C kernels (x86-64, picked at run time: `Simd::Avx2`). Where the CPU also
//! has AVX-VNNI or AVX-512 VNNI, each chunk's products are accumulated with `vpdpwssd`
//! (multiply pairs and accumulate, exact in i32 as `vpmaddwd` + `vpaddd`): the same sums,
//! from the same body, one instruction fewer per chunk, row and input.
//!
//! **Two rows by up to four inputs per pass.** The kernel dots two weight rows with up to
//! four inputs at once: each weight chunk is widened once for all inputs and each activation
//! chunk loaded once for both rows, which leaves the multiplies as nearly all the work.
//! Against one block per register and one row per pass (a 256 KB matrix in cache, one
//! thread, the two builds alternating): ×1.47 (576 columns) and ×1.49 (1536) at four inputs,
//! ×0.98 and ×1.13 at one, which reads the weights from memory in a real step anyway. Every
//! (row, input) value comes from the same operations in the same order whatever the rows and
//! inputs beside it, so a sequence decodes the same alone or in any batch.

use std::arch::x86_64::*;

use std::ops::Range;

use super::layout::{BLOCK, CHUNK, GROUP, Q4_1_BYTES, QuantizedRow, subgroups, to_subgroups};

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

/// `x` rounded to i16 per block, as `portable::quantize_row` rounds it. (Written out: the
/// compiler left the portable loop scalar, a libm rounding per value, which was a sixth of
/// the thread that runs a batched step's serial part.)
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_row(x: &[f32]) -> QuantizedRow {
    let blocks = x.len() / BLOCK;
    let mut values = vec![0i16; blocks * BLOCK];
    let mut scales = vec![0f32; blocks + GROUP];
    let mut sums = vec![0f32; blocks + GROUP];
    for b in 0..blocks {
        // SAFETY: block `b` is inside `x` and `values`.
        unsafe {
            let (scale, sum) = quantize_block(
                x.as_ptr().add(b * BLOCK),
                values.as_mut_ptr().add(b * BLOCK),
            );
            scales[b] = scale;
            sums[b] = sum;
        }
    }
    QuantizedRow {
        values: to_subgroups(&values),
        scales,
        sums,
    }
}

/// One block of 32 f32 at `x` rounded to i16 at `q` (`x ≈ q · scale`, ties to even, as
/// the portable loop): returns `(scale, Σ x)`.
///
/// # Safety
/// 32 values are readable at `x` and writable at `q`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block(x: *const f32, q: *mut i16) -> (f32, f32) {
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

/// The `VNNI` parameter of the kernels: which `vpdpwssd` they use ([`super::Vnni`]).
const NO_VNNI: u8 = 0;
const VEX_VNNI: u8 = 1;
const EVEX_VNNI: u8 = 2;

/// `acc + Σ` of the pairwise products of `w` and `x` (i16 pairs into i32 lanes, exact).
/// With a `VNNI`, one `vpdpwssd`; otherwise `vpmaddwd` and an add, the same sums.
#[inline(always)]
unsafe fn dot_add<const VNNI: u8>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    // SAFETY: the callers enable AVX2, and AVX-VNNI for `VEX_VNNI`, AVX-512 VNNI and VL
    // for `EVEX_VNNI`.
    unsafe {
        match VNNI {
            VEX_VNNI => _mm256_dpwssd_avx_epi32(acc, w, x),
            EVEX_VNNI => _mm256_dpwssd_epi32(acc, w, x),
            _ => _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)),
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
/// F16C, and the `VNNI` instructions.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn subgroup<W: WeightRow, const R: usize, const M: usize, const VNNI: u8>(
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
unsafe fn dot<W: WeightRow, const R: usize, const M: usize, const VNNI: u8>(
    rows: [W; R],
    xs: [&QuantizedRow; M],
) -> [[f32; M]; R] {
    // SAFETY: the caller's contract. A whole group is passed as the constant 8 where the
    // tile is five (row, input) pairs or more, so its offsets are constants. Smaller tiles
    // take the group's size at run time: with the constant, LLVM unrolled their eight chunks
    // whole and summed each pair's products as a tree, keeping every widened chunk on the
    // stack; as a loop, two rows by two inputs took ×0.80 of the time (a 58 MB Q4_1 matrix,
    // two runs alternating: 2.70-2.80 → 2.20-2.33 ms an input; 2-client decode ×1.15-1.20).
    unsafe {
        for row in rows {
            row.prefetch();
        }
        let mut acc = [[_mm256_setzero_ps(); M]; R];
        let mut offsets = [[_mm256_setzero_ps(); M]; R];
        for (first, p) in subgroups(xs[0].blocks()) {
            if p == GROUP && R * M >= 5 {
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

/// Rows `rows` (`row(r)`) against every input into `out` (`[inputs, rows]`), in tiles of
/// two rows ([`inputs`]), an odd last row alone, a block of inputs at a time
/// ([`inputs_per_block`]).
///
/// A step that verifies a guess has a few rows, most often five to nine, and tiles of four
/// inputs leave one or two beside them: a pass that widens the rows' weights again for few
/// multiplies. So a block of five takes one row at a time in one pass ([`five`]), and one
/// of six two passes of three. Measured on this 2-core Zen 2 (a 58 MB Q4_1 matrix of 576
/// columns, three runs alternating with fours and the rest, ms per input): five 1.85-1.91
/// → 1.54-1.57, six 1.76-1.82 → 1.66-1.69. (Nine as four and five measured no better.)
///
/// # Safety
/// As for [`dot`], for every row and input.
#[inline(always)]
unsafe fn tiles<W: WeightRow, const VNNI: u8>(
    row: impl Fn(usize) -> W,
    rows: Range<usize>,
    xs: &[QuantizedRow],
    out: &mut [f32],
) {
    let n = rows.len();
    let per_block = inputs_per_block(xs);
    // SAFETY: the caller's contract.
    unsafe {
        for (b, block) in xs.chunks(per_block).enumerate() {
            let out = &mut out[b * per_block * n..];
            if let [_, _, _, _, _] = block {
                for r in rows.clone() {
                    five::<W, VNNI>(row(r), block, n, &mut out[r - rows.start..]);
                }
                continue;
            }
            // Six inputs as two threes.
            let halves = if block.len() == 6 { 3 } else { block.len() };
            let mut r = rows.start;
            while r < rows.end {
                for (h, xs) in block.chunks(halves.max(1)).enumerate() {
                    let out = &mut out[h * halves * n + (r - rows.start)..];
                    if r + 1 < rows.end {
                        inputs::<W, 2, VNNI>([row(r), row(r + 1)], xs, n, out);
                    } else {
                        inputs::<W, 1, VNNI>([row(r)], xs, n, out);
                    }
                }
                r += 2;
            }
        }
    }
}

/// One row against five inputs in one pass (five integer sums and ten f32 accumulators
/// stay in registers; six or more spill, at twice the time).
///
/// # Safety
/// As for [`dot`].
#[inline(always)]
unsafe fn five<W: WeightRow, const VNNI: u8>(
    row: W,
    xs: &[QuantizedRow],
    n: usize,
    out: &mut [f32],
) {
    let [a, b, c, d, e] = xs else {
        unreachable!("five inputs")
    };
    // SAFETY: the caller's contract.
    let [values] = unsafe { dot::<W, 1, 5, VNNI>([row], [a, b, c, d, e]) };
    for (out, value) in out.chunks_mut(n).zip(values) {
        out[0] = value;
    }
}

/// How many inputs a pass over the rows takes: as many as stay in a core's L1 data cache
/// beside the rows, a multiple of four. A prompt's chunk is hundreds of inputs (~270 KB of
/// i16 for 232 inputs of 576, ~710 KB of 1536); dotting each pair of rows with all of them
/// streams them from L2 or L3 again for every pair, where a block of them stays close for
/// every row of the thread's share.
fn inputs_per_block(xs: &[QuantizedRow]) -> usize {
    const BLOCK_BYTES: usize = 16 << 10;
    let bytes = xs
        .first()
        .map_or(1, |x| x.blocks() * BLOCK * size_of::<i16>())
        .max(1);
    (BLOCK_BYTES / bytes).next_multiple_of(4).max(4)
}

/// `R` rows against inputs `xs`, four per [`dot`], into the first `R` values of each of
/// the first `xs.len()` rows of `out` (rows of `n`, one per input).
///
/// # Safety
/// As for [`dot`].
#[inline(always)]
unsafe fn inputs<W: WeightRow, const R: usize, const VNNI: u8>(
    rows: [W; R],
    xs: &[QuantizedRow],
    n: usize,
    out: &mut [f32],
) {
    /// `values` (`[row][input]`) into `out` (a row of `n` per input) from input `at`.
    #[inline(always)]
    fn put<const R: usize, const M: usize>(
        out: &mut [f32],
        n: usize,
        at: usize,
        values: [[f32; M]; R],
    ) {
        for (j, out) in out[at * n..].chunks_mut(n).take(M).enumerate() {
            for (r, values) in values.iter().enumerate() {
                out[r] = values[j];
            }
        }
    }
    // SAFETY: the caller's contract.
    unsafe {
        for (c, four) in xs.chunks(4).enumerate() {
            let at = 4 * c;
            match four {
                [a, b, c, d] => put(out, n, at, dot::<W, R, 4, VNNI>(rows, [a, b, c, d])),
                [a, b, c] => put(out, n, at, dot::<W, R, 3, VNNI>(rows, [a, b, c])),
                [a, b] => put(out, n, at, dot::<W, R, 2, VNNI>(rows, [a, b])),
                [a] => put(out, n, at, dot::<W, R, 1, VNNI>(rows, [a])),
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
unsafe fn q4_1<const VNNI: u8>(
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
unsafe fn q8_0<const VNNI: u8>(
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
    unsafe { q4_1::<NO_VNNI>(bytes, rows, xs, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub unsafe fn dot_q4_1_avx512vnni(
    bytes: &[u8],
    rows: Range<usize>,
    xs: &[QuantizedRow],
    out: &mut [f32],
) {
    unsafe { q4_1::<EVEX_VNNI>(bytes, rows, xs, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn dot_q4_1_vnni(
    bytes: &[u8],
    rows: Range<usize>,
    xs: &[QuantizedRow],
    out: &mut [f32],
) {
    unsafe { q4_1::<VEX_VNNI>(bytes, rows, xs, out) }
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_q8_0(
    quants: &[i8],
    scales: &[f32],
    rows: Range<usize>,
    xs: &[QuantizedRow],
    out: &mut [f32],
) {
    unsafe { q8_0::<NO_VNNI>(quants, scales, rows, xs, out) }
}

#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
pub unsafe fn dot_q8_0_avx512vnni(
    quants: &[i8],
    scales: &[f32],
    rows: Range<usize>,
    xs: &[QuantizedRow],
    out: &mut [f32],
) {
    unsafe { q8_0::<EVEX_VNNI>(quants, scales, rows, xs, out) }
}

#[target_feature(enable = "avx2,fma,avxvnni")]
pub unsafe fn dot_q8_0_vnni(
    quants: &[i8],
    scales: &[f32],
    rows: Range<usize>,
    xs: &[QuantizedRow],
    out: &mut [f32],
) {
    unsafe { q8_0::<VEX_VNNI>(quants, scales, rows, xs, out) }
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
