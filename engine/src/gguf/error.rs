//! The one error type of the GGUF reader. Every variant names the file (or the in-memory
//! source) so that a bad model file is reported as "which file, what is wrong with it" and never
//! as a panic deep inside the loader.

use std::path::PathBuf;

/// Errors from reading a GGUF file, its metadata, its tensors or its tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a GGUF file (magic {found:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },

    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },

    #[error(
        "{path}: truncated: {what} needs {need} bytes at offset {offset}, but the file has {len} bytes"
    )]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        need: u64,
        len: u64,
    },

    /// A structurally invalid file: bad value types, impossible counts, overlapping or misaligned
    /// tensors, duplicate names...
    #[error("{path}: malformed GGUF: {msg}")]
    Malformed { path: PathBuf, msg: String },

    #[error("{path}: metadata key `{key}` is missing")]
    MissingKey { path: PathBuf, key: String },

    #[error("{path}: metadata key `{key}` is {found}, expected {expected}")]
    WrongType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: String,
    },

    #[error("{path}: no tensor named `{name}`")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` has type {ty}, which this reader cannot {op}")]
    UnsupportedType {
        path: PathBuf,
        name: String,
        ty: String,
        op: &'static str,
    },

    #[error("{path}: tensor `{name}`: {msg}")]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },

    #[error("{path}: cannot build the tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;
