//! The CPU model's KV store and attention over it: the keys and values of every block of the
//! pool (`kv`) in host memory, and a sequence's query rows scored against the blocks its
//! table lists (portable, and AVX2 with FMA). Keys and values are kept as f32, or as f16
//! (`KvCacheType`), which halves what a step reads of them: at a long context those reads
//! are most of a decode step's memory traffic after the weights.

use std::ops::Range;

use half::f16;
use rayon::prelude::*;

use crate::KvCacheType;
use crate::kv::{BLOCK_SIZE, BlockId};
use crate::quant::Simd;

/// A number the store keeps a key or value as; attention reads it back as f32 (exactly:
/// an f16 widens to the f32 of the same value), eight at a time on AVX2.
trait KvElement: Copy + Send + Sync + 'static {
    /// Whether it is narrower than f32, so that attention widens it before use.
    const NARROW: bool;
    /// `len` zeros, allocated zeroed (calloc), so pages never written are never mapped.
    fn zeroed(len: usize) -> Vec<Self>;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// Eight values from `ptr`, widened to f32.
    ///
    /// # Safety
    /// `ptr` points to eight values; the CPU has AVX2 and F16C (`Simd::Avx2`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(ptr: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElement for f32 {
    const NARROW: bool = false;
    fn zeroed(len: usize) -> Vec<Self> {
        vec![0.0; len]
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(ptr: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(ptr) }
    }
}

impl KvElement for f16 {
    const NARROW: bool = true;
    fn zeroed(len: usize) -> Vec<Self> {
        // `vec![f16::ZERO; len]` would write every element: a zeroed allocation is known
        // as such for integers only.
        use half::vec::HalfBitsVecExt;
        vec![0u16; len].reinterpret_into()
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(ptr: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's (eight f16 are the 16 bytes loaded; F16C widens them).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(ptr.cast())) }
    }
}

/// Every block's keys and values, one [`LayerKv`] per layer. Sequences reach it through
/// their block tables: position `p` of a sequence is slot `p % BLOCK_SIZE` of its block
/// `blocks[p / BLOCK_SIZE]`.
#[derive(Debug)]
pub struct CpuKvStore {
    layers: Layers,
    heads: usize,
    head_dim: usize,
}

/// The layers' keys and values, of the store's element type.
#[derive(Debug)]
enum Layers {
    F32(Vec<LayerKv<f32>>),
    F16(Vec<LayerKv<f16>>),
}

/// One layer's keys and values, `[blocks, nkv, BLOCK_SIZE, hd]` each: within a block a
/// head's positions are contiguous, so scoring a query against them is one pass over memory.
/// Allocated zeroed, so the pages of blocks never used are never mapped.
#[derive(Debug)]
struct LayerKv<T> {
    keys: Vec<T>,
    values: Vec<T>,
}

impl<T: KvElement> LayerKv<T> {
    fn zeroed(len: usize) -> Self {
        Self {
            keys: T::zeroed(len),
            values: T::zeroed(len),
        }
    }
}

/// A sequence's part of a step, as the store sees it: its block table and the positions of
/// the step's rows.
pub(super) struct SequenceKv<'a> {
    pub blocks: &'a [BlockId],
    pub positions: Range<usize>,
}

impl CpuKvStore {
    /// A store of `blocks` blocks for `layers` layers of `heads` key/value heads of
    /// `head_dim`, kept as `kind`.
    pub(super) fn new(
        layers: usize,
        heads: usize,
        head_dim: usize,
        blocks: usize,
        kind: KvCacheType,
    ) -> Self {
        let len = blocks * heads * BLOCK_SIZE * head_dim;
        let layers = match kind {
            KvCacheType::F32 => Layers::F32((0..layers).map(|_| LayerKv::zeroed(len)).collect()),
            KvCacheType::F16 => Layers::F16((0..layers).map(|_| LayerKv::zeroed(len)).collect()),
        };
        Self {
            layers,
            heads,
            head_dim,
        }
    }

    /// Offset of `block`'s head `head` in a layer's buffers.
    fn offset(&self, block: BlockId, head: usize) -> usize {
        (block as usize * self.heads + head) * BLOCK_SIZE * self.head_dim
    }

