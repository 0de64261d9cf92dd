//! Loading `--model PATH`: a Hugging Face folder (`hf`) or a GGUF file (`gguf`), told apart
//! by what is on disk, onto the chosen device in the weight plan chosen here, once.

mod gguf;
mod hf;
mod progress;

use std::path::Path;

use burn::module::Param;
use burn::tensor::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::device::{self, Selected};
use crate::model::burn::{BurnModel, ParamMut};
use crate::model::cpu::{self, CpuModel, CpuWeights, Embeddings};
use crate::model::{DeviceModel, Model, ModelConfig};
use crate::quant::BlockMatrix;
use crate::{EngineError, LoadOptions, WeightFormat};

/// A loaded checkpoint: everything needed to run it.
pub struct Checkpoint {
    pub config: ModelConfig,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    /// A name for the model (from the checkpoint, else the folder or file stem).
    pub id: String,
    pub format: Format,
    /// Where it runs, as `/info` says it: `CPU-0`, `GPU-0`, ...
    pub device_name: String,
}

#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

pub fn load_error(path: &Path, reason: String) -> EngineError {
    EngineError::Load {
        path: path.to_owned(),
        reason,
    }
}

/// Longest context a model may declare: beyond any published model (10M positions at most
/// today), and what `/info` reports fits a u32.
pub const MAX_CONTEXT_LENGTH: usize = 1 << 24;
/// Largest vocabulary a model may declare (the largest published ones have ~262k tokens).
pub const MAX_VOCAB_SIZE: usize = 1 << 24;

/// What a checkpoint's files hold, from their headers, before anything is allocated.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stored {
    pub tensors: u64,
    /// Elements of every tensor together.
    pub elements: u64,
}

/// Checks a model's declared shape against what its files hold, before anything of that
/// shape is allocated. Every tensor the config implies must be in the files, so the count
/// and total size of the implied tensors cannot exceed the stored ones: a config (GGUF
/// metadata or `config.json`) declaring, say, 2^40 vocabulary entries, a million layers or
/// heads is a load error naming the value, where it used to become an allocation of that
/// size (an abort) in the layers' constructors.
pub(crate) fn check_config_fits(config: &ModelConfig, stored: Stored) -> Result<(), String> {
    if config.max_position_embeddings > MAX_CONTEXT_LENGTH {
        return Err(format!(
            "context length {} is beyond any model (at most {MAX_CONTEXT_LENGTH})",
            config.max_position_embeddings
        ));
    }
    if config.vocab_size > MAX_VOCAB_SIZE {
        return Err(format!(
            "vocabulary size {} is beyond any model (at most {MAX_VOCAB_SIZE})",
            config.vocab_size
        ));
    }
    // Position tables (cos and sin per position and head dimension, on the device path) grow
    // with the context: held to the size of the weights, so a tiny model cannot declare a
    // context whose tables outweigh it. Real models are far inside this (Llama 3.1 8B:
    // 131072 × 128 positions·dims for 8 G weights; SmolLM2-135M: 8192 × 64 for 135 M).
    let positions = (config.max_position_embeddings as u64).saturating_mul(config.head_dim as u64);
    if positions > stored.elements {
        return Err(format!(
            "context length {} × head dim {} is more than the checkpoint's {} weights: the \
             position tables would outweigh the model",
            config.max_position_embeddings, config.head_dim, stored.elements
        ));
    }
    let too_big = || {
        format!(
            "the config ({} layers, hidden size {}, {} heads of {}, {} kv heads, MLP {}, \
             vocabulary {}) implies more weights than the checkpoint holds ({} tensors, {} \
             elements)",
            config.num_layers,
            config.hidden_size,
            config.num_heads,
            config.head_dim,
            config.num_kv_heads,
            config.intermediate_size,
            config.vocab_size,
            stored.tensors,
            stored.elements
        )
    };
    let per_layer_tensors = if config.attention_bias { 12 } else { 9 };
    let tensors = (config.num_layers as u64)
        .checked_mul(per_layer_tensors)
        .and_then(|t| t.checked_add(2 + u64::from(!config.tie_word_embeddings)));
    if !matches!(tensors, Some(t) if t <= stored.tensors) {
        return Err(too_big());
    }
    if implied_elements(config).is_none_or(|elements| elements > stored.elements) {
        return Err(too_big());
    }
    Ok(())
}

