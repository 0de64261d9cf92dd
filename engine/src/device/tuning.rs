//! Kernel tuning on the GPU, kept across restarts.
//!
//! With Burn's `autotune`, the first matmul (and fused kernel) of each new shape times the
//! candidate kernels on the device and keeps the fastest: a vector-matrix kernel for a
//! decode step's one row, a tiled or tensor-core one for a prompt's many. Tuning costs
//! seconds the first time a shape is seen (on an H200, 72 tunings held up a worker's first
//! requests by 12–36 s), so the choices go to a small database in the worker's cache
//! directory, and a restart reads them back instead of tuning again.
//!
//! CubeCL reads its configuration once per process, when the first device opens, so
//! [`configure`] sets it before. `cubecl.toml` and the `CUBECL_*` variables
//! (`CUBECL_AUTOTUNE_LEVEL=minimal`, ...) still apply as CubeCL reads them; where the
//! results are kept is the worker's to say.

use std::path::Path;

use burn_cubecl::cubecl::config::cache::CacheConfig;
use burn_cubecl::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};

/// Keeps the tuning results in `cache` (a private directory the caller made), or nowhere
/// past this process with `None`. Only the first call of a process decides: CubeCL's
/// configuration cannot change once a device is open.
pub fn configure(cache: Option<&Path>) {
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    match cache {
        Some(dir) => config.environment.path = CacheConfig::Directory(dir.to_path_buf()),
        None => config.autotune.disable_cache = true,
    }
    if CubeClRuntimeConfig::try_set(config) {
        match cache {
            Some(dir) => {
                tracing::info!(dir = %dir.display(), "GPU kernel tuning is kept across restarts")
            }
            None => tracing::info!("GPU kernel tuning is not kept past this process"),
        }
    } else {
        tracing::debug!("CubeCL's configuration was set earlier in this process; keeping it");
    }
}
