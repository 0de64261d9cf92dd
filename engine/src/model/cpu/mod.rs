//! The whole decoder on the CPU with block weights (the default format there).
//!
//! The residual stream and the KV cache stay in host memory: the embedding lookup, norms,
//! RoPE, attention, SwiGLU and the residual adds are plain loops over them, wrapped around
//! the block kernels (`quant`) that every projection and the output head go through. Why not
//! Burn: at SmolLM2's width (576) a Burn op costs more in dispatch, allocation and copying
//! than in arithmetic — the ~40 ops of a layer took about as long as its matmuls, and Burn's
//! attention copied the cached keys and values out of the cache buffer on every step. The
//! same decoder in Burn (`burn`) is the path for the GPU and for f32 weights; the test
//! `cpu_model_matches_burn_model` holds the two to each other.
//!
//! This file is the model and its forward pass, read top to bottom; its parts are `weights`
//! (where the weights come from, and the embedding table), `matmul` (how a step's rows are
//! grouped into matmul calls), `kv_store` (the KV blocks and attention over them) and `ops`
//! (the element-wise operations).

mod kv_store;
mod matmul;
mod ops;
mod weights;

use std::sync::Arc;

use rayon::prelude::*;

pub use self::kv_store::CpuKvStore;
pub use self::weights::{CpuWeights, Embeddings};

use self::kv_store::SequenceKv;
use self::matmul::{Group, grouped};
use self::ops::{add, rms_norm, swiglu};
use super::ModelConfig;
use super::rope::Rope;
use crate::KvCacheType;
use crate::kv::BlockId;
use crate::quant::{BLOCK, BlockMatrix};

/// Whether a model of this shape can run here: every matrix width is a whole number of
/// 32-value blocks (true of every Llama-family checkpoint in practice).
pub fn fits(config: &ModelConfig) -> bool {
    [
        config.hidden_size,
        config.num_heads * config.head_dim,
        config.intermediate_size,
    ]
    .iter()
    .all(|width| width.is_multiple_of(BLOCK))
}

/// The decoder with block weights in host memory.
#[derive(Debug)]
pub struct CpuModel {
    embeddings: Embeddings,
    layers: Vec<CpuLayer>,
    norm: Vec<f32>,
    /// The output projection, or the embedding blocks when tied.
    head: Arc<BlockMatrix>,
    eps: f32,
    /// Query heads, key/value heads, head dim.
    heads: (usize, usize, usize),
    rope: Rope,
}

#[derive(Debug)]
struct CpuLayer {
    input_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
    /// q, k, v.
    qkv: [BlockMatrix; 3],
    /// q, k, v biases (Qwen2).
    qkv_bias: [Option<Vec<f32>>; 3],
    o: BlockMatrix,
    /// gate, up.
    gate_up: [BlockMatrix; 2],
    down: BlockMatrix,
}

