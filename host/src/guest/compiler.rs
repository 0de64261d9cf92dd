//! Turning a guest's bytes into something a request can run: wasmtime's engine, the linker
//! that resolves the guest's imports against the host, the compile cache and the per-instance
//! limits, owned together because every compilation and every request store needs all four.
//!
//! A guest is compiled once into an `InstancePre` (imports already resolved), so a request
//! only pays for instantiation from the pooling allocator and the call itself. Before a guest
//! goes live it is instantiated once on trial, so one that cannot even start never serves.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use wasmtime::Store;
use wasmtime::component::{Component, InstancePre, Linker};

use super::bindings::{handler, openai, openai_agents};
use super::cache::ComponentCache;
use super::pool::wasmtime_config;
use super::request::{self, RequestState};
use super::sandbox::GuestLimits;
use super::source::Candidate;
use crate::clock::now_rfc3339;

/// What is known about a loaded guest (shown by `/info` and the admin endpoint).
#[derive(Debug, Clone, Serialize)]
pub struct GuestMeta {
    pub name: String,
    pub sha256: String,
    pub source: String,
    /// RFC 3339.
    pub loaded_at: String,
    /// Compile (or cache load) and validation time.
    pub load_ms: u64,
    pub from_cache: bool,
    /// 1 for the guest the worker started with, +1 for each swap.
    pub generation: u64,
    /// Whether the guest exports `openai` and so serves the OpenAI-compatible routes.
    pub openai: bool,
    /// Whether it exports `openai-agents` and so serves structured output and
    /// log-probabilities there.
    pub openai_agents: bool,
}

/// A compiled, validated guest, ready to instantiate.
pub struct LoadedGuest {
    pub(super) pre: InstancePre<RequestState>,
    pub(super) exports: Exports,
    /// The name again, shared with every request's store for its log lines.
    pub(super) name: Arc<str>,
    pub meta: GuestMeta,
}

/// Where a guest's exports are, found once at load: `handler` is required, `openai` optional.
pub(super) struct Exports {
    pub handler: handler::GuestIndices,
    /// `None` when the guest does not serve the OpenAI routes.
    pub openai: Option<openai::GuestIndices>,
    /// `None` when it does not serve agent clients' options on them.
    pub openai_agents: Option<openai_agents::GuestIndices>,
}

impl Exports {
    fn find(pre: &InstancePre<RequestState>) -> anyhow::Result<Self> {
        let handler = handler::GuestIndices::new(pre)
            .map_err(anyhow::Error::from)
            .context("the guest does not export the rbee:worker/handler interface")?;
        Ok(Self {
            handler,
            openai: optional(pre, openai::GuestIndices::new(pre), "openai"),
            openai_agents: optional(pre, openai_agents::GuestIndices::new(pre), "openai-agents"),
        })
    }
}

/// An optional export's indices: absent, or present with another shape; either way the guest
/// does not serve what it stands for, and the second case says so in the log.
fn optional<T>(
    pre: &InstancePre<RequestState>,
    found: wasmtime::Result<T>,
    name: &str,
) -> Option<T> {
    match found {
        Ok(indices) => Some(indices),
        Err(error)
            if pre
                .component()
                .get_export_index(None, format!("rbee:worker/{name}@0.1.0"))
                .is_some() =>
        {
            tracing::warn!("the guest's `{name}` export does not match this host's: {error:#}");
            None
        }
        Err(_) => None,
    }
}

pub(super) struct Compiler {
    engine: wasmtime::Engine,
    linker: Linker<RequestState>,
    cache: Option<ComponentCache>,
    limits: GuestLimits,
}

impl Compiler {
    /// Sets up wasmtime for up to `max_instances` guest instances at once, the host's imports
    /// (WASI and the `worker` world) and, with a directory, the compile cache.
    pub fn new(
        limits: GuestLimits,
        max_instances: u32,
        cache_dir: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let engine = wasmtime::Engine::new(&wasmtime_config(max_instances, limits.memory_bytes))?;
        let mut linker = Linker::new(&engine);
        request::add_to_linker(&mut linker)?;
        // A cache that cannot be used safely (another user can write it, see `cache`) is a
        // slower start, not a failed one: the worker compiles every guest and says why.
        let cache = cache_dir.and_then(|dir| match ComponentCache::open(dir, &engine) {
            Ok(cache) => Some(cache),
            Err(error) => {
                tracing::warn!("not caching compiled guests: {error:#}");
                None
            }
        });
        Ok(Self {
            engine,
            linker,
            cache,
            limits,
        })
    }

    pub fn engine(&self) -> &wasmtime::Engine {
        &self.engine
    }

    pub fn limits(&self) -> GuestLimits {
        self.limits
    }

    /// A store for one instance, held to the sandbox's memory and time limits.
    pub fn store(&self, state: RequestState) -> Store<RequestState> {
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.sandbox);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut store| store.data_mut().sandbox.on_epoch());
        store
    }

    /// Compiles (or takes from the cache), links and trial-instantiates a guest. Blocking: a
    /// compilation may take seconds.
    pub fn compile(&self, candidate: Candidate, generation: u64) -> anyhow::Result<LoadedGuest> {
        let started = Instant::now();
        let Candidate {
            name,
            source,
            bytes,
            sha256,
        } = candidate;
        let (component, from_cache) = self.component(&bytes, &sha256)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .context("the guest imports something this host does not provide")?;
        let exports = Exports::find(&pre)?;
        let name: Arc<str> = name.into();
        // A trial instantiation runs the guest's start-up code (a language runtime's
        // initialisation) so a guest that cannot even start never goes live.
        let mut store = self.store(RequestState::trial(self.limits, name.clone()));
        pre.instantiate(&mut store)
            .map_err(anyhow::Error::from)
            .context("the guest failed to instantiate")?;
        // Only a guest that passed every check above is cached for next time.
        if !from_cache
            && let Some(cache) = &self.cache
            && let Err(error) = cache.put(&sha256, &component)
        {
            tracing::warn!("cannot cache the compiled guest: {error:#}");
        }
        Ok(LoadedGuest {
            pre,
            meta: GuestMeta {
                openai: exports.openai.is_some(),
                openai_agents: exports.openai_agents.is_some(),
                name: name.to_string(),
                sha256,
                source,
                loaded_at: now_rfc3339(),
                load_ms: started.elapsed().as_millis() as u64,
                from_cache,
                generation,
            },
            exports,
            name,
        })
    }

    /// The compiled component and whether it came from the cache.
    fn component(&self, bytes: &[u8], sha256: &str) -> anyhow::Result<(Component, bool)> {
        let cache = self.cache.as_ref();
        if let Some(component) = cache.and_then(|cache| cache.get(&self.engine, sha256)) {
            return Ok((component, true));
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(anyhow::Error::from)
            .context("not a valid WebAssembly component")?;
        Ok((component, false))
    }
}
