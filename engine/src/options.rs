//! How to load a model: where it runs, how its weights are kept, and how many sequences (and
//! KV-cache positions) the scheduler runs together.

use std::path::PathBuf;

/// Where to run the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// A hardware GPU when wgpu finds one, else the CPU (a software adapter such as
    /// lavapipe is no GPU here: the CPU path is far faster).
    #[default]
    Auto,
    Cpu,
    /// The N-th hardware GPU; GPU 0 is the software adapter when that is all there is.
    Gpu(usize),
    /// A bare index, as upstream's hive spawns workers (`--device 0`): GPU N where there is
    /// one; on a machine without a GPU, 0 means the CPU (and says so in the log).
    Index(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" | "cpu:0" | "cpu-0" => Ok(Self::Cpu),
            "gpu" | "cuda" => Ok(Self::Gpu(0)),
            other if other.bytes().all(|b| b.is_ascii_digit()) => other
                .parse()
                .map(Self::Index)
                .map_err(|e| format!("device index `{s}`: {e}")),
            other => other
                .strip_prefix("gpu:")
                .or_else(|| other.strip_prefix("gpu-"))
                .or_else(|| other.strip_prefix("cuda:"))
                .and_then(|n| n.parse().ok())
                .map(Self::Gpu)
                .ok_or_else(|| {
                    format!("unknown device `{s}`: expected auto, cpu, gpu, gpu:N or an index N")
                }),
        }
    }
}

/// How weights are kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// The fastest format the backend supports for this checkpoint.
    #[default]
    Auto,
    /// Everything expanded to f32 (the reference format for correctness checks).
    F32,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: DeviceChoice,
    pub weights: WeightFormat,
    /// Sequences decoded together in one forward pass.
    pub max_batch: usize,
    /// KV-cache positions of the pool all running sequences share: a sequence takes blocks
    /// of it as it reaches new positions, and waits to join until its prompt's blocks are
    /// free. `None`: derived from the model (`DEFAULT_KV_BYTES` worth, and at least one
    /// full context).
    pub kv_budget_tokens: Option<usize>,
    /// Whether full KV blocks stay cached for later sequences that begin with the same
    /// tokens (chat turns, a shared system prompt), on the model forms that can start past
    /// position 0 (the CPU's).
    pub prefix_caching: bool,
    /// Whether generating sequences guess their next tokens from their own context (n-gram
    /// lookup) and each step verifies the guesses, on the model forms that verify several
    /// rows at once (the CPU's). The output is the same either way (greedy, or sampled with a
    /// seed: a guess is verified by the draw the sequence makes anyway); it pays on text that
    /// repeats its context and drafts next to nothing where it would not pay (measured in
    /// `bench_speculative`: ×1.6 on copying at one client, ×1.0 on prose at four).
    pub speculative: bool,
    /// The most tokens a sequence guesses for one step (llama-server's `--draft-max`).
    pub draft_max: usize,
    /// How many of them it guesses.
    pub draft_length: DraftLength,
    /// How the CPU model's KV cache keeps keys and values (f16 unless told).
    pub kv_cache_type: KvCacheType,
    /// Whether a constrained sequence whose shape forces its next tokens (a JSON object's
    /// fixed keys) feeds them in one step as a draft the model verifies (jump-forward), on
    /// the model forms that verify several rows at once. The output is the same either way.
    pub jump_forward: bool,
    /// Whether the CPU reads every prompt position with the integer row kernel, as it
    /// computes generated tokens, rather than long prompt chunks with f32 gemm. A position's
    /// keys and values are then the same bit for bit however it was computed, so the KV of
    /// an answer is a prefix-cache hit when the next turn of the chat sends the answer back
    /// (every chat client does): that turn reads only its new message. Off, a turn reads the
    /// last answer again, but a long prompt nobody has sent before reads ×1.1–1.3 faster.
    pub answer_reuse: bool,
    /// Prompt tokens a sequence feeds per step on the CPU: a long prompt is read in chunks
    /// so the sequences decoding beside it are held up by one chunk at a time.
    pub prompt_chunk: usize,
    /// Where a GPU keeps the kernel choices Burn's autotune makes, so that a restart does
    /// not time every shape's candidates again (a private directory: the worker's cache).
    /// `None`: they last as long as the process.
    pub tuning_cache: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::default(),
            weights: WeightFormat::default(),
            max_batch: DEFAULT_MAX_BATCH,
            kv_budget_tokens: None,
            prefix_caching: true,
            speculative: true,
            draft_max: DEFAULT_DRAFT_MAX,
            draft_length: DraftLength::Measured,
            kv_cache_type: KvCacheType::F16,
            jump_forward: true,
            answer_reuse: true,
            prompt_chunk: DEFAULT_PROMPT_CHUNK,
            tuning_cache: None,
        }
    }
}

/// The most tokens a sequence guesses for one step unless told otherwise: past eight, a
/// guess of SmolLM2's is rarely all taken, and the rows still cost.
pub const DEFAULT_DRAFT_MAX: usize = 8;

/// How the CPU model's KV cache keeps keys and values (llama.cpp's `--cache-type-k/-v`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheType {
    /// As computed: the references' numbers.
    F32,
    /// Rounded to half precision (about three decimal digits, as llama.cpp keeps its cache
    /// by default): half the memory, so twice the positions in the same budget, and half
    /// what attention reads per step, which at a long context is most of a decode step's
    /// traffic after the weights. At 1800 positions SmolLM2 decodes ×1.2–1.3 faster than
    /// with f32, and no slower at 128.
    #[default]
    F16,
}

impl KvCacheType {
    /// How many times smaller than f32 a key or value is kept.
    pub fn shrink(self) -> usize {
        match self {
            KvCacheType::F32 => 1,
            KvCacheType::F16 => 2,
        }
    }
}

/// How many tokens a speculating sequence guesses for a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DraftLength {
    /// The length that makes the step's expected tokens per cost the most, from the
    /// sequence's acceptance so far and the step times the scheduler measures: none where a
    /// guess would not pay (a busy batch, text that does not repeat).
    #[default]
    Measured,
    /// All the context offers, up to `draft_max`, whatever it costs (as llama-server's
    /// n-gram drafts): for comparing, and for tests whose drafts must not hang on timing.
    Max,
}

/// Sequences per forward pass unless told otherwise (llama-server's default slot count).
pub const DEFAULT_MAX_BATCH: usize = 4;
/// Prompt tokens per step per sequence: about half a second of prefill on two cores.
pub const DEFAULT_PROMPT_CHUNK: usize = 256;
/// The KV-cache memory the default budget is sized to.
pub const DEFAULT_KV_BYTES: usize = 1 << 30;
