//! The guest runtime: compiles guest components, keeps the active one hot-swappable, and runs
//! each request in a fresh, sandboxed instance.
//!
//! A guest is compiled once into an `InstancePre` (imports already resolved against the host),
//! so a request only pays for instantiation from the pooling allocator (microseconds) and the
//! call itself. The active guest sits behind an `ArcSwap`: a swap is one atomic store, and a
//! request that already took its `Arc` finishes on the guest it started with.

mod bindings;
mod cache;
mod host;
mod sandbox;
mod stream;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwap;
use rbee_engine::Engine as Model;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

pub use bindings::{InferError, InferRequest, InferResponse};
pub use cache::ComponentCache;
pub use host::Cancellation;
pub use sandbox::Limits;

use bindings::{Worker, WorkerPre};
use host::RequestState;
use sandbox::{EpochTicker, Exceeded, Sandbox};

/// Longest trap explanation sent to a client.
const MAX_TRAP_MESSAGE: usize = 2048;

/// How the runtime is set up.
pub struct RuntimeSettings {
    pub limits: Limits,
    /// Guest instances that may exist at once (requests in flight plus validation).
    pub max_instances: u32,
    pub cache_dir: Option<PathBuf>,
}

/// Where a guest comes from.
pub enum GuestSource {
    File(PathBuf),
    /// Bytes uploaded through the admin endpoint.
    Upload(Vec<u8>),
}

