//! Model hyper-parameters and tokenizer ids from GGUF metadata, under llama.cpp's key names
//! (`{arch}.embedding_length`, `tokenizer.ggml.eos_token_id`, ...).

use super::error::Result;
use super::permute::needs_qk_unpermute;
use super::reader::GgufFile;

/// Token spellings llama.cpp treats as end-of-generation when the file marks them as control.
const EOG_SPELLINGS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
];

/// What a Llama-family loader needs from the metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufModelConfig {
    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub architecture: String,
    /// `general.name`, if present.
    pub name: Option<String>,
    pub context_length: usize,
    /// Hidden size.
    pub embedding_length: usize,
    /// Number of decoder layers.
    pub block_count: usize,
    /// MLP intermediate size.
    pub feed_forward_length: usize,
    pub head_count: usize,
    /// Defaults to `head_count` (no GQA) when absent, as in llama.cpp.
    pub head_count_kv: usize,
    /// Defaults to 10000, llama.cpp's default.
    pub rope_freq_base: f32,
    /// `{arch}.attention.key_length`: the head dimension when the file states it (models whose
    /// heads are not `embedding_length / head_count`, e.g. Qwen3, Gemma).
    pub key_length: Option<usize>,
    /// `{arch}.rope.dimension_count` (rotary dims per head), if present.
    pub rope_dimension_count: Option<usize>,
    pub rms_norm_eps: f32,
    /// `{arch}.vocab_size`, else the length of `tokenizer.ggml.tokens`, else the embedding rows.
    pub vocab_size: usize,
    /// True when the file has no `output.weight`: the LM head reuses `token_embd.weight`.
    pub tie_word_embeddings: bool,
    /// True when q/k rows are stored permuted for ggml's rope; see [`super::unpermute_qk`].
    pub qk_permuted: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// End-of-turn (`tokenizer.ggml.eot_token_id`), e.g. `<|im_end|>` or `<|eot_id|>`.
    pub eot_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// Whether prompts start with BOS (`tokenizer.ggml.add_bos_token`; llama.cpp defaults it
    /// to true for SentencePiece vocabularies and false for byte-level BPE).
    pub add_bos_token: bool,
    pub chat_template: Option<String>,
    /// Ids that end generation (llama.cpp's "EOG" set): EOS, EOT, and any control token spelled
    /// like a known end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, ...), since
    /// many files (SmolLM2's among them) set only EOS. Sorted, without duplicates.
    pub eog_token_ids: Vec<u32>,
}

impl GgufModelConfig {
    /// Head dimension: `attention.key_length` if stated, else `embedding_length / head_count`.
    pub fn head_dim(&self) -> usize {
        self.key_length
            .unwrap_or(self.embedding_length / self.head_count.max(1))
    }
}

impl GgufFile {
    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.metadata().get_str("general.architecture")
    }

    /// The model's hyper-parameters and special token ids.
    pub fn model_config(&self) -> Result<GgufModelConfig> {
        let md = self.metadata();
        let arch = md.get_str("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let usize_key = |k: &str| md.get::<usize>(&key(k));

        let head_count = usize_key("attention.head_count")?;
        let vocab_size = match md.get_opt::<usize>(&key("vocab_size"))? {
            Some(v) => v,
            None => match md.value("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
                Some(tokens) => tokens.len(),
                None => self
                    .tensor_info("token_embd.weight")?
                    .dims
                    .get(1)
                    .copied()
                    .unwrap_or(0) as usize,
            },
        };
        let tokenizer_model = md.get_opt::<&str>("tokenizer.ggml.model")?;
        let eos_token_id = md.get_opt("tokenizer.ggml.eos_token_id")?;
        let eot_token_id = md.get_opt("tokenizer.ggml.eot_token_id")?;
        let mut eog_token_ids: Vec<u32> = [eos_token_id, eot_token_id]
            .into_iter()
            .flatten()
            .chain(md.get_opt("tokenizer.ggml.eom_token_id")?)
            .collect();
        if let Some(tokens) = md.value("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            let types = md
                .value("tokenizer.ggml.token_type")
                .and_then(|v| v.as_array());
            for (id, tok) in tokens.iter().enumerate() {
                let control = types
                    .and_then(|t| t.get(id))
                    .and_then(|t| t.as_int())
                    .is_none_or(|t| t == 3);
                if control && tok.as_str().is_some_and(|t| EOG_SPELLINGS.contains(&t)) {
                    eog_token_ids.push(id as u32);
                }
            }
        }
        eog_token_ids.sort_unstable();
        eog_token_ids.dedup();
        let add_bos_default = tokenizer_model == Some("llama");

        Ok(GgufModelConfig {
            name: md.get_opt::<&str>("general.name")?.map(str::to_string),
            context_length: usize_key("context_length")?,
            embedding_length: usize_key("embedding_length")?,
            block_count: usize_key("block_count")?,
            feed_forward_length: usize_key("feed_forward_length")?,
            head_count,
            head_count_kv: md
                .get_opt::<usize>(&key("attention.head_count_kv"))?
                .unwrap_or(head_count),
            rope_freq_base: md.get_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            key_length: md.get_opt(&key("attention.key_length"))?,
            rope_dimension_count: md.get_opt(&key("rope.dimension_count"))?,
            rms_norm_eps: md.get(&key("attention.layer_norm_rms_epsilon"))?,
            vocab_size,
            tie_word_embeddings: !self.has_tensor("output.weight"),
            qk_permuted: needs_qk_unpermute(&arch),
            bos_token_id: md.get_opt("tokenizer.ggml.bos_token_id")?,
            eos_token_id,
            eot_token_id,
            pad_token_id: md.get_opt("tokenizer.ggml.padding_token_id")?,
            add_bos_token: md
                .get_opt("tokenizer.ggml.add_bos_token")?
                .unwrap_or(add_bos_default),
            chat_template: md
                .get_opt::<&str>("tokenizer.chat_template")?
                .map(str::to_string),
            eog_token_ids,
            architecture: arch,
        })
    }
}
