//! The worker's lifecycle.
//!
//! Start-up order: listen (so the port is known), compile the guest (a broken guest fails
//! fast), serve HTTP while the model loads in the background (`/info` says `starting`,
//! `/v1/infer` answers 503), then `ready`. SIGTERM/SIGINT stop accepting, give in-flight
//! requests a grace period, cut what is left, send the final `stopped` heartbeat and exit.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use rbee_engine::{DeviceChoice, Engine, LoadOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::Admission;
use crate::api::{self, AppState};
use crate::cli::Args;
use crate::guest::{ComponentCache, GuestRuntime, GuestSource, Limits, RuntimeSettings};
use crate::heartbeat::Heartbeats;
use crate::reload;
use crate::status::Status;

/// How long the final `stopped` heartbeat may take before the worker exits anyway.
const FINAL_BEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the worker stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Signal,
    ModelFailed,
}

/// Runs the worker until a signal stops it (Ok) or the model fails to load (Err).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind((args.host, args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let port = listener.local_addr()?.port();
    let worker_id = args
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("worker-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    let status = Arc::new(Status::new(
        worker_id,
        model_name(&args.model),
        requested_device(args.device),
        port,
    ));

    let guests = Arc::new(start_guest_runtime(&args).await?);
    let app = Arc::new(AppState {
        status: status.clone(),
        guests: guests.clone(),
        model: OnceLock::new(),
        admission: Admission::new(args.max_concurrent as usize, args.queue_size as usize),
        cut: Arc::new(AtomicBool::new(false)),
        admin_token: args.admin_token.clone(),
        max_body_bytes: args.max_body_kb * 1024,
    });
    let _triggers = reload::start(guests, args.guest.clone(), !args.no_watch)?;

    let heartbeat = match args.heartbeat_url() {
        Some(url) => {
            let beats = Heartbeats::new(url, args.heartbeat_interval)?;
            Some(tokio::spawn(beats.run(status.subscribe())))
        }
        None => None,
    };

    let (stop, mut stopping) = watch::channel(None::<Stop>);
    tokio::spawn(load_model(
        app.clone(),
        args.model.clone(),
        args.load_options(),
        stop.clone(),
    ));
    tokio::spawn(stop_on_signal(stop));

    tracing::info!(port, "listening");
    let server = axum::serve(listener, api::router(app.clone())).with_graceful_shutdown({
        let mut stopping = stopping.clone();
        async move {
            let _ = stopping.wait_for(Option::is_some).await;
        }
    });
    let mut server = tokio::spawn(async move { server.await });

    // Biased: a stop request also ends the server, and must be seen as the reason.
    let reason = tokio::select! {
        biased;
        reason = stopping.wait_for(Option::is_some) => reason?.expect("waited for Some"),
        served = &mut server => {
            served.context("the HTTP server task failed")??;
            anyhow::bail!("the HTTP server stopped unexpectedly");
        }
    };
    tracing::info!(?reason, grace = ?args.shutdown_grace, "shutting down: no new requests");
    if tokio::time::timeout(args.shutdown_grace, &mut server)
        .await
        .is_err()
    {
        tracing::warn!("grace period over: cutting the requests still running");
        app.cut.store(true, Ordering::Release);
        // Generations stop at their next token; give their responses a moment to end.
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
    status.stopped();
    if let Some(heartbeat) = heartbeat
        && tokio::time::timeout(FINAL_BEAT_TIMEOUT, heartbeat)
            .await
            .is_err()
    {
        tracing::warn!("the final heartbeat did not complete in time");
    }
    match reason {
        Stop::Signal => Ok(()),
        Stop::ModelFailed => anyhow::bail!("stopped because the model could not be loaded"),
    }
}

impl Args {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device,
            weights: self.weights,
        }
    }
}

async fn start_guest_runtime(args: &Args) -> anyhow::Result<GuestRuntime> {
    let cache_dir = match (&args.cache_dir, args.no_cache) {
        (_, true) => None,
        (Some(dir), false) => Some(dir.clone()),
        (None, false) => ComponentCache::default_dir(),
    };
    let settings = RuntimeSettings {
        limits: Limits {
            time: args.guest_timeout,
            memory_bytes: usize::try_from(args.guest_memory_mb << 20)
                .context("--guest-memory-mb is too large")?,
        },
        // Requests in service on the current guest, as many finishing on a swapped-out one,
        // and validation instances for swaps.
        max_instances: args.max_concurrent * 2 + 4,
        cache_dir,
    };
    let first = GuestSource::File(args.guest.clone());
    tokio::task::spawn_blocking(move || GuestRuntime::start(settings, first)).await?
}

async fn load_model(
    app: Arc<AppState>,
    path: std::path::PathBuf,
    options: LoadOptions,
    stop: watch::Sender<Option<Stop>>,
) {
    let loaded = tokio::task::spawn_blocking(move || Engine::load(&path, &options)).await;
    match loaded {
        Ok(Ok(engine)) => {
            let info = engine.info().clone();
            tracing::info!(
                model = %info.id,
                architecture = %info.architecture,
                format = %info.format,
                device = %info.device,
                context = info.context_length,
                "model ready"
            );
            if app.model.set(Arc::new(engine)).is_ok() {
                app.status.model_ready(info.id, info.device);
            }
        }
        Ok(Err(error)) => {
            tracing::error!("{error}");
            stop.send_replace(Some(Stop::ModelFailed));
        }
        Err(join) => {
            tracing::error!("loading the model panicked: {join}");
            stop.send_replace(Some(Stop::ModelFailed));
        }
    }
}

async fn stop_on_signal(stop: watch::Sender<Option<Stop>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT");
        return;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    // A model failure may have asked to stop first; keep that reason.
    stop.send_if_modified(|reason| {
        let first = reason.is_none();
        if first {
            *reason = Some(Stop::Signal);
        }
        first
    });
}

/// The model's name before it is loaded: the folder's or file's name.
fn model_name(path: &Path) -> String {
    path.file_stem()
        .or(path.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The device as `/info` shows it while the model loads (`auto` resolves when it has loaded).
fn requested_device(device: DeviceChoice) -> String {
    match device {
        DeviceChoice::Gpu(index) => format!("GPU-{index}"),
        DeviceChoice::Auto | DeviceChoice::Cpu => "CPU-0".into(),
    }
}
