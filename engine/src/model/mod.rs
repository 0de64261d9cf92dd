//! The model: a Llama-family decoder in one of two forms, chosen once at load by the weight
//! plan (`load::plan::WeightPlan`) and fixed in the type, so no pass decides it again:
//! - [`burn`]: Burn's tensors on the device — the GPU (wgpu), or f32 on the CPU, the
//!   reference that the other form is tested against;
//! - [`cpu`]: block-quantized weights (`quant`) and host-memory loops, the CPU's default.
//!
//! Both take token ids and KV of their own kind (`KvStore`, and Burn's per-sequence
//! `BurnCache`) and return logits as host `f32`s.

pub mod burn;
pub mod config;
pub mod cpu;
#[cfg(feature = "wgpu")]
pub mod device_kernels;
pub mod proj;
pub mod rope;

use ::burn::tensor::{DType, Device, Int, Tensor, TensorData};

pub use config::ModelConfig;

use self::burn::{BurnCache, BurnModel};
use self::cpu::{CpuKvStore, CpuModel};
use self::rope::{Rope, RopeTables};
use crate::kv::{BlockId, blocks_for};
use crate::{EngineError, KvCacheType};

pub enum Model {
    /// Burn's layers on a device.
    Burn(Box<DeviceModel>),
    /// Block weights in host memory.
    Cpu(CpuModel),
}

/// Burn's layers with the RoPE tables on the device they run on.
pub struct DeviceModel {
    pub model: BurnModel,
    pub rope: RopeTables,
    pub device: Device,
}

impl DeviceModel {
    /// `model` (filled with f32 weights) cast to `dtype`, with the RoPE tables of the
    /// model's whole context on `device`.
    pub fn new(model: BurnModel, config: &ModelConfig, dtype: DType, device: &Device) -> Self {
        let model = model.cast(dtype);
        let model = if *device == Device::flex() {
            model
        } else {
            model.fuse_projections()
        };
        Self {
            model,
            rope: Rope::new(config).tables(config.max_position_embeddings, device),
            device: device.clone(),
        }
    }
}

/// Where the KV blocks of the scheduler's pool (`kv`) keep their numbers, made once by
/// [`Model::new_store`]. Burn's layers keep each sequence's keys and values in device
/// buffers of its own ([`BurnCache`]) and the pool only counts them.
pub enum KvStore {
    Cpu(CpuKvStore),
    PerSequence,
}

/// One sequence's part of a batched step.
pub struct BatchItem<'a> {
    /// Token ids at the sequence's next positions, `start..start + ids.len()`.
    pub ids: &'a [u32],
    /// Positions already in the sequence's KV.
    pub start: usize,
    /// The sequence's blocks of the pool, covering every position through the step's.
    pub blocks: &'a [BlockId],
    /// The sequence's own device buffers, on Burn's layers ([`Model::new_sequence_cache`]).
    pub cache: Option<&'a mut BurnCache>,
    /// On the CPU, whether the rows take the row kernel (else the tiled gemm path): the
    /// scheduler keeps each position on one path whenever it is computed.
    pub row_kernel: bool,
    /// Rows, counted from the last, whose logits are wanted: 0 while a prompt is read, 1 for
    /// the next token, more to verify a speculative draft (the CPU form only).
    pub logits: usize,
}

impl Model {
    /// The store of `blocks` KV blocks the running sequences share.
    pub fn new_store(&self, blocks: usize, kind: KvCacheType) -> KvStore {
        match self {
            Model::Burn(_) => KvStore::PerSequence,
            Model::Cpu(model) => KvStore::Cpu(model.new_store(blocks, kind)),
        }
    }

    /// What a sequence keeps of its own besides its blocks: Burn's device buffers.
    pub fn new_sequence_cache(&self) -> Option<BurnCache> {
        match self {
            Model::Burn(burn) => Some(BurnCache::new(burn.model.model.layers.len())),
            Model::Cpu(_) => None,
        }
    }

    /// Whether a prompt may be fed in chunks, several passes that start past position 0
    /// (Burn's fused attention masks a multi-position pass only from position 0, so Burn's
    /// layers take a prompt whole).
    pub fn takes_prompt_chunks(&self) -> bool {
        matches!(self, Model::Cpu(_))
    }

    /// Whether a sequence can start from KV blocks another one wrote (prefix caching): it
    /// then reads the rest of its prompt from past position 0, which only the CPU form does.
    pub fn resumes_from_blocks(&self) -> bool {
        self.takes_prompt_chunks()
    }

