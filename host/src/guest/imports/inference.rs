//! `inference`: the model, as a guest reaches it. A request runs one generation at a time
//! (blocking `infer`, or `infer-stream` with a `token-stream` to read), and time spent in the
//! model is kept off the guest's clock.

use std::ops::ControlFlow;
use std::sync::Arc;

use rbee_engine::{Engine, Prompt};
use wasmtime::component::Resource;

use super::{engine_params, engine_prompt, infer_error, wit_completion};
use crate::guest::bindings::{
    Completion, InferError, ModelInfo, PromptPart, SamplingParams, inference,
};
use crate::guest::generation::Generation;
use crate::guest::request::RequestState;

impl RequestState {
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

impl RequestState {
    /// `infer` and `infer-parts`: one generation, waited for off the guest's clock.
    fn run_generation(
        &mut self,
        prompt: Prompt,
        params: SamplingParams,
    ) -> Result<Completion, InferError> {
        let params = engine_params(params)?;
        self.check_one_generation()?;
        let model = self.loaded_model()?.clone();
        let cancellation = self.cancellation.clone();
        let metrics = self.metrics.clone();
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
        if let Some(metrics) = &self.metrics {
            metrics.generation(
                completion.prompt_tokens,
                completion.generated_tokens,
                completion.finish_reason,
            );
        }
        Ok(wit_completion(completion))
    }

    /// `infer-stream` and `infer-stream-parts`: a generation on its own thread, behind a
    /// `token-stream` handle.
    fn start_generation(
        &mut self,
        prompt: Prompt,
        params: SamplingParams,
    ) -> Result<Resource<Generation>, InferError> {
        // Checked here, not on the model thread, so a bad call fails at once rather than on
        // the stream's first `next`.
        let params = engine_params(params)?;
        self.check_one_generation()?;
        let generation = Generation::start(
            self.loaded_model()?.clone(),
            prompt,
            params,
            self.cancellation.clone(),
            &self.generations,
            self.metrics.clone(),
        )
        .map_err(|error| {
            InferError::ModelError(format!("cannot start a generation thread: {error}"))
        })?;
        self.table
            .push(generation)
            .map_err(|error| InferError::ModelError(format!("too many open streams: {error}")))
    }
}

impl inference::Host for RequestState {
    fn infer(&mut self, prompt: String, params: SamplingParams) -> Result<Completion, InferError> {
        self.run_generation(Prompt::Text(prompt), params)
    }

    fn infer_parts(
        &mut self,
        prompt: Vec<PromptPart>,
        params: SamplingParams,
    ) -> Result<Completion, InferError> {
        self.run_generation(engine_prompt(prompt), params)
    }

    fn infer_stream(
        &mut self,
        prompt: String,
        params: SamplingParams,
    ) -> Result<Resource<Generation>, InferError> {
        self.start_generation(Prompt::Text(prompt), params)
    }

    fn infer_stream_parts(
        &mut self,
        prompt: Vec<PromptPart>,
        params: SamplingParams,
    ) -> Result<Resource<Generation>, InferError> {
        self.start_generation(engine_prompt(prompt), params)
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
