//! The model's shape, read from a Hugging Face `config.json` or from GGUF metadata.

use serde::Deserialize;

/// Everything the forward pass needs to know about a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// "llama", "qwen2", ... (HF `model_type`, GGUF `general.architecture`).
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// The output projection reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
}

/// Architectures whose forward pass is the one in `model` (Llama-family decoders).
pub const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "smollm"];

impl ModelConfig {
    /// Bytes of KV cache one position takes (keys and values of every layer, f32).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.num_layers * self.num_kv_heads * self.head_dim * 2 * 4
    }

    /// Checks the numbers fit together, so a bad config is a load error rather than a
    /// shape panic deep inside the forward pass.
    pub fn validate(&self) -> Result<(), String> {
        if !SUPPORTED.contains(&self.architecture.as_str()) {
            return Err(format!(
                "unsupported architecture `{}` (supported: {})",
                self.architecture,
                SUPPORTED.join(", ")
            ));
        }
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("config value `{name}` is 0"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        Ok(())
    }
}

/// The fields of a Hugging Face `config.json` that matter here; the rest is ignored.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_max_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}

impl HfConfig {
    pub fn into_model_config(self) -> Result<ModelConfig, String> {
        let architecture = match self.model_type.as_deref() {
            Some(t) => t.to_ascii_lowercase(),
            None => match self.architectures.first().map(String::as_str) {
                Some("LlamaForCausalLM") => "llama".into(),
                Some("Qwen2ForCausalLM") => "qwen2".into(),
                Some("MistralForCausalLM") => "mistral".into(),
                Some(other) => other.to_string(),
                None => return Err("config.json names no model_type or architectures".into()),
            },
        };
        // Scaled RoPE variants (llama3, yarn, dynamic NTK) change the frequencies; computing
        // plain RoPE for them would give silently wrong text, so refuse them.
        if let Some(scaling) = &self.rope_scaling
            && !scaling.is_null()
        {
            return Err(format!("rope_scaling {scaling} is not supported"));
        }
        let is_qwen2 = architecture == "qwen2";
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let config = ModelConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            // transformers' default for Llama is tied = false... except that the checkpoint
            // decides in practice: the loader unties when `lm_head.weight` is present.
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            // Qwen2 always has q/k/v biases; Llama has them only when `attention_bias` says so.
            attention_bias: self.attention_bias.unwrap_or(is_qwen2),
            architecture,
        };
        config.validate()?;
        Ok(config)
    }
}
