//! The worker's lifecycle.
//!
//! Start-up order: listen (so the port is known), compile the guest (a broken guest fails
//! fast), serve HTTP while the model loads in the background (`/info` says `starting`,
//! `/v1/infer` answers 503), then `ready`. SIGTERM/SIGINT stop accepting and report
//! `stopped` at once (the queen sends no more work), give in-flight requests a grace period,
//! cut what is left and exit once the final heartbeat is out. A second signal exits at once.
//! Nothing the worker waits for on the way out is unbounded: `main` does not wait for blocking
//! threads (a model load or a guest that is stuck) either.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use anyhow::Context;
use rbee_engine::{BatchStats, DeviceChoice, Engine, LoadOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admission::Admission;
use crate::cache_dir;
use crate::cli::Args;
use crate::guest::{GuestLimits, GuestRuntime, GuestRuntimeSettings, GuestSource};
use crate::http::{self, AppState};
use crate::metrics::{Metrics, WorkerState};
use crate::queen::{Heartbeats, Status};
use crate::reload;

/// How long the final `stopped` heartbeat may take before the worker exits anyway.
const FINAL_BEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long cut requests get to end their responses after the grace period.
const CUT_TIMEOUT: Duration = Duration::from_secs(2);

/// The exit status after a second SIGTERM/SIGINT (128 + SIGINT, as a shell reports an
/// interrupted command).
const SECOND_SIGNAL_EXIT: i32 = 130;

/// Why the worker shuts down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShutdownReason {
    Signal,
    ModelFailed,
}

/// Set once, by whichever asks first: a signal or a model that failed to load.
type ShutdownSender = watch::Sender<Option<ShutdownReason>>;
type ShutdownReceiver = watch::Receiver<Option<ShutdownReason>>;

type ServerTask = JoinHandle<std::io::Result<()>>;

/// Runs the worker until a signal stops it (Ok) or the model fails to load (Err).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind((args.host, args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let port = listener.local_addr()?.port();
    let served_model = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| model_name(&args.model));
    let status = Arc::new(Status::new(
        worker_id(&args),
        served_model.clone(),
        requested_device(args.device),
        port,
    ));

    let guests = Arc::new(start_guest_runtime(&args).await?);
    let app = Arc::new_cyclic(|app| AppState {
        metrics: Metrics::new(&served_model, Arc::new(MetricsState(app.clone()))),
        status: status.clone(),
        guests: guests.clone(),
        model: OnceLock::new(),
        admission: Admission::new(
            args.max_concurrent as usize,
            args.queue_size as usize,
            args.queue_timeout,
        ),
        cut: Arc::new(AtomicBool::new(false)),
        admin_token: args.admin_token.clone(),
        api_key: args.api_key.clone(),
        served_model: served_model.clone(),
        started_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs()),
        max_body_bytes: args.max_body_kb * 1024,
        request_timeout: args.request_timeout,
    });
    let _triggers = reload::start(guests, args.guest.clone(), !args.no_watch)?;
    let heartbeat = match args.heartbeat_url() {
        Some(url) => {
            let beats = Heartbeats::new(url, args.heartbeat_interval)?;
            Some(tokio::spawn(beats.run(status.subscribe())))
        }
        None => None,
    };

    let (shutdown, shutting_down) = watch::channel(None::<ShutdownReason>);
    tokio::spawn(load_model(
        app.clone(),
        args.model.clone(),
        args.load_options(),
        shutdown.clone(),
    ));
    tokio::spawn(shut_down_on_signal(shutdown));

    tracing::info!(port, "listening");
    let limits = http::ClientLimits::new(args.max_connections as usize, args.request_timeout);
    let mut server = serve(listener, app.clone(), limits, shutting_down.clone());
    let reason = wait_for_shutdown(shutting_down, &mut server).await?;
    tracing::info!(?reason, grace = ?args.shutdown_grace, "shutting down: no new requests");
    // Not `ready` any more: the queen hears it now, not after the grace period, and new
    // requests get 503 while the ones in flight finish.
    status.stopped();
    drain(&mut server, args.shutdown_grace, &app.cut).await;
    if let Some(heartbeat) = heartbeat
        && tokio::time::timeout(FINAL_BEAT_TIMEOUT, heartbeat)
            .await
            .is_err()
    {
        tracing::warn!("the final heartbeat did not complete in time");
    }
    match reason {
        ShutdownReason::Signal => Ok(()),
        ShutdownReason::ModelFailed => {
            anyhow::bail!("stopped because the model could not be loaded")
        }
    }
}

/// The HTTP server, on its own task; it stops accepting once a shutdown is asked for.
fn serve(
    listener: TcpListener,
    app: Arc<AppState>,
    limits: http::ClientLimits,
    mut shutting_down: ShutdownReceiver,
) -> ServerTask {
    let shutdown = async move {
        let _ = shutting_down.wait_for(Option::is_some).await;
    };
    tokio::spawn(http::serve(listener, http::router(app), limits, shutdown))
}

/// Waits until a shutdown is asked for; the server ending by itself is an error.
async fn wait_for_shutdown(
    mut shutting_down: ShutdownReceiver,
    server: &mut ServerTask,
) -> anyhow::Result<ShutdownReason> {
    // Biased: a shutdown also ends the server, and must be seen as the reason.
    tokio::select! {
        biased;
        reason = shutting_down.wait_for(Option::is_some) => {
            Ok(reason?.expect("waited for Some"))
        }
        served = server => {
            served.context("the HTTP server task failed")??;
            anyhow::bail!("the HTTP server stopped unexpectedly");
        }
    }
}

