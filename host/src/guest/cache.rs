//! On-disk cache of compiled guests.
//!
//! Compiling a component is the slow part of loading a guest (seconds for Python or
//! SpiderMonkey guests); deserializing it is milliseconds. Entries are keyed by the
//! component's SHA-256 and the engine's compatibility hash (wasmtime version, target and
//! settings), so a stale or foreign entry is never picked up.
//!
//! An entry is native code that `deserialize` maps executable without checking it, so the
//! cache only ever runs what it wrote itself:
//! - the directory is created private (0700); one that is not owned by this user, or that
//!   another user can write, is refused, and the worker then runs without a cache (it
//!   compiles every guest: a slower start, never an unsafe one) and says so in a warning;
//! - every entry carries an HMAC-SHA256 under a per-cache secret key (the file `key`, 32
//!   random bytes, created 0600 and refused unless it is ours and private). The tag is
//!   checked over the bytes in memory and those same bytes are deserialized, so neither a
//!   planted or corrupted file nor one swapped in after the check is ever run: such an entry
//!   is removed and the guest compiled again;
//! - files are written to a temporary file created exclusively (`O_EXCL`, 0600) in the
//!   directory and renamed into place, so a reader never sees half an entry.

use std::fs::{File, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use wasmtime::component::Component;

type HmacSha256 = Hmac<Sha256>;

/// The key file's name inside the cache directory, and its length.
const KEY_FILE: &str = "key";
const KEY_LEN: usize = 32;
/// An entry starts with its tag.
const TAG_LEN: usize = 32;

pub struct ComponentCache {
    dir: PathBuf,
    engine_key: String,
    key: [u8; KEY_LEN],
}

impl ComponentCache {
    /// Opens (creating it private if absent) the cache in `dir`; an error when the directory
    /// is not safe to take native code from, or its key cannot be read or made.
    pub fn open(dir: PathBuf, engine: &wasmtime::Engine) -> anyhow::Result<Self> {
        crate::cache_dir::create_private(&dir)
            .with_context(|| format!("refusing the guest cache {}", dir.display()))?;
        let key = load_or_create_key(&dir)
            .with_context(|| format!("cannot set up the guest cache's key in {}", dir.display()))?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
            key,
        })
    }

    fn entry_name(&self, sha256: &str) -> String {
        format!("{sha256}-{}.cwasm", self.engine_key)
    }

    /// The tag of `body` stored as entry `name`: the name is authenticated too, so one of
    /// our own entries cannot stand in for another guest's.
    fn mac(&self, name: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(name.as_bytes());
        mac.update(&[0]);
        mac.update(body);
        mac
    }

    /// A previously compiled component, if the cache holds an authentic one.
    pub fn get(&self, engine: &wasmtime::Engine, sha256: &str) -> Option<Component> {
        let name = self.entry_name(sha256);
        let path = self.dir.join(&name);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(path = %path.display(), "cannot read the cache entry: {error}");
                return None;
            }
        };
        let authentic = bytes.len() > TAG_LEN && {
            let (tag, body) = bytes.split_at(TAG_LEN);
            self.mac(&name, body).verify_slice(tag).is_ok()
        };
        if !authentic {
            tracing::warn!(
                path = %path.display(),
                "the cache entry was not written by this cache (planted or corrupted): \
                 removing it and compiling the guest"
            );
            let _ = std::fs::remove_file(&path);
            return None;
        }
        // SAFETY: these bytes carry a valid tag under this cache's private key, so they are
        // exactly what `put` wrote from `Component::serialize`; the entry's name (part of the
        // tag) holds the engine's compatibility hash, and wasmtime checks its header too.
        // They are the bytes in memory that were checked, not the file read again.
        match unsafe { Component::deserialize(engine, &bytes[TAG_LEN..]) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), "ignoring unusable cache entry: {error}");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores a compiled component (the caller stores only components that passed
    /// validation), tagged, through an exclusively created temporary file renamed into place.
    pub fn put(&self, sha256: &str, component: &Component) -> anyhow::Result<()> {
        let body = component.serialize()?;
        let name = self.entry_name(sha256);
        let tag = self.mac(&name, &body).finalize().into_bytes();
        let path = self.dir.join(&name);
        let write = || -> std::io::Result<()> {
            let mut partial = tempfile::Builder::new()
                .prefix(".partial-")
                .tempfile_in(&self.dir)?;
            partial.write_all(&tag)?;
            partial.write_all(&body)?;
            partial.as_file().sync_data()?;
            partial.persist(&path).map_err(|error| error.error)?;
            Ok(())
        };
        write().with_context(|| format!("cannot write {}", path.display()))
    }
}

