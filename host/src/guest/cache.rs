//! On-disk cache of compiled guests.
//!
//! Compiling a component is the slow part of loading a guest (seconds for Python or
//! SpiderMonkey guests); deserializing it is milliseconds. Entries are keyed by the
//! component's SHA-256 and the engine's compatibility hash (wasmtime version, target and
//! settings), so a stale or foreign entry is never picked up.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::Context;
use wasmtime::component::Component;

pub struct ComponentCache {
    dir: PathBuf,
    engine_key: String,
}

impl ComponentCache {
    pub fn open(dir: PathBuf, engine: &wasmtime::Engine) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the guest cache {}", dir.display()))?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
        })
    }

    /// The default location: $XDG_CACHE_HOME/rbee-host, else ~/.cache/rbee-host.
    pub fn default_dir() -> Option<PathBuf> {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
            .map(|base| base.join("rbee-host"))
    }

    fn entry(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    /// A previously compiled component, if the cache has one.
    pub fn get(&self, engine: &wasmtime::Engine, sha256: &str) -> Option<Component> {
        let path = self.entry(sha256);
        if !path.exists() {
            return None;
        }
        // SAFETY: the file was written by `put` below with an engine of the same compatibility
        // hash (part of its name), in a directory owned by this worker's operator. wasmtime
        // still checks its header and refuses mismatched builds.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), "ignoring unusable cache entry: {error}");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores a compiled component; written to a temporary file and renamed, so a crash or a
    /// concurrent reader never sees half an entry.
    pub fn put(&self, sha256: &str, component: &Component) -> anyhow::Result<()> {
        let bytes = component.serialize()?;
        let path = self.entry(sha256);
        let partial = path.with_extension(format!("{}.part", std::process::id()));
        std::fs::write(&partial, bytes)
            .and_then(|()| std::fs::rename(&partial, &path))
            .with_context(|| format!("cannot write {}", path.display()))
    }
}
