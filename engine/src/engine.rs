//! [`Engine`]: one loaded model and the scheduler that runs it, and [`ModelInfo`], what the
//! model is. Reading the checkpoint is `load`'s work; checking, tokenizing and generating is
//! `run`'s, which the public methods here call into.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::kv::{BlockHash, blocks_for};
use crate::run::{self, BatchLimits, BatchStats, Cancelled, Core, Prompt, Scheduler};
use crate::{
    Completion, Constraint, DEFAULT_KV_BYTES, EngineError, LoadOptions, Piece, SamplingParams, load,
};

/// What the loaded model is.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub architecture: String,
    /// "hf" or "gguf".
    pub format: String,
    pub path: PathBuf,
    pub context_length: u32,
    pub vocab_size: u32,
    pub bos_token: Option<String>,
    pub eos_tokens: Vec<String>,
    pub chat_template: Option<String>,
    /// "CPU-0", "GPU-0", ...
    pub device: String,
}

/// One model in memory, shared by all requests (`Send + Sync`: the model is immutable once
/// loaded, and each generation keeps its own KV cache). Every generation runs in one batch
/// on the scheduler's thread.
pub struct Engine {
    info: ModelInfo,
    /// Crate-visible for the unit tests that check which model form a plan loaded, and
    /// those that drive a batch of their own turn by turn.
    pub(crate) core: Arc<Core>,
    pub(crate) limits: BatchLimits,
    scheduler: Scheduler,
}