/// The cache's key: read when a sound one exists (a regular file of ours, readable by nobody
/// else, of the right length), else made afresh. A fresh key replaces an unsound one, which
/// only costs recompiling what the old key tagged.
fn load_or_create_key(dir: &Path) -> anyhow::Result<[u8; KEY_LEN]> {
    let path = dir.join(KEY_FILE);
    // Another worker may be creating the key at the same time: the second attempt reads
    // whichever key won.
    for _ in 0..2 {
        match read_key(&path) {
            Ok(Some(key)) => return Ok(key),
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(path = %path.display(), "replacing the guest cache's key: {reason}");
                return write_key(dir, &path, true);
            }
        }
        match write_key(dir, &path, false) {
            Ok(key) => return Ok(key),
            Err(error)
                if error
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == ErrorKind::AlreadyExists) => {}
            Err(error) => return Err(error),
        }
    }
    bail!("{} keeps changing", path.display())
}

/// `Ok(None)` when there is no key yet; `Err(reason)` when there is one we must not use.
fn read_key(path: &Path) -> Result<Option<[u8; KEY_LEN]>, String> {
    // O_NOFOLLOW: the key is a file of ours, never a link to someone else's.
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("cannot open it: {error}")),
    };
    // Checked on the open file, so the file read is the file checked.
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file()
        || meta.uid() != crate::cache_dir::effective_uid()
        || meta.mode() & 0o077 != 0
    {
        return Err(format!(
            "it is not a private file of this user (uid {}, mode {:o})",
            meta.uid(),
            meta.mode() & 0o777
        ));
    }
    let mut key = [0u8; KEY_LEN];
    let mut rest = Vec::new();
    file.read_exact(&mut key)
        .and_then(|()| file.read_to_end(&mut rest))
        .map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err("it is longer than a key".into());
    }
    Ok(Some(key))
}

