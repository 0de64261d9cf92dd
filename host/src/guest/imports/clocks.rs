//! `wasi:clocks/monotonic-clock`'s waits, bounded by the sandbox. A guest that blocks in
//! WASI (`sleep`, a `poll` on a clock) is not running wasm, so the epoch check that enforces
//! its time limit cannot reach it; these waits end by the guest's remaining time and when its
//! request is cancelled, after which the epoch check stops the guest. The wait is the
//! guest's own time: it holds a thread.

use std::time::Duration;

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::clocks::WasiClocksCtxView;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host as _;
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};

use crate::guest::cancellation::Cancellation;
use crate::guest::sandbox::{EPOCH_TICK, Sandbox};

/// How often a guest's clock wait looks at its request's cancellation.
const CANCEL_CHECK: Duration = Duration::from_millis(20);

/// The WASI interface whose waits are bounded; the version is the one wasmtime-wasi defines,
/// so that these definitions replace its own (guests importing any 0.2.x resolve to it).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// What a bounded wait reads: the guest's sandbox (time left, cancellation) and WASI's clocks
/// and resource table, where the wait's pollable goes.
pub struct ClocksView<'a> {
    pub sandbox: &'a Sandbox,
    pub clocks: WasiClocksCtxView<'a>,
}

/// Replaces WASI's `monotonic-clock.subscribe-duration` and `subscribe-instant` in `linker`
/// (which must already hold wasmtime-wasi's) with bounded waits; `view` finds their context
/// in the store. Costs nothing per request: the functions are resolved when a guest is
/// compiled.
pub fn add_to_linker<T: 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> ClocksView<'_>,
) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        move |mut store: StoreContextMut<'_, T>, (nanos,): (u64,)| {
            bounded_wait(view(store.data_mut()), Duration::from_nanos(nanos))
                .map(|pollable| (pollable,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        move |mut store: StoreContextMut<'_, T>, (when,): (u64,)| {
            let mut view = view(store.data_mut());
            let now = view.clocks.now()?;
            bounded_wait(view, Duration::from_nanos(when.saturating_sub(now)))
                .map(|pollable| (pollable,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A pollable ready after `wait`, or sooner: once the guest's time is up (a little after, so
/// the epoch check finds it exceeded) or its request is cancelled.
fn bounded_wait(view: ClocksView<'_>, wait: Duration) -> wasmtime::Result<Resource<DynPollable>> {
    let cut = view.sandbox.time_left() + EPOCH_TICK;
    let wait = BoundedWait {
        until: tokio::time::Instant::now() + wait.min(cut),
        cancellation: view.sandbox.cancellation().clone(),
    };
    let table = view.clocks.table;
    let wait = table.push(wait)?;
    subscribe(table, wait)
}

struct BoundedWait {
    until: tokio::time::Instant,
    cancellation: Cancellation,
}

#[wasmtime_wasi::async_trait]
impl Pollable for BoundedWait {
    async fn ready(&mut self) {
        loop {
            let now = tokio::time::Instant::now();
            if now >= self.until || self.cancellation.is_cancelled() {
                return;
            }
            tokio::time::sleep_until(self.until.min(now + CANCEL_CHECK)).await;
        }
    }
}
