//! Loading a single GGUF file through the `gguf` module: metadata → config, tensors
//! dequantized to f32 (then converted to the chosen weight format), llama.cpp's q/k row
//! permutation undone, and the tokenizer built from the embedded vocabulary.

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};

use std::sync::Arc;

use crate::EngineError;
use crate::config::ModelConfig;
use crate::gguf::{GgmlType, GgufFile, RawTensor, hf_to_gguf, unpermute_qk};
use crate::loader::{Loaded, SpecialTokens, load_error};
use crate::model::{Llama, ParamMut, Rope};
use crate::progress::Progress;
use crate::quant::Q8Matrix;

/// `keep_quantized`: hand Q4_1 / Q8_0 projection weights to the CPU kernel as they are
/// (no f32 round trip, no requantization), for the CPU's default weight format.
pub fn load(path: &Path, device: &Device, keep_quantized: bool) -> Result<Loaded, EngineError> {
    let err = |reason: String| load_error(path, reason);
    let file = GgufFile::open(path).map_err(|e| err(e.to_string()))?;
    let g = file.model_config().map_err(|e| err(e.to_string()))?;
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
    config.validate().map_err(err)?;
    if let Some(dims) = g.rope_dimension_count
        && dims != config.head_dim
    {
        return Err(err(format!(
            "partial RoPE ({dims} of {} head dims) is not supported",
            config.head_dim
        )));
    }

    // With the CPU's block format, a tied embedding matrix stored as Q4_1/Q8_0 serves both as
    // the output projection and, row by row, as the embedding lookup (`Llama::forward`),
    // so its f32 copy (113 MB for SmolLM2) is never made. Only where the host layers will
    // run, which needs every projection width in whole 32-value blocks.
    let embeddings_in_blocks = keep_quantized
        && config.tie_word_embeddings
        && [
            config.hidden_size,
            config.num_heads * config.head_dim,
            config.intermediate_size,
        ]
        .iter()
        .all(|w| w.is_multiple_of(crate::quant::BLOCK))
        && matches!(
            file.raw_tensor("token_embd.weight").map(|t| t.ggml_type()),
            Ok(GgmlType::Q4_1 | GgmlType::Q8_0)
        );

    let mut model = Llama::new(&config, device);
    let params = model.named_params_mut();
    let progress = Progress::new("loading gguf tensors", params.len() as u64);
    for (hf_name, param) in params {
        if embeddings_in_blocks && hf_name == "model.embed_tokens.weight" {
            progress.inc(1);
            continue;
        }
        // A projection's bias (Qwen2's q/k/v) travels with it.
        let param = match param {
            ParamMut::Proj(proj) => {
                if let Some(bias) = &mut proj.bias {
                    let bias_name = hf_name.replace(".weight", ".bias");
                    load_vector(&file, &bias_name, bias, device).map_err(err)?;
                }
                ParamMut::Proj(proj)
            }
            other => other,
        };
        let name = hf_to_gguf(&hf_name)
            .ok_or_else(|| err(format!("no GGUF name for tensor `{hf_name}`")))?;
        if !file.has_tensor(&name) {
            return Err(err(format!("tensor `{name}` is missing")));
        }
        let permuted_heads = if !g.qk_permuted {
            None
        } else if name.contains(".attn_q.") {
            Some(config.num_heads)
        } else if name.contains(".attn_k.") {
            Some(config.num_kv_heads)
        } else {
            None
        };
        let raw = file.raw_tensor(&name).map_err(|e| err(e.to_string()))?;
        let shape = raw.shape();
        if let Some(heads) = permuted_heads
            && !shape[0].is_multiple_of(2 * heads)
        {
            return Err(err(format!(
                "`{name}` has {} rows for {heads} heads",
                shape[0]
            )));
        }
        let param = match param {
            ParamMut::Proj(proj) if keep_quantized => {
                let [rows, cols]: [usize; 2] = proj.weight.shape().dims();
                let want = vec![rows, cols];
                match native_blocks(&raw, permuted_heads) {
                    Some(q) if shape == want => {
                        proj.q8 = Some(Arc::new(q));
                        proj.weight = Param::from_tensor(Tensor::zeros([1, 1], device));
                        progress.inc(1);
                        continue;
                    }
                    _ => ParamMut::Matrix(&mut proj.weight),
                }
            }
            ParamMut::Proj(proj) => ParamMut::Matrix(&mut proj.weight),
            other => other,
        };
        let mut t = file.tensor_f32(&name).map_err(|e| err(e.to_string()))?;
        if let Some(heads) = permuted_heads {
            let rows = t.shape[0];
            let cols = t.data.len() / rows.max(1);
            unpermute_qk(&mut t.data, rows, cols, heads);
        }
        match param {
            ParamMut::Proj(_) => unreachable!("projections were turned into matrices above"),
            ParamMut::Matrix(p) => {
                let [rows, cols]: [usize; 2] = p.shape().dims();
                let want = vec![rows, cols];
                if t.shape != want {
                    return Err(err(format!(
                        "`{name}` has shape {:?}, the config implies {want:?}",
                        t.shape
                    )));
                }
                let data = TensorData::new(t.data, [want[0], want[1]]);
                *p = Param::from_tensor(Tensor::from_data(data, device));
            }
            ParamMut::Vector(p) => load_vector(&file, &hf_name, p, device).map_err(err)?,
        }
        progress.inc(1);
    }
    progress.finish();
    if keep_quantized && config.tie_word_embeddings {
        let raw = file
            .raw_tensor("token_embd.weight")
            .map_err(|e| err(e.to_string()))?;
        model.tied_q8 = native_blocks(&raw, None).map(Arc::new);
    }
    if embeddings_in_blocks {
        model.model.embed_tokens.weight = Param::from_tensor(Tensor::zeros([1, 1], device));
        model.embeddings_in_blocks = true;
    }

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
    let rope = Rope::new(&config, device);
    Ok(Loaded {
        config,
        model,
        rope,
        tokenizer,
        special,
        id,
    })
}

