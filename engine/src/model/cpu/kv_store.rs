//! The CPU model's KV store and attention over it: the keys and values of every block of the
//! pool (`kv`) in host memory, and a sequence's query rows scored against the blocks its
//! table lists (portable, and AVX2 with FMA).

use std::ops::Range;

use rayon::prelude::*;

use crate::kv::{BLOCK_SIZE, BlockId};
use crate::quant::Simd;

/// Every block's keys and values, one [`LayerKv`] per layer. Sequences reach it through
/// their block tables: position `p` of a sequence is slot `p % BLOCK_SIZE` of its block
/// `blocks[p / BLOCK_SIZE]`.
#[derive(Debug)]
pub struct CpuKvStore {
    layers: Vec<LayerKv>,
    heads: usize,
    head_dim: usize,
}

/// One layer's keys and values, `[blocks, nkv, BLOCK_SIZE, hd]` each: within a block a
/// head's positions are contiguous, so scoring a query against them is one pass over memory.
/// Allocated zeroed, so the pages of blocks never used are never mapped.
#[derive(Debug)]
struct LayerKv {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// A sequence's part of a step, as the store sees it: its block table and the positions of
/// the step's rows.
pub(super) struct SequenceKv<'a> {
    pub blocks: &'a [BlockId],
    pub positions: Range<usize>,
}

impl CpuKvStore {
    /// A store of `blocks` blocks for `layers` layers of `heads` key/value heads of
    /// `head_dim`.
    pub(super) fn new(layers: usize, heads: usize, head_dim: usize, blocks: usize) -> Self {
        let len = blocks * heads * BLOCK_SIZE * head_dim;
        Self {
            layers: (0..layers)
                .map(|_| LayerKv {
                    keys: vec![0.0; len],
                    values: vec![0.0; len],
                })
                .collect(),
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
    fn head_blocks<'b>(
        &self,
        buffer: &'b [f32],
        blocks: &[BlockId],
        head: usize,
    ) -> Vec<&'b [f32]> {
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
        for (position, (k, v)) in kv
            .positions
            .clone()
            .zip(k.chunks_exact(heads * hd).zip(v.chunks_exact(heads * hd)))
        {
            let block = kv.blocks[position / BLOCK_SIZE];
            let slot = position % BLOCK_SIZE;
            for (g, (k, v)) in k.chunks_exact(hd).zip(v.chunks_exact(hd)).enumerate() {
                let at = self.offset(block, g) + slot * hd;
                let layer = &mut self.layers[layer];
                layer.keys[at..at + hd].copy_from_slice(k);
                layer.values[at..at + hd].copy_from_slice(v);
            }
        }
    }

    /// `softmax(q·Kᵀ / √hd) · V` for a sequence's queries `q` `[s, nh, hd]` at its
    /// `positions`, each seeing the positions up to its own (causal); query head `h` reads kv
    /// head `h / (nh / nkv)`. Returns `[s, nh, hd]`.
    pub(super) fn attend(
        &self,
        layer: usize,
        kv: &SequenceKv<'_>,
        q: &[f32],
        nh: usize,
    ) -> Vec<f32> {
        let hd = self.head_dim;
        let rep = nh / self.heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let positions = &kv.positions;
        // Each kv head's blocks, in the table's order, through the last position.
        let blocks = &kv.blocks[..crate::kv::blocks_for(positions.end)];
        let layer = &self.layers[layer];
        let keys: Vec<Vec<&[f32]>> = (0..self.heads)
            .map(|g| self.head_blocks(&layer.keys, blocks, g))
            .collect();
        let values: Vec<Vec<&[f32]>> = (0..self.heads)
            .map(|g| self.head_blocks(&layer.values, blocks, g))
            .collect();
        let mut out = vec![0f32; q.len()];
        let simd = Simd::detect();
        let row = |(r, out): (usize, &mut [f32])| {
            let (i, h) = (r / nh, r % nh);
            let seen = positions.start + i + 1;
            let (keys, values) = (&keys[h / rep], &values[h / rep]);
            let q = &q[r * hd..(r + 1) * hd];
            match simd {
                // SAFETY: `Simd::Avx2` means the CPU has AVX2 and FMA.
                #[cfg(target_arch = "x86_64")]
                Simd::Avx2 { .. } => unsafe { attend_row_avx2(q, keys, values, seen, scale, out) },
                Simd::Portable => attend_row(q, keys, values, seen, scale, out),
            }
        };
        let work = q.len() * positions.end;
        if work >= PARALLEL_ATTENTION_WORK {
            out.par_chunks_mut(hd).enumerate().for_each(row);
        } else {
            out.chunks_mut(hd).enumerate().for_each(row);
        }
        out
    }
}

/// Work (query values × positions seen) from which attention rows are split across the
/// pool: for SmolLM2's decode step (9 heads × 64) from about 110 cached positions on; below
/// that a row is a few microseconds and dispatch would cost more than it saves.
const PARALLEL_ATTENTION_WORK: usize = 1 << 16;