/// Elements of every tensor `config` implies (checked: `None` on overflow).
fn implied_elements(c: &ModelConfig) -> Option<u64> {
    let mul = |a: usize, b: usize| (a as u64).checked_mul(b as u64);
    let h = c.hidden_size;
    let q = mul(c.num_heads, c.head_dim)?;
    let kv = mul(c.num_kv_heads, c.head_dim)?;
    let attention = q
        .checked_add(kv.checked_mul(2)?)?
        .checked_mul(h as u64)?
        .checked_add(q.checked_mul(h as u64)?)?;
    let mlp = mul(h, c.intermediate_size)?.checked_mul(3)?;
    let bias = if c.attention_bias {
        q.checked_add(kv.checked_mul(2)?)?
    } else {
        0
    };
    let layer = attention
        .checked_add(mlp)?
        .checked_add(bias)?
        .checked_add(2 * h as u64)?;
    let embeddings =
        mul(c.vocab_size, h)?.checked_mul(if c.tie_word_embeddings { 1 } else { 2 })?;
    layer
        .checked_mul(c.num_layers as u64)?
        .checked_add(embeddings)?
        .checked_add(h as u64)
}

/// Which kind of checkpoint a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    HfFolder,
    Gguf,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::HfFolder => "hf",
            Format::Gguf => "gguf",
        }
    }

    pub fn detect(path: &Path) -> Result<Format, EngineError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| load_error(path, format!("no such model file or folder ({e})")))?;
        if meta.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(Format::HfFolder);
            }
            return Err(load_error(
                path,
                "folder has no config.json (expected a Hugging Face model folder)".into(),
            ));
        }
        let mut magic = [0u8; 4];
        use std::io::Read;
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map_err(|e| load_error(path, format!("cannot read ({e})")))?;
        if &magic == b"GGUF" {
            Ok(Format::Gguf)
        } else {
            Err(load_error(
                path,
                "not a GGUF file (bad magic) and not a model folder".into(),
            ))
        }
    }
}

/// How the weights are held, decided once per load from the device, the requested format
/// and the model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightPlan {
    /// Burn tensors of this dtype on the device.
    Burn(DType),
    /// Block weights in host memory (`model::cpu`): decoding on a CPU is bound by the bytes
    /// each token reads, and blocks are 4× (Q8_0) to 6.4× (Q4_1) fewer than f32.
    CpuBlocks,
}

impl WeightPlan {
    pub fn choose(format: WeightFormat, device: &Selected, config: &ModelConfig) -> Self {
        match format {
            WeightFormat::F32 => WeightPlan::Burn(DType::F32),
            // f16 halves the bytes each decode step reads, and GPUs multiply f16 natively;
            // an adapter without f16 shaders (wgpu's SHADER_F16) computes in f32.
            WeightFormat::Auto if device.is_gpu => {
                if device.device.supports_dtype(DType::F16) {
                    tracing::info!("f16 weights on the GPU");
                    WeightPlan::Burn(DType::F16)
                } else {
                    tracing::info!("the GPU has no f16 arithmetic: f32 weights");
                    WeightPlan::Burn(DType::F32)
                }
            }
            WeightFormat::Auto if cpu::fits(config) => WeightPlan::CpuBlocks,
            WeightFormat::Auto => {
                tracing::info!("matrix widths are not whole 32-blocks: f32 weights on the CPU");
                WeightPlan::Burn(DType::F32)
            }
        }
    }
}

