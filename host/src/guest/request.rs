//! The host side of the WIT imports (`inference`, `output`, `log`), implemented on the
//! per-request store data. Every check the host must make on a guest's call lives here: the
//! guest is untrusted, so its parameters are validated as strictly as a client's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rbee_engine::{Engine, EngineError};
use tokio::sync::mpsc;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{
    Completion, FinishReason, InferError, ModelInfo, SamplingParams, StreamItem, inference, log,
    output, types,
};
use super::sandbox::Sandbox;
use super::stream::{GenerationCount, Next, TokenStream};

/// Longest stop list and stop string a guest may pass (each is checked on every token).
const MAX_STOP_SEQUENCES: usize = 16;
const MAX_STOP_BYTES: usize = 256;

/// Why a request's generation should end early: its client went away, or the worker is
/// shutting down past its grace period.
#[derive(Clone, Default)]
pub struct Cancellation {
    client_gone: Arc<AtomicBool>,
    shutdown: Arc<AtomicBool>,
}

impl Cancellation {
    /// A cancellation for one request that also observes the worker-wide `shutdown` flag.
    pub fn for_request(shutdown: Arc<AtomicBool>) -> Self {
        Self {
            client_gone: Arc::default(),
            shutdown,
        }
    }

    pub fn client_gone(&self) {
        self.client_gone.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.client_gone.load(Ordering::Acquire) || self.shutdown.load(Ordering::Acquire)
    }
}

/// Everything one request's guest instance can reach.
pub struct RequestState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub sandbox: Sandbox,
    /// What the guest wrote to stderr (a Rust panic message, a Python traceback), kept to
    /// explain a trap.
    pub stderr: MemoryOutputPipe,
    /// `None` only for the trial instance that validates a new guest.
    model: Option<Arc<Engine>>,
    /// Where `output.emit` sends text; `None` for a request that is not streamed.
    client: Option<mpsc::Sender<String>>,
    cancellation: Cancellation,
    generations: GenerationCount,
    guest_name: Arc<str>,
}

/// Bytes of guest stderr kept per request.
const STDERR_CAPTURE: usize = 64 * 1024;