    /// Kv head `head`'s part of each of `blocks` in a layer's `buffer` (keys or values):
    /// `[BLOCK_SIZE, hd]` each.
    fn head_blocks<'b, T>(&self, buffer: &'b [T], blocks: &[BlockId], head: usize) -> Vec<&'b [T]> {
        let span = BLOCK_SIZE * self.head_dim;
        blocks
            .iter()
            .map(|&block| &buffer[self.offset(block, head)..][..span])
            .collect()
    }

    /// Stores `layer`'s keys and values `k`, `v` `[s, nkv, hd]` of a sequence's step at its
    /// `positions` (whose blocks its table must already list).
    pub(super) fn write(&mut self, layer: usize, kv: &SequenceKv<'_>, k: &[f32], v: &[f32]) {
        let (heads, hd) = (self.heads, self.head_dim);
        let offset =
            |block: BlockId, head: usize| (block as usize * heads + head) * BLOCK_SIZE * hd;
        match &mut self.layers {
            Layers::F32(layers) => write_rows(&mut layers[layer], kv, k, v, heads, hd, offset),
            Layers::F16(layers) => write_rows(&mut layers[layer], kv, k, v, heads, hd, offset),
        }
    }

    /// `softmax(q·Kᵀ / √hd) · V` for a sequence's queries `q` `[s, nh, hd]` at its
    /// `positions`, each seeing the positions up to its own (causal); query head `h` reads kv
    /// head `h / (nh / nkv)`. Returns `[s, nh, hd]`.
    ///
    /// The queries that read one kv head (its `nh / nkv` query heads, of every row of the
    /// step) go through its blocks together, each block's keys and values loaded once for
    /// all of them rather than once per query: a draft's rows and the query heads of a
    /// grouped-query model share the reads. A query's own arithmetic is the same whichever
    /// queries it goes with, so a row's numbers do not depend on the step's other rows.
    pub(super) fn attend(
        &self,
        layer: usize,
        kv: &SequenceKv<'_>,
        q: &[f32],
        nh: usize,
    ) -> Vec<f32> {
        match &self.layers {
            Layers::F32(layers) => self.attend_layer(&layers[layer], kv, q, nh),
            Layers::F16(layers) => self.attend_layer(&layers[layer], kv, q, nh),
        }
    }

    /// [`CpuKvStore::attend`] over one layer's keys and values.
    fn attend_layer<T: KvElement>(
        &self,
        layer: &LayerKv<T>,
        kv: &SequenceKv<'_>,
        q: &[f32],
        nh: usize,
    ) -> Vec<f32> {
        let hd = self.head_dim;
        let rep = nh / self.heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let positions = &kv.positions;
        let rows = q.len() / (nh * hd);
        // Each kv head's blocks, in the table's order, through the last position.
        let blocks = &kv.blocks[..crate::kv::blocks_for(positions.end)];
        // A kv head's queries, `rows * rep` of them, numbered row by row; query `k` of kv
        // head `g` is row `k / rep`'s head `g * rep + k % rep`.
        let query = |g: usize, k: usize| {
            let (i, h) = (k / rep, g * rep + k % rep);
            (i * nh + h, positions.start + i + 1)
        };
        // Tasks of a kv head and some of its queries: where the work is worth splitting (a
        // query alone is a few microseconds at a short context), enough for every thread of
        // the pool twice over, and a query each for a lone row (a decode step: nine queries
        // on two threads split 5:4, three tasks of three 2:1; at 2k positions that took
        // 13.2-14.7 against 14.9-17.2 ms a step). Else one task per kv head.
        let queries = rows * rep;
        let work = q.len() * positions.end;
        let parallel = work >= PARALLEL_ATTENTION_WORK;
        let per_part = match (parallel, rows) {
            (false, _) => queries,
            (true, 1) => 1,
            (true, _) => {
                let parts = (2 * rayon::current_num_threads()).div_ceil(self.heads);
                queries.div_ceil(parts)
            }
        };
        let tasks: Vec<(usize, Range<usize>)> = (0..self.heads)
            .flat_map(|g| {
                (0..queries)
                    .step_by(per_part)
                    .map(move |k| (g, k..(k + per_part).min(queries)))
            })
            .collect();
        let simd = Simd::detect();
        let task = |(g, ks): &(usize, Range<usize>)| {
            let keys = self.head_blocks(&layer.keys, blocks, *g);
            let values = self.head_blocks(&layer.values, blocks, *g);
            let group: Vec<(&[f32], usize)> = ks
                .clone()
                .map(|k| {
                    let (r, seen) = query(*g, k);
                    (&q[r * hd..(r + 1) * hd], seen)
                })
                .collect();
            let mut out = vec![0f32; group.len() * hd];
            match simd {
                // SAFETY: `Simd::Avx2` means the CPU has AVX2, FMA and F16C.
                #[cfg(target_arch = "x86_64")]
                Simd::Avx2 { .. } => unsafe {
                    attend_group_avx2(&group, &keys, &values, scale, &mut out)
                },
                Simd::Portable => {
                    for ((q, seen), out) in group.iter().zip(out.chunks_exact_mut(hd)) {
                        attend_row(q, &keys, &values, *seen, scale, out);
                    }
                }
            }
            out
        };
        let parts: Vec<Vec<f32>> = if parallel {
            tasks.par_iter().map(task).collect()
        } else {
            tasks.iter().map(task).collect()
        };
        let mut out = vec![0f32; q.len()];
        for ((g, ks), part) in tasks.iter().zip(&parts) {
            for (k, values) in ks.clone().zip(part.chunks_exact(hd)) {
                let (r, _) = query(*g, k);
                out[r * hd..(r + 1) * hd].copy_from_slice(values);
            }
        }
        out
    }
}

