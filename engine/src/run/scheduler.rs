//! Continuous batching: one thread owns the stepping of every running sequence. Each step is
//! one forward pass over all of them — a decode row per sequence that is generating, plus a
//! prompt chunk of each that is still reading its prompt — so the weights are read once per
//! step, not once per sequence. Sequences join at any step boundary and leave at the one
//! after they finish, are cancelled or their client goes away; nobody waits for the batch to
//! drain.
//!
//! The KV cache is a pool of blocks (`kv`): a sequence joins when the blocks for its prompt
//! are free (less the full blocks another sequence left with the same tokens: it starts
//! after them), takes one more block each time its generation reaches a new one, and gives
//! them back when it leaves. When a growing sequence finds the pool empty, the most recently
//! admitted sequence is preempted: its blocks are given back and it waits at the head of the
//! queue, then reads its prompt and what it had generated again (mostly from its own cached
//! blocks) and goes on; its client sees a delay, never an error.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::constraint::{Allowed, Constrained, Vocabulary};
use super::core::{Core, check_logits, panic_message};
use super::logprobs::{candidates_logprob, token_logprob};
use super::sampling::Sampler;
use super::speculation::{self, Acceptance, BatchAcceptance};
use super::stats::{Counters, MaskTimings};
use super::step_costs::StepCosts;
use super::stop::StopSignals;
use super::text::TextStream;
use crate::kv::{BLOCK_SIZE, BlockContent, BlockHash, BlockId, BlockPool, blocks_for};
use crate::model::{BatchItem, BestCandidates, KvStore, Readout, TokenChoice};
use crate::quant::BlockMatrix;
use crate::{
    Completion, DraftLength, EngineError, FinishReason, KvCacheType, Piece, SamplingParams,
    TokenLogprob,
};

/// One row of a sequence's step, as the step read it back: its logits, or what the device
/// handed back instead (`TokenChoice`).
enum Row<'a> {
    Logits(&'a mut [f32]),
    Chosen(Result<u32, EngineError>),
    Best(Result<BestCandidates, EngineError>),
}

impl Row<'_> {
    /// A row the device chose for, or found the candidates of. A row read whole comes in
    /// an item's logits (`Readout::Logits`), never among rows chosen on the device.
    fn on_device(readout: Readout) -> Self {
        match readout {
            Readout::Token(token) => Row::Chosen(token),
            Readout::Best(best) => Row::Best(best),
            Readout::Logits(_) | Readout::Rows(_) => Row::Chosen(Err(EngineError::Model(
                "a row read whole among rows chosen on the device".into(),
            ))),
        }
    }
}

/// What a generation reports, in order: text as it becomes final, then one `Done`.
pub(crate) enum Event {
    Text(Piece),
    Done(Result<(Completion, Vec<u32>), EngineError>),
}

/// How many sequences run together, and the KV they share.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub max_batch: usize,
    /// Blocks of `kv::BLOCK_SIZE` positions in the KV pool the running sequences share.
    pub kv_blocks: usize,
    /// Prompt tokens a sequence feeds per step (where the model takes chunks): the other
    /// sequences wait at most one chunk per step. A sequence's chunks are the same alone or
    /// in a batch, so batching never changes its numbers.
    pub prompt_chunk: usize,
    /// Whether full blocks stay cached for later sequences that begin with the same tokens.
    pub prefix_caching: bool,
    /// Whether generating sequences draft tokens from their context for the step to verify
    /// (`speculation`), where the model form verifies several rows at once.
    pub speculative: bool,
    /// The most tokens a sequence guesses for a step, and how many it guesses.
    pub draft_max: usize,
    pub draft_length: DraftLength,
    /// How the CPU model's KV store keeps keys and values.
    pub kv_cache_type: KvCacheType,
    /// Whether constrained sequences draft the tokens their shape forces.
    pub jump_forward: bool,
    /// Whether prompts are read by the row kernel at every position, as generated tokens
    /// are, so that a chat's earlier answers are prefix-cache hits when its next turn sends
    /// them back (`LoadOptions::answer_reuse`).
    pub answer_reuse: bool,
}

impl BatchLimits {
    /// Positions the KV pool holds.
    pub fn kv_positions(&self) -> usize {
        self.kv_blocks * BLOCK_SIZE
    }
}

/// A generation asked for: everything the scheduler needs to run it.
pub(crate) struct Submission {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// `params.constraint`, compiled.
    pub constraint: Option<Constrained>,
    pub events: Sender<Event>,
    pub stop_signals: StopSignals,
}

impl Submission {
    fn is_cancelled(&self) -> bool {
        self.stop_signals.is_set()
    }

    fn finish(self, result: Result<(Completion, Vec<u32>), EngineError>) {
        // The reader may be gone; then nobody needs the answer.
        let _ = self.events.send(Event::Done(result));
    }
}

/// The scheduler thread; dropping it lets the thread finish the work it has and exit.
pub(crate) struct Scheduler {
    submit: Option<Sender<Submission>>,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the thread; `root` names the model in the KV blocks' hash chain.
    pub fn start(core: Arc<Core>, limits: BatchLimits, root: BlockHash) -> std::io::Result<Self> {
        let (submit, submissions) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("rbee-scheduler".into())
            .spawn(move || run(&core, limits, root, submissions))?;
        Ok(Self {
            submit: Some(submit),
            thread: Some(thread),
        })
    }

