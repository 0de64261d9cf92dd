//! Burn's layers' KV cache: the scheduler's pool of blocks (`kv`), kept on the device, and
//! how one step's rows address it.
//!
//! Every layer holds its keys and values in two pools of slots `[slots, nkv, 1, hd]`, slot
//! `block · BLOCK_SIZE + offset` holding a position of the sequence that holds `block`. All
//! running sequences share the pools, so a step of any mix of decode rows and prompt chunks
//! writes its new keys and values with one launch per pool (a `select_assign` of its rows'
//! slots, in place) and attends with one launch per layer (the engine's paged kernel,
//! `device_kernels::attend_paged`), however many sequences it carries. A block is the
//! pool's, so a sequence may start from blocks another one wrote (prefix caching), and a
//! prompt may be read in chunks from any position.
//!
//! The pools grow with the highest block handed out (the pool hands out low numbers
//! first), to twice what they held, up to the pool's size: memory follows the load, not the
//! limit.

use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::kv::{BLOCK_SIZE, BlockId};

/// The device's KV: per layer, a key pool and a value pool.
#[derive(Debug)]
pub struct DeviceKv {
    /// Taken out while a step writes them (`write`), so the store holds them alone and
    /// Burn writes them in place.
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// Blocks the pools hold room for now.
    capacity: usize,
    /// Blocks of the scheduler's pool: the most they grow to.
    max_blocks: usize,
    kv_heads: usize,
    head_dim: usize,
    device: Device,
}

impl DeviceKv {
    /// Pools for `max_blocks` blocks of `layers` layers, allocated as the blocks are used.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        max_blocks: usize,
        device: &Device,
    ) -> Self {
        let empty = || Tensor::zeros([0, kv_heads, 1, head_dim], device);
        Self {
            layers: (0..layers).map(|_| Some((empty(), empty()))).collect(),
            capacity: 0,
            max_blocks,
            kv_heads,
            head_dim,
            device: device.clone(),
        }
    }

    /// Room for blocks `0..blocks`: the pools are copied into larger ones where they hold
    /// fewer (a few times in a worker's life, as its load rises).
    pub fn reserve(&mut self, blocks: usize) {
        if blocks <= self.capacity {
            return;
        }
        let capacity = blocks
            .max(2 * self.capacity)
            .min(self.max_blocks.max(blocks));
        let (old, slots) = (self.capacity * BLOCK_SIZE, capacity * BLOCK_SIZE);
        let shape = [slots, self.kv_heads, 1, self.head_dim];
        for (keys, values) in self.layers.iter_mut().flatten() {
            let grow = |pool: &Tensor<4>| {
                let grown = Tensor::zeros(shape, &self.device);
                if old == 0 {
                    return grown;
                }
                grown.slice_assign([0..old, 0..shape[1], 0..1, 0..shape[3]], pool.clone())
            };
            (*keys, *values) = (grow(keys), grow(values));
        }
        self.capacity = capacity;
    }

    /// Writes a step's keys and values `[rows, nkv, 1, hd]` into layer `layer`'s pools at
    /// their rows' slots (in place: the store holds the pools alone), and returns the pools
    /// to attend over.
    pub fn write(
        &mut self,
        layer: usize,
        layout: &StepLayout,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>) {
        let (keys, values) = self.layers[layer].take().expect("a layer's pools are held");
        let write = |pool: Tensor<4>, rows: Tensor<4>| {
            let rows = if rows.dtype() == DType::F32 {
                rows
            } else {
                rows.cast(DType::F32)
            };
            pool.select_assign(0, layout.slots.clone(), rows, IndexingUpdateOp::Assign)
        };
        let pools = (write(keys, k), write(values, v));
        self.layers[layer] = Some(pools.clone());
        pools
    }
}

/// One sequence's part of a step: rows `rows` of the step are its positions
/// `start..start + rows.len()`, in `blocks`.
pub struct StepSequence<'a> {
    pub start: usize,
    pub rows: usize,
    pub blocks: &'a [BlockId],
}