/// Stores a step's keys and values `k`, `v` `[s, nkv, hd]` at its positions in `layer`,
/// whose head `g` of block `b` starts at `offset(b, g)`.
fn write_rows<T: KvElement>(
    layer: &mut LayerKv<T>,
    kv: &SequenceKv<'_>,
    k: &[f32],
    v: &[f32],
    heads: usize,
    hd: usize,
    offset: impl Fn(BlockId, usize) -> usize,
) {
    for (position, (k, v)) in kv
        .positions
        .clone()
        .zip(k.chunks_exact(heads * hd).zip(v.chunks_exact(heads * hd)))
    {
        let block = kv.blocks[position / BLOCK_SIZE];
        let slot = position % BLOCK_SIZE;
        for (g, (k, v)) in k.chunks_exact(hd).zip(v.chunks_exact(hd)).enumerate() {
            let at = offset(block, g) + slot * hd;
            for (to, from) in layer.keys[at..at + hd].iter_mut().zip(k) {
                *to = T::from_f32(*from);
            }
            for (to, from) in layer.values[at..at + hd].iter_mut().zip(v) {
                *to = T::from_f32(*from);
            }
        }
    }
}

/// Work (query values × positions seen) from which attention is split across the pool:
/// for SmolLM2's decode step (9 heads × 64) from about 110 cached positions on; below that
/// a query is a few microseconds and dispatch would cost more than it saves.
const PARALLEL_ATTENTION_WORK: usize = 1 << 16;

/// One query row against the first `seen` positions of a sequence's blocks (`keys`,
/// `values`: each block's `[BLOCK_SIZE, hd]` of one kv head), into `out` `[hd]`.
#[inline(always)]
fn attend_row<T: KvElement>(
    q: &[f32],
    keys: &[&[T]],
    values: &[&[T]],
    seen: usize,
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    // A plain loop rather than `map().collect()`: the closure of an iterator adapter is
    // compiled on its own, without the caller's AVX2.
    let mut scores = Vec::with_capacity(seen);
    for block in keys {
        let n = (seen - scores.len()).min(BLOCK_SIZE);
        for k in block[..n * hd].chunks_exact(hd) {
            scores.push(dot(q, k) * scale);
        }
    }
    // `out += softmax(scores) · values`.
    let total = exp_from_max(&mut scores);
    for (weights, values) in scores.chunks(BLOCK_SIZE).zip(values) {
        add_weighted(weights, total, &values[..weights.len() * hd], out);
    }
}