    pub fn submit(&self, submission: Submission) -> Result<(), EngineError> {
        self.submit
            .as_ref()
            .and_then(|submit| submit.send(submission).ok())
            .ok_or_else(|| EngineError::Model("the scheduler has stopped".into()))
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.submit = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A generation, waiting or running.
struct Sequence<'t> {
    request: Submission,
    /// The prompt's ids, then each generated one: everything the sequence has read and
    /// written (the repeat penalty's history too).
    tokens: Vec<u32>,
    /// Positions of `tokens` in the KV: a step feeds `tokens[computed..]`, or a chunk of it.
    computed: usize,
    /// The KV blocks it holds, in position order.
    blocks: Vec<BlockId>,
    /// The hash chain of its full blocks: `hashes[i]` names the tokens of `blocks[..=i]`.
    hashes: Vec<BlockHash>,
    sampler: Sampler,
    text: TextStream<'t>,
    generated: u32,
    /// When it was first admitted.
    started: Instant,
    prefill: Option<Duration>,
    /// The order of its last admission: the most recent is preempted first.
    admitted: u64,
    /// Whether it was preempted and waits to read its tokens again.
    preempted: bool,
    /// Tokens guessed for this step to verify after its last one (`speculation`), or
    /// forced by its constraint.
    draft: Vec<u32>,
    /// Whether `draft` is its constraint's forced tokens rather than a guess.
    draft_forced: bool,
    /// The length of the match a guessed `draft` followed.
    draft_ngram: usize,
    /// How often its guesses are accepted.
    acceptance: Acceptance,
    /// Where its output is in the shape it must have.
    constraint: Option<Constrained>,
    /// The tokens' bytes, for log-probabilities.
    vocabulary: &'t Vocabulary,
    /// Where its masks' times are counted.
    mask_timings: &'t MaskTimings,
    /// Whether its prompt takes the row kernel at every position, as its generated tokens
    /// do (`BatchLimits::answer_reuse`).
    prompt_on_row_kernel: bool,
    /// Log-probabilities of the tokens whose text is held back (a possible stop string, part
    /// of a character): they go out with it.
    held_logprobs: Vec<TokenLogprob>,
    /// Those of the tokens whose text went out.
    logprobs: Vec<TokenLogprob>,
}

impl<'t> Sequence<'t> {
    fn new(
        core: &'t Core,
        mut request: Submission,
        acceptance: Acceptance,
        prompt_on_row_kernel: bool,
    ) -> Self {
        Self {
            prompt_on_row_kernel,
            constraint: request.constraint.take(),
            vocabulary: &core.vocabulary,
            mask_timings: &core.stats.masks,
            held_logprobs: Vec::new(),
            logprobs: Vec::new(),
            tokens: request.prompt.clone(),
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            sampler: Sampler::new(&request.params),
            text: TextStream::new(core.prompts.tokenizer(), &request.params.stop),
            generated: 0,
            started: Instant::now(),
            prefill: None,
            admitted: 0,
            preempted: false,
            draft: Vec::new(),
            draft_forced: false,
            draft_ngram: 0,
            acceptance,
            request,
        }
    }

    /// Whether its next step is one decode row: the last token it generated.
    fn decoding(&self) -> bool {
        self.generated > 0 && self.tokens.len() - self.computed == 1
    }

