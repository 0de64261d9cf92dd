//! Loading a single GGUF file through the `gguf` module: metadata → config, tensors by their
//! Hugging Face names (llama.cpp's q/k row permutation undone), and the tokenizer built from
//! the embedded vocabulary. For the CPU's block plan the file's Q4_1/Q8_0 matrices are kept
//! as stored (no f32 round trip, no requantization) and others are requantized; for Burn's
//! layers every tensor is dequantized to f32 (then cast for the device).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};

use super::checkpoint::{Checkpoint, Format, SpecialTokens, load_error};
use super::limits::{Stored, check_config_fits};
use super::plan::{WeightPlan, finish_burn_model};
use super::progress::Progress;
use crate::EngineError;
use crate::device::Selected;
use crate::gguf::{GgmlType, GgufFile, GgufModelConfig, RawTensor, hf_to_gguf, unpermute_qk};
use crate::model::burn::{BurnModel, ParamMut};
use crate::model::cpu::{CpuModel, CpuWeights, Embeddings};
use crate::model::{Model, ModelConfig};
use crate::quant::BlockMatrix;

/// A GGUF file whose metadata is read and checked: the model's shape, which the weight plan
/// is chosen from before any tensor is read.
pub struct Header {
    path: PathBuf,
    file: GgufFile,
    /// The metadata in GGUF's terms (tokens, name, llama.cpp's q/k permutation).
    meta: GgufModelConfig,
    pub config: ModelConfig,
}

impl Header {
    /// Opens the file at `path` and reads its model config, checked against its tensors.
    pub fn read(path: &Path) -> Result<Self, EngineError> {
        let err = |reason: String| load_error(path, reason);
        let file = GgufFile::open(path).map_err(|e| err(e.to_string()))?;
        let meta = file.model_config().map_err(|e| err(e.to_string()))?;
        let config = model_config(&file, &meta).map_err(err)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            meta,
            config,
        })
    }

    /// Loads the file's tensors onto `device` in `plan`'s form, and its tokenizer.
    pub fn load(self, plan: WeightPlan, device: &Selected) -> Result<Checkpoint, EngineError> {
        let Header {
            path,
            file,
            meta: g,
            config,
        } = self;
        let err = |reason: String| load_error(&path, reason);
        let mut tensors = Tensors {
            file: &file,
            config: &config,
            qk_permuted: g.qk_permuted,
        };
        let model = match plan {
            WeightPlan::CpuBlocks => {
                Model::Cpu(CpuModel::load(&config, &mut tensors).map_err(err)?)
            }
            WeightPlan::Burn(_) => {
                let model = tensors.burn_model(&device.device).map_err(err)?;
                finish_burn_model(model, &config, plan, &device.device).map_err(err)?
            }
        };

        let tokenizer = file.tokenizer().map_err(|e| err(e.to_string()))?;
        let special = SpecialTokens {
            bos_token: g.bos_token_id.and_then(|id| tokenizer.id_to_token(id)),
            eos_ids: g.eog_token_ids.clone(),
            chat_template: g.chat_template.clone(),
        };
        let id = g.name.clone().unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        Ok(Checkpoint {
            config,
            model,
            tokenizer,
            special,
            id,
            format: Format::Gguf,
            device_name: device.name.clone(),
        })
    }
}

/// The model's shape from the file's metadata, checked.
fn model_config(file: &GgufFile, g: &GgufModelConfig) -> Result<ModelConfig, String> {
    let config = ModelConfig {
        architecture: g.architecture.clone(),
        hidden_size: g.embedding_length,
        intermediate_size: g.feed_forward_length,
        num_layers: g.block_count,
        num_heads: g.head_count,
        num_kv_heads: g.head_count_kv,
        head_dim: g.head_dim(),
        vocab_size: g.vocab_size,
        max_position_embeddings: g.context_length,
        rms_norm_eps: g.rms_norm_eps as f64,
        rope_theta: g.rope_freq_base as f64,
        tie_word_embeddings: g.tie_word_embeddings,
        attention_bias: file.has_tensor("blk.0.attn_q.bias"),
    };
    config.validate()?;
    let stored = file
        .tensors()
        .iter()
        .fold(Stored::default(), |s, t| Stored {
            tensors: s.tensors + 1,
            elements: s.elements.saturating_add(t.n_elements()),
        });
    check_config_fits(&config, stored)?;
    if let Some(dims) = g.rope_dimension_count
        && dims != config.head_dim
    {
        return Err(format!(
            "partial RoPE ({dims} of {} head dims) is not supported",
            config.head_dim
        ));
    }
    Ok(config)
}

/// The file's tensors by Hugging Face name.
struct Tensors<'a> {
    file: &'a GgufFile,
    config: &'a ModelConfig,
    /// llama.cpp's converter permuted q/k rows (Llama-family architectures).
    qk_permuted: bool,
}

