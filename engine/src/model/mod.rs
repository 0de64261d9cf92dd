//! The model: a Llama-family decoder in one of two forms, chosen once at load by the weight
//! plan (`load::plan::WeightPlan`) and fixed in the type, so no pass decides it again:
//! - [`burn`]: Burn's tensors on the device — the GPU (wgpu), or f32 on the CPU, the
//!   reference that the other form is tested against;
//! - [`cpu`]: block-quantized weights (`quant`) and host-memory loops, the CPU's default.
//!
//! Both take token ids and a cache of their own kind and return logits as host `f32`s.

pub mod burn;
pub mod config;
pub mod cpu;
pub mod proj;
pub mod rope;

use ::burn::tensor::{DType, Device, Int, Tensor, TensorData};

pub use config::ModelConfig;

use self::burn::{BurnCache, BurnModel};
use self::cpu::{CpuCache, CpuModel};
use self::rope::{Rope, RopeTables};
use crate::EngineError;

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
        Self {
            model: model.cast(dtype),
            rope: Rope::new(config).tables(config.max_position_embeddings, device),
            device: device.clone(),
        }
    }
}

/// One generation's keys and values, made by [`Model::new_cache`] for that model's form.
pub enum Cache {
    Burn(BurnCache),
    Cpu(CpuCache),
}

/// One sequence's part of a batched step.
pub struct BatchItem<'a> {
    /// Token ids at the cache's next positions.
    pub ids: &'a [u32],
    pub cache: &'a mut Cache,
    /// Whether the last position's logits are wanted.
    pub logits: bool,
}

impl Model {
    /// A cache for up to `capacity` positions (prompt and generated tokens together).
    pub fn new_cache(&self, capacity: usize) -> Cache {
        match self {
            Model::Burn(burn) => {
                Cache::Burn(BurnCache::new(burn.model.model.layers.len(), capacity))
            }
            Model::Cpu(model) => Cache::Cpu(model.new_cache(capacity)),
        }
    }

    /// Whether a prompt may be fed in chunks, several passes that start past position 0
    /// (Burn's fused attention masks a multi-position pass only from position 0, so Burn's
    /// layers take a prompt whole).
    pub fn takes_prompt_chunks(&self) -> bool {
        matches!(self, Model::Cpu(_))
    }

    /// Runs `ids` at positions `cache.len..` and returns the logits (`[s, vocab]` row-major,
    /// or only the last row when `last_only`).
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut Cache,
        last_only: bool,
    ) -> Result<Vec<f32>, EngineError> {
        in_pool(|| self.forward_one(ids, cache, last_only))
    }

    /// One step of several sequences (`batch[..decoding]` single decode positions, the rest
    /// prompt chunks): the last position's logits of each item that asks for them. On the
    /// CPU the step reads the weights once for all decode rows; Burn's layers run the items
    /// one after another. `Ok(None)` when `abandoned` said so part-way (checked between
    /// layers on the CPU, between items on Burn): the step's sequences are all leaving.
    pub fn forward_batch(
        &self,
        batch: &mut [BatchItem<'_>],
        decoding: usize,
        abandoned: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Vec<Option<Vec<f32>>>>, EngineError> {
        in_pool(|| match self {
            Model::Cpu(model) => {
                let mut segments = Vec::with_capacity(batch.len());
                for item in batch.iter_mut() {
                    let Cache::Cpu(cache) = &mut *item.cache else {
                        return Err(foreign_cache());
                    };
                    segments.push(cpu::Segment {
                        ids: item.ids,
                        cache,
                        logits: item.logits,
                    });
                }
                Ok(model.forward_batch(&mut segments, decoding, abandoned))
            }
            Model::Burn(_) => {
                let mut outputs = Vec::with_capacity(batch.len());
                for item in batch.iter_mut() {
                    if abandoned() {
                        return Ok(None);
                    }
                    let logits = self.forward_one(item.ids, item.cache, true)?;
                    outputs.push(item.logits.then_some(logits));
                }
                Ok(Some(outputs))
            }
        })
    }

    fn forward_one(
        &self,
        ids: &[u32],
        cache: &mut Cache,
        last_only: bool,
    ) -> Result<Vec<f32>, EngineError> {
        match (self, cache) {
            (Model::Cpu(model), Cache::Cpu(cache)) => Ok(model.forward(ids, cache, last_only)),
            (Model::Burn(burn), Cache::Burn(cache)) => {
                let DeviceModel {
                    model,
                    rope,
                    device,
                } = &**burn;
                let len = ids.len();
                let ids = ids.iter().map(|&id| id as i64).collect();
                let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, len]), device);
                let logits = model.forward(tokens, rope, cache, last_only);
                logits
                    .into_data()
                    .try_to_vec::<f32>()
                    .map_err(|e| EngineError::Model(format!("reading logits: {e:?}")))
            }
            _ => Err(foreign_cache()),
        }
    }
}

fn foreign_cache() -> EngineError {
    EngineError::Model("a cache made for another model was passed to forward".into())
}

/// Runs a pass on a rayon worker, so the ~200 parallel matmuls of a token each start inside
/// the pool (a cheap join) rather than waking it from outside and sleeping until it
/// finishes (a futex round trip each: about 4 ms of a 16 ms token on two cores).
fn in_pool<R: Send>(pass: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| pass())
}