    /// Tokens it has still to read before its next token.
    fn unread(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Ends the sequence (its blocks already given back): flushes the text held back (for a
    /// natural end) and reports.
    fn finish(mut self, mut reason: FinishReason) {
        debug_assert!(self.blocks.is_empty(), "a sequence left holding KV blocks");
        if matches!(reason, FinishReason::Eos | FinishReason::Length) {
            match self.text.finish() {
                Ok(rest) if !rest.is_empty() || !self.held_logprobs.is_empty() => {
                    if !self.send(rest) {
                        reason = FinishReason::Cancelled;
                    }
                }
                Ok(_) => {}
                Err(error) => return self.request.finish(Err(error)),
            }
        }
        let prefill = self.prefill.unwrap_or_else(|| self.started.elapsed());
        let prompt_tokens = self.request.prompt.len();
        let completion = Completion {
            text: self.text.text().to_string(),
            prompt_tokens: prompt_tokens as u32,
            generated_tokens: self.generated,
            finish_reason: reason,
            logprobs: std::mem::take(&mut self.logprobs),
            prefill,
            decode: self.started.elapsed().saturating_sub(prefill),
        };
        let ids = self.tokens.split_off(prompt_tokens);
        self.request.finish(Ok((completion, ids)));
    }

    /// Takes what the step read back of this sequence's rows: a token from each (chosen from
    /// its logits, by the device, or from its best candidates), verifying the draft (the
    /// row before a drafted token gives the model's choice there: it goes on while that is
    /// the draft), streams them, and tells whether the sequence has ended. Returns the
    /// drafted tokens accepted, too.
    fn advance(
        &mut self,
        readout: Readout,
        eos_ids: &[u32],
        stats: &Counters,
    ) -> (usize, Result<Option<FinishReason>, EngineError>) {
        let draft = std::mem::take(&mut self.draft);
        let (mut logits, on_device) = match readout {
            Readout::Logits(values) => (values, Vec::new()),
            Readout::Rows(rows) => (Vec::new(), rows),
            one => (Vec::new(), vec![one]),
        };
        let vocab = logits.len() / (draft.len() + 1);
        let rows: Vec<Row<'_>> = if on_device.is_empty() {
            let rows = logits.chunks_exact_mut(vocab.max(1));
            rows.map(Row::Logits).collect()
        } else {
            on_device.into_iter().map(Row::on_device).collect()
        };
        let mut accepted = 0;
        for (row, readout) in rows.into_iter().enumerate() {
            // The model's choice at each row is made as it would be without the draft (the
            // same logits, the sampler's next draw), and the draft goes on while it agrees.
            // For a draft that guesses one token, that is speculative sampling's rejection
            // rule: the guess stays with the probability the model gives it, and a rejected
            // row yields the model's distribution less the guess. A sampler draws once per
            // token taken, so a seed gives the same tokens with and without drafts. A
            // constrained sequence's rows are masked in turn, each after the accepted tokens
            // before it moved the shape on, as if they had been generated one by one.
            let token = match readout {
                Row::Logits(logits) => self.choose(logits, eos_ids),
                Row::Chosen(token) => token,
                Row::Best(best) => best.and_then(|best| self.choose_best(best, eos_ids, stats)),
            };
            let token = match token {
                Ok(token) => token,
                Err(error) => return (accepted, Err(error)),
            };
            let agreed = draft.get(row) == Some(&token);
            match self.take(token, eos_ids) {
                Ok(None) if agreed => accepted += 1,
                Ok(None) => break,
                outcome => return (accepted, outcome),
            }
        }
        (accepted, Ok(None))
    }

    /// How this step's tokens are chosen (a draft's rows' too), which says what the device
    /// may hand back instead of the rows' logits: they are read whole where anything but
    /// the sampler and the log-probabilities reads them (a bias, a constraint).
    fn token_choice(&self) -> TokenChoice {
        let params = &self.request.params;
        let reads_logits = !params.logit_bias.is_empty() || self.constraint.is_some();
        match self.sampler.choice() {
            _ if reads_logits => TokenChoice::FromLogits,
            // Log-probabilities come from the candidates too (the best 20 at most).
            TokenChoice::MostLikely if params.logprobs.is_some() => {
                TokenChoice::FromCandidates { temperature: 1.0 }
            }
            choice => choice,
        }
    }

    /// Chooses the next token from the best candidates of its row that the device handed
    /// back ([`TokenChoice::FromCandidates`]), with its log-probabilities where asked, or
    /// from the row's logits where the draw walks past them (the sampler draws the same
    /// from either).
    fn choose_best(
        &mut self,
        best: BestCandidates,
        eos_ids: &[u32],
        stats: &Counters,
    ) -> Result<u32, EngineError> {
        let token = self.sampler.sample_best(&best);
        stats.drawn(token.is_some());
        let Some(token) = token else {
            return self.choose(&mut best.read_row()?, eos_ids);
        };
        if let Some(top) = self.request.params.logprobs
            && !eos_ids.contains(&token)
        {
            let logprob = match candidates_logprob(
                &best.candidates,
                best.complete,
                best.log_total,
                token,
                top as usize,
                self.vocabulary,
            ) {
                Some(logprob) => logprob?,
                None => token_logprob(&best.read_row()?, token, top as usize, self.vocabulary)?,
            };
            self.held_logprobs.push(logprob);
        }
        Ok(token)
    }

    /// Chooses the next token from one row's logits: biased, masked by the constraint (a
    /// token it alone allows is taken as it is), sampled; its log-probability kept when
    /// asked for.
    fn choose(&mut self, logits: &mut [f32], eos_ids: &[u32]) -> Result<u32, EngineError> {
        check_logits(logits)?;
        let params = &self.request.params;
        for &(token, bias) in &params.logit_bias {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit += bias;
            }
        }
        let forced = match &mut self.constraint {
            Some(constraint) => constraint.mask(logits, self.mask_timings)?,
            None => Allowed::Some,
        };
        // The sampler changes the logits it reads (the repeat penalty): log-probabilities
        // are of the distribution before it.
        let before = params.logprobs.map(|_| logits.to_vec());
        let token = match forced {
            Allowed::Only(token) => token,
            Allowed::Some => self.sampler.sample(logits, &self.tokens),
        };
        if let (Some(top), Some(logits)) = (params.logprobs, before)
            && !eos_ids.contains(&token)
        {
            let logprob = token_logprob(&logits, token, top as usize, self.vocabulary)?;
            self.held_logprobs.push(logprob);
        }
        if let Some(constraint) = &mut self.constraint
            && !eos_ids.contains(&token)
        {
            constraint.consume(token)?;
        }
        Ok(token)
    }

    /// Sends a piece of text, with the log-probabilities held for it; false once the
    /// caller is gone.
    fn send(&mut self, text: String) -> bool {
        let logprobs = std::mem::take(&mut self.held_logprobs);
        if self.request.params.logprobs.is_some() {
            self.logprobs.extend(logprobs.iter().cloned());
        }
        self.request
            .events
            .send(Event::Text(Piece { text, logprobs }))
            .is_ok()
    }

