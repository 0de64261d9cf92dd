//! The worker's cache directory (`--cache-dir`, else $XDG_CACHE_HOME/rbee-host or
//! ~/.cache/rbee-host): compiled guests (`guest::ComponentCache`) and the GPU's kernel
//! tuning (`gpu-tuning/`) are kept under it. What is read back from it steers the worker
//! (native code for the guests, kernel choices for the GPU), so a directory is only used
//! when it is this user's and nobody else can write it.

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The default location: $XDG_CACHE_HOME/rbee-host, else ~/.cache/rbee-host.
pub fn default_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .map(|base| base.join("rbee-host"))
}

/// Creates `dir` (and its parents) private (0700) if absent; an error when it exists but is
/// not a directory of this user's that only this user can write.
pub fn create_private(dir: &Path) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let meta = std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    check_private_dir(&meta, effective_uid())
}

pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The cache directory must be a directory owned by `uid` that nobody else can write: else
/// another user could plant entries, or swap the key and the entries together.
fn check_private_dir(meta: &std::fs::Metadata, uid: u32) -> anyhow::Result<()> {
    if !meta.is_dir() {
        bail!("it is not a directory");
    }
    if meta.uid() != uid {
        bail!(
            "it is owned by uid {}, not by this user (uid {uid})",
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "other users can write it (mode {:o}); `chmod 700` it or pick another --cache-dir",
            meta.mode() & 0o777
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let meta = std::fs::metadata(base.path()).unwrap();
        check_private_dir(&meta, meta.uid()).unwrap();
        let error = check_private_dir(&meta, meta.uid() + 1).unwrap_err();
        assert!(error.to_string().contains("not by this user"), "{error}");
    }

    #[test]
    fn a_new_directory_is_private_and_one_others_can_write_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/gpu-tuning");
        create_private(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = create_private(&dir).unwrap_err();
        assert!(
            error.to_string().contains("other users can write"),
            "{error}"
        );
    }
}
