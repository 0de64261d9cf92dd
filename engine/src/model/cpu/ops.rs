//! Element-wise operations on host rows: the norms, the MLP's activation and the adds.

/// `out = x / rms(x) · gamma`, row by row (rows of `gamma.len()`), as Burn's `RmsNorm`.
pub(super) fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
    let width = gamma.len();
    for (row, out) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let rms = (mean_square + eps).sqrt();
        for ((o, v), g) in out.iter_mut().zip(row).zip(gamma) {
            *o = v / rms * g;
        }
    }
}

/// `gate = silu(gate) · up`.
pub(super) fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `x += y`, element by element (the residual adds and the q/k/v biases).
pub(super) fn add(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_and_swiglu_match_their_definitions() {
        let x = [3.0f32, -4.0, 1.0, 2.0];
        let gamma = [1.0f32, 0.5];
        let mut out = [0f32; 4];
        rms_norm(&x, &gamma, 0.0, &mut out);
        // Rows [3, -4] (rms √12.5) and [1, 2] (rms √2.5).
        let (r0, r1) = (12.5f32.sqrt(), 2.5f32.sqrt());
        assert_eq!(out, [3.0 / r0, -4.0 / r0 * 0.5, 1.0 / r1, 2.0 / r1 * 0.5]);
        let mut gate = [0.0f32, 2.0];
        swiglu(&mut gate, &[5.0, 3.0]);
        assert_eq!(gate, [0.0, 2.0 / (1.0 + (-2.0f32).exp()) * 3.0]);
    }
}