impl Engine {
    /// Loads a model from a Hugging Face folder or a GGUF file, showing progress (a bar on a
    /// terminal, log lines otherwise).
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Engine, EngineError> {
        let started = std::time::Instant::now();
        let engine = Self::from_checkpoint(load::load(path, options)?, path, options)?;
        // The path, not `info.id`: that is the checkpoint's own name, while the host serves
        // the model under a name of its choosing and logs that itself.
        tracing::info!(
            path = %path.display(),
            architecture = %engine.info.architecture,
            device = %engine.info.device,
            max_batch = engine.limits.max_batch,
            kv_budget_tokens = engine.limits.kv_positions(),
            prefix_caching = engine.limits.prefix_caching,
            speculative = engine.limits.speculative,
            jump_forward = engine.limits.jump_forward,
            answer_reuse = engine.limits.answer_reuse,
            seconds = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        Ok(engine)
    }

    /// An engine of a loaded checkpoint. Crate-visible for the unit tests that change a
    /// checkpoint's model before running it.
    pub(crate) fn from_checkpoint(
        checkpoint: load::Checkpoint,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<Engine, EngineError> {
        let tokenizer = checkpoint.tokenizer;
        let special = checkpoint.special;
        let config = checkpoint.config;
        let eos_tokens = special
            .eos_ids
            .iter()
            .filter_map(|&id| tokenizer.id_to_token(id))
            .collect();
        let bos_id = special
            .bos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t));
        let info = ModelInfo {
            id: checkpoint.id,
            architecture: config.architecture.clone(),
            format: checkpoint.format.name().into(),
            path: path.to_owned(),
            context_length: config.max_position_embeddings as u32,
            vocab_size: config.vocab_size as u32,
            bos_token: special.bos_token,
            eos_tokens,
            chat_template: special.chat_template,
            device: checkpoint.device_name,
        };
        let kv_cache_type = checkpoint.model.kv_cache_type(options.kv_cache_type);
        let kv_budget = options.kv_budget_tokens.unwrap_or_else(|| {
            let bytes_per_token = config.kv_bytes_per_token() / kv_cache_type.shrink();
            (DEFAULT_KV_BYTES / bytes_per_token.max(1)).max(config.max_position_embeddings)
        });
        let limits = BatchLimits {
            max_batch: options.max_batch.max(1),
            kv_blocks: blocks_for(kv_budget),
            prompt_chunk: options.prompt_chunk.max(1),
            prefix_caching: options.prefix_caching,
            speculative: options.speculative,
            draft_max: options.draft_max,
            draft_length: options.draft_length,
            kv_cache_type,
            jump_forward: options.jump_forward,
            answer_reuse: options.answer_reuse,
        };
        // The KV of one model is never another's: the chain's root names the checkpoint and
        // how its weights are kept.
        let root = BlockHash::root(&format!(
            "{} {:?} {}",
            path.display(),
            options.weights,
            info.device
        ));
        let core = Arc::new(Core::new(
            checkpoint.model,
            tokenizer,
            bos_id,
            special.eos_ids,
            config.max_position_embeddings,
            config.vocab_size,
        )?);
        core.probe(bos_id.unwrap_or(0))?;
        let scheduler = Scheduler::start(core.clone(), limits, root)
            .map_err(|e| EngineError::Model(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Engine {
            info,
            core,
            limits,
            scheduler,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// What the scheduler has done so far.
    pub fn batch_stats(&self) -> BatchStats {
        self.core.stats.snapshot()
    }

    /// Token ids of `text`, without special tokens.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.core.tokenize(text)
    }

    /// The longest text, in bytes, whose tokens could fit in the context: longer text is
    /// refused before tokenizing, so its cost is bounded by the context, not by the caller.
    pub fn max_prompt_bytes(&self) -> usize {
        self.core.max_prompt_bytes()
    }

    /// The ids a generation of `prompt` starts from, the beginning-of-sequence token
    /// included where the model expects one.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        self.core.encode_prompt(prompt)
    }

    /// The logits (`[ids.len(), vocab_size]`, row-major) of one forward pass over `ids`.
    /// Compiles `constraint` against the model's vocabulary without generating: an invalid
    /// schema, regex or grammar is `InvalidInput` with the reason.
    pub fn check_constraint(&self, constraint: &Constraint) -> Result<(), EngineError> {
        self.core.vocabulary.compile(constraint).map(drop)
    }

    /// For verification against a reference implementation.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        self.core.logits(ids)
    }

    /// Generates a completion of `prompt`. `on_text` receives each piece of text as it is
    /// produced (whole UTF-8, stop strings withheld); returning `Break` cancels the generation
    /// (finish reason `Cancelled`). Blocking: call it from a blocking thread. The generation
    /// runs in the shared batch with every other one.
    pub fn generate(
        &self,
        prompt: impl Into<Prompt>,
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, EngineError> {
        self.generate_cancellable(prompt, params, None, on_text)
    }

    /// [`Engine::generate`], also stopped at the next step once `cancelled` says so — even
    /// while the prompt is still being read, when no text is produced to refuse.
    pub fn generate_cancellable(
        &self,
        prompt: impl Into<Prompt>,
        params: &SamplingParams,
        cancelled: Option<Cancelled>,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, EngineError> {
        self.generate_pieces(prompt, params, cancelled, &mut |piece| on_text(&piece.text))
    }

    /// [`Engine::generate_cancellable`], each piece of text with the log-probabilities of
    /// the tokens that produced it (when `params.logprobs` asks for them).
    pub fn generate_pieces(
        &self,
        prompt: impl Into<Prompt>,
        params: &SamplingParams,
        cancelled: Option<Cancelled>,
        on_piece: &mut dyn FnMut(&Piece) -> ControlFlow<()>,
    ) -> Result<Completion, EngineError> {
        let prompt_ids = self.encode_prompt(&prompt.into())?;
        let generation = self.start(prompt_ids, params, cancelled)?;
        Ok(generation.follow(on_piece)?.0)
    }

    /// Like [`Engine::generate`] from token ids (no bos added), also returning the generated
    /// ids. For verification against a reference implementation.
    pub fn generate_ids(
        &self,
        prompt_ids: &[u32],
        params: &SamplingParams,
    ) -> Result<(Completion, Vec<u32>), EngineError> {
        self.start(prompt_ids.to_vec(), params, None)?
            .follow(&mut |_| ControlFlow::Continue(()))
    }

    /// Checks a generation and hands it to the scheduler.
    fn start(
        &self,
        prompt: Vec<u32>,
        params: &SamplingParams,
        cancelled: Option<Cancelled>,
    ) -> Result<run::EventReader, EngineError> {
        run::start_generation(
            &self.core,
            &self.scheduler,
            self.limits,
            prompt,
            params,
            cancelled,
        )
    }
}

// The host shares one `Engine` between concurrent requests.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
};
