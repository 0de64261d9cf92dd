//! The decoder layers on the CPU with block weights (the default format there).
//!
//! The residual stream and the KV cache stay in host memory: the norms, RoPE, attention,
//! SwiGLU and the residual adds are plain loops over them, wrapped around the block kernels
//! (`quant`). Why: at SmolLM2's width (576) a Burn op costs more in dispatch, allocation and
//! copying than in arithmetic — the ~40 ops of a layer took about as long as its matmuls,
//! and Burn's attention copied the cached keys and values out of the cache buffer on every
//! step. The same layers in Burn (`DecoderLayer::forward`) remain the path for the GPU and
//! for f32 weights, and the test `host_layers_match_burn_layers` holds the two to each other.

use std::ops::Range;
use std::sync::Arc;

use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::linear::Proj;
use crate::model::{Cache, Llama, Rope};
use crate::quant::{Q8Matrix, Simd};

/// Every layer's block weights (shared with the Burn model, not copied), norm weights and
/// q/k/v biases as host vectors, and the attention shape.
#[derive(Debug)]
pub struct HostLayers {
    layers: Vec<HostLayer>,
    eps: f32,
    /// Query heads, key/value heads, head dim.
    heads: (usize, usize, usize),
    /// The token embeddings, when looked up from blocks (`Llama::embeddings_in_blocks`).
    embeddings: Option<Arc<Q8Matrix>>,
}

#[derive(Debug)]
struct HostLayer {
    input_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
    /// q, k, v.
    qkv: [Arc<Q8Matrix>; 3],
    /// q, k, v biases (Qwen2).
    qkv_bias: [Option<Vec<f32>>; 3],
    o: Arc<Q8Matrix>,
    /// gate, up.
    gate_up: [Arc<Q8Matrix>; 2],
    down: Arc<Q8Matrix>,
}

fn host_vec(t: Tensor<1>) -> Option<Vec<f32>> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().ok()
}