impl RequestState {
    pub fn new(
        sandbox: Sandbox,
        model: Option<Arc<Engine>>,
        client: Option<mpsc::Sender<String>>,
        cancellation: Cancellation,
        guest_name: Arc<str>,
    ) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        // No preopened directories, environment, arguments or network: a guest gets only
        // what this worker's WIT world offers. stdout is discarded, stderr kept for errors.
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            sandbox,
            stderr,
            model,
            client,
            cancellation,
            generations: GenerationCount::default(),
            guest_name,
        }
    }

    /// State for the trial instantiation that validates a guest before it goes live: no
    /// model, no client.
    pub fn trial(sandbox: Sandbox, guest_name: Arc<str>) -> Self {
        Self::new(sandbox, None, None, Cancellation::default(), guest_name)
    }

    fn loaded_model(&self) -> Result<&Arc<Engine>, InferError> {
        self.model
            .as_ref()
            .ok_or_else(|| InferError::ModelError("no model in a validation instance".into()))
    }

    fn check_one_generation(&self) -> Result<(), InferError> {
        if self.generations.running() > 0 {
            return Err(InferError::Busy(
                "a generation is already running for this request; finish or drop its stream first"
                    .into(),
            ));
        }
        Ok(())
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

impl types::Host for RequestState {}

impl inference::Host for RequestState {
    fn infer(&mut self, prompt: String, params: SamplingParams) -> Result<Completion, InferError> {
        let params = engine_params(params)?;
        self.check_one_generation()?;
        let model = self.loaded_model()?.clone();
        let cancellation = self.cancellation.clone();
        let completion = self.sandbox.off_the_clock(|| {
            model.generate(&prompt, &params, &mut |_| {
                if cancellation.is_cancelled() {
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            })
        });
        Ok(wit_completion(completion.map_err(infer_error)?))
    }

    fn infer_stream(
        &mut self,
        prompt: String,
        params: SamplingParams,
    ) -> Result<Resource<TokenStream>, InferError> {
        let params = engine_params(params)?;
        self.check_one_generation()?;
        let stream = TokenStream::start(
            self.loaded_model()?.clone(),
            prompt,
            params,
            self.cancellation.clone(),
            &self.generations,
        )
        .map_err(|error| {
            InferError::ModelError(format!("cannot start a generation thread: {error}"))
        })?;
        self.table
            .push(stream)
            .map_err(|error| InferError::ModelError(format!("too many open streams: {error}")))
    }

    fn tokenize(&mut self, text: String) -> Result<Vec<u32>, InferError> {
        self.loaded_model()?.tokenize(&text).map_err(infer_error)
    }

    fn model(&mut self) -> ModelInfo {
        let Some(model) = &self.model else {
            return ModelInfo {
                id: String::new(),
                architecture: String::new(),
                context_length: 0,
                bos_token: None,
                eos_tokens: Vec::new(),
                chat_template: None,
                device: String::new(),
            };
        };
        let info = model.info();
        ModelInfo {
            id: info.id.clone(),
            architecture: info.architecture.clone(),
            context_length: info.context_length,
            bos_token: info.bos_token.clone(),
            eos_tokens: info.eos_tokens.clone(),
            chat_template: info.chat_template.clone(),
            device: info.device.clone(),
        }
    }
}

impl inference::HostTokenStream for RequestState {
    fn next(&mut self, stream: Resource<TokenStream>) -> Result<StreamItem, InferError> {
        let stream = self
            .table
            .get_mut(&stream)
            .map_err(|error| InferError::GuestError(format!("bad token-stream handle: {error}")))?;
        match self.sandbox.off_the_clock(|| stream.next()) {
            Next::Text(text) => Ok(StreamItem::Text(text)),
            Next::Done(done) => Ok(StreamItem::Done(wit_completion(done))),
            Next::Failed(error) => Err(infer_error(error)),
        }
    }

    fn drop(&mut self, stream: Resource<TokenStream>) -> wasmtime::Result<()> {
        let stream = self.table.delete(stream)?;
        // Joining the model thread waits for at most one token step.
        self.sandbox.off_the_clock(|| drop(stream));
        Ok(())
    }
}

impl output::Host for RequestState {
    fn emit(&mut self, text: String) -> Result<(), InferError> {
        let Some(client) = &self.client else {
            return Err(InferError::InvalidInput(
                "output.emit is only for streaming requests".into(),
            ));
        };
        if self.cancellation.is_cancelled() {
            return Err(InferError::Cancelled);
        }
        // A slow client makes this wait (bounded channel): back-pressure, off the guest's clock.
        let client = client.clone();
        let sent = self.sandbox.off_the_clock(|| client.blocking_send(text));
        sent.map_err(|_| {
            self.cancellation.client_gone();
            InferError::Cancelled
        })
    }
}

impl log::Host for RequestState {
    fn log(&mut self, level: log::Level, message: String) {
        let guest = &*self.guest_name;
        match level {
            log::Level::Trace => tracing::trace!(guest, "{message}"),
            log::Level::Debug => tracing::debug!(guest, "{message}"),
            log::Level::Info => tracing::info!(guest, "{message}"),
            log::Level::Warn => tracing::warn!(guest, "{message}"),
            log::Level::Error => tracing::error!(guest, "{message}"),
        }
    }
}

/// Checks a guest's sampling parameters against what the engine can run.
fn engine_params(params: SamplingParams) -> Result<rbee_engine::SamplingParams, InferError> {
    let invalid = |message: String| Err(InferError::InvalidInput(message));
    if !(1..=4096).contains(&params.max_tokens) {
        return invalid(format!(
            "max-tokens must be 1..=4096, got {}",
            params.max_tokens
        ));
    }
    if !(0.0..=2.0).contains(&params.temperature) {
        return invalid(format!(
            "temperature must be 0..=2, got {}",
            params.temperature
        ));
    }
    if !(params.top_p > 0.0 && params.top_p <= 1.0) {
        return invalid(format!("top-p must be in (0, 1], got {}", params.top_p));
    }
    if !(params.repeat_penalty > 0.0 && params.repeat_penalty.is_finite()) {
        return invalid(format!(
            "repeat-penalty must be positive, got {}",
            params.repeat_penalty
        ));
    }
    if params.stop.len() > MAX_STOP_SEQUENCES {
        return invalid(format!(
            "at most {MAX_STOP_SEQUENCES} stop sequences, got {}",
            params.stop.len()
        ));
    }
    if params
        .stop
        .iter()
        .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return invalid(format!("stop sequences must be 1..={MAX_STOP_BYTES} bytes"));
    }
    Ok(rbee_engine::SamplingParams {
        max_tokens: params.max_tokens,
        temperature: params.temperature,
        top_k: params.top_k,
        top_p: params.top_p,
        repeat_penalty: params.repeat_penalty,
        seed: params.seed,
        stop: params.stop,
    })
}

fn wit_completion(done: rbee_engine::Completion) -> Completion {
    Completion {
        text: done.text,
        prompt_tokens: done.prompt_tokens,
        tokens_generated: done.generated_tokens,
        finish_reason: match done.finish_reason {
            rbee_engine::FinishReason::Eos => FinishReason::Eos,
            rbee_engine::FinishReason::Length => FinishReason::Length,
            rbee_engine::FinishReason::Stop => FinishReason::Stop,
            rbee_engine::FinishReason::Cancelled => FinishReason::Cancelled,
        },
    }
}

fn infer_error(error: EngineError) -> InferError {
    match error {
        EngineError::InvalidInput(message) => InferError::InvalidInput(message),
        error @ EngineError::ContextOverflow { .. } => {
            InferError::ContextOverflow(error.to_string())
        }
        error @ (EngineError::Load { .. } | EngineError::Model(_)) => {
            InferError::ModelError(error.to_string())
        }
    }
}