impl CpuModel {
    /// Builds the model from `weights`; the caller has checked [`fits`].
    pub fn load(config: &ModelConfig, weights: &mut dyn CpuWeights) -> Result<Self, String> {
        let h = config.hidden_size;
        let (nh, nkv, hd) = (config.num_heads, config.num_kv_heads, config.head_dim);
        let i = config.intermediate_size;
        let embeddings = weights.embeddings(config.vocab_size, h)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let p = format!("model.layers.{l}.");
            let mut blocks =
                |name: &str, rows, cols| weights.blocks(&format!("{p}{name}.weight"), rows, cols);
            let qkv = [
                blocks("self_attn.q_proj", nh * hd, h)?,
                blocks("self_attn.k_proj", nkv * hd, h)?,
                blocks("self_attn.v_proj", nkv * hd, h)?,
            ];
            let o = blocks("self_attn.o_proj", h, nh * hd)?;
            let gate_up = [blocks("mlp.gate_proj", i, h)?, blocks("mlp.up_proj", i, h)?];
            let down = blocks("mlp.down_proj", h, i)?;
            let mut qkv_bias = [None, None, None];
            if config.attention_bias {
                for ((bias, name), len) in qkv_bias
                    .iter_mut()
                    .zip(["q_proj", "k_proj", "v_proj"])
                    .zip([nh * hd, nkv * hd, nkv * hd])
                {
                    *bias = Some(weights.vector(&format!("{p}self_attn.{name}.bias"), len)?);
                }
            }
            layers.push(CpuLayer {
                input_norm: weights.vector(&format!("{p}input_layernorm.weight"), h)?,
                post_attention_norm: weights
                    .vector(&format!("{p}post_attention_layernorm.weight"), h)?,
                qkv,
                qkv_bias,
                o,
                gate_up,
                down,
            });
        }
        let head = if config.tie_word_embeddings {
            embeddings.as_head()?
        } else {
            Arc::new(weights.blocks("lm_head.weight", config.vocab_size, h)?)
        };
        Ok(Self {
            embeddings,
            layers,
            norm: weights.vector("model.norm.weight", h)?,
            head,
            eps: config.rms_norm_eps as f32,
            heads: (nh, nkv, hd),
            rope: Rope::new(config),
        })
    }

    /// A store of `blocks` KV blocks for this model, kept as `kind`.
    pub fn new_store(&self, blocks: usize, kind: KvCacheType) -> CpuKvStore {
        let (_, nkv, hd) = self.heads;
        CpuKvStore::new(self.layers.len(), nkv, hd, blocks, kind)
    }

    /// Every position's logits `[s, vocab]` of `ids` from position 0, in `store`'s first
    /// blocks: the verification path, one sequence.
    pub fn logits_of_every_position(&self, ids: &[u32], store: &mut CpuKvStore) -> Vec<f32> {
        let blocks: Vec<BlockId> = (0..crate::kv::blocks_for(ids.len()) as BlockId).collect();
        let segment = Segment {
            ids,
            blocks: &blocks,
            start: 0,
            row_kernel: BlockMatrix::row_kernel_for(ids.len()),
            logits: 0,
        };
        let rows = [Group {
            rows: 0..ids.len(),
            row_kernel: segment.row_kernel,
        }];
        let x = self
            .layers_forward(store, &[segment], &rows, &|| false)
            .expect("never abandoned");
        let mut normed = vec![0f32; x.len()];
        rms_norm(&x, &self.norm, self.eps, &mut normed);
        self.head.matmul(&normed, ids.len())
    }

    /// One step of several sequences, each a decode row or a prompt chunk. A layer
    /// multiplies the segments that take the row kernel in one call and the others in one
    /// gemm call (`grouped`), and every row's arithmetic is the same as if its sequence ran
    /// alone, so batching never changes a sequence's tokens. Returns the logits `[rows, vocab]` of
    /// each segment's last `logits` rows
    /// that asks for them, or `None` when `abandoned` said so between two layers: nobody
    /// wants the step any more (every sequence in it was cancelled), and the step's
    /// positions are left half-written in blocks their sequences are about to give back.
    pub fn forward_batch(
        &self,
        store: &mut CpuKvStore,
        batch: &[Segment<'_>],
        abandoned: &(dyn Fn() -> bool + Sync),
    ) -> Option<Vec<Vec<f32>>> {
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for segment in batch {
            spans.push(ids.len()..ids.len() + segment.ids.len());
            ids.extend_from_slice(segment.ids);
        }
        let groups: Vec<Group> = batch
            .iter()
            .zip(&spans)
            .map(|(segment, rows)| Group {
                rows: rows.clone(),
                row_kernel: segment.row_kernel,
            })
            .collect();
        let x = self.layers_forward(store, batch, &groups, abandoned)?;
        let hidden = self.norm.len();
        // The last `segment.logits` rows of each segment, in order.
        let wanted: Vec<usize> = batch
            .iter()
            .zip(&spans)
            .flat_map(|(segment, span)| span.end - segment.logits.min(span.len())..span.end)
            .collect();
        let mut last_rows = Vec::with_capacity(wanted.len() * hidden);
        for &row in &wanted {
            last_rows.extend_from_slice(&x[row * hidden..(row + 1) * hidden]);
        }
        let logits = self.logits(&last_rows, wanted.len());
        let vocab = self.head.rows();
        let mut taken = 0;
        let logits = batch
            .iter()
            .zip(&spans)
            .map(|(segment, span)| {
                let rows = segment.logits.min(span.len());
                let part = logits[taken * vocab..(taken + rows) * vocab].to_vec();
                taken += rows;
                part
            })
            .collect();
        Some(logits)
    }

    /// The residual stream of the segments' ids (in order) after every layer, their keys and
    /// values written to `store`; `groups` are the row ranges multiplied together. `None`
    /// when `abandoned` says so before a layer (a long prompt chunk then stops within a
    /// layer's time, not the chunk's).
    fn layers_forward(
        &self,
        store: &mut CpuKvStore,
        segments: &[Segment<'_>],
        groups: &[Group],
        abandoned: &(dyn Fn() -> bool + Sync),
    ) -> Option<Vec<f32>> {
        let ids: Vec<u32> = segments
            .iter()
            .flat_map(|s| s.ids.iter().copied())
            .collect();
        // Each segment's rows of the step, and its blocks and positions.
        let mut sequences = Vec::with_capacity(segments.len());
        let mut row = 0;
        for segment in segments {
            let rows = row..row + segment.ids.len();
            row = rows.end;
            let kv = SequenceKv {
                blocks: segment.blocks,
                positions: segment.start..segment.start + rows.len(),
            };
            sequences.push((kv, rows));
        }
        let mut x = self.embeddings.lookup(&ids);
        let hidden = self.norm.len();
        let mut normed = vec![0f32; x.len()];
        let (nh, nkv, hd) = self.heads;
        for (index, layer) in self.layers.iter().enumerate() {
            if abandoned() {
                return None;
            }
            rms_norm(&x, &layer.input_norm, self.eps, &mut normed);
            let [mut q, mut k, mut v] = grouped(groups, hidden, &normed, layer.qkv.each_ref());
            for (values, bias) in [&mut q, &mut k, &mut v].into_iter().zip(&layer.qkv_bias) {
                if let Some(bias) = bias {
                    for row in values.chunks_exact_mut(bias.len()) {
                        add(row, bias);
                    }
                }
            }
            // RoPE at each sequence's positions, and its keys and values into its blocks
            // (little work: a copy of the step's new positions).
            for (kv, rows) in &sequences {
                let part = |width: usize| rows.start * width..rows.end * width;
                self.rope
                    .rotate(&mut q[part(nh * hd)], nh, kv.positions.clone());
                self.rope
                    .rotate(&mut k[part(nkv * hd)], nkv, kv.positions.clone());
                store.write(index, kv, &k[part(nkv * hd)], &v[part(nkv * hd)]);
            }
            // Each sequence's attention over its blocks, the sequences spread over the pool
            // (a short context's rows are too little work to split within one sequence).
            let store = &*store;
            let parts: Vec<Vec<f32>> = sequences
                .par_iter()
                .map(|(kv, rows)| {
                    store.attend(index, kv, &q[rows.start * nh * hd..rows.end * nh * hd], nh)
                })
                .collect();
            let attended = parts.concat();
            let [o] = grouped(groups, nh * hd, &attended, [&layer.o]);
            add(&mut x, &o);

            rms_norm(&x, &layer.post_attention_norm, self.eps, &mut normed);
            let [mut gate, up] = grouped(groups, hidden, &normed, layer.gate_up.each_ref());
            swiglu(&mut gate, &up);
            let [down] = grouped(groups, layer.down.cols(), &gate, [&layer.down]);
            add(&mut x, &down);
        }
        Some(x)
    }

    /// The final norm and the output head over `rows` last positions of `x`: `[rows, vocab]`.
    fn logits(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut normed = vec![0f32; x.len()];
        rms_norm(x, &self.norm, self.eps, &mut normed);
        // Row by row in integers, as a lone decode step does, whatever the batch.
        let [logits] = BlockMatrix::matmul_rows([&*self.head], &normed, rows);
        logits
    }
}

/// One sequence's part of a batched step.
pub struct Segment<'a> {
    /// Token ids at the sequence's next positions, `start..start + ids.len()`.
    pub ids: &'a [u32],
    /// The sequence's KV blocks in the store, covering every position through the step's.
    pub blocks: &'a [BlockId],
    /// Positions already in the sequence's blocks.
    pub start: usize,
    /// Whether its rows take the row kernel (else the tiled gemm path).
    pub row_kernel: bool,
    /// Rows, counted from the last, whose logits are wanted: 0 while a prompt is read, 1 for
    /// the next token, more to verify a speculative draft.
    pub logits: usize,
}

