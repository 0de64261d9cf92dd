//! Where a guest comes from, and its bytes read and hashed. The SHA-256 names a guest
//! everywhere: in the compile cache, in `/info`, and to tell a real swap from a no-op.

use std::path::PathBuf;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// Where a guest comes from.
pub enum GuestSource {
    File(PathBuf),
    /// Bytes uploaded through the admin endpoint.
    Upload(Vec<u8>),
}

/// A guest's bytes, read and hashed, before compilation.
pub(super) struct Candidate {
    pub name: String,
    pub source: String,
    pub bytes: Vec<u8>,
    pub sha256: String,
}

impl GuestSource {
    pub(super) fn describe(&self) -> String {
        match self {
            GuestSource::File(path) => path.display().to_string(),
            GuestSource::Upload(_) => "admin upload".into(),
        }
    }

    /// The guest's name: the file's stem (`llm` for `guests/llm.wasm`), or `upload`.
    fn name(&self) -> String {
        match self {
            GuestSource::File(path) => path
                .file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_else(|| "guest".into()),
            GuestSource::Upload(_) => "upload".into(),
        }
    }

    pub(super) fn read(self) -> anyhow::Result<Candidate> {
        let (name, source) = (self.name(), self.describe());
        let bytes = match self {
            GuestSource::File(path) => {
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?
            }
            GuestSource::Upload(bytes) => bytes,
        };
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Ok(Candidate {
            name,
            source,
            bytes,
            sha256,
        })
    }
}