    /// Takes `next` as the sequence's next token: streams it, and tells whether the sequence
    /// has ended.
    fn take(&mut self, next: u32, eos_ids: &[u32]) -> Result<Option<FinishReason>, EngineError> {
        if eos_ids.contains(&next) {
            return Ok(Some(FinishReason::Eos));
        }
        self.generated += 1;
        self.tokens.push(next);
        let step = self.text.push(next)?;
        if !step.emit.is_empty() && !self.send(step.emit) {
            return Ok(Some(FinishReason::Cancelled));
        }
        if step.stopped {
            return Ok(Some(FinishReason::Stop));
        }
        if self.generated >= self.request.params.max_tokens {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    /// The chunk that prompt position `position` falls in when the prompt is read from
    /// position 0 in chunks of `prompt_chunk`.
    fn prompt_chunk_around(&self, position: usize, prompt_chunk: usize) -> Range<usize> {
        let start = position / prompt_chunk * prompt_chunk;
        start..(start + prompt_chunk).min(self.request.prompt.len())
    }

    /// Whether `position` is computed by the row kernel (else the tiled gemm path): every
    /// position with answer reuse on (`BatchLimits::answer_reuse`); else as when the
    /// sequence reads its prompt from position 0 in chunks of `prompt_chunk` (a chunk's
    /// length picks its path) and then decodes one row at a time. Every computation of a
    /// position (the first, after a prefix hit, after a preemption) takes this path, so its
    /// keys, values and logits are the same bit for bit.
    fn takes_row_kernel(&self, position: usize, prompt_chunk: usize) -> bool {
        self.prompt_on_row_kernel
            || position >= self.request.prompt.len()
            || BlockMatrix::row_kernel_for(self.prompt_chunk_around(position, prompt_chunk).len())
    }

    /// The positions its next step reads, and whether they take the row kernel: positions
    /// of one path, within one of the prompt's chunks.
    fn next_chunk(&self, chunk: usize) -> (Range<usize>, bool) {
        let start = self.computed;
        let end = if start < self.request.prompt.len() {
            self.prompt_chunk_around(start, chunk).end
        } else {
            // Generated tokens: decode rows (several at once when it reads them again).
            (start + chunk).min(self.tokens.len())
        };
        (start..end, self.takes_row_kernel(start, chunk))
    }

    /// What its full block `index` holds, for the prefix cache.
    fn block_content(&self, index: usize, prompt_chunk: usize) -> BlockContent<'_> {
        let positions = index * BLOCK_SIZE..(index + 1) * BLOCK_SIZE;
        let row_kernel = positions
            .clone()
            .enumerate()
            .filter(|&(_, position)| self.takes_row_kernel(position, prompt_chunk))
            .fold(0, |mask, (bit, _)| mask | 1 << bit);
        BlockContent {
            tokens: &self.tokens[positions],
            row_kernel,
        }
    }

    /// Names the blocks that the last step filled, so later sequences can start from them.
    fn register_full_blocks(&mut self, pool: &mut BlockPool, root: BlockHash, prompt_chunk: usize) {
        if !pool.caching() {
            return;
        }
        while self.hashes.len() < self.computed / BLOCK_SIZE {
            let index = self.hashes.len();
            let parent = self.hashes.last().copied().unwrap_or(root);
            let hash = pool.register(
                self.blocks[index],
                parent,
                self.block_content(index, prompt_chunk),
            );
            self.hashes.push(hash);
        }
    }
}

/// The scheduler's state: the KV pool and its store, the running sequences and the queue.
struct Batch<'t> {
    core: &'t Core,
    limits: BatchLimits,
    pool: BlockPool,
    store: KvStore,
    /// The hash chain's root for this model.
    root: BlockHash,
    running: Vec<Sequence<'t>>,
    /// First come, first served; a preempted sequence goes back to the front.
    waiting: VecDeque<Sequence<'t>>,
    admissions: u64,
    /// How long decode steps take by their rows, for drafts to be worth their rows.
    costs: StepCosts,
    /// How the batch's guesses have lately fared: a new sequence's first estimate.
    acceptance: BatchAcceptance,
}

impl<'t> Batch<'t> {
    fn new(core: &'t Core, limits: BatchLimits, root: BlockHash) -> Self {
        Self {
            core,
            limits,
            pool: BlockPool::new(limits.kv_blocks, limits.prefix_caching),
            store: core.model.new_store(limits.kv_blocks, limits.kv_cache_type),
            root,
            running: Vec::new(),
            waiting: VecDeque::new(),
            admissions: 0,
            costs: StepCosts::default(),
            acceptance: BatchAcceptance::default(),
        }
    }

    fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Queues a new generation behind the others.
    fn enqueue(&mut self, submission: Submission) {
        let acceptance = Acceptance::starting_at(&self.acceptance);
        let reuse = self.limits.answer_reuse;
        self.waiting
            .push_back(Sequence::new(self.core, submission, acceptance, reuse));
    }

    /// Takes `running[index]` out of the batch, its blocks given back.
    fn leave(&mut self, index: usize) -> Sequence<'t> {
        let mut sequence = self.running.remove(index);
        self.pool.release(&sequence.blocks);
        sequence.blocks.clear();
        sequence.hashes.clear();
        sequence
    }

    /// Every sequence whose request was cancelled leaves, waiting or running.
    fn drop_cancelled(&mut self) {
        for sequence in std::mem::take(&mut self.waiting) {
            if sequence.request.is_cancelled() {
                sequence.finish(FinishReason::Cancelled);
            } else {
                self.waiting.push_back(sequence);
            }
        }
        let mut index = 0;
        while index < self.running.len() {
            if self.running[index].request.is_cancelled() {
                self.leave(index).finish(FinishReason::Cancelled);
            } else {
                index += 1;
            }
        }
    }

