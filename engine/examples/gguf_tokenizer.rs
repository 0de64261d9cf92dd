//! Writes a GGUF file's tokenizer as a Hugging Face `tokenizer.json`:
//!
//!     gguf_tokenizer MODEL.gguf tokenizer.json
//!
//! The tokenizer is the one the engine builds from the file's `tokenizer.ggml.*` metadata, so
//! a Hugging Face folder made beside it (random weights of the same vocabulary, say, for the
//! GPU check on a machine without a model hub: `scripts/gpu_check.sh`) encodes text as the
//! GGUF model does.

use std::path::PathBuf;

use clap::Parser;
use rbee_engine::gguf::GgufFile;

/// Writes a GGUF file's tokenizer as a Hugging Face `tokenizer.json`.
#[derive(Parser)]
struct Args {
    /// The GGUF file.
    model: PathBuf,
    /// Where the `tokenizer.json` goes.
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let Args { model, out } = Args::parse();
    let tokenizer = GgufFile::open(&model)?.tokenizer()?;
    tokenizer
        .save(&out, false)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    println!(
        "{}: {} tokens",
        out.display(),
        tokenizer.get_vocab_size(true)
    );
    Ok(())
}
