//! The generation loop: prefill the prompt in one pass, then one token per step with the KV
//! cache, streaming text as it becomes final.

use std::ops::ControlFlow;
use std::time::Instant;

use burn::tensor::{Device, Int, Tensor, TensorData};
use tokenizers::Tokenizer;

use crate::model::{Cache, Llama, Rope};
use crate::sampling::Sampler;
use crate::text::TextStream;
use crate::{Completion, EngineError, FinishReason, SamplingParams};

/// The parts of a loaded model that requests use.
pub struct Runtime {
    pub model: Llama,
    pub rope: Rope,
    pub tokenizer: Tokenizer,
    pub eos_ids: Vec<u32>,
    pub bos_id: Option<u32>,
    pub device: Device,
    pub context_length: usize,
    pub vocab_size: usize,
}

impl Runtime {
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, EngineError> {
        let encoding = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| EngineError::InvalidInput(format!("cannot tokenize: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        // A templated prompt often starts with the bos string itself; the tokenizer's
        // post-processor then adds a second one.
        if special
            && let Some(bos) = self.bos_id
            && ids.len() >= 2
            && ids[0] == bos
            && ids[1] == bos
        {
            ids.remove(0);
        }
        Ok(ids)
    }

    /// Runs `ids` at positions `cache.len..` and returns the logits (`[s, vocab]` row-major,
    /// or only the last row when `last_only`).
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut Cache,
        last_only: bool,
    ) -> Result<Vec<f32>, EngineError> {
        // The pass runs on a rayon worker, so the ~200 parallel matmuls of a token each start
        // inside the pool (a cheap join) rather than waking it from outside and sleeping until
        // it finishes (a futex round trip each: about 4 ms of a 16 ms token on two cores).
        rayon::scope(|_| {
            let data = TensorData::new(ids.iter().map(|&i| i as i64).collect(), [1, ids.len()]);
            let tokens = Tensor::<2, Int>::from_data(data, &self.device);
            let logits = self.model.forward(tokens, &self.rope, cache, last_only);
            logits
                .into_data()
                .try_to_vec::<f32>()
                .map_err(|e| EngineError::Model(format!("reading logits: {e:?}")))
        })
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), EngineError> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(id) => Err(EngineError::InvalidInput(format!(
                "token id {id} is outside the model's vocabulary ({})",
                self.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// Logits for every position of `ids` (a verification hook: one forward pass, no cache).
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        if ids.is_empty() {
            return Err(EngineError::InvalidInput("no tokens".into()));
        }
        self.check_ids(ids)?;
        if ids.len() > self.context_length {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: ids.len() as u32,
                max_tokens: 0,
                context_length: self.context_length as u32,
            });
        }
        let mut cache = Cache::new(self.model.model.layers.len(), ids.len());
        self.forward(ids, &mut cache, false)
    }

    pub fn generate(
        &self,
        prompt: &str,
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, EngineError> {
        let prompt_ids = self.encode(prompt, true)?;
        Ok(self.generate_ids(&prompt_ids, params, on_text)?.0)
    }

    pub fn generate_ids(
        &self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(Completion, Vec<u32>), EngineError> {
        params.validate()?;
        if prompt_ids.is_empty() {
            return Err(EngineError::InvalidInput(
                "the prompt is empty (no tokens to condition on)".into(),
            ));
        }
        self.check_ids(prompt_ids)?;
        let prompt_tokens = prompt_ids.len();
        if prompt_tokens + params.max_tokens as usize > self.context_length {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: prompt_tokens as u32,
                max_tokens: params.max_tokens,
                context_length: self.context_length as u32,
            });
        }

        let mut sampler = Sampler::new(params);
        let mut stream = TextStream::new(&self.tokenizer, &params.stop);
        let mut history = prompt_ids.to_vec();
        let capacity = prompt_tokens + params.max_tokens as usize;
        let mut cache = Cache::new(self.model.model.layers.len(), capacity);
        let mut generated = 0u32;

        let start = Instant::now();
        let mut finish = FinishReason::Length;
        let prefill;
        if params.max_tokens == 0 {
            prefill = start.elapsed();
        } else {
            let mut logits = self.forward(prompt_ids, &mut cache, true)?;
            prefill = start.elapsed();
            loop {
                let next = sampler.sample(&mut logits, &history);
                if self.eos_ids.contains(&next) {
                    finish = FinishReason::Eos;
                    break;
                }
                generated += 1;
                history.push(next);
                let step = stream.push(next)?;
                if !step.emit.is_empty() && on_text(&step.emit).is_break() {
                    finish = FinishReason::Cancelled;
                    break;
                }
                if step.stopped {
                    finish = FinishReason::Stop;
                    break;
                }
                if generated >= params.max_tokens {
                    break;
                }
                logits = self.forward(&[next], &mut cache, true)?;
            }
        }
        if matches!(finish, FinishReason::Eos | FinishReason::Length) {
            let rest = stream.finish()?;
            if !rest.is_empty() && on_text(&rest).is_break() {
                finish = FinishReason::Cancelled;
            }
        }
        let decode = start.elapsed() - prefill;
        let completion = Completion {
            text: stream.text().to_string(),
            prompt_tokens: prompt_tokens as u32,
            generated_tokens: generated,
            finish_reason: finish,
            prefill,
            decode,
        };
        Ok((completion, history.split_off(prompt_tokens)))
    }
}