impl Tensors<'_> {
    /// `hf_name`'s tensor in the file, and the heads its rows are permuted over, if any.
    fn raw(&self, hf_name: &str) -> Result<(String, RawTensor<'_>, Option<usize>), String> {
        let name =
            hf_to_gguf(hf_name).ok_or_else(|| format!("no GGUF name for tensor `{hf_name}`"))?;
        if !self.file.has_tensor(&name) {
            return Err(format!("tensor `{name}` is missing"));
        }
        let raw = self.file.raw_tensor(&name).map_err(|e| e.to_string())?;
        let heads = if !self.qk_permuted {
            None
        } else if name.contains(".attn_q.") {
            Some(self.config.num_heads)
        } else if name.contains(".attn_k.") {
            Some(self.config.num_kv_heads)
        } else {
            None
        };
        if let Some(heads) = heads
            && !raw.shape()[0].is_multiple_of(2 * heads)
        {
            return Err(format!(
                "`{name}` has {} rows for {heads} heads",
                raw.shape()[0]
            ));
        }
        Ok((name, raw, heads))
    }

    /// `hf_name` dequantized to f32 in PyTorch order, checked against `shape`.
    fn f32(&self, hf_name: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        let (name, _, heads) = self.raw(hf_name)?;
        let mut t = self.file.tensor_f32(&name).map_err(|e| e.to_string())?;
        if t.shape != shape {
            return Err(format!(
                "`{name}` has shape {:?}, the config implies {shape:?}",
                t.shape
            ));
        }
        if let Some(heads) = heads {
            let rows = t.shape[0];
            let cols = t.data.len() / rows.max(1);
            unpermute_qk(&mut t.data, rows, cols, heads);
        }
        Ok(t.data)
    }

    /// Burn's layers filled with every tensor as f32.
    fn burn_model(&self, device: &Device) -> Result<BurnModel, String> {
        let mut model = BurnModel::new(self.config, device);
        let params = model.named_params_mut();
        let progress = Progress::new("loading gguf tensors", params.len() as u64);
        for (hf_name, param) in params {
            match param {
                ParamMut::Proj(proj) => {
                    // A projection's bias (Qwen2's q/k/v) travels with it.
                    if let Some(bias) = &mut proj.bias {
                        let bias_name = hf_name.replace(".weight", ".bias");
                        let shape: [usize; 1] = bias.shape().dims();
                        set(bias, self.f32(&bias_name, &shape)?, device);
                    }
                    let shape: [usize; 2] = proj.weight.shape().dims();
                    set(&mut proj.weight, self.f32(&hf_name, &shape)?, device);
                }
                ParamMut::Matrix(p) => {
                    let shape: [usize; 2] = p.shape().dims();
                    set(p, self.f32(&hf_name, &shape)?, device);
                }
                ParamMut::Vector(p) => {
                    let shape: [usize; 1] = p.shape().dims();
                    set(p, self.f32(&hf_name, &shape)?, device);
                }
            }
            progress.inc(1);
        }
        progress.finish();
        Ok(model)
    }
}

/// Replaces `param` with `values` (whose count the caller checked against its shape).
fn set<const D: usize>(param: &mut Param<Tensor<D>>, values: Vec<f32>, device: &Device) {
    let data = TensorData::new(values, param.shape());
    *param = Param::from_tensor(Tensor::from_data(data, device));
}

impl CpuWeights for Tensors<'_> {
    fn blocks(&mut self, name: &str, rows: usize, cols: usize) -> Result<BlockMatrix, String> {
        let (gguf_name, raw, heads) = self.raw(name)?;
        if raw.shape() != [rows, cols] {
            return Err(format!(
                "`{gguf_name}` has shape {:?}, the config implies [{rows}, {cols}]",
                raw.shape()
            ));
        }
        if let Some(blocks) = native_blocks(&raw, heads) {
            return Ok(blocks);
        }
        let values = self.f32(name, &[rows, cols])?;
        BlockMatrix::quantize(&values, rows, cols)
            .ok_or_else(|| format!("`{gguf_name}` is not whole blocks"))
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, String> {
        self.f32(name, &[len])
    }

    fn embeddings(&mut self, vocab: usize, hidden: usize) -> Result<Embeddings, String> {
        let name = "model.embed_tokens.weight";
        let (_, raw, _) = self.raw(name)?;
        match native_blocks(&raw, None) {
            Some(table) if raw.shape() == [vocab, hidden] => {
                Ok(Embeddings::Blocks(Arc::new(table)))
            }
            _ => Ok(Embeddings::F32 {
                table: self.f32(name, &[vocab, hidden])?,
                hidden,
            }),
        }
    }
}

/// A Q4_1 or Q8_0 matrix as blocks for the CPU kernel (q/k rows un-permuted on the raw
/// bytes: blocks never straddle rows); `None` for other types.
fn native_blocks(raw: &RawTensor<'_>, permuted_heads: Option<usize>) -> Option<BlockMatrix> {
    let shape = raw.shape();
    let [rows, cols] = shape[..] else { return None };
    let ty = raw.ggml_type();
    if !matches!(ty, GgmlType::Q4_1 | GgmlType::Q8_0) {
        return None;
    }
    let mut bytes = raw.data.to_vec();
    if let Some(heads) = permuted_heads {
        let row_bytes = bytes.len() / rows.max(1);
        unpermute_qk(&mut bytes, rows, row_bytes, heads);
    }
    match ty {
        GgmlType::Q4_1 => BlockMatrix::from_q4_1(&bytes, rows, cols),
        _ => BlockMatrix::from_q8_0(&bytes, rows, cols),
    }
}
