//! The CPU model's KV cache and attention over it: keys and values in host memory, one
//! buffer per layer, and a query row scored against them (portable, and AVX2 with FMA).

use std::ops::Range;

use rayon::prelude::*;

use crate::quant::Simd;

/// A generation's keys and values on the CPU path, one `KvCache` per layer. A step stores
/// its new positions layer by layer as it attends over them
/// ([`append_and_attend`](Self::append_and_attend)), then counts them in once every layer
/// has them ([`advance`](Self::advance)).
#[derive(Debug)]
pub struct CpuCache {
    layers: Vec<KvCache>,
    /// Positions already in the cache.
    len: usize,
}

impl CpuCache {
    /// An empty cache of `layers` layers of `heads` key/value heads of `head_dim`, for up to
    /// `capacity` positions.
    pub(super) fn new(layers: usize, heads: usize, head_dim: usize, capacity: usize) -> Self {
        Self {
            layers: (0..layers)
                .map(|_| KvCache::new(heads, head_dim, capacity))
                .collect(),
            len: 0,
        }
    }

    /// Positions already in the cache: the next step's rows start at this position.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Stores `layer`'s keys and values `k`, `v` `[s, nkv, hd]` of the step's positions
    /// (`len..len + s`) and returns the attention of its queries `q` `[s, nh, hd]` at those
    /// positions over the cache, each seeing the positions up to its own: `[s, nh, hd]`.
    pub(super) fn append_and_attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        nh: usize,
    ) -> Vec<f32> {
        let kv = &mut self.layers[layer];
        let s = q.len() / (nh * kv.head_dim);
        let positions = self.len..self.len + s;
        kv.append(k, v, positions.start);
        kv.attend(q, nh, positions)
    }

    /// Counts in the step's `positions` new positions, once every layer has stored them.
    pub(super) fn advance(&mut self, positions: usize) {
        self.len += positions;
    }
}

/// One layer's keys and values in host memory, `[nkv, capacity, hd]` each: a head's
/// positions are contiguous, so scoring a query against them is one pass over memory.
#[derive(Debug)]
struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    heads: usize,
    head_dim: usize,
    capacity: usize,
}

/// Work (query values × positions seen) from which attention rows are split across the
/// pool: for SmolLM2's decode step (9 heads × 64) from about 110 cached positions on; below
/// that a row is a few microseconds and dispatch would cost more than it saves.
const PARALLEL_ATTENTION_WORK: usize = 1 << 16;

impl KvCache {
    fn new(heads: usize, head_dim: usize, capacity: usize) -> Self {
        let len = heads * capacity * head_dim;
        Self {
            keys: vec![0.0; len],
            values: vec![0.0; len],
            heads,
            head_dim,
            capacity,
        }
    }

    /// Stores `k`, `v` `[s, nkv, hd]` at positions `start..start + s`.
    fn append(&mut self, k: &[f32], v: &[f32], start: usize) {
        let (hd, cap) = (self.head_dim, self.capacity);
        let s = k.len() / (self.heads * hd);
        assert!(start + s <= cap, "KV cache of {cap} positions is full");
        for (i, (k, v)) in k
            .chunks_exact(self.heads * hd)
            .zip(v.chunks_exact(self.heads * hd))
            .enumerate()
        {
            for (g, (k, v)) in k.chunks_exact(hd).zip(v.chunks_exact(hd)).enumerate() {
                let at = (g * cap + start + i) * hd;
                self.keys[at..at + hd].copy_from_slice(k);
                self.values[at..at + hd].copy_from_slice(v);
            }
        }
    }

