//! A `tokenizers::Tokenizer` rebuilt from GGUF metadata, behaving like llama.cpp's tokenizer
//! for the same file.
//!
//! * `tokenizer.ggml.model == "gpt2"`: byte-level BPE (tokens + merges). llama.cpp splits text
//!   with a list of regexes chosen by `tokenizer.ggml.pre`, each applied to the pieces the
//!   previous one produced, keeping matches *and* the gaps between them. That is a chain of
//!   `Split(regex, Isolated)` pre-tokenizers followed by a byte-level mapping without its own
//!   regex. The regexes are llama.cpp's (`llm_tokenizer_bpe`), written back in the original
//!   Hugging Face form where llama.cpp had to rewrite them for `std::regex`.
//! * `tokenizer.ggml.model == "llama"`: SentencePiece. llama.cpp prefixes a space (unless
//!   `add_space_prefix` is false), turns spaces into `▁` and repeatedly merges the adjacent pair
//!   whose concatenation is the highest-scoring token, falling back to `<0xNN>` byte tokens.
//!   Here: a BPE with byte fallback whose merges are ranked by the merged token's score (or the
//!   file's merges if it has some), behind a `Prepend("▁") + Replace(" ", "▁")` normalizer. The
//!   normalizer runs on each stretch of text between special tokens, so the space prefix after
//!   a special token matches llama.cpp's "prefix after special" rule too.
//!
//! Tokens typed control (3) or unknown (2) become special added tokens and user-defined ones (4)
//! plain added tokens, matched verbatim in the text as llama.cpp does, so `<|im_start|>` is one
//! id. BOS/EOS are added by a post-processor when `tokenizer.ggml.add_bos_token` /
//! `add_eos_token` say so (and `encode(.., add_special_tokens = true)` is used).

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use super::error::{GgufError, Result};
use super::metadata::Metadata;
use super::reader::GgufFile;

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// Longest token merges are derived for (SentencePiece vocabularies without merges).
const MAX_DERIVED_TOKEN_CHARS: usize = 128;
/// Most memory merges derived from scores may take.
const MAX_DERIVED_MERGES_BYTES: u64 = 64 << 20;

const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const BLOOM_SPLIT: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// How llama.cpp pre-tokenizes for a `tokenizer.ggml.pre` value: the regexes, applied in
/// order, and whether a word found whole in the vocabulary skips the merges (`ignore_merges`).
fn bpe_pre_tokenization(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        "" | "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_SPLIT,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => (vec![LLAMA3_SPLIT], true),
        "dbrx" | "smaug-bpe" | "chatglm-bpe" | "glm4" => (vec![LLAMA3_SPLIT], false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "mpt" | "olmo" | "jais" | "exaone4" | "trillion" | "granite-docling" | "roberta-bpe"
        | "jina-v1-en" | "jina-v2-code" => (vec![GPT2_SPLIT], false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2_SPLIT], false)
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" | "hunyuan" => {
            (vec![QWEN2_SPLIT], false)
        }
        "falcon" => (
            vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, r"[0-9][0-9][0-9]"],
            false,
        ),
        "deepseek-coder" => (
            vec![
                r"[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                r"[一-龥ࠀ-一가-퟿]+",
                r"\p{N}",
            ],
            false,
        ),
        "poro-chat" | "bloom" | "gpt3-finnish" => (vec![BLOOM_SPLIT], false),
        "viking" => (vec![BLOOM_SPLIT, r"\p{N}"], false),
        "tekken" => (vec![TEKKEN_SPLIT], true),
        "gpt-4o" | "llama4" | "minimax-m2" => (vec![GPT4O_SPLIT], false),
        _ => return None,
    })
}

impl GgufFile {
    /// The file's tokenizer; see the module docs for what is reproduced.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        tokenizer_from_metadata(self.metadata())
    }
}

