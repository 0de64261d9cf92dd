//! GGUF (llama.cpp's model format, v2 and v3): a memory-mapped reader with typed metadata,
//! tensor access (raw bytes or dequantized f32 in PyTorch order), the q/k un-permutation, model
//! hyper-parameters, GGUF → Hugging Face tensor names, and the embedded tokenizer.
//!
//! ```no_run
//! use rbee_engine::gguf::{GgufFile, gguf_to_hf, unpermute_qk};
//! # fn main() -> Result<(), rbee_engine::gguf::GgufError> {
//! let file = GgufFile::open("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let cfg = file.model_config()?;
//! for info in file.tensors() {
//!     let mut t = file.tensor_f32(&info.name)?; // row-major, t.shape like PyTorch
//!     let hf = gguf_to_hf(&info.name);          // "model.layers.0.self_attn.q_proj.weight"
//!     if cfg.qk_permuted && info.name.ends_with("attn_q.weight") {
//!         unpermute_qk(&mut t.data, t.shape[0], t.shape[1], cfg.head_count);
//!     }
//!     # let _ = hf;
//! }
//! let tokenizer = file.tokenizer()?; // tokenizers::Tokenizer
//! # let _ = tokenizer; Ok(()) }
//! ```

mod dequant;
mod error;
mod ggml_type;
mod metadata;
mod model;
mod names;
mod permute;
mod reader;
mod tokenizer;

pub use dequant::{
    DequantError, dequantize, dequantize_bf16, dequantize_f16, dequantize_f32, dequantize_q2_k,
    dequantize_q3_k, dequantize_q4_0, dequantize_q4_1, dequantize_q4_k, dequantize_q5_0,
    dequantize_q5_1, dequantize_q5_k, dequantize_q6_k, dequantize_q8_0, dequantize_to_vec,
    split_q8_0,
};
pub use error::{GgufError, Result};
pub use ggml_type::{GgmlType, QK_K};
pub use metadata::{FromValue, Metadata, Value, ValueType};
pub use model::GgufModelConfig;
pub use names::{gguf_to_hf, hf_to_gguf};
pub use permute::{needs_qk_unpermute, permute_qk, unpermute_qk};
pub use reader::{F32Tensor, GgufFile, RawTensor, TensorInfo};
pub use tokenizer::tokenizer_from_metadata;