/// Loads `path` as `options` say.
pub fn load(path: &Path, options: &LoadOptions) -> Result<Checkpoint, EngineError> {
    let format = Format::detect(path)?;
    tracing::info!(path = %path.display(), format = format.name(), "loading model");
    let device = device::select(options.device)?;
    match format {
        Format::HfFolder => hf::load(path, options.weights, &device),
        Format::Gguf => gguf::load(path, options.weights, &device),
    }
}

/// The Burn form of `model` (filled with f32 weights) for `plan`: cast for the device, or
/// moved into blocks for the CPU layers.
pub(crate) fn finish_burn_model(
    model: BurnModel,
    config: &ModelConfig,
    plan: WeightPlan,
    device: &Device,
) -> Result<Model, String> {
    Ok(match plan {
        WeightPlan::Burn(dtype) => Model::Burn(Box::new(DeviceModel {
            model: model.cast(dtype),
            rope: crate::model::rope::Rope::new(config)
                .tables(config.max_position_embeddings, device),
            device: device.clone(),
        })),
        WeightPlan::CpuBlocks => {
            Model::Cpu(CpuModel::load(config, &mut FromBurn { model, device })?)
        }
    })
}

/// The CPU model's weights taken out of a Burn model one tensor at a time (each replaced by
/// an empty placeholder), so the f32 copy shrinks as the blocks grow: Hugging Face folders
/// load through Burn's safetensors store, then move here.
struct FromBurn<'a> {
    model: BurnModel,
    device: &'a Device,
}

impl FromBurn<'_> {
    fn take(&mut self, name: &str) -> Result<Vec<f32>, String> {
        let device = self.device;
        let bias = name
            .strip_suffix(".bias")
            .map(|base| format!("{base}.weight"));
        let wanted = bias.as_deref().unwrap_or(name);
        let param = self
            .model
            .named_params_mut()
            .into_iter()
            .find(|(n, _)| n == wanted)
            .map(|(_, p)| p)
            .ok_or_else(|| format!("no tensor `{name}` in the model"))?;
        let taken = match (param, bias.is_some()) {
            (ParamMut::Proj(proj), true) => {
                let bias = proj
                    .bias
                    .as_mut()
                    .ok_or_else(|| format!("`{name}` is not in the model"))?;
                take_values(bias, device)
            }
            (ParamMut::Proj(proj), false) => take_values(&mut proj.weight, device),
            (ParamMut::Matrix(p), _) => take_values(p, device),
            (ParamMut::Vector(p), _) => take_values(p, device),
        };
        taken.map_err(|e| format!("`{name}`: {e}"))
    }
}

/// `param`'s values as f32, leaving an empty placeholder in its place.
fn take_values<const D: usize>(
    param: &mut Param<Tensor<D>>,
    device: &Device,
) -> Result<Vec<f32>, String> {
    let empty = Param::from_tensor(Tensor::zeros([1; D], device));
    std::mem::replace(param, empty)
        .val()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| format!("{e:?}"))
}

impl CpuWeights for FromBurn<'_> {
    fn blocks(&mut self, name: &str, rows: usize, cols: usize) -> Result<BlockMatrix, String> {
        let values = self.take(name)?;
        BlockMatrix::quantize(&values, rows, cols)
            .ok_or_else(|| format!("`{name}` is not [{rows}, {cols}] in whole blocks"))
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, String> {
        let values = self.take(name)?;
        if values.len() != len {
            return Err(format!(
                "`{name}` has {} values, expected {len}",
                values.len()
            ));
        }
        Ok(values)
    }

    fn embeddings(&mut self, vocab: usize, hidden: usize) -> Result<Embeddings, String> {
        let table = self.take("model.embed_tokens.weight")?;
        if table.len() != vocab * hidden {
            return Err(format!(
                "the embedding table has {} values, expected {vocab} × {hidden}",
                table.len()
            ));
        }
        Ok(Embeddings::F32 { table, hidden })
    }
}