    /// Admits waiting sequences in order while the batch has room and the pool has the
    /// blocks of each one's tokens (less its prefix hits), with a block to spare for each
    /// running sequence's next position, so that a new prompt does not push one straight
    /// out again.
    fn admit(&mut self) {
        while self.running.len() < self.limits.max_batch {
            let Some(sequence) = self.waiting.front() else {
                break;
            };
            // Full blocks from the cache, within all but the last token: a step must read at
            // least one token to give the next one's logits.
            let full = (sequence.tokens.len() - 1) / BLOCK_SIZE;
            let chunk = self.limits.prompt_chunk;
            let hits = self.pool.lookup(
                self.root,
                (0..full).map(|index| sequence.block_content(index, chunk)),
            );
            if self.pool.caching() && self.reading_ahead_of(sequence, hits.len()) {
                // A running sequence is reading the same prompt further than the cache
                // holds it (the choices of one request, `n`, that joined in one turn; a
                // shared system prompt sent at once): this one waits for those blocks and
                // finds them cached, rather than computing them a second time beside it.
                break;
            }
            let needed = blocks_for(sequence.tokens.len()) - hits.len();
            if self.pool.available_besides(&hits) < needed + self.running.len() {
                break;
            }
            let mut sequence = self.waiting.pop_front().expect("a front element");
            self.pool.hold(&hits);
            sequence.computed = hits.len() * BLOCK_SIZE;
            (sequence.blocks, sequence.hashes) = hits.into_iter().unzip();
            for _ in 0..needed {
                let block = self.pool.allocate().expect("counted as available");
                sequence.blocks.push(block);
            }
            if !sequence.preempted {
                self.core
                    .stats
                    .prefix_lookup(sequence.tokens.len(), sequence.computed);
                sequence.started = Instant::now();
            }
            self.admissions += 1;
            sequence.admitted = self.admissions;
            self.running.push(sequence);
        }
    }

    /// Whether a running sequence still reading its prompt shares with `sequence` a full
    /// block past the `cached` ones that it has yet to compute (within all but `sequence`'s
    /// last token, as a hit must be): one more step or a few, and the block is the cache's.
    fn reading_ahead_of(&self, sequence: &Sequence<'_>, cached: usize) -> bool {
        let full = (sequence.tokens.len() - 1) / BLOCK_SIZE;
        self.running.iter().any(|other| {
            let shared = sequence
                .tokens
                .iter()
                .zip(&other.tokens[..other.request.prompt.len()])
                .take_while(|(a, b)| a == b)
                .count();
            let shared_blocks = (shared / BLOCK_SIZE).min(full);
            shared_blocks > cached && other.computed < shared_blocks * BLOCK_SIZE
        })
    }

    /// Gives each running sequence the blocks its next step writes, oldest first. When the
    /// pool has none left, the most recently admitted sequence is preempted (possibly the
    /// one that asked): the oldest always go on, so everyone finishes in turn.
    fn grow(&mut self) {
        self.running.sort_by_key(|sequence| sequence.admitted);
        let mut index = 0;
        while index < self.running.len() {
            let sequence = &self.running[index];
            if sequence.blocks.len() >= blocks_for(sequence.tokens.len()) {
                index += 1;
                continue;
            }
            match self.pool.allocate() {
                Some(block) => self.running[index].blocks.push(block),
                None => self.preempt_newest(),
            }
        }
        // Drafts take what blocks are left, and are cut to fit: a guess never preempts.
        for sequence in &mut self.running {
            let end = sequence.tokens.len() + sequence.draft.len();
            while sequence.blocks.len() < blocks_for(end) {
                match self.pool.allocate() {
                    Some(block) => sequence.blocks.push(block),
                    None => break,
                }
            }
            let fits = (sequence.blocks.len() * BLOCK_SIZE).saturating_sub(sequence.tokens.len());
            sequence.draft.truncate(fits);
        }
    }

    /// Drafts tokens for the generating sequences to verify in the next step, oldest first,
    /// as many as make the step's expected tokens per cost (as timed: `step_costs`) the
    /// most. A constrained sequence whose shape forces its next tokens drafts those
    /// (jump-forward: several tokens in one step, sampled or not, as a forced token is never
    /// sampled; counted as certain, though the model still verifies them). Otherwise it
    /// guesses as many as its acceptance makes worth it (`speculation`): none while a prompt
    /// is being read (its first token comes first), fewer the more rows the step carries
    /// already. Greedy or sampled alike: `advance` verifies a guess by the draw the sequence
    /// makes anyway.
    fn draft(&mut self) {
        let (speculates, jumps) = (self.limits.speculative, self.limits.jump_forward);
        let reading = self.running.iter().any(|sequence| !sequence.decoding());
        let decoding = self.running.iter().filter(|s| s.decoding()).count();
        let (mut tokens, mut rows) = (decoding as f64, decoding);
        let mut guessed = false;
        for sequence in self.running.iter_mut().filter(|s| s.decoding()) {
            let room = (sequence.request.params.max_tokens - sequence.generated) as usize - 1;
            let room = room.min(self.core.context_length - sequence.tokens.len());
            let forced = match &mut sequence.constraint {
                Some(constraint) if jumps && room > 0 => constraint.forced(),
                _ => Vec::new(),
            };
            if !forced.is_empty() {
                // The next tokens are known: no guess can be better, even where none pays.
                let len = self
                    .costs
                    .draft_len(tokens, rows, 1.0, forced.len().min(room));
                sequence.draft = forced;
                sequence.draft.truncate(len);
                sequence.draft_forced = len > 0;
                (tokens, rows) = (tokens + len as f64, rows + len);
                continue;
            }
            sequence.draft_forced = false;
            sequence.draft.clear();
            let guess = if speculates && !reading {
                speculation::propose(&sequence.tokens, room.min(self.limits.draft_max))
            } else {
                None
            };
            if let Some(guess) = guess {
                let len = match self.limits.draft_length {
                    DraftLength::Measured => {
                        let rate = sequence.acceptance.rate(guess.ngram);
                        self.costs.draft_len(tokens, rows, rate, guess.tokens.len())
                    }
                    DraftLength::Max => guess.tokens.len(),
                };
                sequence.draft = guess.tokens;
                sequence.draft.truncate(len);
                sequence.draft_ngram = guess.ngram;
            }
            if sequence.draft.is_empty() {
                sequence.acceptance.idle(&self.acceptance);
            } else {
                let ngram = sequence.draft_ngram;
                tokens += sequence.acceptance.expected(ngram, sequence.draft.len());
                rows += sequence.draft.len();
                guessed = true;
            }
        }
        if speculates && !reading && decoding > 0 && !guessed {
            self.acceptance.idle();
        }
    }