#[cfg(test)]
mod tests {
    use ::burn::module::Param;
    use ::burn::tensor::{Tensor, TensorData};

    use super::*;
    use crate::load;
    use crate::load::plan::{self, WeightPlan};
    use crate::model::Model;
    use crate::model::burn::{BurnModel, ParamMut};
    use crate::{DeviceChoice, Engine, LoadOptions, SamplingParams, WeightFormat};

    /// Every matrix replaced by its Q8_0 blocks expanded back: weights that both forms hold
    /// exactly, so what differs between them is the arithmetic alone.
    fn round_through_blocks(model: &mut BurnModel) {
        for (_, param) in model.named_params_mut() {
            let p = match param {
                ParamMut::Proj(proj) => &mut proj.weight,
                ParamMut::Matrix(p) => p,
                ParamMut::Vector(_) => continue,
            };
            let [rows, cols] = p.shape().dims();
            let device = p.device();
            let values = p.val().into_data().try_into_vec::<f32>().unwrap();
            let blocks = BlockMatrix::quantize(&values, rows, cols).unwrap();
            let mut rounded = vec![0f32; rows * cols];
            for (r, row) in rounded.chunks_exact_mut(cols).enumerate() {
                blocks.expand_row(r, row);
            }
            let data = TensorData::new(rounded, [rows, cols]);
            *p = Param::from_tensor(Tensor::from_data(data, &device));
        }
    }

