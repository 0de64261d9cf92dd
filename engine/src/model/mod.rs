//! The model: a Llama-family decoder in one of two forms, chosen once at load by the weight
//! plan (`load::plan::WeightPlan`) and fixed in the type, so no pass decides it again:
//! - [`burn`]: Burn's tensors on the device — the GPU (wgpu), or f32 on the CPU, the
//!   reference that the other form is tested against;
//! - [`cpu`]: block-quantized weights (`quant`) and host-memory loops, the CPU's default.
//!
//! Both take a step's token ids and the KV blocks of the scheduler's pool, in a store of
//! their own kind (`KvStore`: host memory, or pools on the device), and return logits as
//! host `f32`s (or, on a GPU, a greedy row's token, or a sampled row's best candidates).

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
    /// How the host chooses the token of each of the item's wanted rows (a draft's too),
    /// which says what a device may hand back for them instead of the vocabulary's logits.
    pub choice: TokenChoice,
}

/// How the scheduler chooses a sequence's next token from its one row of logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TokenChoice {
    /// From the logits themselves: a bias, a constraint, log-probabilities, a penalty or
    /// a draft read them ([`Readout::Logits`]).
    FromLogits,
    /// The most likely token as it is: a device may choose it and hand back its id alone
    /// ([`Readout::Token`]).
    MostLikely,
    /// By the host's sampler from the row's best candidates, which a device may hand back
    /// with the softmax's sums (at `temperature`, and at 1 for log-probabilities) rather
    /// than the row ([`Readout::Best`]): a draw at the sampler's temperature (top-k,
    /// top-p), or the most likely token with its log-probabilities (`temperature` 1).
    FromCandidates { temperature: f32 },
}

/// What a step reads back of an item's rows, where it wants any. A device's fault in a row
/// (a NaN in its logits) is an error of that row alone, which fails its sequence, as NaN
/// logits do on the host.
#[derive(Debug)]
pub enum Readout {
    /// The logits of the item's last `logits` rows, `[rows, vocab]` row-major.
    Logits(Vec<f32>),
    /// The most likely token of the item's one row, chosen on the device
    /// ([`TokenChoice::MostLikely`]).
    Token(Result<u32, EngineError>),
    /// The best candidates of the item's one row ([`TokenChoice::FromCandidates`], or a
    /// [`TokenChoice::MostLikely`] row in a step with such rows).
    Best(Result<BestCandidates, EngineError>),
    /// Each of the item's rows (a draft's), one of the forms above, where a device chose
    /// or found the candidates of any of them.
    Rows(Vec<Readout>),
}

/// The best candidates of a row of logits, as a device hands them back for a sampled token
/// (SmolLM2's: 16 KiB rather than the vocabulary's 196), the logits staying on the device in
/// case a draw walks past the candidates (the sampler says so: `Sampler::sample_best`).
pub struct BestCandidates {
    /// `(id, logit)` of the row's largest finite logits, unranked; the lowest ids among
    /// equal ones at the cut.
    pub candidates: Vec<(u32, f32)>,
    /// Whether they are all of the row's finite logits.
    pub complete: bool,
    /// The softmax's sum at the row's temperature over all of its finite logits,
    /// `Σ exp((l - max) / t)`.
    pub sum: f64,
    /// The log-softmax's normalizer, `max + ln Σ exp(l - max)` over the row's finite
    /// logits: a candidate's log-probability is its logit less this.
    pub log_total: f32,
    /// The row's logits, where the candidates are not enough.
    row: Box<dyn FnOnce() -> Result<Vec<f32>, EngineError> + Send>,
}

impl BestCandidates {
    /// `candidates` of a row, `complete` or not, its softmax's `sum` at the sampler's
    /// temperature and `sum_at_one` at 1, and how to read the row's logits.
    pub fn new(
        candidates: Vec<(u32, f32)>,
        complete: bool,
        sum: f64,
        sum_at_one: f64,
        row: impl FnOnce() -> Result<Vec<f32>, EngineError> + Send + 'static,
    ) -> Self {
        let max = candidates
            .iter()
            .map(|&(_, logit)| logit)
            .fold(f32::NEG_INFINITY, f32::max);
        Self {
            candidates,
            complete,
            sum,
            // As the host's log-softmax takes it (`run::logprobs`).
            log_total: max + sum_at_one.ln() as f32,
            row: Box::new(row),
        }
    }

    /// The row's logits, read back from the device.
    pub fn read_row(self) -> Result<Vec<f32>, EngineError> {
        (self.row)()
    }
}

