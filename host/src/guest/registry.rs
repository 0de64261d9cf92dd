//! Which guest serves new requests, and what became of the loads that tried to replace it.
//!
//! The active guest sits behind an `ArcSwap`: a swap is one atomic store, and a request that
//! already took its `Arc` finishes on the guest it started with. Loads are serialised (the
//! file watcher, SIGHUP and admin uploads may race) so generations are numbered in the order
//! guests went live; a failed load leaves the active guest in place and is remembered.

use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use serde::Serialize;

use super::compiler::{GuestMeta, LoadedGuest};
use super::source::{Candidate, GuestSource};
use crate::clock::now_rfc3339;

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
    /// Loads that failed since the worker started.
    pub failed_loads: u64,
}

/// What became of a load that succeeded.
pub enum SwapOutcome {
    Swapped(Arc<LoadedGuest>),
    /// The same bytes are already active; nothing changed.
    Unchanged(Arc<LoadedGuest>),
}

pub(super) struct Registry {
    active: ArcSwap<LoadedGuest>,
    history: Mutex<History>,
    /// Held for the whole of a load, so loads go live one at a time.
    loading: Mutex<()>,
}

struct History {
    generation: u64,
    last_failure: Option<FailedLoad>,
    failed_loads: u64,
}

impl Registry {
    /// `first` is generation 1.
    pub fn new(first: LoadedGuest) -> Self {
        Self {
            active: ArcSwap::from_pointee(first),
            history: Mutex::new(History {
                generation: 1,
                last_failure: None,
                failed_loads: 0,
            }),
            loading: Mutex::new(()),
        }
    }

    pub fn active(&self) -> Arc<LoadedGuest> {
        self.active.load_full()
    }

    pub fn status(&self) -> GuestStatus {
        let history = self.history();
        GuestStatus {
            active: self.active().meta.clone(),
            last_failure: history.last_failure.clone(),
            failed_loads: history.failed_loads,
        }
    }

    /// Reads `source` and, unless it is the active guest already, builds it with `compile`
    /// (given the candidate and its generation) and makes it the active one. On failure the
    /// current guest keeps serving and the failure is recorded.
    pub fn load(
        &self,
        source: GuestSource,
        compile: impl FnOnce(Candidate, u64) -> anyhow::Result<LoadedGuest>,
    ) -> anyhow::Result<SwapOutcome> {
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
            return Ok(SwapOutcome::Unchanged(current));
        }
        let sha256 = candidate.sha256.clone();
        let generation = self.history().generation + 1;
        match compile(candidate, generation) {
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
                Ok(SwapOutcome::Swapped(guest))
            }
            Err(error) => Err(self.record_failure(describe, Some(sha256), error)),
        }
    }

    fn history(&self) -> MutexGuard<'_, History> {
        self.history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record_failure(
        &self,
        source: String,
        sha256: Option<String>,
        error: anyhow::Error,
    ) -> anyhow::Error {
        tracing::error!(%source, "guest load failed, the previous guest keeps serving: {error:#}");
        let mut history = self.history();
        history.failed_loads += 1;
        history.last_failure = Some(FailedLoad {
            source,
            sha256,
            at: now_rfc3339(),
            error: format!("{error:#}"),
        });
        error
    }
}