    /// Preempts the last of `running` (sorted by admission): its blocks go back to the
    /// pool (the full ones stay cached, for it to find again) and it waits at the queue's
    /// head to read its tokens again.
    fn preempt_newest(&mut self) {
        let mut sequence = self.leave(self.running.len() - 1);
        sequence.computed = 0;
        sequence.draft.clear();
        sequence.draft_forced = false;
        sequence.preempted = true;
        self.core.stats.preempted();
        tracing::debug!(
            tokens = sequence.tokens.len(),
            "the KV pool is full: preempted the most recently admitted sequence"
        );
        self.waiting.push_front(sequence);
    }

    /// Fails the first `count` running sequences with `error`.
    fn fail(&mut self, count: usize, error: &str) {
        for _ in 0..count {
            let sequence = self.leave(0);
            let error = EngineError::Model(error.to_string());
            sequence.request.finish(Err(error));
        }
    }

    /// Reports the queue, the batch and the pool to the counters.
    fn report(&self) {
        self.core.stats.set_state(
            self.running.len(),
            self.waiting.len(),
            self.pool.held(),
            self.pool.total(),
        );
    }

    /// One turn of the scheduler: sequences leave and join at the step boundary, then one
    /// forward step runs over the batch.
    fn turn(&mut self) {
        self.drop_cancelled();
        self.admit();
        self.draft();
        self.grow();
        self.report();
        if self.running.is_empty() {
            return;
        }
        // A panic in a step (a bug in a kernel) fails the sequences of that step, not the
        // worker: the scheduler goes on with the next ones.
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| step(self)));
        if let Err(panic) = stepped {
            let what = panic_message(&*panic);
            tracing::error!("a forward step panicked: {what}");
            let running = self.running.len();
            self.fail(running, &format!("the forward step failed: {what}"));
        }
    }
}

fn run(core: &Core, limits: BatchLimits, root: BlockHash, submissions: Receiver<Submission>) {
    let mut batch = Batch::new(core, limits, root);
    loop {
        // Idle: sleep until work arrives (or every sender is gone: exit).
        if batch.is_idle() {
            batch.report();
            match submissions.recv() {
                Ok(submission) => batch.enqueue(submission),
                Err(_) => return,
            }
        }
        for submission in submissions.try_iter() {
            batch.enqueue(submission);
        }
        batch.turn();
    }
}

/// Prompt tokens a step reads (or one prompt chunk, where that is longer). Prompts that
/// arrive together are read shortest first, as many per step as fit, instead of all in one
/// step that each of them waits for: four 20-token prompts give their first tokens after
/// one, two, three and four prompts' work rather than all after four (the median first
/// token about twice as soon, the same work in all). A long prompt's chunk runs alone, and a
/// short prompt that arrives meanwhile goes before its next one. Deferring a chunk does not
/// change it, so a sequence's numbers are still those it gets alone.
const PROMPT_TOKENS_PER_STEP: usize = 32;

/// How many of a step's prompt chunks (their lengths, in the step's order) it reads: the
/// first always, then each that keeps the step within `PROMPT_TOKENS_PER_STEP`.
fn prompt_chunks_admitted(chunks: impl IntoIterator<Item = usize>) -> usize {
    let mut admitted = 0;
    let mut rows = 0;
    for chunk in chunks {
        if admitted > 0 && rows + chunk > PROMPT_TOKENS_PER_STEP {
            break;
        }
        rows += chunk;
        admitted += 1;
    }
    admitted
}