impl std::fmt::Debug for BestCandidates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BestCandidates")
            .field("candidates", &self.candidates.len())
            .field("complete", &self.complete)
            .field("sum", &self.sum)
            .finish_non_exhaustive()
    }
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
            choice: TokenChoice::FromLogits,
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
        // How each wanted row's token is chosen: a draft's rows as its sequence chooses.
        let choices: Vec<TokenChoice> = batch
            .iter()
            .flat_map(|item| std::iter::repeat_n(item.choice, item.logits.min(item.ids.len())))
            .collect();
        let mut rows = self.read_back(logits, &choices)?.into_iter();
        for (output, item) in outputs.iter_mut().zip(batch.iter()) {
            let logits = item.logits.min(item.ids.len());
            if logits == 0 {
                continue;
            }
            *output = if logits == 1 {
                rows.next()
            } else {
                // A draft's rows: their logits as one readout, as the CPU gives them, where
                // all were read whole.
                let parts: Vec<Readout> = rows.by_ref().take(logits).collect();
                if parts.iter().all(|row| matches!(row, Readout::Logits(_))) {
                    let values = parts.into_iter().flat_map(|row| match row {
                        Readout::Logits(values) => values,
                        _ => unreachable!("all read whole"),
                    });
                    Some(Readout::Logits(values.collect()))
                } else {
                    Some(Readout::Rows(parts))
                }
            };
        }
        Ok(outputs)
    }

    /// `ids` as a `shape` tensor of token ids on the device.
    fn tokens(&self, ids: &[u32], shape: [usize; 2]) -> Tensor<2, Int> {
        let ids = ids.iter().map(|&id| id as i64).collect();
        Tensor::from_data(TensorData::new(ids, shape), &self.device)
    }

    /// Each row of `logits` `[rows, vocab]` as the host takes it, by `choices` (one a row):
    /// its logits; or on a GPU, for a row whose token the device may choose, the token
    /// alone (where every such row is greedy) or its best candidates. At most two readbacks:
    /// the rows read whole, and the others.
    fn read_back(
        &self,
        logits: Tensor<2>,
        choices: &[TokenChoice],
    ) -> Result<Vec<Readout>, EngineError> {
        let whole: Vec<usize> = (0..choices.len())
            .filter(|&row| choices[row] == TokenChoice::FromLogits || self.device == Device::flex())
            .collect();
        let mut readouts: Vec<Option<Readout>> = choices.iter().map(|_| None).collect();
        if !whole.is_empty() {
            let rows = self.rows_of(&logits, &whole, choices.len());
            let [_, vocab] = rows.dims();
            let values = read_logits(rows)?;
            for (&row, values) in whole.iter().zip(values.chunks_exact(vocab.max(1))) {
                readouts[row] = Some(Readout::Logits(values.to_vec()));
            }
        }
        #[cfg(feature = "wgpu")]
        if whole.len() < choices.len() {
            let chosen: Vec<usize> = (0..choices.len())
                .filter(|row| whole.binary_search(row).is_err())
                .collect();
            let rows = self.rows_of(&logits, &chosen, choices.len());
            let on_device = self.choose_on_device(rows, chosen.iter().map(|&row| choices[row]))?;
            for (row, readout) in chosen.into_iter().zip(on_device) {
                readouts[row] = Some(readout);
            }
        }
        Ok(readouts
            .into_iter()
            .map(|readout| readout.expect("every row is read"))
            .collect())
    }

    /// The rows `wanted` (ascending) of `logits`, which has `rows` rows.
    fn rows_of(&self, logits: &Tensor<2>, wanted: &[usize], rows: usize) -> Tensor<2> {
        if wanted.len() == rows {
            return logits.clone();
        }
        let indices = wanted.iter().map(|&row| row as i64).collect();
        let indices = Tensor::from_data(TensorData::new(indices, [wanted.len()]), &self.device);
        logits.clone().select(0, indices)
    }

    /// What the device hands back for `logits`' rows, one choice each, none
    /// [`TokenChoice::FromLogits`]: each row's most likely token where every row is greedy
    /// (one id a row), else each row's best candidates (a greedy one's sampler takes the
    /// best of them).
    #[cfg(feature = "wgpu")]
    fn choose_on_device(
        &self,
        logits: Tensor<2>,
        choices: impl ExactSizeIterator<Item = TokenChoice>,
    ) -> Result<Vec<Readout>, EngineError> {
        use self::device_kernels::{NAN_ROW, best_candidates, best_layout, candidates_for};
        let fault = || {
            EngineError::Model("the forward pass gave NaN logits: a device or kernel fault".into())
        };
        let choices: Vec<TokenChoice> = choices.collect();
        if choices
            .iter()
            .all(|&choice| choice == TokenChoice::MostLikely)
        {
            let tokens = device_kernels::greedy_tokens(logits).into_data();
            let tokens = tokens.iter::<i64>().map(|token| match token {
                NAN_ROW => Err(fault()),
                token => Ok(token as u32),
            });
            return Ok(tokens.map(Readout::Token).collect());
        }
        let temperatures: Vec<f32> = choices
            .iter()
            .map(|choice| match *choice {
                TokenChoice::FromCandidates { temperature } => temperature,
                _ => 1.0,
            })
            .collect();
        let temperatures =
            Tensor::<1>::from_data(TensorData::new(temperatures, [choices.len()]), &self.device);
        let k = candidates_for(logits.dims()[1]);
        let best = read_logits(best_candidates(logits.clone(), temperatures, k))?;
        Ok(best
            .chunks_exact(best_layout::width(k))
            .enumerate()
            .map(|(row, figures)| {
                if figures[best_layout::NAN] != 0.0 {
                    return Readout::Best(Err(fault()));
                }
                let finite = figures[best_layout::FINITE] as usize;
                let values = &figures[best_layout::VALUES..][..k];
                let ids = &figures[best_layout::ids(k)..][..k];
                let candidates: Vec<(u32, f32)> = ids
                    .iter()
                    .zip(values)
                    .take(finite.min(k))
                    .map(|(&id, &value)| (id as u32, value))
                    .collect();
                let row = logits.clone().narrow(0, row, 1);
                let best = BestCandidates::new(
                    candidates,
                    finite <= k,
                    figures[best_layout::SUM] as f64,
                    figures[best_layout::SUM_AT_ONE] as f64,
                    move || read_logits(row),
                );
                Readout::Best(Ok(best))
            })
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
