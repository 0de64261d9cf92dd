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
    /// The sequence takes the most likely token as it is, and nothing else reads its one
    /// row's logits: a device may choose the token there and hand back its id alone
    /// ([`Readout::Token`]) rather than the vocabulary's logits.
    pub greedy: bool,
}

/// What a step reads back of an item's rows, where it wants any.
#[derive(Debug)]
pub enum Readout {
    /// The logits of the item's last `logits` rows, `[rows, vocab]` row-major.
    Logits(Vec<f32>),
    /// The most likely token of the item's one row, chosen on the device
    /// ([`BatchItem::greedy`]); an error where the row held a NaN (a fault of that row's
    /// pass, which fails its sequence alone, as NaN logits do on the host).
    Token(Result<u32, EngineError>),
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
            Model::Burn(burn) => burn.logits(ids),
        })
    }

    /// One step of several sequences (decode rows, drafts and prompt chunks): for each item,
    /// the logits `[rows, vocab]` of its last `logits` rows, or the token a device chose for a
    /// greedy one. On the
    /// CPU the step reads the weights once for all decode rows and prompt chunks; Burn's
    /// layers take the decode rows in one pass and each prompt in a pass of its own. `Ok(None)` when `abandoned` said so part-way (checked between
    /// layers on the CPU, between items on Burn): the step's sequences are all leaving.
    pub fn forward_batch(
        &self,
        store: &mut KvStore,
        batch: &mut [BatchItem<'_>],
        abandoned: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<Option<Readout>>>, EngineError> {
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
                let outputs = model.forward_batch(store, &segments, abandoned);
                // The logits are in host memory already: the sampler chooses from them.
                Ok(outputs.map(|outputs| {
                    outputs
                        .into_iter()
                        .map(|logits| (!logits.is_empty()).then_some(Readout::Logits(logits)))
                        .collect()
                }))
            }
            (Model::Burn(burn), KvStore::PerSequence) => {
                let mut outputs: Vec<Option<Readout>> = batch.iter().map(|_| None).collect();
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
                    // One read-back for the pass: token ids when every row is greedy.
                    let greedy = rows.iter().all(|(_, item)| item.greedy);
                    let mut wanted = Vec::with_capacity(rows.len());
                    let mut caches = Vec::with_capacity(rows.len());
                    for (index, item) in rows {
                        wanted.push((index, item.logits > 0));
                        caches.push(item.cache.as_deref_mut().ok_or_else(foreign_cache)?);
                    }
                    let rows = burn.forward_rows(&ids, &mut caches, greedy)?;
                    for ((index, wants), output) in wanted.into_iter().zip(rows) {
                        if wants {
                            outputs[index] = Some(output);
                        }
                    }
                }
                for (index, item) in prompts {
                    if abandoned() {
                        return Ok(None);
                    }
                    let cache = item.cache.as_deref_mut().ok_or_else(foreign_cache)?;
                    let logits = burn.forward_last(item.ids, cache)?;
                    // Burn's layers give the last row's: they never verify drafts.
                    if item.logits > 0 {
                        outputs[index] = burn.read_back(logits, item.greedy)?.pop();
                    }
                }
                Ok(Some(outputs))
            }
            _ => Err(foreign_cache()),
        })
    }
}

impl DeviceModel {
    /// Every position's logits of `ids` (`[s, vocab]` row-major), in a KV of their own.
    fn logits(&self, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        let mut cache = BurnCache::new(self.model.model.layers.len());
        let logits = self.model.forward(
            self.tokens(ids, [1, ids.len()]),
            &self.rope,
            &mut cache,
            false,
        );
        read_logits(logits.flatten(0, 1))
    }

    /// Runs `ids` at positions `cache.len..` and returns the last position's logits
    /// `[1, vocab]`, on the device.
    fn forward_last(&self, ids: &[u32], cache: &mut BurnCache) -> Result<Tensor<2>, EngineError> {
        let tokens = self.tokens(ids, [1, ids.len()]);
        Ok(self
            .model
            .forward(tokens, &self.rope, cache, true)
            .flatten(0, 1))
    }

    /// One position of each of several sequences (`ids[i]` continues the sequence of
    /// `caches[i]`) in one pass: each sequence's logits, or its most likely token where
    /// `greedy`, read back together.
    fn forward_rows(
        &self,
        ids: &[u32],
        caches: &mut [&mut BurnCache],
        greedy: bool,
    ) -> Result<Vec<Readout>, EngineError> {
        let tokens = self.tokens(ids, [ids.len(), 1]);
        let logits = self.model.forward_each(tokens, &self.rope, caches, true);
        self.read_back(logits.flatten(0, 1), greedy)
    }

    /// `ids` as a `shape` tensor of token ids on the device.
    fn tokens(&self, ids: &[u32], shape: [usize; 2]) -> Tensor<2, Int> {
        let ids = ids.iter().map(|&id| id as i64).collect();
        Tensor::from_data(TensorData::new(ids, shape), &self.device)
    }

    /// Each row of `logits` `[rows, vocab]` as the host takes it: the logits, or where
    /// `greedy` on a GPU, the most likely token alone (the engine's kernel chooses it there:
    /// one id read back per row, not the vocabulary's floats).
    fn read_back(&self, logits: Tensor<2>, greedy: bool) -> Result<Vec<Readout>, EngineError> {
        #[cfg(feature = "wgpu")]
        if greedy && self.device != Device::flex() {
            use self::device_kernels::{NAN_ROW, greedy_tokens};
            let tokens = greedy_tokens(logits).into_data();
            let tokens = tokens.iter::<i64>().map(|token| match token {
                NAN_ROW => Err(EngineError::Model(
                    "the forward pass gave NaN logits: a device or kernel fault".into(),
                )),
                token => Ok(token as u32),
            });
            return Ok(tokens.map(Readout::Token).collect());
        }
        let _ = greedy;
        let [rows, vocab] = logits.dims();
        let values = read_logits(logits)?;
        debug_assert_eq!(values.len(), rows * vocab);
        Ok(values
            .chunks_exact(vocab.max(1))
            .map(|row| Readout::Logits(row.to_vec()))
            .collect())
    }
}

/// `logits` read back into host memory, row-major.
fn read_logits(logits: Tensor<2>) -> Result<Vec<f32>, EngineError> {
    logits
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| EngineError::Model(format!("reading logits: {e:?}")))
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