    /// `softmax(q·Kᵀ / √hd) · V` for queries `q` `[s, nh, hd]` at `positions`, each seeing
    /// the cached positions up to its own (causal); query head `h` reads kv head
    /// `h / (nh / nkv)`. Returns `[s, nh, hd]`.
    fn attend(&self, q: &[f32], nh: usize, positions: Range<usize>) -> Vec<f32> {
        let hd = self.head_dim;
        let rep = nh / self.heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; q.len()];
        let simd = Simd::detect();
        let row = |(r, out): (usize, &mut [f32])| {
            let (i, h) = (r / nh, r % nh);
            let seen = positions.start + i + 1;
            let base = (h / rep) * self.capacity * hd;
            let keys = &self.keys[base..base + seen * hd];
            let values = &self.values[base..base + seen * hd];
            let q = &q[r * hd..(r + 1) * hd];
            match simd {
                // SAFETY: `Simd::Avx2` means the CPU has AVX2 and FMA.
                #[cfg(target_arch = "x86_64")]
                Simd::Avx2 { .. } => unsafe { attend_row_avx2(q, keys, values, scale, out) },
                Simd::Portable => attend_row(q, keys, values, scale, out),
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

/// One query row against `seen` cached positions (`keys`, `values` `[seen, hd]`), into
/// `out` `[hd]`.
#[inline(always)]
fn attend_row(q: &[f32], keys: &[f32], values: &[f32], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    // A plain loop rather than `map().collect()`: the closure of an iterator adapter is
    // compiled on its own, without the caller's AVX2.
    let mut scores = Vec::with_capacity(keys.len() / hd);
    for k in keys.chunks_exact(hd) {
        scores.push(dot(q, k) * scale);
    }
    // `out += softmax(scores) · values`.
    let total = exp_from_max(&mut scores);
    add_weighted(&scores, total, values, out);
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
/// attention of a 4-client decode step was a twelfth of it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_row_avx2(q: &[f32], keys: &[f32], values: &[f32], scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = q.len();
    if !hd.is_multiple_of(8) {
        return attend_row(q, keys, values, scale, out);
    }
    let seen = keys.len() / hd;
    let mut scores = vec![0f32; seen];
    let mut eights = keys.chunks_exact(8 * hd);
    for (eight, scores) in eights.by_ref().zip(scores.chunks_exact_mut(8)) {
        // SAFETY: `eight` holds 8 keys of `hd` values, `q` `hd` values, `scores` 8; AVX2 and
        // FMA are enabled.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..hd).step_by(8) {
                let qc = _mm256_loadu_ps(q.as_ptr().add(c));
                for (t, acc) in acc.iter_mut().enumerate() {
                    let k = _mm256_loadu_ps(eight.as_ptr().add(t * hd + c));
                    *acc = _mm256_fmadd_ps(qc, k, *acc);
                }
            }
            // Pairwise sums: [key 0..3 of lanes 0..3 | of lanes 4..7], then the halves added.
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
    let done = seen - seen % 8;
    for (score, k) in scores[done..]
        .iter_mut()
        .zip(eights.remainder().chunks_exact(hd))
    {
        *score = dot(q, k) * scale;
    }
    let total = exp_from_max(&mut scores);
    // `out += p · v` over the keys with `out` held in registers, 64 values at a time (the
    // portable loop loaded and stored `out` for every key: half of this function's time).
    if !hd.is_multiple_of(64) {
        return add_weighted(&scores, total, values, out);
    }
    for (strip, at) in out.chunks_exact_mut(64).zip((0..hd).step_by(64)) {
        // SAFETY: every load is inside `values` (row `j`, values `at..at + 64`) and every
        // store inside `strip`; AVX2 and FMA are enabled.
        unsafe {
            let mut acc: [__m256; 8] =
                std::array::from_fn(|c| _mm256_loadu_ps(strip.as_ptr().add(8 * c)));
            for (j, score) in scores.iter().enumerate() {
                let p = _mm256_set1_ps(score / total);
                let v = values.as_ptr().add(j * hd + at);
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(p, _mm256_loadu_ps(v.add(8 * c)), *acc);
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

    /// The AVX2 attention row (eight keys at a time, `out` in registers) against the
    /// portable one, for head widths on and off its fast paths and key counts around eight.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_attention_row_matches_the_portable_one() {
        if !matches!(Simd::detect(), Simd::Avx2 { .. }) {
            return;
        }
        let mut state = 7u32;
        let mut next = move || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        };
        for hd in [64, 128, 40, 12] {
            for seen in [1, 7, 8, 19, 64] {
                let q: Vec<f32> = (0..hd).map(|_| next()).collect();
                let keys: Vec<f32> = (0..seen * hd).map(|_| next()).collect();
                let values: Vec<f32> = (0..seen * hd).map(|_| next()).collect();
                let start: Vec<f32> = (0..hd).map(|_| next()).collect();
                let (mut want, mut got) = (start.clone(), start);
                attend_row(&q, &keys, &values, 0.125, &mut want);
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { attend_row_avx2(&q, &keys, &values, 0.125, &mut got) };
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "hd {hd}, {seen} keys: {g} vs {w}"
                    );
                }
            }
        }
    }
}