/// `scores` replaced by `exp(score - max)`; returns their sum (softmax's denominator).
#[inline(always)]
fn exp_from_max(scores: &mut [f32]) -> f32 {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut total = 0f32;
    for x in scores.iter_mut() {
        *x = (*x - max).exp();
        total += *x;
    }
    total
}

/// `out += (weights / total) · values`, key by key.
#[inline(always)]
fn add_weighted<T: KvElement>(weights: &[f32], total: f32, values: &[T], out: &mut [f32]) {
    let hd = out.len();
    for (p, v) in weights.iter().zip(values.chunks_exact(hd)) {
        let p = p / total;
        for (o, v) in out.iter_mut().zip(v) {
            *o += p * v.to_f32();
        }
    }
}

/// [`attend_row`] for AVX2, for several queries of one kv head (`group`: each query and
/// the positions it sees) into `out` (`[queries, hd]`, zeroed), block by block: each
/// block's keys, then its values, are read once for every query while they are in cache.
/// A query's scores come eight keys at a time, their lanes summed by one transpose (with a
/// horizontal sum per key, the sums were most of a score's work), and its output is
/// accumulated 64 values at a time in registers, loaded and stored around each block
/// (exactly: a query's sums are the same operations in the same order as alone). A block
/// holds a multiple of eight positions, so the eights are the same as over one contiguous
/// buffer.
///
/// f16 keys and values read by several queries (a verify step's rows, a prompt chunk, the
/// heads that share a kv head) are widened once a block into f32 for all of them, not once
/// for every query: the widening is exact, so the sums are the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_group_avx2<T: KvElement>(
    group: &[(&[f32], usize)],
    keys: &[&[T]],
    values: &[&[T]],
    scale: f32,
    out: &mut [f32],
) {
    let Some(&(first, _)) = group.first() else {
        return;
    };
    let hd = first.len();
    if !hd.is_multiple_of(8) {
        for ((q, seen), out) in group.iter().zip(out.chunks_exact_mut(hd)) {
            attend_row(q, keys, values, *seen, scale, out);
        }
        return;
    }
    let widen = T::NARROW && group.len() > 1;
    let mut wide = if widen {
        vec![0f32; BLOCK_SIZE * hd]
    } else {
        Vec::new()
    };
    // The positions of block `b` that some query sees.
    let most = group.iter().map(|&(_, seen)| seen).max().unwrap_or(0);
    let used = |b: usize| most.saturating_sub(b * BLOCK_SIZE).min(BLOCK_SIZE) * hd;
    let mut scores: Vec<Vec<f32>> = group.iter().map(|&(_, seen)| vec![0f32; seen]).collect();
    for (b, keys) in keys.iter().enumerate() {
        // SAFETY: AVX2, FMA and F16C are enabled; `hd` is a multiple of 8.
        unsafe {
            if widen {
                let wide = widen_into(&keys[..used(b)], &mut wide);
                score_block(group, &mut scores, b, wide, hd, scale);
            } else {
                score_block(group, &mut scores, b, keys, hd, scale);
            }
        }
    }
    // The softmax's weights, eight at a time.
    for scores in &mut scores {
        // SAFETY: AVX2 and FMA are enabled.
        unsafe { softmax_avx2(scores) };
    }
    // `out += p · v` over the keys, block by block.
    for (b, values) in values.iter().enumerate() {
        // SAFETY: AVX2, FMA and F16C are enabled; `hd` is a multiple of 8.
        unsafe {
            if widen {
                let wide = widen_into(&values[..used(b)], &mut wide);
                add_weighted_block(&scores, b, wide, hd, out);
            } else {
                add_weighted_block(&scores, b, values, hd, out);
            }
        }
    }
}

/// `values` widened to f32 into the start of `wide`, eight at a time; returns them.
///
/// # Safety
/// AVX2 and F16C are enabled; `values.len()` is a multiple of 8 and at most `wide.len()`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn widen_into<'w, T: KvElement>(values: &[T], wide: &'w mut [f32]) -> &'w [f32] {
    let wide = &mut wide[..values.len()];
    for (from, to) in values.chunks_exact(8).zip(wide.chunks_exact_mut(8)) {
        // SAFETY: eight values read, eight written; the caller's features.
        unsafe { std::arch::x86_64::_mm256_storeu_ps(to.as_mut_ptr(), T::load8(from.as_ptr())) };
    }
    wide
}

