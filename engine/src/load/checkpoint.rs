//! What a load produces: the checkpoint with its tokenizer and special tokens, the format it
//! was read from, and the error a failed load gives.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::EngineError;
use crate::model::{Model, ModelConfig};

/// A loaded checkpoint: everything needed to run it.
pub struct Checkpoint {
    pub config: ModelConfig,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    /// A name for the model (from the checkpoint, else the folder or file stem).
    pub id: String,
    pub format: Format,
    /// Where it runs, as `/info` says it: `CPU-0`, `GPU-0`, ...
    pub device_name: String,
}

#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

/// The error of a load that failed at `path` for `reason`.
pub fn load_error(path: &Path, reason: String) -> EngineError {
    EngineError::Load {
        path: path.to_owned(),
        reason,
    }
}

/// Which kind of checkpoint a path is.
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
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map_err(|e| load_error(path, format!("cannot read ({e})")))?;
        if &magic == b"GGUF" {
            Ok(Format::Gguf)
        } else {
            Err(load_error(
                path,
                "not a GGUF file (bad magic) and not a model folder".into(),
            ))
        }
    }
}