/// Gives in-flight requests `grace` to finish, then cuts their generations and gives their
/// responses a moment to end before the server is aborted.
async fn drain(server: &mut ServerTask, grace: Duration, cut: &AtomicBool) {
    if tokio::time::timeout(grace, &mut *server).await.is_ok() {
        return;
    }
    tracing::warn!("grace period over: cutting the requests still running");
    cut.store(true, Ordering::Release);
    // Generations stop at their next token.
    if tokio::time::timeout(CUT_TIMEOUT, &mut *server)
        .await
        .is_err()
    {
        server.abort();
    }
}

impl Args {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device,
            weights: self.weights,
            // Every request in service is a sequence of the batch.
            max_batch: self.max_concurrent as usize,
            kv_budget_tokens: self.kv_budget_tokens.map(|tokens| tokens as usize),
            prefix_caching: !self.no_prefix_cache,
            speculative: self.speculative == crate::cli::Speculative::Ngram,
            draft_max: self.draft_max as usize,
            draft_length: self.draft_length.into(),
            kv_cache_type: self.kv_cache_type.into(),
            jump_forward: !self.no_jump_forward,
            answer_reuse: !self.no_answer_reuse,
            tuning_cache: self.tuning_cache(),
            ..LoadOptions::default()
        }
    }

    /// The worker's cache directory, unless told to keep nothing on disk.
    fn cache_root(&self) -> Option<PathBuf> {
        match (&self.cache_dir, self.no_cache) {
            (_, true) => None,
            (Some(dir), false) => Some(dir.clone()),
            (None, false) => cache_dir::default_dir(),
        }
    }

    /// Where a GPU keeps its kernel tuning across restarts: `gpu-tuning/` in the cache
    /// directory, when that is private (the CPU path tunes nothing).
    fn tuning_cache(&self) -> Option<PathBuf> {
        if self.device == DeviceChoice::Cpu {
            return None;
        }
        let dir = self.cache_root()?.join("gpu-tuning");
        match cache_dir::create_private(&dir) {
            Ok(()) => Some(dir),
            Err(error) => {
                tracing::warn!(
                    "{error:#}: GPU kernel tuning is not kept across restarts (it is redone \
                     for each new shape after every start)"
                );
                None
            }
        }
    }
}

async fn start_guest_runtime(args: &Args) -> anyhow::Result<GuestRuntime> {
    let cache_dir = args.cache_root();
    let settings = GuestRuntimeSettings {
        limits: GuestLimits {
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
    path: PathBuf,
    options: LoadOptions,
    shutdown: ShutdownSender,
) {
    let loaded = tokio::task::spawn_blocking(move || Engine::load(&path, &options)).await;
    match loaded {
        Ok(Ok(engine)) => {
            let info = engine.info().clone();
            // The name the worker serves the model under (`/info`, `/v1/models`, heartbeats);
            // the checkpoint's own name (a GGUF's `general.name`) is only that.
            tracing::info!(
                model = %app.served_model,
                checkpoint_name = %info.id,
                architecture = %info.architecture,
                format = %info.format,
                device = %info.device,
                context = info.context_length,
                "model ready"
            );
            if app.model.set(Arc::new(engine)).is_ok() {
                app.status.model_ready(info.device);
            }
        }
        Ok(Err(error)) => {
            tracing::error!("{error}");
            shutdown.send_replace(Some(ShutdownReason::ModelFailed));
        }
        Err(join) => {
            tracing::error!("loading the model panicked: {join}");
            shutdown.send_replace(Some(ShutdownReason::ModelFailed));
        }
    }
}

async fn shut_down_on_signal(shutdown: ShutdownSender) {
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
    shutdown.send_if_modified(|reason| {
        let first = reason.is_none();
        if first {
            *reason = Some(ShutdownReason::Signal);
        }
        first
    });
    // An operator who signals again does not want to wait for the grace period.
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    tracing::warn!("second signal: exiting now, without waiting for requests in flight");
    std::process::exit(SECOND_SIGNAL_EXIT);
}

/// The id the hive assigned, or a random one.
fn worker_id(args: &Args) -> String {
    args.worker_id
        .clone()
        .unwrap_or_else(|| format!("worker-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
}

/// The model's name before it is loaded: the folder's or file's name.
/// What `/metrics` reads from the worker on each scrape. Weak: the metrics live in the
/// state they read.
struct MetricsState(Weak<AppState>);

impl WorkerState for MetricsState {
    fn scheduler(&self) -> Option<BatchStats> {
        let app = self.0.upgrade()?;
        app.model.get().map(|engine| engine.batch_stats())
    }

    fn queued(&self) -> usize {
        self.0.upgrade().map_or(0, |app| app.admission.counts().1)
    }

    fn guests(&self) -> (u64, u64) {
        self.0.upgrade().map_or((0, 0), |app| {
            let status = app.guests.status();
            (status.active.generation, status.failed_loads)
        })
    }
}

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
        // A bare index resolves once the model loads (GPU N, or the CPU for 0 without one).
        DeviceChoice::Auto | DeviceChoice::Cpu | DeviceChoice::Index(_) => "CPU-0".into(),
    }
}