    /// Largest minus smallest logit of `ids`'s forward pass.
    fn spread(engine: &Engine, ids: &[u32]) -> f32 {
        let logits = engine.logits(ids).unwrap();
        let max = logits.iter().fold(f32::MIN, |m, &v| m.max(v));
        let min = logits.iter().fold(f32::MAX, |m, &v| m.min(v));
        max - min
    }

    /// The CPU model and Burn's layers on the same weights (the tiny fixtures, rounded to
    /// Q8_0; Qwen2's has q/k/v biases): prefill logits agree to float rounding, and greedy
    /// decoding through each one's KV cache gives the same tokens.
    #[test]
    fn cpu_model_matches_burn_model() {
        let greedy = SamplingParams::greedy(24);
        let ids = [1, 5, 9, 42, 7, 300, 12, 64];
        for fixture in ["tiny-llama", "tiny-qwen2"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(fixture);
            let options = |weights| LoadOptions {
                device: DeviceChoice::Cpu,
                weights,
                // Burn's keys and values are f32: so are these, for the greedy tokens.
                kv_cache_type: crate::KvCacheType::F32,
                ..LoadOptions::default()
            };
            let auto = Engine::load(&path, &options(WeightFormat::Auto)).unwrap();
            assert!(
                matches!(auto.core.model, Model::Cpu(_)),
                "{fixture}: the CPU's default plan is blocks"
            );

            let f32 = options(WeightFormat::F32);
            let checkpoint = load::load(&path, &f32).unwrap();
            let Model::Burn(mut burn) = checkpoint.model else {
                panic!("{fixture}: f32 weights load Burn's layers");
            };
            round_through_blocks(&mut burn.model);
            let cpu = plan::finish_burn_model(
                burn.model.clone(),
                &checkpoint.config,
                WeightPlan::CpuBlocks,
                &burn.device,
            )
            .unwrap();
            let engine = |model| {
                let checkpoint = load::load(&path, &f32).unwrap();
                Engine::from_checkpoint(
                    load::Checkpoint {
                        model,
                        ..checkpoint
                    },
                    &path,
                    &f32,
                )
                .unwrap()
            };
            let burn = engine(Model::Burn(burn));
            let cpu = engine(cpu);
            // A prompt long enough for the gemm path multiplies f32 by f32 as Burn does:
            // agreement to float rounding. A short one takes the integer path, whose i16
            // activations round to 1/65534 of each block's largest value: agreement to
            // 1e-4 of the logits' spread.
            let long: Vec<u32> = (0..crate::quant::GEMM_MIN_ROWS + 4)
                .map(|k| ids[k % ids.len()] + k as u32)
                .collect();
            for (prompt, tolerance) in [(&long[..], 1e-4), (&ids[..], 1e-4 * spread(&burn, &ids))] {
                let burn_logits = burn.logits(prompt).unwrap();
                let max_error = cpu
                    .logits(prompt)
                    .unwrap()
                    .iter()
                    .zip(&burn_logits)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    max_error < tolerance,
                    "{fixture}, {} tokens: logits differ by {max_error}",
                    prompt.len()
                );
            }
            let (_, burn_tokens) = burn.generate_ids(&ids, &greedy).unwrap();
            let (_, cpu_tokens) = cpu.generate_ids(&ids, &greedy).unwrap();
            assert_eq!(cpu_tokens, burn_tokens, "{fixture}: greedy tokens");
        }
    }
}
