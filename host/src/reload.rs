//! Hot-swap triggers for the guest file: a change on disk (watched, debounced so a file being
//! written in pieces is read once it is complete) and SIGHUP. The admin endpoint is the third
//! trigger (see `http::admin`). Every trigger ends in `GuestRuntime::load`, which keeps the current
//! guest serving when the new one does not compile or does not fit the `worker` world.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::guest::{GuestRuntime, GuestSource, SwapOutcome};

/// Quiet time after the last file event before the guest is reloaded.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Keeps the file watcher alive; dropping it stops watching.
pub struct Triggers {
    _watcher: Option<RecommendedWatcher>,
}

pub fn start(
    runtime: Arc<GuestRuntime>,
    guest: PathBuf,
    watch_file: bool,
) -> anyhow::Result<Triggers> {
    let (wake, woken) = mpsc::unbounded_channel::<Reason>();
    let watcher = if watch_file {
        Some(watch(&guest, wake.clone())?)
    } else {
        None
    };
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            if wake.send(Reason::Hangup).is_err() {
                return;
            }
        }
    });
    tokio::spawn(reload_loop(runtime, guest, woken));
    Ok(Triggers { _watcher: watcher })
}

#[derive(Debug, Clone, Copy)]
enum Reason {
    FileChanged,
    Hangup,
}

/// Watches the guest's directory rather than the file: editors and `cp`/`mv` replace files
/// (a new inode), which a watch on the file itself would miss.
fn watch(guest: &Path, wake: mpsc::UnboundedSender<Reason>) -> anyhow::Result<RecommendedWatcher> {
    let guest = std::path::absolute(guest).context("cannot resolve the guest path")?;
    let directory = guest
        .parent()
        .context("the guest path has no parent directory")?
        .to_owned();
    let file_name = guest.file_name().map(ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let ours = event
            .paths
            .iter()
            .any(|path| path.file_name().map(ToOwned::to_owned) == file_name);
        if ours {
            let _ = wake.send(Reason::FileChanged);
        }
    })
    .context("cannot create a file watcher")?;
    watcher
        .watch(&directory, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", directory.display()))?;
    Ok(watcher)
}

async fn reload_loop(
    runtime: Arc<GuestRuntime>,
    guest: PathBuf,
    mut woken: mpsc::UnboundedReceiver<Reason>,
) {
    while let Some(mut reason) = woken.recv().await {
        // Debounce: wait until the triggers have been quiet for DEBOUNCE.
        loop {
            match tokio::time::timeout(DEBOUNCE, woken.recv()).await {
                Ok(Some(next)) => reason = next,
                Ok(None) => return,
                Err(_quiet) => break,
            }
        }
        if !guest.exists() {
            // Mid-replacement (removed, not yet renamed in); the next event brings it back.
            continue;
        }
        let runtime = runtime.clone();
        let source = GuestSource::File(guest.clone());
        match tokio::task::spawn_blocking(move || runtime.load(source)).await {
            Ok(Ok(SwapOutcome::Swapped(_))) => tracing::info!(?reason, "guest reloaded"),
            Ok(Ok(SwapOutcome::Unchanged(_))) => tracing::debug!(?reason, "guest unchanged"),
            // `load` has logged and recorded the failure.
            Ok(Err(_)) => {}
            Err(join) => tracing::error!("guest reload panicked: {join}"),
        }
    }
}