/// One forward pass over the running sequences — every decode row, and the prompt chunks
/// that `PROMPT_TOKENS_PER_STEP` admits — then each one's token.
fn step(batch: &mut Batch<'_>) {
    let core = batch.core;
    // Decode rows first (the model multiplies them together), then the prompts that have
    // the fewest tokens left to read.
    batch
        .running
        .sort_by_key(|sequence| (!sequence.decoding()).then(|| sequence.unread()));
    let chunk = batch.limits.prompt_chunk.max(1);
    let running = &mut batch.running;
    let decoding = running.iter().filter(|s| s.decoding()).count();
    // The step's sequences: `running[..stepping]`; the others wait for a later step.
    let stepping = decoding
        + prompt_chunks_admitted(
            running[decoding..]
                .iter()
                .map(|sequence| sequence.next_chunk(chunk).0.len()),
        );
    let chunks: Vec<_> = running[..stepping]
        .iter()
        .map(|sequence| sequence.next_chunk(chunk))
        .collect();
    let stop_signals: Vec<_> = running[..stepping]
        .iter()
        .map(|sequence| sequence.request.stop_signals.clone())
        .collect();
    // Each one's ids: its chunk, and after a last token its draft.
    let inputs: Vec<Vec<u32>> = running[..stepping]
        .iter()
        .zip(&chunks)
        .map(|(sequence, (chunk, _))| {
            let mut ids = sequence.tokens[chunk.clone()].to_vec();
            if chunk.end == sequence.tokens.len() {
                ids.extend_from_slice(&sequence.draft);
            }
            ids
        })
        .collect();
    // Each item, and the constraint of each sequence this step gives logits to, with its
    // draft: its next masks are computed beside the forward pass, on another thread.
    type Masked<'a> = Option<(&'a mut Constrained, &'a [u32])>;
    let (mut items, constraints): (Vec<BatchItem<'_>>, Vec<Masked<'_>>) = running[..stepping]
        .iter_mut()
        .zip(&chunks)
        .zip(&inputs)
        .map(|((sequence, (chunk, row_kernel)), ids)| {
            let gives_logits = chunk.end == sequence.tokens.len();
            let choice = sequence.token_choice();
            let item = BatchItem {
                ids,
                start: chunk.start,
                blocks: &sequence.blocks,
                row_kernel: *row_kernel,
                logits: if gives_logits {
                    1 + sequence.draft.len()
                } else {
                    0
                },
                choice,
            };
            let constraint = sequence
                .constraint
                .as_mut()
                .filter(|_| gives_logits)
                .map(|constraint| (constraint, sequence.draft.as_slice()));
            (item, constraint)
        })
        .unzip();
    let mut constraints: Vec<(&mut Constrained, &[u32])> =
        constraints.into_iter().flatten().collect();
    let rows = inputs.iter().map(Vec::len).sum();
    core.stats.record(items.len(), rows);
    // Steps of decode rows alone are timed by their rows, for the drafts of later steps.
    let decode_only = stepping == decoding;
    let started = Instant::now();
    // A step whose sequences have all been cancelled stops between layers rather than
    // finishing a prompt chunk nobody wants (seconds for a long one), so that whatever waits
    // behind it starts at once; the cancelled sequences then leave at the boundary.
    let abandoned = || stop_signals.iter().all(StopSignals::is_set);
    let store = &mut batch.store;
    let outputs = std::thread::scope(|scope| {
        let masks = (!constraints.is_empty()).then(|| {
            scope.spawn(|| {
                for (constraint, draft) in &mut constraints {
                    constraint.prepare(draft, &core.stats.masks);
                }
            })
        });
        let outputs = core.model.forward_batch(store, &mut items, &abandoned);
        if let Some(masks) = masks {
            // A panic there leaves the masks to be computed (and fail) where they are used.
            let _ = masks.join();
        }
        outputs
    });
    drop(items);
    drop(constraints);
    let outputs = match outputs {
        Ok(Some(outputs)) => outputs,
        Ok(None) => return,
        Err(error) => return batch.fail(stepping, &error.to_string()),
    };
    let mut ended = Vec::new();
    let prompt_chunk = batch.limits.prompt_chunk;
    for (index, ((sequence, (chunk, _)), output)) in batch.running[..stepping]
        .iter_mut()
        .zip(&chunks)
        .zip(outputs)
        .enumerate()
    {
        let Some(readout) = output else {
            sequence.computed = chunk.end;
            sequence.register_full_blocks(&mut batch.pool, batch.root, prompt_chunk);
            continue;
        };
        if sequence.prefill.is_none() {
            sequence.prefill = Some(sequence.started.elapsed());
        }
        let drafted = sequence.draft.len();
        let forced = std::mem::take(&mut sequence.draft_forced);
        let (accepted, outcome) = sequence.advance(readout, &core.eos_ids, &core.stats);
        if forced {
            core.stats.forced(drafted, accepted);
        } else if drafted > 0 {
            let ngram = sequence.draft_ngram;
            sequence.acceptance.record(ngram, drafted, accepted);
            batch.acceptance.record(ngram, drafted, accepted);
            core.stats.drafted(drafted, accepted);
        }
        // The KV holds the chunk and the accepted draft; the rejected rows' positions are
        // written again by the steps that reach them.
        sequence.computed = chunk.end + accepted;
        sequence.register_full_blocks(&mut batch.pool, batch.root, prompt_chunk);
        match outcome {
            Ok(None) => {}
            Ok(Some(reason)) => ended.push((index, Ok(reason))),
            Err(error) => ended.push((index, Err(error))),
        }
    }
    if decode_only {
        // The forward pass and each row's verification and draw.
        let elapsed = started.elapsed();
        tracing::trace!(rows, micros = elapsed.as_micros() as u64, "decode step");
        batch.costs.record(rows, elapsed);
    }
    // Highest index first, so the earlier indices stay valid.
    let ended: Vec<_> = ended
        .into_iter()
        .rev()
        .map(|(index, outcome)| (batch.leave(index), outcome))
        .collect();
    // Counted out before their callers hear of it: whoever has an answer sees counters
    // (and `/metrics`) without its sequence.
    batch.report();
    for (sequence, outcome) in ended {
        match outcome {
            Ok(reason) => sequence.finish(reason),
            Err(error) => sequence.request.finish(Err(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::{DeviceChoice, Engine, LoadOptions, WeightFormat};

    fn tiny_engine() -> Engine {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
        let options = LoadOptions {
            device: DeviceChoice::Cpu,
            weights: WeightFormat::F32,
            ..LoadOptions::default()
        };
        Engine::load(path.as_ref(), &options).unwrap()
    }

    /// Token ids of the tiny vocabulary, different for each `seed`.
    fn ids(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32)
            .map(|k| 4 + (k * 7 + seed * 31 + k * k * seed) % 370)
            .collect()
    }

    /// Queues a generation in `batch` directly; returns its reader's end.
    fn submit(batch: &mut Batch<'_>, prompt: &[u32], params: &SamplingParams) -> Receiver<Event> {
        let (events, receiver) = mpsc::channel();
        batch.enqueue(Submission {
            prompt: prompt.to_vec(),
            params: params.clone(),
            constraint: None,
            events,
            stop_signals: StopSignals {
                stop: Arc::new(AtomicBool::new(false)),
                cancelled: None,
            },
        });
        receiver
    }

    /// Turns `batch` until every sequence has finished.
    fn finish_all(batch: &mut Batch<'_>) {
        for _ in 0..100_000 {
            if batch.is_idle() {
                return;
            }
            batch.turn();
        }
        panic!("the batch never finished");
    }

    /// The ids a finished generation produced.
    fn generated(receiver: &Receiver<Event>) -> Vec<u32> {
        receiver
            .try_iter()
            .find_map(|event| match event {
                Event::Done(result) => Some(result.unwrap().1),
                Event::Text(_) => None,
            })
            .expect("the generation has finished")
    }

    /// Four sequences arrive at once in a pool of 10 blocks, where each grows to 5: three
    /// are admitted (the fourth waits for a spare block per running one), and as they grow
    /// the most recently admitted is preempted, resumes later, and every sequence's tokens
    /// are those it produces alone. The pool ends empty. (Driven turn by turn: with threads
    /// and the tiny model's microsecond steps, who overlaps whom is up to the OS.)
    #[test]
    fn a_full_pool_preempts_the_newest_and_each_sequence_resumes_to_its_own_tokens() {
        let engine = tiny_engine();
        let params = SamplingParams::greedy(60);
        let prompts: Vec<Vec<u32>> = (0..4).map(|i| ids(40 + i, 20)).collect();
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|prompt| engine.generate_ids(prompt, &params).unwrap().1)
            .collect();
        let limits = BatchLimits {
            max_batch: 4,
            kv_blocks: 10,
            prefix_caching: false,
            speculative: false,
            ..engine.limits
        };
        let mut batch = Batch::new(&engine.core, limits, BlockHash::root("test"));
        let before = engine.batch_stats();
        let readers: Vec<_> = prompts
            .iter()
            .map(|prompt| submit(&mut batch, prompt, &params))
            .collect();
        batch.turn();
        assert_eq!((batch.running.len(), batch.waiting.len()), (3, 1));
        finish_all(&mut batch);
        assert_eq!(readers.iter().map(generated).collect::<Vec<_>>(), alone);
        let after = engine.batch_stats();
        assert!(after.preemptions > before.preemptions, "{after:?}");
        assert_eq!(batch.pool.held(), 0);
    }

    /// Sequences that may each grow to the whole context (`max_tokens` up to it, as clients
    /// that send none get) all start at once when their prompts fit: the pool is taken by
    /// what they hold, not by what they might. Reserving prompt + max_tokens, two would fit.
    #[test]
    fn sequences_join_by_the_blocks_their_prompts_need() {
        let engine = tiny_engine();
        let context = engine.core.context_length;
        let limits = BatchLimits {
            max_batch: 8,
            kv_blocks: blocks_for(2 * context),
            ..engine.limits
        };
        let mut batch = Batch::new(&engine.core, limits, BlockHash::root("test"));
        let params = SamplingParams::greedy((context - 10) as u32);
        let prompts: Vec<Vec<u32>> = (0..8).map(|i| ids(100 + i, 10)).collect();
        let readers: Vec<_> = prompts
            .iter()
            .map(|prompt| submit(&mut batch, prompt, &params))
            .collect();
        batch.turn();
        assert_eq!((batch.running.len(), batch.waiting.len()), (8, 0));
        finish_all(&mut batch);
        for (prompt, reader) in prompts.iter().zip(&readers) {
            let alone = engine.generate_ids(prompt, &params).unwrap().1;
            assert_eq!(generated(reader), alone);
        }
        assert_eq!(batch.pool.held(), 0);
    }

    /// The choices of one request (`n`), submitted in one turn with the same prompt: the
    /// first reads it, the others wait until its blocks are cached and start from them, and
    /// each gets the tokens it gets alone. Without the prefix cache they all read it at once.
    #[test]
    fn choices_of_one_prompt_read_it_once() {
        let engine = tiny_engine();
        let params = SamplingParams::greedy(8);
        let prompt = ids(7, 100);
        let alone = engine.generate_ids(&prompt, &params).unwrap().1;
        // Full blocks within all but the last token.
        let shared = (prompt.len() - 1) / BLOCK_SIZE * BLOCK_SIZE;
        for caching in [true, false] {
            let limits = BatchLimits {
                max_batch: 4,
                prefix_caching: caching,
                speculative: false,
                ..engine.limits
            };
            let mut batch = Batch::new(&engine.core, limits, BlockHash::root("test"));
            let before = engine.batch_stats();
            let readers: Vec<_> = (0..3)
                .map(|_| submit(&mut batch, &prompt, &params))
                .collect();
            batch.turn();
            let running = if caching { 1 } else { 3 };
            assert_eq!(
                (batch.running.len(), batch.waiting.len()),
                (running, 3 - running)
            );
            finish_all(&mut batch);
            for reader in &readers {
                assert_eq!(generated(reader), alone, "caching {caching}");
            }
            let hits = engine.batch_stats().prefix_hit_tokens - before.prefix_hit_tokens;
            let expected = if caching { 2 * shared as u64 } else { 0 };
            assert_eq!(hits, expected, "caching {caching}");
        }
    }

    #[test]
    fn a_step_reads_prompt_chunks_up_to_its_budget_and_at_least_one() {
        assert_eq!(prompt_chunks_admitted([]), 0);
        // Shortest first: 10 and 20 fit in 32 tokens, 30 waits.
        assert_eq!(prompt_chunks_admitted([10, 20, 30]), 2);
        assert_eq!(prompt_chunks_admitted([8, 8, 8, 8, 8]), 4);
        // A chunk longer than the budget runs, alone.
        assert_eq!(prompt_chunks_admitted([256, 5]), 1);
        assert_eq!(prompt_chunks_admitted([PROMPT_TOKENS_PER_STEP, 1]), 1);
    }
}
