//! The model: a Llama-family decoder in one of two forms, chosen once at load by the weight
//! plan (`load::plan::WeightPlan`) and fixed in the type, so no pass decides it again:
//! - [`burn`]: Burn's tensors on the device — the GPU (wgpu), or f32 on the CPU, the
//!   reference that the other form is tested against;
//! - [`cpu`]: block-quantized weights (`quant`) and host-memory loops, the CPU's default.
//!
//! Both take a step's token ids and the KV blocks of the scheduler's pool, in a store of
//! their own kind (`KvStore`: host memory, or pools on the device), and return logits as
//! host `f32`s (or, on a GPU, a greedy row's token).

pub mod burn;
pub mod config;
pub mod cpu;
#[cfg(feature = "wgpu")]
pub mod device_kernels;
pub mod device_kv;
pub mod proj;
pub mod rope;

use ::burn::tensor::{DType, Device, Int, Tensor, TensorData};

pub use config::ModelConfig;

use self::burn::{BurnModel, WantedRows};
use self::cpu::{CpuKvStore, CpuModel};
use self::device_kv::{DeviceKv, StepLayout, StepSequence};
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
    config: ModelConfig,
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
            config: config.clone(),
        }
    }
}

/// Where the KV blocks of the scheduler's pool (`kv`) keep their numbers, made once by
/// [`Model::new_store`]: host memory, or pools on Burn's device.
pub enum KvStore {
    Cpu(CpuKvStore),
    Device(DeviceKv),
}

/// One sequence's part of a batched step.
pub struct BatchItem<'a> {
    /// Token ids at the sequence's next positions, `start..start + ids.len()`.
    pub ids: &'a [u32],
    /// Positions already in the sequence's KV.
    pub start: usize,
    /// The sequence's blocks of the pool, covering every position through the step's.
    pub blocks: &'a [BlockId],
    /// On the CPU, whether the rows take the row kernel (else the tiled gemm path): the
    /// scheduler keeps each position on one path whenever it is computed.
    pub row_kernel: bool,
    /// Rows, counted from the last, whose logits are wanted: 0 while a prompt is read, 1 for
    /// the next token, more to verify a speculative draft.
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
    /// The type the KV is kept in when `requested` is asked for, which the pool's budget
    /// counts in bytes: as asked on the CPU; f32 on Burn's layers, whose pools f16 would
    /// only cost launches today (a cast of the keys and of the values a layer that Burn's
    /// fusion leaves unfused: 456 -> 516 launches a SmolLM2 step on lavapipe) and precision
    /// (the f32 reference tests' greedy tokens turned on a near tie).
    pub fn kv_cache_type(&self, requested: KvCacheType) -> KvCacheType {
        match self {
            Model::Burn(_) => KvCacheType::F32,
            Model::Cpu(_) => requested,
        }
    }

    /// The store of `blocks` KV blocks the running sequences share.
    pub fn new_store(&self, blocks: usize, kind: KvCacheType) -> KvStore {
        match self {
            Model::Burn(burn) => KvStore::Device(burn.new_store(blocks)),
            Model::Cpu(model) => KvStore::Cpu(model.new_store(blocks, kind)),
        }
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
    /// greedy one. Either form reads the weights once for all of the step's rows. `Ok(None)`
    /// when `abandoned` said so (checked between layers on the CPU, before the pass on
    /// Burn's layers, whose pass is queued on the device whole): the step's sequences are all
    /// leaving.
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
            (Model::Burn(burn), KvStore::Device(kv)) => {
                if abandoned() {
                    return Ok(None);
                }
                burn.forward_batch(kv, batch).map(Some)
            }
            _ => Err(foreign_cache()),
        })
    }
}

impl DeviceModel {
    /// A store of `blocks` KV blocks on the device.
    fn new_store(&self, blocks: usize) -> DeviceKv {
        let config = &self.config;
        DeviceKv::new(
            config.num_layers,
            config.num_kv_heads,
            config.head_dim,
            blocks,
            &self.device,
        )
    }

    /// Every position's logits of `ids` (`[s, vocab]` row-major), in a KV of their own.
    fn logits(&self, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        let blocks: Vec<BlockId> = (0..blocks_for(ids.len()) as BlockId).collect();
        let mut kv = self.new_store(blocks.len());
        let mut item = [BatchItem {
            ids,
            start: 0,
            blocks: &blocks,
            row_kernel: false,
            logits: ids.len(),
            greedy: false,
        }];
        match self.forward_batch(&mut kv, &mut item)?.pop().flatten() {
            Some(Readout::Logits(logits)) => Ok(logits),
            _ => Err(EngineError::Model("the pass read back no logits".into())),
        }
    }

    /// One step over every item's rows in one pass: each item's wanted rows read back,
    /// token ids alone where every item that wants any is greedy.
    fn forward_batch(
        &self,
        kv: &mut DeviceKv,
        batch: &mut [BatchItem<'_>],
    ) -> Result<Vec<Option<Readout>>, EngineError> {
        let sequences: Vec<StepSequence<'_>> = batch
            .iter()
            .map(|item| StepSequence {
                start: item.start,
                rows: item.ids.len(),
                blocks: item.blocks,
            })
            .collect();
        let highest = batch.iter().flat_map(|item| item.blocks).max();
        kv.reserve(highest.map_or(0, |&block| block as usize + 1));
        let layout = StepLayout::new(&sequences, &self.device);

        // The rows whose logits are read: each item's last `logits`.
        let mut wanted = Vec::new();
        let mut first = 0;
        for item in batch.iter() {
            let rows = item.ids.len();
            let logits = item.logits.min(rows);
            wanted.extend((first + rows - logits..first + rows).map(|row| row as i64));
            first += rows;
        }
        let ids: Vec<u32> = batch.iter().flat_map(|item| item.ids).copied().collect();
        let wanted_rows = match wanted.len() {
            0 => WantedRows::Nothing,
            n if n == ids.len() => WantedRows::All,
            n => WantedRows::These(Box::new(Tensor::from_data(
                TensorData::new(wanted, [n]),
                &self.device,
            ))),
        };
        let tokens = self.tokens(&ids, [ids.len(), 1]);
        let mut outputs: Vec<Option<Readout>> = batch.iter().map(|_| None).collect();
        let Some(logits) = self
            .model
            .forward(tokens, &self.rope, kv, &layout, wanted_rows)
        else {
            // Prompt chunks alone: the keys and values are written (in the device's queue,
            // before any later step's reads), and nothing is read back.
            return Ok(outputs);
        };
        let greedy = batch
            .iter()
            .filter(|item| item.logits > 0)
            .all(|item| item.greedy && item.logits == 1);
        let mut rows = self.read_back(logits, greedy)?.into_iter();
        for (output, item) in outputs.iter_mut().zip(batch.iter()) {
            let logits = item.logits.min(item.ids.len());
            if logits == 0 {
                continue;
            }
            *output = if logits == 1 {
                rows.next()
            } else {
                // A draft's rows, one readout of them all (never greedy: drafts read logits).
                let parts: Vec<f32> = rows
                    .by_ref()
                    .take(logits)
                    .flat_map(|row| match row {
                        Readout::Logits(values) => values,
                        Readout::Token(_) => Vec::new(),
                    })
                    .collect();
                Some(Readout::Logits(parts))
            };
        }
        Ok(outputs)
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
