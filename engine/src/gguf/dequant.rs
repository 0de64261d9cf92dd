//! Expansion of ggml tensor encodings to f32.
//!
//! Block layouts and arithmetic follow ggml's `ggml-common.h` / `dequantize_row_*` in
//! `ggml-quants.c` exactly, including the order of the f32 operations (`d * q + m`, not a fused
//! multiply-add), so results are bit-identical to ggml's reference and to the `gguf` Python
//! package. Each type has one block function; [`run`] slices the input into blocks and spreads
//! them over rayon's pool.

use half::{bf16, f16};
use rayon::prelude::*;

use super::ggml_type::{GgmlType, QK_K};

/// Why a buffer could not be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    #[error("dequantizing {0} is not supported")]
    Unsupported(GgmlType),
    #[error(
        "{ty}: {src_len} bytes do not encode {dst_len} values ({expected} bytes expected, in whole blocks of {block})"
    )]
    Size {
        ty: GgmlType,
        src_len: usize,
        dst_len: usize,
        expected: usize,
        block: usize,
    },
}

/// Expands `src` (whole blocks of `ty`) into `dst`; `dst.len()` must be the element count.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    use GgmlType::*;
    match ty {
        F32 => dequantize_f32(src, dst),
        F16 => dequantize_f16(src, dst),
        BF16 => dequantize_bf16(src, dst),
        Q4_0 => dequantize_q4_0(src, dst),
        Q4_1 => dequantize_q4_1(src, dst),
        Q5_0 => dequantize_q5_0(src, dst),
        Q5_1 => dequantize_q5_1(src, dst),
        Q8_0 => dequantize_q8_0(src, dst),
        Q2_K => dequantize_q2_k(src, dst),
        Q3_K => dequantize_q3_k(src, dst),
        Q4_K => dequantize_q4_k(src, dst),
        Q5_K => dequantize_q5_k(src, dst),
        Q6_K => dequantize_q6_k(src, dst),
        other => Err(DequantError::Unsupported(other)),
    }
}

/// Convenience: allocates the output. `n` is the number of elements.
pub fn dequantize_to_vec(ty: GgmlType, src: &[u8], n: usize) -> Result<Vec<f32>, DequantError> {
    let mut out = vec![0f32; n];
    dequantize(ty, src, &mut out)?;
    Ok(out)
}

/// Elements handed to one rayon task. One core expands ~1-3 G values/s, so small tensors are
/// done faster than threads wake up; big tensors (embeddings) still spread over the pool.
/// Measured on a loaded 2-core box, 16 K-element tasks were 5-10× slower than one thread.
const ELEMS_PER_TASK: usize = 256 * 1024;

/// Checks sizes, then applies `block` to every (input block, output block) pair in parallel.
fn run<const B: usize, const N: usize>(
    ty: GgmlType,
    src: &[u8],
    dst: &mut [f32],
    block: impl Fn(&[u8; B], &mut [f32; N]) + Sync,
) -> Result<(), DequantError> {
    debug_assert_eq!((B, N), (ty.type_size(), ty.block_size()));
    let expected = dst.len() / N * B;
    if !dst.len().is_multiple_of(N) || src.len() != expected {
        return Err(DequantError::Size {
            ty,
            src_len: src.len(),
            dst_len: dst.len(),
            expected,
            block: N,
        });
    }
    let blocks_per_task = (ELEMS_PER_TASK / N).max(1);
    dst.par_chunks_mut(blocks_per_task * N)
        .zip(src.par_chunks(blocks_per_task * B))
        .for_each(|(d, s)| {
            for (y, x) in d
                .as_chunks_mut::<N>()
                .0
                .iter_mut()
                .zip(s.as_chunks::<B>().0)
            {
                block(x, y);
            }
        });
    Ok(())
}

#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

pub fn dequantize_f32(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<4, 1>(GgmlType::F32, src, dst, |x, y| {
        y[0] = f32::from_le_bytes(*x)
    })
}

pub fn dequantize_f16(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<2, 1>(GgmlType::F16, src, dst, |x, y| {
        y[0] = f16::from_bits(u16::from_le_bytes(*x)).to_f32()
    })
}