    /// Every position's logits of `ids` (`[s, vocab]` row-major), in a KV of their own: the
    /// verification path.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        in_pool(|| match self {
            Model::Cpu(model) => {
                // f32, as the references the path is checked against keep them.
                let mut store = model.new_store(blocks_for(ids.len()), KvCacheType::F32);
                Ok(model.logits_of_every_position(ids, &mut store))
            }
            Model::Burn(burn) => burn.forward(
                ids,
                &mut BurnCache::new(burn.model.model.layers.len()),
                false,
            ),
        })
    }

    /// One step of several sequences (decode rows, drafts and prompt chunks): the logits
    /// `[rows, vocab]` of each item's last `logits` rows. On the
    /// CPU the step reads the weights once for all decode rows and prompt chunks; Burn's
    /// layers take the decode rows in one pass and each prompt in a pass of its own. `Ok(None)` when `abandoned` said so part-way (checked between
    /// layers on the CPU, between items on Burn): the step's sequences are all leaving.
    pub fn forward_batch(
        &self,
        store: &mut KvStore,
        batch: &mut [BatchItem<'_>],
        abandoned: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<Vec<f32>>>, EngineError> {
        in_pool(|| match (self, store) {
            (Model::Cpu(model), KvStore::Cpu(store)) => {
                let segments: Vec<cpu::Segment<'_>> = batch
                    .iter()
                    .map(|item| cpu::Segment {
                        ids: item.ids,
                        blocks: item.blocks,
                        start: item.start,
                        row_kernel: item.row_kernel,
                        logits: item.logits,
                    })
                    .collect();
                Ok(model.forward_batch(store, &segments, abandoned))
            }
            (Model::Burn(burn), KvStore::PerSequence) => {
                let mut outputs = vec![Vec::new(); batch.len()];
                // The items of one position (decode rows) in one pass, the prompts one by
                // one after them (Burn's layers take a prompt whole, from position 0).
                let (rows, prompts): (Vec<_>, Vec<_>) = batch
                    .iter_mut()
                    .enumerate()
                    .partition(|(_, item)| item.ids.len() == 1);
                if !rows.is_empty() {
                    if abandoned() {
                        return Ok(None);
                    }
                    let ids: Vec<u32> = rows.iter().map(|(_, item)| item.ids[0]).collect();
                    let mut wanted = Vec::with_capacity(rows.len());
                    let mut caches = Vec::with_capacity(rows.len());
                    for (index, item) in rows {
                        wanted.push((index, item.logits > 0));
                        caches.push(item.cache.as_deref_mut().ok_or_else(foreign_cache)?);
                    }
                    let logits = burn.forward_rows(&ids, &mut caches)?;
                    for ((index, wants), logits) in wanted.into_iter().zip(logits) {
                        if wants {
                            outputs[index] = logits;
                        }
                    }
                }
                for (index, item) in prompts {
                    if abandoned() {
                        return Ok(None);
                    }
                    let cache = item.cache.as_deref_mut().ok_or_else(foreign_cache)?;
                    let logits = burn.forward(item.ids, cache, true)?;
                    // Burn's layers give the last row's: they never verify drafts.
                    if item.logits > 0 {
                        outputs[index] = logits;
                    }
                }
                Ok(Some(outputs))
            }
            _ => Err(foreign_cache()),
        })
    }
}

impl DeviceModel {
    /// Runs `ids` at positions `cache.len..` and returns the logits (`[s, vocab]` row-major,
    /// or only the last row when `last_only`).
    fn forward(
        &self,
        ids: &[u32],
        cache: &mut BurnCache,
        last_only: bool,
    ) -> Result<Vec<f32>, EngineError> {
        let len = ids.len();
        let ids = ids.iter().map(|&id| id as i64).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, len]), &self.device);
        let logits = self.model.forward(tokens, &self.rope, cache, last_only);
        logits
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| EngineError::Model(format!("reading logits: {e:?}")))
    }
}

impl DeviceModel {
    /// One position of each of several sequences (`ids[i]` continues the sequence of
    /// `caches[i]`) in one pass: each sequence's logits, read back together.
    fn forward_rows(
        &self,
        ids: &[u32],
        caches: &mut [&mut BurnCache],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let rows = ids.len();
        let ids = ids.iter().map(|&id| id as i64).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, 1]), &self.device);
        let logits = self.model.forward_each(tokens, &self.rope, caches, true);
        let values = logits
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| EngineError::Model(format!("reading logits: {e:?}")))?;
        let vocab = values.len() / rows.max(1);
        Ok(values.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }
}

fn foreign_cache() -> EngineError {
    EngineError::Model("a KV store made for another model was passed to forward".into())
}

/// Runs a pass on a rayon worker, so the ~200 parallel matmuls of a token each start inside
/// the pool (a cheap join) rather than waking it from outside and sleeping until it
/// finishes (a futex round trip each: about 4 ms of a 16 ms token on two cores).
fn in_pool<R: Send>(pass: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| pass())
}