/// Where a step's rows go in the KV and what each attends over, on the device (and on the
/// host, for the attention in Burn's operations).
pub struct StepLayout {
    /// Each row's position in its sequence `[rows]`: the RoPE angle.
    pub positions: Tensor<1, Int>,
    /// Each row's slot in the pools `[rows]`: where its key and value are written.
    pub slots: Tensor<1, Int>,
    /// Each row's sequence `[rows]`, an index into `tables`.
    pub row_sequence: Tensor<1, Int>,
    /// Each row's count of visible positions `[rows]`: its own position and every earlier one.
    pub row_visible: Tensor<1, Int>,
    /// Each sequence's blocks `[sequences, max blocks]`, padded with 0.
    pub tables: Tensor<2, Int>,
    /// The sequences as the host sees them: (first row, start position, rows, the slots of
    /// positions `0..start + rows`).
    sequences: Vec<(usize, usize, usize, Vec<i64>)>,
    device: Device,
}

impl StepLayout {
    pub fn new(sequences: &[StepSequence<'_>], device: &Device) -> Self {
        let rows: usize = sequences.iter().map(|s| s.rows).sum();
        let width = sequences.iter().map(|s| s.blocks.len()).max().unwrap_or(0);
        let mut positions = Vec::with_capacity(rows);
        let mut slots = Vec::with_capacity(rows);
        let mut row_sequence = Vec::with_capacity(rows);
        let mut row_visible = Vec::with_capacity(rows);
        let mut tables = vec![0i64; sequences.len() * width.max(1)];
        let mut host = Vec::with_capacity(sequences.len());
        for (index, sequence) in sequences.iter().enumerate() {
            let end = sequence.start + sequence.rows;
            assert!(
                sequence.blocks.len() * BLOCK_SIZE >= end,
                "a sequence's blocks cover its step's positions"
            );
            let slot = |p: usize| {
                (sequence.blocks[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE) as i64
            };
            for (table, &block) in tables[index * width.max(1)..]
                .iter_mut()
                .zip(sequence.blocks)
            {
                *table = block as i64;
            }
            host.push((
                positions.len(),
                sequence.start,
                sequence.rows,
                (0..end).map(slot).collect(),
            ));
            for p in sequence.start..end {
                positions.push(p as i64);
                slots.push(slot(p));
                row_sequence.push(index as i64);
                row_visible.push(p as i64 + 1);
            }
        }
        let ints = |values: Vec<i64>| {
            let n = values.len();
            Tensor::<1, Int>::from_data(TensorData::new(values, [n]), device)
        };
        Self {
            positions: ints(positions),
            slots: ints(slots),
            row_sequence: ints(row_sequence),
            row_visible: ints(row_visible),
            tables: Tensor::from_data(
                TensorData::new(tables, [sequences.len(), width.max(1)]),
                device,
            ),
            sequences: host,
            device: device.clone(),
        }
    }

    /// Rows in the step.
    pub fn rows(&self) -> usize {
        self.positions.dims()[0]
    }

    /// Attention in Burn's operations, where the engine's kernel does not run (the CPU,
    /// types or head sizes it does not take), and the reference it is tested against:
    /// `q` `[rows, nh, 1, hd]` over the pools `[slots, nkv, 1, hd]`, each row over its
    /// sequence's positions through its own. Per sequence: its keys and values gathered from
    /// their slots, grouped query heads as rows of one matmul against their K/V head.
    pub fn attend_by_gathering(
        &self,
        q: Tensor<4>,
        keys: &Tensor<4>,
        values: &Tensor<4>,
    ) -> Tensor<4> {
        let [_, nh, _, hd] = q.dims();
        let nkv = keys.dims()[1];
        let group = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let parts = self
            .sequences
            .iter()
            .map(|(first, start, rows, slots)| {
                let (s, t) = (*rows, slots.len());
                let index =
                    Tensor::<1, Int>::from_data(TensorData::new(slots.clone(), [t]), &self.device);
                // `[t, nkv, 1, hd]` → `[nkv, t, hd]`.
                let gather = |pool: &Tensor<4>| {
                    pool.clone()
                        .select(0, index.clone())
                        .reshape([t, nkv, hd])
                        .swap_dims(0, 1)
                };
                let (k, v) = (gather(keys), gather(values));
                // `[s, nh, 1, hd]` → `[nkv, group · s, hd]` (query head `h` reads K/V head
                // `h / group`, the Hugging Face `repeat_kv` order).
                let q = q
                    .clone()
                    .narrow(0, *first, s)
                    .reshape([s, nh, hd])
                    .swap_dims(0, 1)
                    .reshape([nkv, group * s, hd]);
                let scores = q.matmul(k.swap_dims(1, 2)) * scale;
                let scores = if s > 1 {
                    // Row `i` (position `start + i`) sees positions `..= start + i`.
                    let hidden: Vec<bool> = (0..s)
                        .flat_map(|i| (0..t).map(move |j| j > start + i))
                        .collect();
                    let hidden =
                        Tensor::<2, Bool>::from_data(TensorData::new(hidden, [s, t]), &self.device);
                    let hidden = hidden.reshape([1, 1, s, t]).expand([nkv, group, s, t]);
                    scores
                        .reshape([nkv, group, s, t])
                        .mask_fill(hidden, f32::MIN)
                        .reshape([nkv, group * s, t])
                } else {
                    scores
                };
                softmax(scores, 2)
                    .matmul(v)
                    .reshape([nh, s, hd])
                    .swap_dims(0, 1)
                    .reshape([s, nh, 1, hd])
            })
            .collect();
        Tensor::cat(parts, 0)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData};

    use super::{StepLayout, StepSequence};
    use crate::kv::BLOCK_SIZE;

    /// Deterministic values in `[-1, 1)`.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Against attention written out in loops over host memory: two sequences in blocks out
    /// of order (a decode row at position 21, a chunk of 5 rows from position 3), grouped
    /// query heads, each row seeing its own position and every earlier one.
    #[test]
    fn gathered_attention_is_each_rows_causal_softmax() {
        let device = Device::flex();
        let (nh, nkv, hd) = (4, 2, 8);
        let group = nh / nkv;
        let sequences = [
            StepSequence {
                start: 21,
                rows: 1,
                blocks: &[3, 0],
            },
            StepSequence {
                start: 3,
                rows: 5,
                blocks: &[2],
            },
        ];
        let layout = StepLayout::new(&sequences, &device);
        let rows = layout.rows();
        let slots = 4 * BLOCK_SIZE;
        let (k, v, q) = (
            values(slots * nkv * hd, 1),
            values(slots * nkv * hd, 2),
            values(rows * nh * hd, 3),
        );
        let tensor = |data: &[f32], n: usize, heads: usize| {
            Tensor::<4>::from_data(TensorData::new(data.to_vec(), [n, heads, 1, hd]), &device)
        };
        let ours = layout.attend_by_gathering(
            tensor(&q, rows, nh),
            &tensor(&k, slots, nkv),
            &tensor(&v, slots, nkv),
        );
        let ours = ours.into_data().try_to_vec::<f32>().unwrap();

        let mut row = 0;
        for &StepSequence {
            start,
            rows: n,
            blocks,
        } in &sequences
        {
            for i in 0..n {
                let visible = start + i + 1;
                let slot = |p: usize| blocks[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE;
                for h in 0..nh {
                    let kv = h / group;
                    let query = &q[(row * nh + h) * hd..][..hd];
                    let scores: Vec<f32> = (0..visible)
                        .map(|p| {
                            let key = &k[(slot(p) * nkv + kv) * hd..][..hd];
                            query.iter().zip(key).map(|(a, b)| a * b).sum::<f32>()
                                / (hd as f32).sqrt()
                        })
                        .collect();
                    let top = scores.iter().cloned().fold(f32::MIN, f32::max);
                    let weights: Vec<f32> = scores.iter().map(|s| (s - top).exp()).collect();
                    let total: f32 = weights.iter().sum();
                    for d in 0..hd {
                        let want: f32 = (0..visible)
                            .map(|p| weights[p] / total * v[(slot(p) * nkv + kv) * hd + d])
                            .sum();
                        let got = ours[(row * nh + h) * hd + d];
                        assert!(
                            (got - want).abs() < 1e-5,
                            "row {row} head {h} dim {d}: {got} {want}"
                        );
                    }
                }
                row += 1;
            }
        }
    }
}