/// Every query's scores against its positions in block `b` (`keys`: the block's first
/// positions, at least as many as any query sees there), eight keys at a time.
///
/// # Safety
/// AVX2 and FMA are enabled (and F16C for f16); `hd` is a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn score_block<U: KvElement>(
    group: &[(&[f32], usize)],
    scores: &mut [Vec<f32>],
    b: usize,
    keys: &[U],
    hd: usize,
    scale: f32,
) {
    use std::arch::x86_64::*;
    for ((q, _), scores) in group.iter().zip(scores) {
        let Some(scores) = scores.chunks_mut(BLOCK_SIZE).nth(b) else {
            continue;
        };
        let keys = &keys[..scores.len() * hd];
        let mut eights = keys.chunks_exact(8 * hd);
        for (eight, scores) in eights.by_ref().zip(scores.chunks_exact_mut(8)) {
            // SAFETY: `eight` holds 8 keys of `hd` values, `q` `hd` values, `scores` 8;
            // the caller's features.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in (0..hd).step_by(8) {
                    let qc = _mm256_loadu_ps(q.as_ptr().add(c));
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let k = U::load8(eight.as_ptr().add(t * hd + c));
                        *acc = _mm256_fmadd_ps(qc, k, *acc);
                    }
                }
                // Pairwise sums: [key 0..3 of lanes 0..3 | of lanes 4..7], then the
                // halves added.
                let low = _mm256_hadd_ps(
                    _mm256_hadd_ps(acc[0], acc[1]),
                    _mm256_hadd_ps(acc[2], acc[3]),
                );
                let high = _mm256_hadd_ps(
                    _mm256_hadd_ps(acc[4], acc[5]),
                    _mm256_hadd_ps(acc[6], acc[7]),
                );
                let sums = _mm256_add_ps(
                    _mm256_permute2f128_ps(low, high, 0x20),
                    _mm256_permute2f128_ps(low, high, 0x31),
                );
                _mm256_storeu_ps(
                    scores.as_mut_ptr(),
                    _mm256_mul_ps(sums, _mm256_set1_ps(scale)),
                );
            }
        }
        let done = scores.len() - scores.len() % 8;
        for (score, k) in scores[done..]
            .iter_mut()
            .zip(eights.remainder().chunks_exact(hd))
        {
            *score = dot(q, k) * scale;
        }
    }
}

/// Every query's `out += p · v` over its positions in block `b` (`values`: the block's first
/// positions, at least as many as any query sees there), 64 values at a time in registers.
///
/// # Safety
/// AVX2 and FMA are enabled (and F16C for f16).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn add_weighted_block<U: KvElement>(
    scores: &[Vec<f32>],
    b: usize,
    values: &[U],
    hd: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    for (scores, out) in scores.iter().zip(out.chunks_exact_mut(hd)) {
        let Some(weights) = scores.chunks(BLOCK_SIZE).nth(b) else {
            continue;
        };
        let values = &values[..weights.len() * hd];
        if !hd.is_multiple_of(64) {
            add_weighted(weights, 1.0, values, out);
            continue;
        }
        for (strip, at) in out.chunks_exact_mut(64).zip((0..hd).step_by(64)) {
            // SAFETY: every load is inside `values` (key `j` of `weights.len()`, values
            // `at..at + 64`) and every store inside `strip`; the caller's features.
            unsafe {
                let mut acc: [__m256; 8] =
                    std::array::from_fn(|c| _mm256_loadu_ps(strip.as_ptr().add(8 * c)));
                for (j, &p) in weights.iter().enumerate() {
                    let p = _mm256_set1_ps(p);
                    let v = values.as_ptr().add(j * hd + at);
                    for (c, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(p, U::load8(v.add(8 * c)), *acc);
                    }
                }
                for (c, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(strip.as_mut_ptr().add(8 * c), *acc);
                }
            }
        }
    }
}

