//! Rotary position embeddings, rotate-half as in Hugging Face's Llama: dimension `i` of a
//! head's first half pairs with dimension `i + hd/2`. (Burn's `RotaryEncoding` rotates
//! adjacent pairs instead, which is the GGUF layout; GGUF q/k rows are un-permuted at load,
//! so one convention serves both checkpoint formats.)

use std::ops::Range;

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::ModelConfig;

/// The rotation frequencies, `1 / theta^(2i / hd)` for `i < hd / 2`.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let hd = config.head_dim;
        // transformers computes the inverse frequencies in f32; doing the same keeps the
        // angles bit-identical before cos/sin.
        let inv_freq = (0..hd / 2)
            .map(|i| 1.0 / (config.rope_theta as f32).powf((2 * i) as f32 / hd as f32))
            .collect();
        Self { inv_freq }
    }

    /// Rotates host rows `[s, heads, hd]` at `positions` in place.
    pub fn rotate(&self, values: &mut [f32], heads: usize, positions: Range<usize>) {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
        for (p, row) in positions.zip(values.chunks_exact_mut(heads * 2 * half)) {
            for ((c, s), f) in cos.iter_mut().zip(&mut sin).zip(&self.inv_freq) {
                let angle = p as f32 * f;
                (*c, *s) = (angle.cos(), angle.sin());
            }
            for head in row.chunks_exact_mut(2 * half) {
                let (x1, x2) = head.split_at_mut(half);
                for (((a, b), c), s) in x1.iter_mut().zip(x2).zip(&cos).zip(&sin) {
                    (*a, *b) = (*a * c - *b * s, *b * c + *a * s);
                }
            }
        }
    }

    /// The same angles as tensor tables for Burn's layers: cos/sin `[positions, hd]`, each
    /// frequency repeated for both halves, the sines of the first half negated (rotate-half's
    /// sign, so that the rotation needs no negation kernel: `RopeTables::rotate`).
    pub fn tables(&self, positions: usize, device: &Device) -> RopeTables {
        let half = self.inv_freq.len();
        let hd = 2 * half;
        let mut cos = Vec::with_capacity(positions * hd);
        let mut sin = Vec::with_capacity(positions * hd);
        for p in 0..positions {
            for i in 0..hd {
                let angle = p as f32 * self.inv_freq[i % half];
                cos.push(angle.cos());
                sin.push(if i < half { -angle.sin() } else { angle.sin() });
            }
        }
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, [positions, hd]), device),
            sin: Tensor::from_data(TensorData::new(sin, [positions, hd]), device),
        }
    }
}

/// Precomputed cos/sin tables on a Burn device (`Rope::tables`).
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor<2>,
    /// The sines, negated in each head's first half.
    sin: Tensor<2>,
}

impl RopeTables {
    /// The tables' rows at `positions` `[rows]`, as cos and sin `[rows, 1, 1, hd]`: the
    /// angles of a step's rows (one position each), for [`RopeTables::rotate`].
    pub fn at(&self, positions: Tensor<1, Int>) -> (Tensor<4>, Tensor<4>) {
        let [rows] = positions.dims();
        let [_, hd] = self.cos.dims();
        let cos = self.cos.clone().select(0, positions.clone());
        let sin = self.sin.clone().select(0, positions);
        (cos.reshape([rows, 1, 1, hd]), sin.reshape([rows, 1, 1, hd]))
    }

    /// `x · cos + rotate_half(x) · sin`, the tables broadcast over `x`: `rotate_half(x)` is
    /// `[-x₂, x₁]`, here the halves swapped by one flip and the sign carried by the table
    /// (`[-x₂, x₁] · [s, s]` is `[x₂, x₁] · [-s, s]`, exactly), which on a GPU is one
    /// kernel where a negation and a concatenation were four.
    pub fn rotate(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
        let [b, heads, s, hd] = x.dims();
        let swapped = x
            .clone()
            .reshape([b, heads, s, 2, hd / 2])
            .flip([3])
            .reshape([b, heads, s, hd]);
        x * cos + swapped * sin
    }
}