/// A Q4_1 or Q8_0 matrix as blocks for the CPU kernel (q/k rows un-permuted on the raw
/// bytes: blocks never straddle rows); `None` for other types.
fn native_blocks(raw: &RawTensor<'_>, permuted_heads: Option<usize>) -> Option<Q8Matrix> {
    let shape = raw.shape();
    let [rows, cols] = shape[..] else { return None };
    let mut bytes = raw.data.to_vec();
    if let Some(heads) = permuted_heads {
        let row_bytes = bytes.len() / rows.max(1);
        unpermute_qk(&mut bytes, rows, row_bytes, heads);
    }
    match raw.ggml_type() {
        GgmlType::Q4_1 => Q8Matrix::from_q4_1(&bytes, rows, cols),
        GgmlType::Q8_0 => Q8Matrix::from_q8_0(&bytes, rows, cols),
        _ => None,
    }
}

/// Loads the 1-D tensor `hf_name` (a norm weight or a bias) into `param`.
fn load_vector(
    file: &GgufFile,
    hf_name: &str,
    param: &mut Param<Tensor<1>>,
    device: &Device,
) -> Result<(), String> {
    let name = hf_to_gguf(hf_name).ok_or_else(|| format!("no GGUF name for `{hf_name}`"))?;
    let t = file.tensor_f32(&name).map_err(|e| e.to_string())?;
    let [want]: [usize; 1] = param.shape().dims();
    if t.shape != [want] {
        return Err(format!(
            "`{name}` has shape {:?}, the config implies [{want}]",
            t.shape
        ));
    }
    *param = Param::from_tensor(Tensor::from_data(TensorData::new(t.data, [want]), device));
    Ok(())
}