/// `scores` replaced by `softmax(scores)`: `exp(score - max)` eight lanes at a time
/// ([`exp_avx2`]), then each divided by their sum (a division per value, as the portable
/// path divides, vectorised).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut eights = scores.chunks_exact_mut(8);
    // SAFETY: each chunk holds eight values; AVX2 and FMA are enabled.
    unsafe {
        let mut sums = _mm256_setzero_ps();
        for eight in eights.by_ref() {
            let x = _mm256_sub_ps(_mm256_loadu_ps(eight.as_ptr()), _mm256_set1_ps(max));
            let e = exp_avx2(x);
            _mm256_storeu_ps(eight.as_mut_ptr(), e);
            sums = _mm256_add_ps(sums, e);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
        let mut total: f32 = lanes.iter().sum();
        let rest = eights.into_remainder();
        let mut padded = [f32::NEG_INFINITY; 8];
        padded[..rest.len()].copy_from_slice(rest);
        let e = exp_avx2(_mm256_sub_ps(
            _mm256_loadu_ps(padded.as_ptr()),
            _mm256_set1_ps(max),
        ));
        _mm256_storeu_ps(padded.as_mut_ptr(), e);
        for (x, e) in rest.iter_mut().zip(padded) {
            *x = e;
            total += e;
        }
        let total = _mm256_set1_ps(total);
        let mut eights = scores.chunks_exact_mut(8);
        for eight in eights.by_ref() {
            let p = _mm256_div_ps(_mm256_loadu_ps(eight.as_ptr()), total);
            _mm256_storeu_ps(eight.as_mut_ptr(), p);
        }
        let total = _mm256_cvtss_f32(total);
        for x in eights.into_remainder() {
            *x /= total;
        }
    }
}

/// `eˣ` of eight lanes of `x ≤ 0` to within about an ulp (Cephes' `expf`: `2ⁿ·eʳ` with
/// `n = round(x / ln 2)`, `r` in ±ln 2 / 2 by a two-part `ln 2`, `eʳ` by a degree-6
/// polynomial); below -87 (where `2ⁿ` leaves the normal range) it gives `e⁻⁸⁷`, a weight
/// no softmax can tell from 0. A call to libm's `expf` per score was a fifth of attention.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    // 2ⁿ: n + 127 in the exponent bits.
    let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(scale))
}