/// One query row against the first `seen` positions of a sequence's blocks (`keys`,
/// `values`: each block's `[BLOCK_SIZE, hd]` of one kv head), into `out` `[hd]`.
#[inline(always)]
fn attend_row(
    q: &[f32],
    keys: &[&[f32]],
    values: &[&[f32]],
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
fn add_weighted(weights: &[f32], total: f32, values: &[f32], out: &mut [f32]) {
    let hd = out.len();
    for (p, v) in weights.iter().zip(values.chunks_exact(hd)) {
        let p = p / total;
        for (o, v) in out.iter_mut().zip(v) {
            *o += p * v;
        }
    }
}

/// [`attend_row`] for AVX2: the scores of eight keys at a time, their lanes summed by one
/// transpose (with a horizontal sum per key, the sums were most of a score's work; the
/// attention of a 4-client decode step was a twelfth of it). A block holds a multiple of
/// eight positions, so the eights are the same as over one contiguous buffer.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_row_avx2(
    q: &[f32],
    keys: &[&[f32]],
    values: &[&[f32]],
    seen: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = q.len();
    if !hd.is_multiple_of(8) {
        return attend_row(q, keys, values, seen, scale, out);
    }
    let mut scores = vec![0f32; seen];
    for (scores, keys) in scores.chunks_mut(BLOCK_SIZE).zip(keys) {
        let keys = &keys[..scores.len() * hd];
        let mut eights = keys.chunks_exact(8 * hd);
        for (eight, scores) in eights.by_ref().zip(scores.chunks_exact_mut(8)) {
            // SAFETY: `eight` holds 8 keys of `hd` values, `q` `hd` values, `scores` 8; AVX2
            // and FMA are enabled.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in (0..hd).step_by(8) {
                    let qc = _mm256_loadu_ps(q.as_ptr().add(c));
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let k = _mm256_loadu_ps(eight.as_ptr().add(t * hd + c));
                        *acc = _mm256_fmadd_ps(qc, k, *acc);
                    }
                }
                // Pairwise sums: [key 0..3 of lanes 0..3 | of lanes 4..7], then the halves
                // added.
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
    let total = exp_from_max(&mut scores);
    // `out += p · v` over the keys with `out` held in registers, 64 values at a time (the
    // portable loop loaded and stored `out` for every key: half of this function's time).
    if !hd.is_multiple_of(64) {
        for (weights, values) in scores.chunks(BLOCK_SIZE).zip(values) {
            add_weighted(weights, total, &values[..weights.len() * hd], out);
        }
        return;
    }
    for (strip, at) in out.chunks_exact_mut(64).zip((0..hd).step_by(64)) {
        // SAFETY: every load is inside a block of `values` (key `j` of a block holding
        // `weights.len()` of them, values `at..at + 64`) and every store inside `strip`; AVX2
        // and FMA are enabled.
        unsafe {
            let mut acc: [__m256; 8] =
                std::array::from_fn(|c| _mm256_loadu_ps(strip.as_ptr().add(8 * c)));
            for (weights, values) in scores.chunks(BLOCK_SIZE).zip(values) {
                assert!(values.len() >= weights.len() * hd);
                for (j, score) in weights.iter().enumerate() {
                    let p = _mm256_set1_ps(score / total);
                    let v = values.as_ptr().add(j * hd + at);
                    for (c, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(p, _mm256_loadu_ps(v.add(8 * c)), *acc);
                    }
                }
            }
            for (c, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(strip.as_mut_ptr().add(8 * c), *acc);
            }
        }
    }
}

/// Dot product in eight independent lanes, so it vectorizes without reassociation.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (a, b) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for k in 0..8 {
            lanes[k] += a[k] * b[k];
        }
    }
    let tail: f32 = a
        .chunks_exact(8)
        .remainder()
        .iter()
        .zip(b.chunks_exact(8).remainder())
        .map(|(a, b)| a * b)
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

    /// The AVX2 attention row (eight keys at a time, `out` in registers) against the
    /// portable one, for head widths on and off its fast paths and key counts around eight
    /// and around a block.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_attention_row_matches_the_portable_one() {
        if !matches!(Simd::detect(), Simd::Avx2 { .. }) {
            return;
        }
        let mut next = random(7);
        for hd in [64, 128, 40, 12] {
            for seen in [1, 7, 8, 19, BLOCK_SIZE, 64, 70] {
                let q: Vec<f32> = (0..hd).map(|_| next()).collect();
                let blocks = crate::kv::blocks_for(seen);
                let keys: Vec<f32> = (0..blocks * BLOCK_SIZE * hd).map(|_| next()).collect();
                let values: Vec<f32> = (0..blocks * BLOCK_SIZE * hd).map(|_| next()).collect();
                let span = BLOCK_SIZE * hd;
                let keys: Vec<&[f32]> = keys.chunks_exact(span).collect();
                let values: Vec<&[f32]> = values.chunks_exact(span).collect();
                let start: Vec<f32> = (0..hd).map(|_| next()).collect();
                let (mut want, mut got) = (start.clone(), start);
                attend_row(&q, &keys, &values, seen, 0.125, &mut want);
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { attend_row_avx2(&q, &keys, &values, seen, 0.125, &mut got) };
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "hd {hd}, {seen} keys: {g} vs {w}"
                    );
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
        let attend_all = |table: &[BlockId], steps: &[Range<usize>]| {
            let mut store = CpuKvStore::new(1, nkv, hd, 9);
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
        let chunks = [0..20, 20..21, 21..positions];
        let consecutive = attend_all(
            &[0, 1, 2, 3],
            &[Range {
                start: 0,
                end: positions,
            }],
        );
        assert_eq!(
            attend_all(
                &[7, 2, 8, 0],
                &[Range {
                    start: 0,
                    end: positions
                }]
            ),
            consecutive
        );
        assert_eq!(attend_all(&[5, 1, 6, 3], &chunks), consecutive);
    }
}
