//! `inference`: the model, as a guest reaches it. A request runs one generation at a time
//! (blocking `infer`, or `infer-stream` with a `token-stream` to read), and time spent in the
//! model is kept off the guest's clock.
//!
//! What it may touch: its own [`InferenceCtx`] (the model, the request's cancellation and
//! metrics, the count of running generations), the resource table that holds its
//! `token-stream`s, and the sandbox, only to keep model time off the guest's clock.

use std::ops::ControlFlow;
use std::sync::Arc;

use rbee_engine::{Engine, Prompt};
use wasmtime::component::{HasData, Resource, ResourceTable};

use super::convert::{engine_params, engine_prompt, infer_error, wit_completion, wit_generation};
use crate::guest::bindings::{
    Completion, Decoding, Generation as WitGeneration, InferError, ModelInfo, PromptPart,
    SamplingParams, inference, types,
};
use crate::guest::cancellation::Cancellation;
use crate::guest::generation::{Generation, GenerationCount};
use crate::guest::sandbox::Sandbox;
use crate::metrics::RequestMetrics;

/// The `inference` capability of one request.
pub struct InferenceCtx {
    /// `None` only for the trial instance that validates a new guest.
    pub model: Option<Arc<Engine>>,
    pub cancellation: Cancellation,
    /// Where the request's token timings and counts go (`None`: not measured).
    pub metrics: Option<Arc<RequestMetrics>>,
    pub generations: GenerationCount,
}

/// [`InferenceCtx`] with what it borrows from the rest of the store.
pub struct InferenceView<'a> {
    pub ctx: &'a mut InferenceCtx,
    pub table: &'a mut ResourceTable,
    pub sandbox: &'a mut Sandbox,
}

/// The `HasData` of the `inference` (and `types`) imports: their host is an
/// [`InferenceView`].
pub struct Inference;

impl HasData for Inference {
    type Data<'a> = InferenceView<'a>;
}

// The shared types have no functions; the inference interface, which uses them, hosts them.
impl types::Host for InferenceView<'_> {}

impl InferenceView<'_> {
    fn loaded_model(&self) -> Result<&Arc<Engine>, InferError> {
        self.ctx
            .model
            .as_ref()
            .ok_or_else(|| InferError::ModelError("no model in a validation instance".into()))
    }

    fn check_one_generation(&self) -> Result<(), InferError> {
        if self.ctx.generations.running() > 0 {
            return Err(InferError::Busy(
                "a generation is already running for this request; finish or drop its stream first"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl InferenceView<'_> {
    /// `infer`, `infer-parts` and `generate`: one generation, waited for off the guest's
    /// clock.
    fn run_generation(
        &mut self,
        prompt: Prompt,
        params: SamplingParams,
        decoding: Option<Decoding>,
    ) -> Result<rbee_engine::Completion, InferError> {
        let params = engine_params(params, decoding)?;
        self.check_one_generation()?;
        let model = self.loaded_model()?.clone();
        let cancellation = self.ctx.cancellation.clone();
        let metrics = self.ctx.metrics.clone();
        let completion = self.sandbox.off_the_clock(|| {
            let cancelled = Some(cancellation.for_engine());
            model.generate_cancellable(prompt, &params, cancelled, &mut |_| {
                if let Some(metrics) = &metrics {
                    metrics.token();
                }
                ControlFlow::Continue(())
            })
        });
        let completion = completion.map_err(infer_error)?;
        if let Some(metrics) = &self.ctx.metrics {
            metrics.generation(
                completion.prompt_tokens,
                completion.generated_tokens,
                completion.finish_reason,
            );
        }
        Ok(completion)
    }

    /// `infer-stream`, `infer-stream-parts` and `generate-stream`: a generation on its own
    /// thread, behind a `token-stream` handle.
    fn start_generation(
        &mut self,
        prompt: Prompt,
        params: SamplingParams,
        decoding: Option<Decoding>,
    ) -> Result<Resource<Generation>, InferError> {
        // Checked here, not on the model thread, so a bad call fails at once rather than on
        // the stream's first `next`. (A constraint's grammar compiles on the model thread:
        // an invalid one fails the first `next`.)
        let params = engine_params(params, decoding)?;
        self.check_one_generation()?;
        let generation = Generation::start(
            self.loaded_model()?.clone(),
            prompt,
            params,
            self.ctx.cancellation.clone(),
            &self.ctx.generations,
            self.ctx.metrics.clone(),
        )
        .map_err(|error| {
            InferError::ModelError(format!("cannot start a generation thread: {error}"))
        })?;
        self.table
            .push(generation)
            .map_err(|error| InferError::ModelError(format!("too many open streams: {error}")))
    }
}

impl inference::Host for InferenceView<'_> {
    fn infer(&mut self, prompt: String, params: SamplingParams) -> Result<Completion, InferError> {
        self.run_generation(Prompt::Text(prompt), params, None)
            .map(wit_completion)
    }

    fn infer_parts(
        &mut self,
        prompt: Vec<PromptPart>,
        params: SamplingParams,
    ) -> Result<Completion, InferError> {
        self.run_generation(engine_prompt(prompt), params, None)
            .map(wit_completion)
    }

    fn generate(
        &mut self,
        prompt: Vec<PromptPart>,
        params: SamplingParams,
        decoding: Decoding,
    ) -> Result<WitGeneration, InferError> {
        self.run_generation(engine_prompt(prompt), params, Some(decoding))
            .map(wit_generation)
    }

    fn infer_stream(
        &mut self,
        prompt: String,
        params: SamplingParams,
    ) -> Result<Resource<Generation>, InferError> {
        self.start_generation(Prompt::Text(prompt), params, None)
    }

    fn infer_stream_parts(
        &mut self,
        prompt: Vec<PromptPart>,
        params: SamplingParams,
    ) -> Result<Resource<Generation>, InferError> {
        self.start_generation(engine_prompt(prompt), params, None)
    }

    fn generate_stream(
        &mut self,
        prompt: Vec<PromptPart>,
        params: SamplingParams,
        decoding: Decoding,
    ) -> Result<Resource<Generation>, InferError> {
        self.start_generation(engine_prompt(prompt), params, Some(decoding))
    }

    fn tokenize(&mut self, text: String) -> Result<Vec<u32>, InferError> {
        self.loaded_model()?.tokenize(&text).map_err(infer_error)
    }

    fn model(&mut self) -> ModelInfo {
        let Some(model) = &self.ctx.model else {
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