/// bf16 is the top half of an f32, so widening is a shift (exact).
pub fn dequantize_bf16(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<2, 1>(GgmlType::BF16, src, dst, |x, y| {
        y[0] = bf16::from_bits(u16::from_le_bytes(*x)).to_f32()
    })
}

/// `block_q4_0`: d (f16), 16 bytes of nibbles; low nibbles are elements 0..16, high 16..32.
/// x = (q - 8) * d.
pub fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<18, 32>(GgmlType::Q4_0, src, dst, |x, y| {
        let d = half(x, 0);
        let qs = &x[2..18];
        for j in 0..16 {
            y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
            y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    })
}

/// `block_q4_1`: d, m (f16), 16 bytes of nibbles. x = q * d + m.
pub fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<20, 32>(GgmlType::Q4_1, src, dst, |x, y| {
        let d = half(x, 0);
        let m = half(x, 2);
        let qs = &x[4..20];
        for j in 0..16 {
            y[j] = (qs[j] & 0x0F) as f32 * d + m;
            y[j + 16] = (qs[j] >> 4) as f32 * d + m;
        }
    })
}

/// `block_q5_0`: d (f16), qh (u32: the 5th bit of each element), 16 bytes of nibbles.
/// x = (q - 16) * d.
pub fn dequantize_q5_0(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<22, 32>(GgmlType::Q5_0, src, dst, |x, y| {
        let d = half(x, 0);
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        let qs = &x[6..22];
        for j in 0..16 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            y[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
            y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    })
}

/// `block_q5_1`: d, m (f16), qh (u32), 16 bytes of nibbles. x = q * d + m.
pub fn dequantize_q5_1(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<24, 32>(GgmlType::Q5_1, src, dst, |x, y| {
        let d = half(x, 0);
        let m = half(x, 2);
        let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
        let qs = &x[8..24];
        for j in 0..16 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            y[j] = ((qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
            y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
        }
    })
}

/// `block_q8_0`: d (f16), 32 × i8. x = q * d.
pub fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<34, 32>(GgmlType::Q8_0, src, dst, |x, y| {
        let d = half(x, 0);
        for j in 0..32 {
            y[j] = x[2 + j] as i8 as f32 * d;
        }
    })
}

/// `block_q2_K`: scales[16] (4-bit scale | 4-bit min), qs[64] (2-bit), d, dmin (f16).
/// Each 128-element half uses 32 bytes of qs at shifts 0, 2, 4, 6; each 16 elements have their
/// own scale byte. x = d * sc * q - dmin * m.
pub fn dequantize_q2_k(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<84, QK_K>(GgmlType::Q2_K, src, dst, |x, y| {
        let scales = &x[0..16];
        let d = half(x, 80);
        let dmin = half(x, 82);
        let mut is = 0;
        let mut out = 0;
        for n in 0..2 {
            let q = &x[16 + 32 * n..16 + 32 * n + 32];
            for shift in [0, 2, 4, 6] {
                for half_ in 0..2 {
                    let sc = scales[is];
                    is += 1;
                    let dl = d * (sc & 0x0F) as f32;
                    let ml = dmin * (sc >> 4) as f32;
                    for l in 0..16 {
                        y[out + l] = dl * ((q[16 * half_ + l] >> shift) & 3) as f32 - ml;
                    }
                    out += 16;
                }
            }
        }
    })
}

/// `block_q3_K`: hmask[32] (high bit, inverted: set means +0, clear means -4), qs[64] (low 2
/// bits), scales[12] (16 × 6-bit, offset by 32), d (f16). x = d * (sc - 32) * q.
pub fn dequantize_q3_k(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<110, QK_K>(GgmlType::Q3_K, src, dst, |x, y| {
        let hm = &x[0..32];
        let packed = &x[96..108];
        let d = half(x, 108);
        // Scale i: low 4 bits from byte i (i < 8) or the high nibble of byte i - 8; high 2 bits
        // from byte 8 + i % 4 at bit 2 * (i / 4).
        let mut scales = [0i32; 16];
        for (i, s) in scales.iter_mut().enumerate() {
            let low = if i < 8 {
                packed[i] & 0x0F
            } else {
                packed[i - 8] >> 4
            };
            let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
            *s = (low | (high << 4)) as i32 - 32;
        }
        let mut is = 0;
        let mut out = 0;
        let mut m = 1u8;
        for n in 0..2 {
            let q = &x[32 + 32 * n..32 + 32 * n + 32];
            for shift in [0, 2, 4, 6] {
                for half_ in 0..2 {
                    let dl = d * scales[is] as f32;
                    is += 1;
                    for l in 0..16 {
                        let k = 16 * half_ + l;
                        let low = ((q[k] >> shift) & 3) as i32;
                        let sub = if hm[k] & m != 0 { 0 } else { 4 };
                        y[out + l] = dl * (low - sub) as f32;
                    }
                    out += 16;
                }
                m <<= 1;
            }
        }
    })
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K super-block
/// (`get_scale_min_k4`): bytes 0..4 hold scales 0..4 and the top bits of scales 4..8, bytes
/// 4..8 the mins likewise, bytes 8..12 the low nibbles of scales/mins 4..8.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K`: d, dmin (f16), scales[12], qs[128]. Each 64 elements use 32 bytes: low
/// nibbles with sub-block scale 2k, high nibbles with 2k+1. x = d * sc * q - dmin * m.
pub fn dequantize_q4_k(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<144, QK_K>(GgmlType::Q4_K, src, dst, |x, y| {
        let d = half(x, 0);
        let dmin = half(x, 2);
        let scales = &x[4..16];
        for k in 0..4 {
            let q = &x[16 + 32 * k..16 + 32 * k + 32];
            let (sc1, m1) = scale_min_k4(2 * k, scales);
            let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            let y = &mut y[64 * k..64 * k + 64];
            for l in 0..32 {
                y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
                y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    })
}

/// `block_q5_K`: d, dmin (f16), scales[12], qh[32], qs[128]. Like Q4_K plus a 5th bit from
/// qh: sub-block i takes bit i of each qh byte. x = d * sc * q - dmin * m.
pub fn dequantize_q5_k(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<176, QK_K>(GgmlType::Q5_K, src, dst, |x, y| {
        let d = half(x, 0);
        let dmin = half(x, 2);
        let scales = &x[4..16];
        let qh = &x[16..48];
        for k in 0..4 {
            let ql = &x[48 + 32 * k..48 + 32 * k + 32];
            let (sc1, m1) = scale_min_k4(2 * k, scales);
            let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
            let y = &mut y[64 * k..64 * k + 64];
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                y[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
                y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
            }
        }
    })
}

/// `block_q6_K`: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (i8), d (f16).
/// Each 128 elements use 64 bytes of ql and 32 of qh. x = d * sc * (q - 32).
pub fn dequantize_q6_k(src: &[u8], dst: &mut [f32]) -> Result<(), DequantError> {
    run::<210, QK_K>(GgmlType::Q6_K, src, dst, |x, y| {
        let d = half(x, 208);
        for n in 0..2 {
            let ql = &x[64 * n..64 * n + 64];
            let qh = &x[128 + 32 * n..128 + 32 * n + 32];
            let sc = &x[192 + 8 * n..192 + 8 * n + 8];
            let y = &mut y[128 * n..128 * n + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * sc[is] as i8 as f32 * q1 as f32;
                y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
            }
        }
    })
}

/// Q8_0 blocks split into their parts without expanding: one i8 per element and one f32 scale
/// (the block's f16 `d`, widened exactly) per 32 elements, so an engine with its own 8-bit
/// kernels can load Q8_0 weights losslessly. `quants[i] as f32 * scales[i / 32]` equals
/// [`dequantize_q8_0`]'s output bit for bit.
pub fn split_q8_0(src: &[u8]) -> Result<(Vec<i8>, Vec<f32>), DequantError> {
    const B: usize = 34;
    if !src.len().is_multiple_of(B) {
        return Err(DequantError::Size {
            ty: GgmlType::Q8_0,
            src_len: src.len(),
            dst_len: src.len() / B * 32,
            expected: src.len() / B * B,
            block: 32,
        });
    }
    let blocks = src.len() / B;
    let mut quants = Vec::with_capacity(blocks * 32);
    let mut scales = Vec::with_capacity(blocks);
    for block in src.as_chunks::<B>().0 {
        scales.push(half(block, 0));
        quants.extend(block[2..].iter().map(|&q| q as i8));
    }
    Ok((quants, scales))
}