/// Builds the tokenizer described by `tokenizer.ggml.*` metadata: the vocabulary, the model
/// (byte-level BPE or SentencePiece as BPE), the special and user-defined tokens, and the
/// bos/eos the encoder adds.
pub fn tokenizer_from_metadata(md: &Metadata) -> Result<Tokenizer> {
    let err = tokenizer_error(md);
    let model = md.get_str("tokenizer.ggml.model")?;
    let tokens = md.get_str_array("tokenizer.ggml.tokens")?;
    let types = match md.contains("tokenizer.ggml.token_type") {
        true => md.get_i32_array("tokenizer.ggml.token_type")?,
        false => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(err(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    // First occurrence wins, like llama.cpp's `token_to_id` (a few vocabularies repeat
    // placeholder spellings).
    let mut vocab: Vocab = Vocab::default();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.entry(tok.to_string()).or_insert(id as u32);
    }
    let mut tokenizer = match model {
        "gpt2" => byte_level_bpe(md, vocab)?,
        "llama" => sentencepiece_bpe(md, &tokens, vocab)?,
        other => {
            return Err(err(format!(
                "tokenizer model `{other}` is not supported (supported: gpt2, llama)"
            )));
        }
    };
    add_special_tokens(md, &mut tokenizer, &tokens, &types)?;
    add_bos_eos(md, &mut tokenizer, &tokens, model)?;
    Ok(tokenizer)
}

/// A `GgufError::Tokenizer` for this file.
fn tokenizer_error(md: &Metadata) -> impl Fn(String) -> GgufError + '_ {
    move |msg| GgufError::Tokenizer {
        path: md.path().to_path_buf(),
        msg,
    }
}

/// GPT-2 style byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names.
fn byte_level_bpe(md: &Metadata, vocab: Vocab) -> Result<Tokenizer> {
    let err = tokenizer_error(md);
    let pre = md
        .get_opt::<&str>("tokenizer.ggml.pre")?
        .unwrap_or("default");
    let (regexes, ignore_merges) = bpe_pre_tokenization(pre).ok_or_else(|| {
        err(format!(
            "unknown pre-tokenizer type `{pre}` (tokenizer.ggml.pre)"
        ))
    })?;
    let merges = file_merges(md)?
        .ok_or_else(|| err("byte-level BPE without `tokenizer.ggml.merges`".to_string()))?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| err(format!("BPE model: {e}")))?;
    let mut t = Tokenizer::new(bpe);
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| err(format!("pre-tokenizer regex {re:?}: {e}")))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    t.with_pre_tokenizer(Some(PreSequence::new(steps)));
    t.with_decoder(Some(ByteLevel::new(false, false, false)));
    Ok(t)
}

/// SentencePiece as BPE (merges from the file, or derived from the scores), with byte
/// fallback and the `▁` space escape.
fn sentencepiece_bpe(md: &Metadata, tokens: &[&str], vocab: Vocab) -> Result<Tokenizer> {
    let err = tokenizer_error(md);
    let scores = match md.contains("tokenizer.ggml.scores") {
        true => md.get_f32_array("tokenizer.ggml.scores")?,
        false => vec![0.0; tokens.len()],
    };
    if scores.len() != tokens.len() {
        return Err(err(format!(
            "{} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let merges = match file_merges(md)? {
        Some(m) => m,
        None => merges_from_scores(tokens, &scores, &vocab).map_err(&err)?,
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = md.get_opt::<u32>("tokenizer.ggml.unknown_token_id")?
        && let Some(tok) = tokens.get(unk as usize)
    {
        builder = builder.unk_token(tok.to_string());
    }
    let bpe = builder
        .build()
        .map_err(|e| err(format!("SentencePiece-as-BPE model: {e}")))?;
    let mut t = Tokenizer::new(bpe);
    let add_space_prefix = md
        .get_opt::<bool>("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let escape = Replace::new(" ", "▁").map_err(|e| err(e.to_string()))?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![Prepend::new("▁".into()).into(), escape.into()]).into()
    } else {
        escape.into()
    };
    t.with_normalizer(Some(normalizer))
        .map_err(|e| err(e.to_string()))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ")
            .map_err(|e| err(e.to_string()))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    t.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(t)
}

/// Special and user-defined tokens are cut out of the text before the model sees it.
fn add_special_tokens(
    md: &Metadata,
    tokenizer: &mut Tokenizer,
    tokens: &[&str],
    types: &[i32],
) -> Result<()> {
    let err = tokenizer_error(md);
    let mut special = Vec::new();
    let mut added = Vec::new();
    for (tok, &ty) in tokens.iter().zip(types) {
        if tok.is_empty() {
            continue;
        }
        match ty {
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => {
                special.push(AddedToken::from(tok.to_string(), true).normalized(false))
            }
            TOKEN_TYPE_USER_DEFINED => {
                added.push(AddedToken::from(tok.to_string(), false).normalized(false))
            }
            _ => {}
        }
    }
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| err(format!("special tokens: {e}")))?;
    tokenizer
        .add_tokens(added)
        .map_err(|e| err(format!("user-defined tokens: {e}")))?;

    Ok(())
}

/// BOS/EOS as llama.cpp adds them: by default BOS for SentencePiece, nothing for BPE.
fn add_bos_eos(
    md: &Metadata,
    tokenizer: &mut Tokenizer,
    tokens: &[&str],
    model: &str,
) -> Result<()> {
    let err = tokenizer_error(md);
    let add_bos = md
        .get_opt::<bool>("tokenizer.ggml.add_bos_token")?
        .unwrap_or(model == "llama");
    let add_eos = md
        .get_opt::<bool>("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let special_token = |key: &str| -> Result<Option<(String, u32)>> {
        Ok(md
            .get_opt::<u32>(key)?
            .and_then(|id| tokens.get(id as usize).map(|t| (t.to_string(), id))))
    };
    let bos = special_token("tokenizer.ggml.bos_token_id")?.filter(|_| add_bos);
    let eos = special_token("tokenizer.ggml.eos_token_id")?.filter(|_| add_eos);
    if bos.is_some() || eos.is_some() {
        let (mut single, mut pair) = (Vec::new(), Vec::new());
        let mut specials = Vec::new();
        if let Some((b, id)) = &bos {
            single.push(b.clone());
            pair.push(b.clone());
            specials.push((b.clone(), *id));
        }
        single.push("$A".to_string());
        pair.push("$A".to_string());
        if let Some((e, id)) = &eos {
            single.push(e.clone());
            pair.push(e.clone());
            specials.push((e.clone(), *id));
        }
        if let Some((b, _)) = &bos {
            pair.push(b.clone());
        }
        pair.push("$B:1".to_string());
        if let Some((e, _)) = &eos {
            pair.push(e.clone());
        }
        let processor = TemplateProcessing::builder()
            .try_single(single)
            .map_err(|e| err(format!("post-processor: {e}")))?
            .try_pair(pair)
            .map_err(|e| err(format!("post-processor: {e}")))?
            .special_tokens(specials)
            .build()
            .map_err(|e| err(format!("post-processor: {e}")))?;
        tokenizer.with_post_processor(Some(processor));
    }
    Ok(())
}

/// `tokenizer.ggml.merges` as pairs ("a b" → ("a", "b")), if the file has them.
fn file_merges(md: &Metadata) -> Result<Option<Merges>> {
    if !md.contains("tokenizer.ggml.merges") {
        return Ok(None);
    }
    let merges = md.get_str_array("tokenizer.ggml.merges")?;
    merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| GgufError::Tokenizer {
                    path: md.path().to_path_buf(),
                    msg: format!("merge {m:?} is not two space-separated tokens"),
                })
        })
        .collect::<Result<Merges>>()
        .map(Some)
}