impl GuestSource {
    fn describe(&self) -> String {
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

    fn read(self) -> anyhow::Result<Candidate> {
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

/// A guest's bytes, read and hashed, before compilation.
struct Candidate {
    name: String,
    source: String,
    bytes: Vec<u8>,
    sha256: String,
}

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
}

/// A load that failed; the previous guest kept serving.
#[derive(Debug, Clone, Serialize)]
pub struct FailedLoad {
    pub source: String,
    pub sha256: Option<String>,
    pub at: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuestStatus {
    pub active: GuestMeta,
    pub last_failure: Option<FailedLoad>,
}

/// A compiled, validated guest, ready to instantiate.
pub struct LoadedGuest {
    pre: WorkerPre<RequestState>,
    name: Arc<str>,
    pub meta: GuestMeta,
}

/// What became of a load request.
pub enum Loaded {
    Swapped(Arc<LoadedGuest>),
    /// The same bytes are already active; nothing changed.
    Unchanged(Arc<LoadedGuest>),
}

/// Why a request's guest call failed, beyond the errors the guest returns itself.
#[derive(Debug, thiserror::Error)]
pub enum GuestFailure {
    #[error("{0:?}")]
    Returned(InferError),
    #[error("guest `{guest}` exceeded its time limit of {limit:?}")]
    Timeout { guest: String, limit: Duration },
    #[error("guest `{guest}` exceeded its memory limit of {limit_mib} MiB")]
    OutOfMemory { guest: String, limit_mib: usize },
    #[error("guest `{guest}` failed: {reason}")]
    Trapped { guest: String, reason: String },
}

/// The per-request inputs that do not come from the client.
pub struct RequestContext {
    pub model: Arc<Model>,
    /// Where streamed text goes; `None` for a plain JSON request.
    pub client: Option<mpsc::Sender<String>>,
    pub cancellation: Cancellation,
}

pub struct GuestRuntime {
    engine: Engine,
    linker: Linker<RequestState>,
    active: ArcSwap<LoadedGuest>,
    cache: Option<ComponentCache>,
    limits: Limits,
    history: Mutex<History>,
    /// Serialises loads (file watcher, SIGHUP and admin uploads may race), so generations
    /// are numbered in the order guests went live.
    loading: Mutex<()>,
    _ticker: EpochTicker,
}

struct History {
    generation: u64,
    last_failure: Option<FailedLoad>,
}

impl GuestRuntime {
    /// Sets up wasmtime and loads the first guest (blocking: it may compile for seconds).
    pub fn start(settings: RuntimeSettings, first: GuestSource) -> anyhow::Result<Self> {
        let engine = Engine::new(&wasmtime_config(&settings))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        Worker::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |state| state)?;
        let cache = match settings.cache_dir {
            Some(dir) => Some(ComponentCache::open(dir, &engine)?),
            None => None,
        };
        let ticker = EpochTicker::start(engine.clone())?;
        let describe = first.describe();
        let first = first
            .read()
            .and_then(|candidate| {
                Self::compile(
                    &engine,
                    &linker,
                    cache.as_ref(),
                    settings.limits,
                    candidate,
                    1,
                )
            })
            .with_context(|| format!("cannot load guest {describe}"))?;
        Ok(Self {
            engine,
            linker,
            active: ArcSwap::from_pointee(first),
            cache,
            limits: settings.limits,
            history: Mutex::new(History {
                generation: 1,
                last_failure: None,
            }),
            loading: Mutex::new(()),
            _ticker: ticker,
        })
    }

    pub fn active(&self) -> Arc<LoadedGuest> {
        self.active.load_full()
    }

    pub fn status(&self) -> GuestStatus {
        GuestStatus {
            active: self.active().meta.clone(),
            last_failure: self.history().last_failure.clone(),
        }
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Compiles and validates a new guest, then makes it the active one. On failure the
    /// current guest keeps serving and the failure is recorded. Blocking.
    pub fn load(&self, source: GuestSource) -> anyhow::Result<Loaded> {
        let _loading = self
            .loading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let describe = source.describe();
        let candidate = match source.read() {
            Ok(candidate) => candidate,
            Err(error) => return Err(self.record_failure(describe, None, error)),
        };
        let current = self.active();
        if current.meta.sha256 == candidate.sha256 {
            return Ok(Loaded::Unchanged(current));
        }
        let sha256 = candidate.sha256.clone();
        let generation = self.history().generation + 1;
        let compiled = Self::compile(
            &self.engine,
            &self.linker,
            self.cache.as_ref(),
            self.limits,
            candidate,
            generation,
        );
        match compiled {
            Ok(guest) => {
                let guest = Arc::new(guest);
                self.history().generation = generation;
                self.active.store(guest.clone());
                tracing::info!(
                    guest = %guest.meta.name,
                    sha256 = %&guest.meta.sha256[..12],
                    generation,
                    load_ms = guest.meta.load_ms,
                    from_cache = guest.meta.from_cache,
                    "guest swapped in"
                );
                Ok(Loaded::Swapped(guest))
            }
            Err(error) => Err(self.record_failure(describe, Some(sha256), error)),
        }
    }

    fn record_failure(
        &self,
        source: String,
        sha256: Option<String>,
        error: anyhow::Error,
    ) -> anyhow::Error {
        tracing::error!(%source, "guest load failed, the previous guest keeps serving: {error:#}");
        self.history().last_failure = Some(FailedLoad {
            source,
            sha256,
            at: now_rfc3339(),
            error: format!("{error:#}"),
        });
        error
    }

    fn compile(
        engine: &Engine,
        linker: &Linker<RequestState>,
        cache: Option<&ComponentCache>,
        limits: Limits,
        candidate: Candidate,
        generation: u64,
    ) -> anyhow::Result<LoadedGuest> {
        let started = Instant::now();
        let Candidate {
            name,
            source,
            bytes,
            sha256,
        } = candidate;
        let cached = cache.and_then(|cache| cache.get(engine, &sha256));
        let from_cache = cached.is_some();
        let component = match cached {
            Some(component) => component,
            None => {
                let component = Component::new(engine, &bytes)
                    .map_err(anyhow::Error::from)
                    .context("not a valid WebAssembly component")?;
                if let Some(cache) = cache
                    && let Err(error) = cache.put(&sha256, &component)
                {
                    tracing::warn!("cannot cache the compiled guest: {error:#}");
                }
                component
            }
        };
        let pre = linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .context("the guest imports something this host does not provide")?;
        let pre = WorkerPre::new(pre)
            .map_err(anyhow::Error::from)
            .context("the guest does not export the rbee:worker/handler interface")?;
        let name: Arc<str> = name.into();
        // A trial instantiation runs the guest's start-up code (a language runtime's
        // initialisation) so a guest that cannot even start never goes live.
        let mut store = Store::new(
            engine,
            RequestState::trial(Sandbox::new(limits), name.clone()),
        );
        configure_store(&mut store);
        pre.instantiate(&mut store)
            .map_err(anyhow::Error::from)
            .context("the guest failed to instantiate")?;
        Ok(LoadedGuest {
            pre,
            meta: GuestMeta {
                name: name.to_string(),
                sha256,
                source,
                loaded_at: now_rfc3339(),
                load_ms: started.elapsed().as_millis() as u64,
                from_cache,
                generation,
            },
            name,
        })
    }

    /// Serves one request on `guest` in a fresh instance. Blocking: call it from a blocking
    /// thread.
    pub fn handle(
        &self,
        guest: &LoadedGuest,
        request: InferRequest,
        context: RequestContext,
    ) -> Result<InferResponse, GuestFailure> {
        let state = RequestState::new(
            Sandbox::new(self.limits),
            Some(context.model),
            context.client,
            context.cancellation,
            guest.name.clone(),
        );
        let mut store = Store::new(&self.engine, state);
        configure_store(&mut store);
        let outcome = guest.pre.instantiate(&mut store).and_then(|worker| {
            worker
                .rbee_worker_handler()
                .call_handle(&mut store, &request)
        });
        match outcome {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(GuestFailure::Returned(error)),
            Err(trap) => Err(self.explain_trap(guest, &store, trap)),
        }
    }

    fn explain_trap(
        &self,
        guest: &LoadedGuest,
        store: &Store<RequestState>,
        trap: wasmtime::Error,
    ) -> GuestFailure {
        let guest_name = guest.meta.name.clone();
        match store.data().sandbox.exceeded {
            Some(Exceeded::Time) => GuestFailure::Timeout {
                guest: guest_name,
                limit: self.limits.time,
            },
            Some(Exceeded::Memory) => GuestFailure::OutOfMemory {
                guest: guest_name,
                limit_mib: self.limits.memory_bytes >> 20,
            },
            None => {
                // The trap itself ("wasm `unreachable` instruction executed"), then what the
                // guest said on stderr before it died (a panic message, a traceback).
                let what = match trap.downcast_ref::<wasmtime::Trap>() {
                    Some(trap) => trap.to_string(),
                    None => trap
                        .to_string()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                };
                let stderr = store.data().stderr.contents();
                let stderr = String::from_utf8_lossy(&stderr);
                let said: Vec<&str> = stderr
                    .lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty() && !line.starts_with("note: run with"))
                    .collect();
                let mut reason = what;
                if !said.is_empty() {
                    reason = format!("{reason}; guest stderr: {}", said.join(" | "));
                }
                reason.truncate(reason.floor_char_boundary(MAX_TRAP_MESSAGE));
                GuestFailure::Trapped {
                    guest: guest_name,
                    reason,
                }
            }
        }
    }
}

fn configure_store(store: &mut Store<RequestState>) {
    store.limiter(|state| &mut state.sandbox);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut store| store.data_mut().sandbox.on_epoch());
}

fn wasmtime_config(settings: &RuntimeSettings) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    // Language runtimes (CPython, SpiderMonkey) bring a handful of core modules, memories and
    // large tables per component; these bounds fit them with room to spare.
    let instances = settings.max_instances;
    pool.total_component_instances(instances)
        .total_core_instances(instances * 32)
        .total_memories(instances * 8)
        .total_tables(instances * 16)
        .total_stacks(instances)
        .max_core_instances_per_component(32)
        .max_memories_per_component(8)
        .max_tables_per_component(16)
        .max_memory_size(settings.limits.memory_bytes)
        .table_elements(1 << 16)
        .max_component_instance_size(1 << 20)
        .max_core_instance_size(1 << 20);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
