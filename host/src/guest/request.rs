//! One request's store data: everything a guest instance can reach while it serves a request
//! (the model, the client's channel, its cancellation, a WASI context with nothing ambient)
//! and the sandbox's accounting. The WIT imports are implemented on it in `imports`; this
//! module only builds it.

use std::sync::Arc;

use rbee_engine::Engine;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::cancellation::Cancellation;
use super::client::ClientSender;
use super::failure::StderrTail;
use super::generation::GenerationCount;
use super::imports::LogBudget;
use super::sandbox::{Limits, Sandbox};
use crate::metrics::RequestMetrics;

/// Resources (WASI streams and pollables, token streams) a guest instance may hold at once.
/// Each costs host memory the guest's memory cap does not count; real guests hold a few
/// dozen (wasmtime's own default, a million, would let a guest take a lot of host memory).
const MAX_RESOURCES: usize = 4096;

/// The per-request inputs that do not come from the client.
pub struct RequestContext {
    pub model: Arc<Engine>,
    /// Where streamed text goes; `None` for a plain JSON request.
    pub client: Option<ClientSender>,
    pub cancellation: Cancellation,
    /// Where the request's token timings and counts go (`None`: not measured).
    pub metrics: Option<Arc<RequestMetrics>>,
}

/// Everything one request's guest instance can reach.
pub struct RequestState {
    pub(super) metrics: Option<Arc<RequestMetrics>>,
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) sandbox: Sandbox,
    /// The end of what the guest wrote to stderr (a Rust panic message, a Python
    /// traceback), kept to explain a trap.
    pub(super) stderr: StderrTail,
    /// `None` only for the trial instance that validates a new guest.
    pub(super) model: Option<Arc<Engine>>,
    /// Where `output.emit` sends text; `None` for a request that is not streamed.
    pub(super) client: Option<ClientSender>,
    pub(super) cancellation: Cancellation,
    pub(super) generations: GenerationCount,
    pub(super) guest_name: Arc<str>,
    pub(super) log_budget: LogBudget,
}

impl RequestState {
    /// State for one client request.
    pub fn for_request(limits: Limits, context: RequestContext, guest_name: Arc<str>) -> Self {
        let mut state = Self::new(
            limits,
            Some(context.model),
            context.client,
            context.cancellation,
            guest_name,
        );
        state.metrics = context.metrics;
        state
    }

    /// State for the trial instantiation that validates a guest before it goes live: no
    /// model, no client.
    pub fn trial(limits: Limits, guest_name: Arc<str>) -> Self {
        Self::new(limits, None, None, Cancellation::default(), guest_name)
    }

    fn new(
        limits: Limits,
        model: Option<Arc<Engine>>,
        client: Option<ClientSender>,
        cancellation: Cancellation,
        guest_name: Arc<str>,
    ) -> Self {
        let stderr = StderrTail::default();
        // No preopened directories, environment, arguments or network: a guest gets only
        // what this worker's WIT world offers. stdout is discarded, stderr kept for errors.
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        Self {
            metrics: None,
            wasi,
            table,
            sandbox: Sandbox::new(limits, cancellation.clone()),
            stderr,
            model,
            client,
            cancellation,
            generations: GenerationCount::default(),
            guest_name,
            log_budget: LogBudget::default(),
        }
    }
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}