/// Writes a fresh random key (created exclusively, 0600) as `path`: without `replace`, only
/// if no key exists (an `AlreadyExists` error otherwise).
fn write_key(dir: &Path, path: &Path, replace: bool) -> anyhow::Result<[u8; KEY_LEN]> {
    let mut key = [0u8; KEY_LEN];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness for a key: {e}"))?;
    let mut partial = tempfile::Builder::new().prefix(".key-").tempfile_in(dir)?;
    partial.write_all(&key)?;
    partial.as_file().sync_data()?;
    if replace {
        partial.persist(path).map_err(|error| error.error)?;
    } else {
        partial
            .persist_noclobber(path)
            .map_err(|error| error.error)?;
    }
    // The directory entry is durable too, so a crash cannot leave entries whose key is lost
    // (harmless, but they would all be recompiled).
    let _ = File::open(dir).and_then(|dir| dir.sync_all());
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn engine() -> wasmtime::Engine {
        wasmtime::Engine::default()
    }

    /// A small valid component: an empty one with a custom section holding `marker`, so
    /// that two of them differ.
    fn component(engine: &wasmtime::Engine, marker: u8) -> Component {
        let mut bytes = b"\0asm\x0d\x00\x01\x00".to_vec();
        bytes.extend([0, 3, 1, b'm', marker]);
        Component::new(engine, &bytes).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o777
    }

    #[test]
    fn creates_a_private_directory_and_key() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b/cache");
        let engine = engine();
        let cache = ComponentCache::open(dir.clone(), &engine).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        let c = component(&engine, 1);
        cache.put("aa", &c).unwrap();
        assert!(cache.get(&engine, "aa").is_some());
        assert_eq!(mode(&dir.join(cache.entry_name("aa"))), 0o600);
        // A second opening uses the same key: the entry is still good.
        let again = ComponentCache::open(dir.clone(), &engine).unwrap();
        assert!(again.get(&engine, "aa").is_some());
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn a_planted_entry_is_not_deserialized() {
        let base = tempfile::tempdir().unwrap();
        let engine = engine();
        let cache = ComponentCache::open(base.path().to_owned(), &engine).unwrap();
        let theirs = component(&engine, 66);
        let path = base.path().join(cache.entry_name("aa"));
        // A valid serialized component of someone else's, as the old format stored it (no
        // tag), and with a tag made under another key.
        let serialized = theirs.serialize().unwrap();
        std::fs::write(&path, &serialized).unwrap();
        assert!(cache.get(&engine, "aa").is_none());
        assert!(!path.exists(), "the planted entry was not removed");
        let mut forged = HmacSha256::new_from_slice(&[7; KEY_LEN]).unwrap();
        forged.update(cache.entry_name("aa").as_bytes());
        forged.update(&[0]);
        forged.update(&serialized);
        let mut with_tag = forged.finalize().into_bytes().to_vec();
        with_tag.extend(&serialized);
        std::fs::write(&path, &with_tag).unwrap();
        assert!(cache.get(&engine, "aa").is_none());

        // One of our own entries copied under another guest's name is refused too.
        let ours = component(&engine, 1);
        cache.put("bb", &ours).unwrap();
        std::fs::copy(base.path().join(cache.entry_name("bb")), &path).unwrap();
        assert!(cache.get(&engine, "aa").is_none());
        assert!(cache.get(&engine, "bb").is_some());
    }

    #[test]
    fn a_corrupted_entry_is_not_deserialized() {
        let base = tempfile::tempdir().unwrap();
        let engine = engine();
        let cache = ComponentCache::open(base.path().to_owned(), &engine).unwrap();
        let c = component(&engine, 1);
        cache.put("aa", &c).unwrap();
        let path = base.path().join(cache.entry_name("aa"));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(cache.get(&engine, "aa").is_none());
        std::fs::write(&path, &bytes[..10]).unwrap();
        assert!(cache.get(&engine, "aa").is_none());
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let engine = engine();
        for mode in [0o777, 0o775, 0o757, 0o1777] {
            let base = tempfile::tempdir().unwrap();
            std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let error = ComponentCache::open(base.path().to_owned(), &engine)
                .err()
                .unwrap_or_else(|| panic!("mode {mode:o} was accepted"));
            assert!(
                format!("{error:#}").contains("other users can write it"),
                "{error:#}"
            );
            assert!(!base.path().join(KEY_FILE).exists());
        }
        // Readable by others is fine: entries are not secret, only the key is.
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        ComponentCache::open(base.path().to_owned(), &engine).unwrap();
    }

    #[test]
    fn a_key_others_can_read_is_replaced() {
        let base = tempfile::tempdir().unwrap();
        let engine = engine();
        let cache = ComponentCache::open(base.path().to_owned(), &engine).unwrap();
        let c = component(&engine, 1);
        cache.put("aa", &c).unwrap();
        let key = base.path().join(KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let reopened = ComponentCache::open(base.path().to_owned(), &engine).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_ne!(reopened.key, cache.key);
        // What the exposed key tagged is no longer trusted.
        assert!(reopened.get(&engine, "aa").is_none());
    }
}
