//! What a checkpoint may declare: its config checked against the tensors its files hold,
//! before anything of the declared shape is allocated.

use crate::model::ModelConfig;

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
