//! Writes a GGUF file's tokenizer as a Hugging Face `tokenizer.json`:
//!
//!     gguf_tokenizer MODEL.gguf tokenizer.json
//!
//! The tokenizer is the one the engine builds from the file's `tokenizer.ggml.*` metadata, so
//! a Hugging Face folder made beside it (random weights of the same vocabulary, say, for the
//! GPU check on a machine without a model hub: `scripts/gpu_check.sh`) encodes text as the
//! GGUF model does.

use rbee_engine::gguf::GgufFile;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(out), None) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: gguf_tokenizer MODEL.gguf tokenizer.json");
    };
    let tokenizer = GgufFile::open(&model)?.tokenizer()?;
    tokenizer
        .save(&out, false)
        .map_err(|e| anyhow::anyhow!("writing {out}: {e}"))?;
    println!("{out}: {} tokens", tokenizer.get_vocab_size(true));
    Ok(())
}
