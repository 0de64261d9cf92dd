//! One request's store data: the contexts of the capabilities a guest instance can reach while
//! it serves a request, side by side, and the one function that wires each WIT import to its
//! context. Each import is implemented in `imports` on its own context and knows nothing of
//! this struct; the sandbox (time and memory) and stderr are contexts of the store itself.

use std::sync::Arc;

use rbee_engine::Engine;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{inference, log, output, types};
use super::cancellation::Cancellation;
use super::client::ClientSender;
use super::generation::GenerationCount;
use super::imports::{
    ClocksView, Inference, InferenceCtx, InferenceView, LogCtx, Output, OutputCtx, OutputView,
    clocks,
};
use super::sandbox::{GuestLimits, Sandbox};
use super::stderr::StderrTail;
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

/// Everything one request's guest instance can reach, one context per capability.
pub struct RequestState {
    /// WASI with nothing ambient (see [`RequestState::new`]).
    wasi: WasiCtx,
    /// The guest's resources: WASI's streams and pollables, and `token-stream`s.
    table: ResourceTable,
    /// Time and memory accounting; the store's limiter and epoch callback.
    pub(super) sandbox: Sandbox,
    /// The end of what the guest wrote to stderr (a Rust panic message, a Python
    /// traceback), kept to explain a trap.
    pub(super) stderr: StderrTail,
    inference: InferenceCtx,
    output: OutputCtx,
    log: LogCtx,
}

impl RequestState {
    /// State for one client request.
    pub fn for_request(limits: GuestLimits, context: RequestContext, guest_name: Arc<str>) -> Self {
        Self::new(
            limits,
            InferenceCtx {
                model: Some(context.model),
                cancellation: context.cancellation.clone(),
                metrics: context.metrics,
                generations: GenerationCount::default(),
            },
            OutputCtx {
                client: context.client,
                cancellation: context.cancellation,
            },
            guest_name,
        )
    }

    /// State for the trial instantiation that validates a guest before it goes live: no
    /// model, no client.
    pub fn trial(limits: GuestLimits, guest_name: Arc<str>) -> Self {
        let cancellation = Cancellation::default();
        Self::new(
            limits,
            InferenceCtx {
                model: None,
                cancellation: cancellation.clone(),
                metrics: None,
                generations: GenerationCount::default(),
            },
            OutputCtx {
                client: None,
                cancellation,
            },
            guest_name,
        )
    }

    fn new(
        limits: GuestLimits,
        inference: InferenceCtx,
        output: OutputCtx,
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
            wasi,
            table,
            sandbox: Sandbox::new(limits, inference.cancellation.clone()),
            stderr,
            inference,
            output,
            log: LogCtx::new(guest_name),
        }
    }

    fn inference(&mut self) -> InferenceView<'_> {
        InferenceView {
            ctx: &mut self.inference,
            table: &mut self.table,
            sandbox: &mut self.sandbox,
        }
    }

    fn output(&mut self) -> OutputView<'_> {
        OutputView {
            ctx: &self.output,
            sandbox: &mut self.sandbox,
        }
    }

    fn log(&mut self) -> &mut LogCtx {
        &mut self.log
    }

    fn clocks(&mut self) -> ClocksView<'_> {
        ClocksView {
            sandbox: &self.sandbox,
            clocks: wasmtime_wasi::clocks::WasiClocksCtxView {
                ctx: self.wasi.clocks(),
                table: &mut self.table,
            },
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

/// Every import a guest can reach, each wired to its own context: WASI (nothing ambient),
/// its clock waits bounded by the sandbox, and the worker world's `types`, `inference`,
/// `output` and `log`.
pub(super) fn add_to_linker(linker: &mut Linker<RequestState>) -> anyhow::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    // After WASI's own: these replace its monotonic-clock waits.
    clocks::add_to_linker(linker, RequestState::clocks)?;
    types::add_to_linker::<_, Inference>(linker, RequestState::inference)?;
    inference::add_to_linker::<_, Inference>(linker, RequestState::inference)?;
    output::add_to_linker::<_, Output>(linker, RequestState::output)?;
    log::add_to_linker::<_, HasSelf<LogCtx>>(linker, RequestState::log)?;
    Ok(())
}
