//! How a step's rows are grouped into matmul calls: the rows that take the row kernel (decode
//! rows, short prompt chunks) together, those that take the tiled path (long prompt chunks)
//! together, each row's arithmetic the same as if its sequence ran alone.

use std::ops::Range;

use crate::quant::BlockMatrix;

/// Rows multiplied together in one call.
#[derive(Debug, Clone)]
pub(super) struct Group {
    pub(super) rows: Range<usize>,
    /// Whether the rows take the row-by-row integer kernel (decode rows, short prompt
    /// chunks), which reads the weights once for all of them, or the tiled gemm path (long
    /// prompt chunks). The scheduler chooses, so that a position takes the same path
    /// whenever it is computed.
    pub(super) row_kernel: bool,
}

/// `x · Wᵢᵀ` for each row group of `x` (rows of `width`), the results in row order. Every
/// group that takes the row kernel (the decode rows and the short prompt chunks) is
/// multiplied in one call, so the step reads the weights once for all of them; the long
/// prompt chunks go to the tiled path together. Each row's arithmetic is what it would be
/// if its group ran alone.
pub(super) fn grouped<const N: usize>(
    groups: &[Group],
    width: usize,
    x: &[f32],
    mats: [&BlockMatrix; N],
) -> [Vec<f32>; N] {
    let rows_of = |group: &Group| &x[group.rows.start * width..group.rows.end * width];
    if let [only] = groups {
        let m = only.rows.len();
        return if only.row_kernel {
            BlockMatrix::matmul_rows(mats, rows_of(only), m)
        } else {
            BlockMatrix::matmul_gemm(mats, rows_of(only), m)
        };
    }
    let total = groups.iter().map(|g| g.rows.len()).sum::<usize>();
    let mut out: [Vec<f32>; N] = mats.map(|w| vec![0f32; total * w.rows()]);
    let mut place = |group: &Group, part: &[Vec<f32>; N], first: usize| {
        for ((out, part), w) in out.iter_mut().zip(part).zip(mats) {
            let (at, len) = (first * w.rows(), group.rows.len() * w.rows());
            out[group.rows.start * w.rows()..][..len].copy_from_slice(&part[at..at + len]);
        }
    };
    let (row_groups, tiled): (Vec<&Group>, Vec<&Group>) = groups.iter().partition(|g| g.row_kernel);
    // The row-kernel groups in one call, and the long prompt chunks in another: gemm sums
    // each output over the inner dimension in the same order whatever the number of rows,
    // so a chunk's values are those of its call alone, and the weights are expanded once
    // for all chunks instead of once per chunk.
    for (kind, multiply) in [
        (
            row_groups,
            BlockMatrix::matmul_rows::<N> as fn(_, &_, _) -> _,
        ),
        (tiled, BlockMatrix::matmul_gemm::<N>),
    ] {
        if kind.is_empty() {
            continue;
        }
        let gathered: Vec<f32> = kind.iter().flat_map(|g| rows_of(g)).copied().collect();
        let part = multiply(mats, &gathered, gathered.len() / width.max(1));
        let mut first = 0;
        for group in kind {
            place(group, &part, first);
            first += group.rows.len();
        }
    }
    out
}
