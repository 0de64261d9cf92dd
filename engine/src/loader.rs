//! `--model PATH`: a Hugging Face folder or a GGUF file, told apart by what is on disk.

use std::path::Path;

use burn::module::Param;
use burn::tensor::{DType, Tensor};
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::model::{DecoderLayer, Llama, Rope};
use crate::{EngineError, WeightFormat};

/// A model in memory with everything needed to run it.
pub struct Loaded {
    pub config: ModelConfig,
    pub model: Llama,
    pub rope: Rope,
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    /// A name for the model (folder or file stem).
    pub id: String,
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

/// Which kind of checkpoint `path` is.
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
    let read = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| load_error(path, format!("cannot read ({e})")));
    match read {
        Ok(()) if &magic == b"GGUF" => Ok(Format::Gguf),
        Ok(()) => Err(load_error(
            path,
            "not a GGUF file (bad magic) and not a model folder".into(),
        )),
        Err(e) => Err(e),
    }
}

/// Puts the projection weights in the chosen in-memory format. Norms and biases stay f32:
/// they are tiny and precision-sensitive.
pub fn convert_weights(model: &mut Llama, format: WeightFormat, is_gpu: bool) {
    let dtype = match format {
        // f16 halves the bytes each decode step reads, and GPUs multiply f16 natively.
        WeightFormat::Auto if is_gpu => DType::F16,
        // On the CPU the projections become Q8_0 below; what stays in Burn is f32.
        _ => DType::F32,
    };
    let cast2 = |p: &mut Param<Tensor<2>>, dtype: DType| {
        let t = p.val();
        if t.dtype() != dtype {
            *p = Param::from_tensor(t.cast(dtype));
        }
    };
    let cast1 = |p: &mut Param<Tensor<1>>| {
        let t = p.val();
        if t.dtype() != DType::F32 {
            *p = Param::from_tensor(t.cast(DType::F32));
        }
    };
    cast2(&mut model.model.embed_tokens.weight, dtype);
    cast1(&mut model.model.norm.gamma);
    if let Some(head) = &mut model.lm_head {
        cast2(&mut head.weight, dtype);
    }
    for layer in &mut model.model.layers {
        cast1(&mut layer.input_layernorm.gamma);
        cast1(&mut layer.post_attention_layernorm.gamma);
        for (_, proj) in DecoderLayer::projections_mut(&mut layer.self_attn, &mut layer.mlp) {
            cast2(&mut proj.weight, dtype);
            if let Some(b) = &mut proj.bias {
                cast1(b);
            }
        }
    }
    if format == WeightFormat::Auto && !is_gpu {
        quantize_q8(model);
        model.host = crate::host_layers::HostLayers::new(model).map(std::sync::Arc::new);
        // The GGUF loader only drops the f32 embedding table when every projection will be
        // in blocks, which is exactly when the host layers exist.
        assert!(
            model.host.is_some() || !model.embeddings_in_blocks,
            "embeddings kept only in blocks need the host layers"
        );
    }
}

/// CPU default: every projection (and a tied output matrix) as Q8_0 blocks for the integer
/// kernel in `quant`; see there for why. The embedding table stays f32 for the lookups.
fn quantize_q8(model: &mut Llama) {
    let mut kept_float = 0;
    for layer in &mut model.model.layers {
        for (_, proj) in DecoderLayer::projections_mut(&mut layer.self_attn, &mut layer.mlp) {
            if proj.q8.is_none() && !proj.quantize_q8() {
                kept_float += 1;
            }
        }
    }
    match &mut model.lm_head {
        Some(head) => {
            if head.q8.is_none() && !head.quantize_q8() {
                kept_float += 1;
            }
        }
        None if model.tied_q8.is_some() => {}
        None => {
            let w = model.model.embed_tokens.weight.val();
            let [rows, cols] = w.dims();
            if let Ok(values) = w.into_data().convert::<f32>().try_to_vec::<f32>() {
                model.tied_q8 =
                    crate::quant::Q8Matrix::quantize(&values, rows, cols).map(std::sync::Arc::new);
            }
            if model.tied_q8.is_none() {
                kept_float += 1;
            }
        }
    }
    if kept_float > 0 {
        tracing::info!(
            kept_float,
            "matrices whose rows are not whole 32-blocks stay f32"
        );
    }
}