/// Dot product in eight independent lanes, so it vectorizes without reassociation.
#[inline(always)]
fn dot<T: KvElement>(a: &[f32], b: &[T]) -> f32 {
    let mut lanes = [0f32; 8];
    for (a, b) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for k in 0..8 {
            lanes[k] += a[k] * b[k].to_f32();
        }
    }
    let tail: f32 = a
        .chunks_exact(8)
        .remainder()
        .iter()
        .zip(b.chunks_exact(8).remainder())
        .map(|(a, b)| a * b.to_f32())
        .sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(seed: u32) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        }
    }

    /// The AVX2 attention (eight keys at a time, `out` in registers, several queries per
    /// pass over the blocks) against the portable row, for head widths on and off its fast
    /// paths and key counts around eight and around a block; and a query's values are
    /// bit for bit the same alone as among others; keys and values kept as f32 and as f16.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_attention_matches_the_portable_rows() {
        if !matches!(Simd::detect(), Simd::Avx2 { .. }) {
            return;
        }
        avx2_against_portable::<f32>();
        avx2_against_portable::<f16>();
    }

    #[cfg(target_arch = "x86_64")]
    fn avx2_against_portable<T: KvElement + std::fmt::Debug>() {
        let mut next = random(7);
        for hd in [64, 128, 40, 12] {
            let most = 70;
            let blocks = crate::kv::blocks_for(most);
            let mut kept = |_| T::from_f32(next());
            let keys: Vec<T> = (0..blocks * BLOCK_SIZE * hd).map(&mut kept).collect();
            let values: Vec<T> = (0..blocks * BLOCK_SIZE * hd).map(&mut kept).collect();
            let span = BLOCK_SIZE * hd;
            let keys: Vec<&[T]> = keys.chunks_exact(span).collect();
            let values: Vec<&[T]> = values.chunks_exact(span).collect();
            let seens = [1, 7, 8, 19, BLOCK_SIZE, 64, most];
            let qs: Vec<Vec<f32>> = seens
                .iter()
                .map(|_| (0..hd).map(|_| next()).collect())
                .collect();
            let group: Vec<(&[f32], usize)> = qs.iter().map(Vec::as_slice).zip(seens).collect();
            let mut together = vec![0f32; group.len() * hd];
            // SAFETY: the CPU has AVX2, FMA and F16C (checked by the caller).
            unsafe { attend_group_avx2(&group, &keys, &values, 0.125, &mut together) };
            for (query, got) in group.iter().zip(together.chunks_exact(hd)) {
                let (q, seen) = *query;
                let mut want = vec![0f32; hd];
                attend_row(q, &keys, &values, seen, 0.125, &mut want);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "hd {hd}, {seen} keys: {g} vs {w}"
                    );
                }
                let mut alone = vec![0f32; hd];
                // SAFETY: as above.
                unsafe { attend_group_avx2(&[*query], &keys, &values, 0.125, &mut alone) };
                assert_eq!(alone, got, "hd {hd}, {seen} keys: alone and in a group");
            }
        }
    }

    /// The vector `exp` against the library's, over softmax's whole range of inputs: within
    /// two ulps where the result is normal, and at most `e⁻⁸⁷` below.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_exp_is_within_two_ulps() {
        use std::arch::x86_64::*;
        if !matches!(Simd::detect(), Simd::Avx2 { .. }) {
            return;
        }
        let xs: Vec<f32> = (0..=120_000).map(|k| -(k as f32) * 1e-3).collect();
        for eight in xs.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: the CPU has AVX2 and FMA (checked above); eight values in and out.
            unsafe {
                let e = exp_avx2(_mm256_loadu_ps(eight.as_ptr()));
                _mm256_storeu_ps(got.as_mut_ptr(), e);
            }
            for (&x, &got) in eight.iter().zip(&got) {
                let want = x.exp();
                if x >= -87.0 {
                    let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
                    assert!(ulps <= 2, "exp({x}): {got} against {want}, {ulps} ulps");
                } else {
                    assert!(got <= (-87f32).exp() * 1.000_001, "exp({x}): {got}");
                }
            }
        }
    }

    /// Where a sequence's blocks lie in the store changes no number: the same keys and values
    /// written through a scattered block table and through consecutive blocks, in steps of
    /// several positions and of one, give bit-identical attention.
    #[test]
    fn attention_is_the_same_wherever_the_blocks_lie() {
        let (nkv, nh, hd) = (2, 4, 64);
        let positions = 3 * BLOCK_SIZE + 5;
        let mut next = random(11);
        let k: Vec<f32> = (0..positions * nkv * hd).map(|_| next()).collect();
        let v: Vec<f32> = (0..positions * nkv * hd).map(|_| next()).collect();
        let q: Vec<f32> = (0..positions * nh * hd).map(|_| next()).collect();
        let attend_all = |kind, table: &[BlockId], steps: &[Range<usize>]| {
            let mut store = CpuKvStore::new(1, nkv, hd, 9, kind);
            let mut out = Vec::new();
            for step in steps {
                let kv = SequenceKv {
                    blocks: table,
                    positions: step.clone(),
                };
                let rows =
                    |x: &[f32], width: usize| x[step.start * width..step.end * width].to_vec();
                store.write(0, &kv, &rows(&k, nkv * hd), &rows(&v, nkv * hd));
                out.extend(store.attend(0, &kv, &rows(&q, nh * hd), nh));
            }
            out
        };
        let whole = [Range {
            start: 0,
            end: positions,
        }];
        let chunks = [0..20, 20..21, 21..positions];
        for kind in [KvCacheType::F32, KvCacheType::F16] {
            let consecutive = attend_all(kind, &[0, 1, 2, 3], &whole);
            assert_eq!(attend_all(kind, &[7, 2, 8, 0], &whole), consecutive);
            assert_eq!(attend_all(kind, &[5, 1, 6, 3], &chunks), consecutive);
        }
        // Keys and values rounded to f16 move the outputs by about f16's precision.
        let (exact, half) = (
            attend_all(KvCacheType::F32, &[0, 1, 2, 3], &whole),
            attend_all(KvCacheType::F16, &[0, 1, 2, 3], &whole),
        );
        let worst = exact
            .iter()
            .zip(&half)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst > 0.0 && worst < 2e-3, "{worst}");
    }
}
