//! Loading a single GGUF file through the `gguf` module: metadata → config, tensors
//! dequantized to f32 (then converted to the chosen weight format), llama.cpp's q/k row
//! permutation undone, and the tokenizer built from the embedded vocabulary.

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};

use crate::EngineError;
use crate::config::ModelConfig;
use crate::gguf::{GgufFile, hf_to_gguf, unpermute_qk};
use crate::loader::{Loaded, SpecialTokens, load_error};
use crate::model::{Llama, ParamMut, Rope};
use crate::progress::Progress;

pub fn load(path: &Path, device: &Device) -> Result<Loaded, EngineError> {
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

    let mut model = Llama::new(&config, device);
    let params = model.named_params_mut();
    let progress = Progress::new("loading gguf tensors", params.len() as u64);
    for (hf_name, param) in params {
        let name = hf_to_gguf(&hf_name)
            .ok_or_else(|| err(format!("no GGUF name for tensor `{hf_name}`")))?;
        if !file.has_tensor(&name) {
            return Err(err(format!("tensor `{name}` is missing")));
        }
        let mut t = file.tensor_f32(&name).map_err(|e| err(e.to_string()))?;
        if g.qk_permuted {
            let heads = if name.contains(".attn_q.") {
                Some(config.num_heads)
            } else if name.contains(".attn_k.") {
                Some(config.num_kv_heads)
            } else {
                None
            };
            if let Some(heads) = heads {
                let rows = t.shape[0];
                let cols = t.data.len() / rows.max(1);
                if rows % (2 * heads) != 0 {
                    return Err(err(format!("`{name}` has {rows} rows for {heads} heads")));
                }
                unpermute_qk(&mut t.data, rows, cols, heads);
            }
        }
        match param {
            ParamMut::Matrix(p) => {
                let want = p.val().dims().to_vec();
                if t.shape != want {
                    return Err(err(format!(
                        "`{name}` has shape {:?}, the config implies {want:?}",
                        t.shape
                    )));
                }
                let data = TensorData::new(t.data, [want[0], want[1]]);
                *p = Param::from_tensor(Tensor::from_data(data, device));
            }
            ParamMut::Vector(p) => {
                let want = p.val().dims()[0];
                if t.shape != [want] {
                    return Err(err(format!(
                        "`{name}` has shape {:?}, the config implies [{want}]",
                        t.shape
                    )));
                }
                *p = Param::from_tensor(Tensor::from_data(TensorData::new(t.data, [want]), device));
            }
        }
        progress.inc(1);
    }
    progress.finish();

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