impl HostLayers {
    /// `None` unless every projection of every layer holds block weights (a matrix whose
    /// rows are not whole blocks stays in Burn, and so do its layers).
    pub fn new(model: &Llama) -> Option<Self> {
        let blocks = |p: &Proj| p.q8.clone();
        let bias = |p: &Proj| p.bias.as_ref().and_then(|b| host_vec(b.val()));
        let layers = model
            .model
            .layers
            .iter()
            .map(|layer| {
                let (a, m) = (&layer.self_attn, &layer.mlp);
                Some(HostLayer {
                    input_norm: host_vec(layer.input_layernorm.gamma.val())?,
                    post_attention_norm: host_vec(layer.post_attention_layernorm.gamma.val())?,
                    qkv: [blocks(&a.q_proj)?, blocks(&a.k_proj)?, blocks(&a.v_proj)?],
                    qkv_bias: [bias(&a.q_proj), bias(&a.k_proj), bias(&a.v_proj)],
                    o: blocks(&a.o_proj)?,
                    gate_up: [blocks(&m.gate_proj)?, blocks(&m.up_proj)?],
                    down: blocks(&m.down_proj)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let first = model.model.layers.first()?;
        let a = &first.self_attn;
        Some(Self {
            layers,
            eps: first.input_layernorm.epsilon as f32,
            heads: (a.num_heads, a.num_kv_heads, a.head_dim),
            embeddings: model
                .embeddings_in_blocks
                .then(|| model.tied_q8.clone())
                .flatten(),
        })
    }

    pub fn embeddings(&self) -> Option<&Q8Matrix> {
        self.embeddings.as_deref()
    }

    /// Runs the residual stream `x` (`[s, hidden]`, positions `cache.len..cache.len + s`)
    /// through every layer.
    pub fn forward(&self, x: &mut [f32], rope: &Rope, cache: &mut Cache) {
        let Some(hidden) = self.layers.first().map(|l| l.input_norm.len()) else {
            return;
        };
        let s = x.len() / hidden;
        let positions = cache.len..cache.len + s;
        let mut normed = vec![0f32; x.len()];
        for (index, layer) in self.layers.iter().enumerate() {
            rms_norm(x, &layer.input_norm, self.eps, &mut normed);
            let kv = cache.host_layer(index, self.heads.1, self.heads.2);
            let attention = layer.attention(&normed, positions.clone(), self.heads, rope, kv);
            add(x, &attention);

            rms_norm(x, &layer.post_attention_norm, self.eps, &mut normed);
            let gate_up = layer.gate_up.each_ref().map(|w| &**w);
            let [mut gate, up] = Q8Matrix::matmul_many(gate_up, &normed, s);
            swiglu(&mut gate, &up);
            add(x, &layer.down.matmul(&gate, s));
        }
    }
}

impl HostLayer {
    /// Self-attention for the normed input `x` `[s, hidden]` at `positions`, with this
    /// layer's cache `kv`: returns the output projection's result `[s, hidden]`.
    fn attention(
        &self,
        x: &[f32],
        positions: Range<usize>,
        (nh, nkv, _): (usize, usize, usize),
        rope: &Rope,
        kv: &mut HostKv,
    ) -> Vec<f32> {
        let s = positions.len();
        let mut qkv = Q8Matrix::matmul_many(self.qkv.each_ref().map(|w| &**w), x, s);
        for (values, bias) in qkv.iter_mut().zip(&self.qkv_bias) {
            if let Some(bias) = bias {
                for row in values.chunks_exact_mut(bias.len()) {
                    add(row, bias);
                }
            }
        }
        let [mut q, mut k, v] = qkv;
        rope.rotate(&mut q, nh, positions.clone());
        rope.rotate(&mut k, nkv, positions.clone());
        kv.append(&k, &v, positions.start);
        let out = kv.attend(&q, nh, positions);
        self.o.matmul(&out, s)
    }
}

/// One layer's keys and values in host memory, `[nkv, capacity, hd]` each: a head's
/// positions are contiguous, so scoring a query against them is one pass over memory.
#[derive(Debug)]
pub struct HostKv {
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

impl HostKv {
    pub fn new(heads: usize, head_dim: usize, capacity: usize) -> Self {
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
                Simd::Avx2 => unsafe { attend_row_avx2(q, keys, values, scale, out) },
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
    // compiled on its own, without this function's AVX2.
    let mut scores = Vec::with_capacity(keys.len() / hd);
    for k in keys.chunks_exact(hd) {
        scores.push(dot(q, k) * scale);
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut total = 0f32;
    for x in &mut scores {
        *x = (*x - max).exp();
        total += *x;
    }
    for (p, v) in scores.iter().zip(values.chunks_exact(hd)) {
        let p = p / total;
        for (o, v) in out.iter_mut().zip(v) {
            *o += p * v;
        }
    }
}

/// [`attend_row`] compiled for AVX2 (8-wide loops instead of SSE's 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_row_avx2(q: &[f32], keys: &[f32], values: &[f32], scale: f32, out: &mut [f32]) {
    attend_row(q, keys, values, scale, out)
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

/// `out = x / rms(x) · gamma`, row by row (rows of `gamma.len()`), as Burn's `RmsNorm`.
fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
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
fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceChoice, Engine, LoadOptions, SamplingParams, WeightFormat};

    /// The host layers and Burn's layers, on the same block weights (the tiny fixtures,
    /// requantized to Q8_0; Qwen2's has q/k/v biases): prefill logits agree to float
    /// rounding, and greedy decoding through the KV cache gives the same tokens.
    #[test]
    fn host_layers_match_burn_layers() {
        let greedy = SamplingParams::greedy(24);
        for fixture in ["tiny-llama", "tiny-qwen2"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(fixture);
            let options = LoadOptions {
                device: DeviceChoice::Cpu,
                weights: WeightFormat::Auto,
            };
            let mut engine = Engine::load(&path, &options).unwrap();
            assert!(
                engine.runtime.model.host.is_some(),
                "{fixture}: host layers in use"
            );
            let ids = [1, 5, 9, 42, 7, 300, 12, 64];
            let host_logits = engine.logits(&ids).unwrap();
            let (_, host_tokens) = engine.generate_ids(&ids, &greedy).unwrap();

            engine.runtime.model.host = None;
            let burn_logits = engine.logits(&ids).unwrap();
            let (_, burn_tokens) = engine.generate_ids(&ids, &greedy).unwrap();

            let max_error = host_logits
                .iter()
                .zip(&burn_logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max_error < 1e-4, "{fixture}: logits differ by {max_error}");
            assert_eq!(host_tokens, burn_tokens, "{fixture}: greedy tokens");
        }
    }

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
