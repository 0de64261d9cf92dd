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
//! Weights and activations alike are stored with blocks side by side, in subgroups of up to
//! eight (`layout`), so that a subgroup's integer dot builds up in one register.
//!
//! **One module per instruction set.** The dot has a portable version, lane by lane
//! (`portable`: the reference, and what non-x86 CPUs run), and an AVX2/FMA/F16C one, with
//! AVX-VNNI where the CPU has it (`avx2`), picked at run time ([`Simd`]); the tests hold
//! every set to the portable one bit for bit. This module picks the set and checks the
//! shapes.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod layout;
mod portable;

use std::ops::Range;

pub use layout::{BLOCK, Q4_1_BYTES, QuantizedRow, interleave_q8_0, regroup_q4_1};
use layout::{GROUP, subgroups};
pub use portable::expand_q8_0;

/// Which kernels this CPU runs, detected once per matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Portable,
    /// AVX2, FMA and F16C; `vnni`: which encoding of `vpdpwssd` (the dots' pair sums in
    /// one instruction) the CPU has on 256-bit registers, if any.
    #[cfg(target_arch = "x86_64")]
    Avx2 {
        vnni: Vnni,
    },
}

/// The 256-bit `vpdpwssd` a CPU has: AVX-VNNI's VEX form (Intel from Alder Lake, AMD from
/// Zen 5), or AVX-512 VNNI's EVEX form on `ymm` registers (AVX512VL; Intel from Ice Lake,
/// AMD Zen 4, whose AVX-512 runs at 256-bit width anyway). The same instruction either way,
/// but where a CPU has both the EVEX form is taken: a kernel compiled for AVX-512 has 32
/// vector registers instead of 16, and a tile of two rows by four inputs keeps its 24
/// accumulators (8 integer, 8 scaled, 8 `m·Σx`) in registers instead of spilling 8 to the
/// stack in every subgroup. On a Xeon with both (2 cores, one thread, a 36 MB Q4_1 matrix
/// of 576 columns, same process): one input 3.0 → 2.5 ms, two 4.5 → 2.8, four 5.3 → 4.3.
/// (The same tile on 512-bit registers, two chunks per instruction, was slower than this:
/// four inputs 5.2 ms.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vnni {
    No,
    Vex,
    Evex,
}

impl Vnni {
    #[cfg(target_arch = "x86_64")]
    fn detect() -> Self {
        if Self::has_evex() {
            Vnni::Evex
        } else if Self::has_vex() {
            Vnni::Vex
        } else {
            Vnni::No
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn has_vex() -> bool {
        std::arch::is_x86_feature_detected!("avxvnni")
    }

    #[cfg(target_arch = "x86_64")]
    fn has_evex() -> bool {
        std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
}

impl Simd {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Simd::Avx2 {
                vnni: Vnni::detect(),
            };
        }
        Simd::Portable
    }

    /// Every kernel set this CPU can run, for tests that hold them to each other.
    #[cfg(test)]
    pub fn available() -> Vec<Self> {
        let mut sets = vec![Simd::Portable];
        #[cfg(target_arch = "x86_64")]
        if let Simd::Avx2 { .. } = Simd::detect() {
            sets.push(Simd::Avx2 { vnni: Vnni::No });
            if Vnni::has_vex() {
                sets.push(Simd::Avx2 { vnni: Vnni::Vex });
            }
            if Vnni::has_evex() {
                sets.push(Simd::Avx2 { vnni: Vnni::Evex });
            }
        }
        sets
    }
}

impl QuantizedRow {
    pub fn new(x: &[f32]) -> Self {
        match Simd::detect() {
            // SAFETY: `Simd::Avx2` means the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 { .. } => unsafe { avx2::quantize_row(x) },
            Simd::Portable => portable::quantize_row(x),
        }
    }
}

/// Rows `rows` of a Q4_1 matrix (`bytes`: rows of `xs[0].blocks()` blocks in the subgroup
/// layout) dotted with every input into `out` (`[inputs, rows]`: an input's values side by
/// side, as the next layer takes them), `Σ_k w_k x_k`. The vector
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
        // the `vnni` it names); the shapes agree (the asserts above).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: Vnni::No } => unsafe { avx2::dot_q4_1(bytes, rows, xs, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: Vnni::Vex } => unsafe { avx2::dot_q4_1_vnni(bytes, rows, xs, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: Vnni::Evex } => unsafe {
            avx2::dot_q4_1_avx512vnni(bytes, rows, xs, out)
        },
        Simd::Portable => portable::dot_q4_1(bytes, rows, xs, out),
    }
}

/// Rows `rows` of a Q8_0 matrix (`quants` in the subgroup layout, one scale per block) dotted
/// with every input into `out` (`[inputs, rows]`), as [`dot_q4_1`].
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
        Simd::Avx2 { vnni: Vnni::No } => unsafe { avx2::dot_q8_0(quants, scales, rows, xs, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: Vnni::Vex } => unsafe {
            avx2::dot_q8_0_vnni(quants, scales, rows, xs, out)
        },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 { vnni: Vnni::Evex } => unsafe {
            avx2::dot_q8_0_avx512vnni(quants, scales, rows, xs, out)
        },
        Simd::Portable => portable::dot_q8_0(quants, scales, rows, xs, out),
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

/// One row of Q4_1 blocks (subgroup layout) as f32 values, `d·q + m` (a multiply, then an
/// add): whole groups by the vector expansion where the CPU has it, the rest portably.
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
        portable::expand_q4_1_subgroup(sub, p, out);
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
                portable::dot_q4_1_row(&q4_1[r * row_bytes..][..row_bytes], &inputs[j])
            };
            let alone_q8 = |r: usize, j: usize| {
                let (q, s) = (&quants[r * blocks * BLOCK..], &scales[r * blocks..]);
                portable::dot_q8_0_row(&q[..blocks * BLOCK], &s[..blocks], &inputs[j])
            };
            // Rows 0..3 (a pair and an odd row) by inputs in every kind of pass: five at once,
            // three and three, four and one, three, two and one.
            let six = [1, 0, 4, 2, 3, 1];
            let nine = [4, 3, 2, 1, 0, 1, 2, 3, 4];
            for picks in [&[0, 1, 2, 3, 4][..], &six, &nine, &[2, 0, 2], &[3, 1], &[4]] {
                let xs: Vec<QuantizedRow> = picks.iter().map(|&j| inputs[j].clone()).collect();
                let want = |alone: &dyn Fn(usize, usize) -> f32| -> Vec<f32> {
                    picks
                        .iter()
                        .flat_map(|&j| (0..3).map(move |r| alone(r, j)))
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
                    let row_1: Vec<f32> = want_q4.iter().skip(1).step_by(3).copied().collect();
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
        let want = portable::dot_q4_1_row(&row, &x);
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
        let portable = portable::quantize_row(&x);
        let detected = QuantizedRow::new(&x);
        assert_eq!(portable.values, detected.values);
        assert_eq!(portable.scales, detected.scales);
        assert_eq!(detected.scales.len(), 5 + GROUP, "padded by a group");
        for (a, b) in portable.sums.iter().zip(&detected.sums) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }
}