/// Merges equivalent to SentencePiece's "merge the pair forming the best-scoring token": every
/// split of every token into two tokens, ranked by the merged token's score (best first). Ties
/// keep vocabulary order, which is how llama.cpp's queue sees equal scores most of the time.
///
/// Every split of every token is looked up, and every merge holds both halves, so the work is
/// quadratic in a token's length and the merges can be far larger than the vocabulary (a
/// crafted family "a", "aa", ... "a"×n yields n³/3 bytes of merges). Tokens are therefore
/// held to [`MAX_DERIVED_TOKEN_CHARS`] (SentencePiece pieces are a few dozen at most) and the
/// merges to [`MAX_DERIVED_MERGES_BYTES`] (a 32k vocabulary derives a few MB).
fn merges_from_scores(
    tokens: &[&str],
    scores: &[f32],
    vocab: &Vocab,
) -> std::result::Result<Merges, String> {
    let ids: HashMap<&str, usize> = vocab
        .iter()
        .map(|(t, &i)| (t.as_str(), i as usize))
        .collect();
    let mut ranked: Vec<(f32, usize, usize, usize)> = Vec::new();
    let mut bytes = 0u64;
    for (id, tok) in tokens.iter().enumerate() {
        if ids.get(tok) != Some(&id) {
            continue;
        }
        let chars = tok.chars().count();
        if chars > MAX_DERIVED_TOKEN_CHARS {
            return Err(format!(
                "token {id} is {chars} characters long: too long to derive merges from scores \
                 (at most {MAX_DERIVED_TOKEN_CHARS}; the file has no tokenizer.ggml.merges)"
            ));
        }
        for (split, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(split);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                // The entry here and the merge's two strings.
                bytes += (size_of::<(f32, usize, usize, usize)>()
                    + 2 * size_of::<String>()
                    + tok.len()) as u64;
                if bytes > MAX_DERIVED_MERGES_BYTES {
                    return Err(format!(
                        "the merges derived from the scores would take more than \
                         {MAX_DERIVED_MERGES_BYTES} bytes"
                    ));
                }
                ranked.push((scores[id], id, li, ri));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    Ok(ranked
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l].to_string(), tokens[r].to_string()))
        .collect())
}
