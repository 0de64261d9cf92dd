//! The portable kernels: the vector kernels' arithmetic written lane by lane. They are the
//! reference every other set is held to, bit for bit, and what non-x86 CPUs run.

use std::ops::Range;

use super::layout::{
    BLOCK, CHUNK, GROUP, Q4_1_BYTES, QuantizedRow, deinterleave, subgroups, to_subgroups,
};

/// `x` rounded to i16 per block (`x ≈ values · scale`, ties to even), with each block's
/// scale and `Σ x`.
#[inline(always)]
pub fn quantize_row(x: &[f32]) -> QuantizedRow {
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
    QuantizedRow {
        values: to_subgroups(&values),
        scales,
        sums,
    }
}

/// Rows `rows` of a Q4_1 matrix (`bytes`: rows of `xs[0].blocks()` blocks in the subgroup
/// layout) dotted with every input into `out` (`[inputs, rows]`), one value at a time.
pub fn dot_q4_1(bytes: &[u8], rows: Range<usize>, xs: &[QuantizedRow], out: &mut [f32]) {
    let len = xs.first().map_or(0, |x| x.blocks()) * Q4_1_BYTES;
    each_value(rows, xs, out, |r, x| {
        dot_q4_1_row(&bytes[r * len..(r + 1) * len], x)
    });
}

/// Rows `rows` of a Q8_0 matrix (`quants` in the subgroup layout, one scale per block) dotted
/// with every input into `out` (`[inputs, rows]`), one value at a time.
pub fn dot_q8_0(
    quants: &[i8],
    scales: &[f32],
    rows: Range<usize>,
    xs: &[QuantizedRow],
    out: &mut [f32],
) {
    let blocks = xs.first().map_or(0, |x| x.blocks());
    each_value(rows, xs, out, |r, x| {
        let (q, s) = (r * blocks * BLOCK, r * blocks);
        dot_q8_0_row(&quants[q..q + blocks * BLOCK], &scales[s..s + blocks], x)
    });
}

/// `out[input, row] = value(row, input)`, one at a time.
fn each_value(
    rows: Range<usize>,
    xs: &[QuantizedRow],
    out: &mut [f32],
    value: impl Fn(usize, &QuantizedRow) -> f32,
) {
    if rows.is_empty() {
        return;
    }
    for (out, x) in out.chunks_exact_mut(rows.len()).zip(xs) {
        for (o, r) in out.iter_mut().zip(rows.clone()) {
            *o = value(r, x);
        }
    }
}

/// The vector kernels' arithmetic, lane by lane. `words(first, p, c)`: the weights meeting
/// activation chunk `c` of the subgroup at block `first`; `scales(first, p)`: its `d`s and
/// `m`s (lanes from `p` zero).
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
    // As the AVX2 kernels' `hsum` adds the lanes.
    let v: [f32; GROUP] = std::array::from_fn(|i| acc[i] + offsets[i]);
    let s: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
    (s[0] + s[2]) + (s[1] + s[3])
}

/// One Q4_1 row (subgroup layout) dotted with one input.
pub fn dot_q4_1_row(row: &[u8], x: &QuantizedRow) -> f32 {
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

/// One Q8_0 row (subgroup layout, its scales) dotted with one input.
pub fn dot_q8_0_row(quants: &[i8], scales: &[f32], x: &QuantizedRow) -> f32 {
    dot_lanes(
        x,
        |first, _, c| std::array::from_fn(|i| quants[first * BLOCK + c * CHUNK + i] as i16),
        |first, p| {
            let d = std::array::from_fn(|i| if i < p { scales[first + i] } else { 0.0 });
            (d, [0.0; GROUP])
        },
    )
}

/// A Q4_1 subgroup's `d`s and `m`s (lanes from `p` zero).
fn q4_1_scales(sub: &[u8], p: usize) -> ([f32; GROUP], [f32; GROUP]) {
    let f16 = |at: usize| half::f16::from_le_bytes([sub[at], sub[at + 1]]).to_f32();
    (
        std::array::from_fn(|i| if i < p { f16(2 * i) } else { 0.0 }),
        std::array::from_fn(|i| if i < p { f16(2 * p + 2 * i) } else { 0.0 }),
    )
}

/// One Q4_1 subgroup of `p` blocks (`sub`) as f32 values, `d·q + m` (a multiply, then an
/// add).
pub fn expand_q4_1_subgroup(sub: &[u8], p: usize, out: &mut [f32]) {
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

/// One row of Q8_0 values (subgroup layout) as f32 (every kernel set's expansion).
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
