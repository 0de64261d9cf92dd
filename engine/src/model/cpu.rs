//! The whole decoder on the CPU with block weights (the default format there).
//!
//! The residual stream and the KV cache stay in host memory: the embedding lookup, norms,
//! RoPE, attention, SwiGLU and the residual adds are plain loops over them, wrapped around
//! the block kernels (`quant`) that every projection and the output head go through. Why not
//! Burn: at SmolLM2's width (576) a Burn op costs more in dispatch, allocation and copying
//! than in arithmetic — the ~40 ops of a layer took about as long as its matmuls, and Burn's
//! attention copied the cached keys and values out of the cache buffer on every step. The
//! same decoder in Burn (`burn`) is the path for the GPU and for f32 weights; the test
//! `cpu_model_matches_burn_model` holds the two to each other.

use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use super::ModelConfig;
use super::rope::Rope;
use crate::quant::{BLOCK, BlockMatrix, Simd};

/// Whether a model of this shape can run here: every matrix width is a whole number of
/// 32-value blocks (true of every Llama-family checkpoint in practice).
pub fn fits(config: &ModelConfig) -> bool {
    [
        config.hidden_size,
        config.num_heads * config.head_dim,
        config.intermediate_size,
    ]
    .iter()
    .all(|width| width.is_multiple_of(BLOCK))
}

/// Where the CPU model's weights come from, by Hugging Face tensor name: a checkpoint
/// reader hands over blocks as stored where it can (a GGUF's Q4_1/Q8_0) and requantizes the
/// rest.
pub trait CpuWeights {
    /// A `[rows, cols]` matrix in blocks.
    fn blocks(&mut self, name: &str, rows: usize, cols: usize) -> Result<BlockMatrix, String>;
    /// A vector of `len` values (a norm weight or a bias).
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, String>;
    /// The token embedding table `[vocab, hidden]` as the checkpoint stores it.
    fn embeddings(&mut self, vocab: usize, hidden: usize) -> Result<Embeddings, String>;
}

/// The token embedding table.
#[derive(Debug)]
pub enum Embeddings {
    /// Stored in blocks: rows are expanded on lookup, and a tied output head multiplies
    /// the same blocks (no f32 copy of the largest matrix: 113 MB for SmolLM2).
    Blocks(Arc<BlockMatrix>),
    /// f32 rows `[vocab, hidden]`, for checkpoints whose table is not in blocks.
    F32 { table: Vec<f32>, hidden: usize },
}

impl Embeddings {
    /// Rows `ids`, `[ids.len(), hidden]`.
    fn lookup(&self, ids: &[u32]) -> Vec<f32> {
        let hidden = match self {
            Embeddings::Blocks(table) => table.cols(),
            Embeddings::F32 { hidden, .. } => *hidden,
        };
        let mut x = vec![0f32; ids.len() * hidden];
        for (&id, row) in ids.iter().zip(x.chunks_exact_mut(hidden)) {
            let id = id as usize;
            match self {
                Embeddings::Blocks(table) => table.expand_row(id, row),
                Embeddings::F32 { table, .. } => {
                    row.copy_from_slice(&table[id * hidden..(id + 1) * hidden]);
                }
            }
        }
        x
    }

    /// The table as the output head's blocks: the same blocks, or the f32 rows quantized.
    fn as_head(&self) -> Result<Arc<BlockMatrix>, String> {
        match self {
            Embeddings::Blocks(table) => Ok(table.clone()),
            Embeddings::F32 { table, hidden } => {
                BlockMatrix::quantize(table, table.len() / hidden, *hidden)
                    .map(Arc::new)
                    .ok_or_else(|| "the embedding table is not whole blocks".into())
            }
        }
    }
}

/// The decoder with block weights in host memory.
#[derive(Debug)]
pub struct CpuModel {
    embeddings: Embeddings,
    layers: Vec<CpuLayer>,
    norm: Vec<f32>,
    /// The output projection, or the embedding blocks when tied.
    head: Arc<BlockMatrix>,
    eps: f32,
    /// Query heads, key/value heads, head dim.
    heads: (usize, usize, usize),
    rope: Rope,
}

#[derive(Debug)]
struct CpuLayer {
    input_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
    /// q, k, v.
    qkv: [BlockMatrix; 3],
    /// q, k, v biases (Qwen2).
    qkv_bias: [Option<Vec<f32>>; 3],
    o: BlockMatrix,
    /// gate, up.
    gate_up: [BlockMatrix; 2],
    down: BlockMatrix,
}

impl CpuModel {
    /// Builds the model from `weights`; the caller has checked [`fits`].
    pub fn load(config: &ModelConfig, weights: &mut dyn CpuWeights) -> Result<Self, String> {
        let h = config.hidden_size;
        let (nh, nkv, hd) = (config.num_heads, config.num_kv_heads, config.head_dim);
        let i = config.intermediate_size;
        let embeddings = weights.embeddings(config.vocab_size, h)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let p = format!("model.layers.{l}.");
            let mut blocks =
                |name: &str, rows, cols| weights.blocks(&format!("{p}{name}.weight"), rows, cols);
            let qkv = [
                blocks("self_attn.q_proj", nh * hd, h)?,
                blocks("self_attn.k_proj", nkv * hd, h)?,
                blocks("self_attn.v_proj", nkv * hd, h)?,
            ];
            let o = blocks("self_attn.o_proj", h, nh * hd)?;
            let gate_up = [blocks("mlp.gate_proj", i, h)?, blocks("mlp.up_proj", i, h)?];
            let down = blocks("mlp.down_proj", h, i)?;
            let mut qkv_bias = [None, None, None];
            if config.attention_bias {
                for ((bias, name), len) in qkv_bias
                    .iter_mut()
                    .zip(["q_proj", "k_proj", "v_proj"])
                    .zip([nh * hd, nkv * hd, nkv * hd])
                {
                    *bias = Some(weights.vector(&format!("{p}self_attn.{name}.bias"), len)?);
                }
            }
            layers.push(CpuLayer {
                input_norm: weights.vector(&format!("{p}input_layernorm.weight"), h)?,
                post_attention_norm: weights
                    .vector(&format!("{p}post_attention_layernorm.weight"), h)?,
                qkv,
                qkv_bias,
                o,
                gate_up,
                down,
            });
        }
        let head = if config.tie_word_embeddings {
            embeddings.as_head()?
        } else {
            Arc::new(weights.blocks("lm_head.weight", config.vocab_size, h)?)
        };
        Ok(Self {
            embeddings,
            layers,
            norm: weights.vector("model.norm.weight", h)?,
            head,
            eps: config.rms_norm_eps as f32,
            heads: (nh, nkv, hd),
            rope: Rope::new(config),
        })
    }

    pub fn new_cache(&self, capacity: usize) -> CpuCache {
        let (_, nkv, hd) = self.heads;
        CpuCache {
            layers: self
                .layers
                .iter()
                .map(|_| KvCache::new(nkv, hd, capacity))
                .collect(),
            len: 0,
        }
    }

    /// Runs `ids` (positions `cache.len..cache.len + s`) through the model and returns the
    /// logits `[s', vocab]`, where `s'` is 1 (the last position) when `last_only`, else `s`.
    pub fn forward(&self, ids: &[u32], cache: &mut CpuCache, last_only: bool) -> Vec<f32> {
        if last_only {
            let mut batch = [Segment {
                ids,
                cache,
                logits: true,
            }];
            let never = || false;
            return self
                .forward_batch(&mut batch, 0, &never)
                .and_then(|mut logits| logits.remove(0))
                .unwrap_or_default();
        }
        // Every position's logits: the verification path, one sequence.
        let rows = [Group {
            rows: 0..ids.len(),
            decode: false,
        }];
        let x = self
            .layers_forward(ids, &mut [(cache, 0..ids.len())], &rows, &|| false)
            .expect("never abandoned");
        let mut normed = vec![0f32; x.len()];
        rms_norm(&x, &self.norm, self.eps, &mut normed);
        self.head.matmul(&normed, ids.len())
    }

    /// One step of several sequences: `batch[..decoding]` are single decode positions, the
    /// rest prompt chunks. A layer multiplies the decode rows and the short prompt chunks in
    /// one call of the row kernel and the long prompt chunks in one gemm call (`grouped`),
    /// and every row's arithmetic is the same as if its sequence ran alone, so batching
    /// never changes a sequence's tokens. Returns the last position's logits of each segment
    /// that asks for them, or `None` when `abandoned` said so between two layers: nobody wants the step any more
    /// (every sequence in it was cancelled), and the caches' new positions are left
    /// half-written for sequences that are about to leave.
    pub fn forward_batch(
        &self,
        batch: &mut [Segment<'_>],
        decoding: usize,
        abandoned: &(dyn Fn() -> bool + Sync),
    ) -> Option<Vec<Option<Vec<f32>>>> {
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for segment in batch.iter() {
            spans.push(ids.len()..ids.len() + segment.ids.len());
            ids.extend_from_slice(segment.ids);
        }
        // The row groups: all decode rows, then each prompt chunk (each chunk's length picks
        // its path, as it would alone).
        let mut groups = Vec::with_capacity(batch.len());
        if decoding > 0 {
            groups.push(Group {
                rows: 0..spans[decoding - 1].end,
                decode: true,
            });
        }
        groups.extend(spans[decoding..].iter().map(|rows| Group {
            rows: rows.clone(),
            decode: false,
        }));
        let mut caches: Vec<(&mut CpuCache, Range<usize>)> = batch
            .iter_mut()
            .zip(&spans)
            .map(|(segment, span)| (&mut *segment.cache, span.clone()))
            .collect();
        let x = self.layers_forward(&ids, &mut caches, &groups, abandoned)?;
        let hidden = self.norm.len();
        let wanted: Vec<usize> = batch
            .iter()
            .zip(&spans)
            .filter(|(segment, _)| segment.logits)
            .map(|(_, span)| span.end - 1)
            .collect();
        let mut last_rows = Vec::with_capacity(wanted.len() * hidden);
        for &row in &wanted {
            last_rows.extend_from_slice(&x[row * hidden..(row + 1) * hidden]);
        }
        let logits = self.logits(&last_rows, wanted.len());
        let vocab = self.head.rows();
        let mut rows = logits.chunks_exact(vocab.max(1));
        let logits = batch
            .iter()
            .map(|segment| {
                segment
                    .logits
                    .then(|| rows.next().map(<[f32]>::to_vec).unwrap_or_default())
            })
            .collect();
        Some(logits)
    }

    /// The residual stream of `ids` after every layer. `caches` pairs each sequence's cache
    /// with its rows of `ids`; `groups` are the row ranges multiplied together. `None` when
    /// `abandoned` says so before a layer (a long prompt chunk then stops within a layer's
    /// time, not the chunk's).
    fn layers_forward(
        &self,
        ids: &[u32],
        caches: &mut [(&mut CpuCache, Range<usize>)],
        groups: &[Group],
        abandoned: &(dyn Fn() -> bool + Sync),
    ) -> Option<Vec<f32>> {
        let mut x = self.embeddings.lookup(ids);
        let hidden = self.norm.len();
        let mut normed = vec![0f32; x.len()];
        for (index, layer) in self.layers.iter().enumerate() {
            if abandoned() {
                return None;
            }
            rms_norm(&x, &layer.input_norm, self.eps, &mut normed);
            let [q, k, v] = grouped(groups, hidden, &normed, layer.qkv.each_ref());
            let (nh, nkv, hd) = self.heads;
            // Each sequence's attention on its own cache, the sequences spread over the pool
            // (a short context's rows are too little work to split within one sequence).
            let parts: Vec<Vec<f32>> = caches
                .par_iter_mut()
                .map(|(cache, rows)| {
                    let positions = cache.len..cache.len + rows.len();
                    let row = |values: &[f32], width| {
                        values[rows.start * width..rows.end * width].to_vec()
                    };
                    let (mut q, mut k, mut v) =
                        (row(&q, nh * hd), row(&k, nkv * hd), row(&v, nkv * hd));
                    for (values, bias) in [&mut q, &mut k, &mut v].into_iter().zip(&layer.qkv_bias)
                    {
                        if let Some(bias) = bias {
                            for row in values.chunks_exact_mut(bias.len()) {
                                add(row, bias);
                            }
                        }
                    }
                    self.rope.rotate(&mut q, nh, positions.clone());
                    self.rope.rotate(&mut k, nkv, positions.clone());
                    let kv = &mut cache.layers[index];
                    kv.append(&k, &v, positions.start);
                    kv.attend(&q, nh, positions)
                })
                .collect();
            let attended = parts.concat();
            let [o] = grouped(groups, nh * hd, &attended, [&layer.o]);
            add(&mut x, &o);

            rms_norm(&x, &layer.post_attention_norm, self.eps, &mut normed);
            let [mut gate, up] = grouped(groups, hidden, &normed, layer.gate_up.each_ref());
            swiglu(&mut gate, &up);
            let [down] = grouped(groups, layer.down.cols(), &gate, [&layer.down]);
            add(&mut x, &down);
        }
        for (cache, rows) in caches.iter_mut() {
            cache.len += rows.len();
        }
        Some(x)
    }

    /// The final norm and the output head over `rows` last positions of `x`: `[rows, vocab]`.
    fn logits(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut normed = vec![0f32; x.len()];
        rms_norm(x, &self.norm, self.eps, &mut normed);
        // Row by row in integers, as a lone decode step does, whatever the batch.
        let [logits] = BlockMatrix::matmul_rows([&*self.head], &normed, rows);
        logits
    }
}

/// One sequence's part of a batched step.
pub struct Segment<'a> {
    /// Token ids at the cache's next positions.
    pub ids: &'a [u32],
    pub cache: &'a mut CpuCache,
    /// Whether the last position's logits are wanted.
    pub logits: bool,
}

/// Rows multiplied together in one call.
#[derive(Debug, Clone)]
struct Group {
    rows: Range<usize>,
    /// Decode rows, one per sequence: always the row-by-row integer kernel (a lone decode
    /// step's path), which reads the weights once for all of them. A prompt chunk takes
    /// the path its own length picks.
    decode: bool,
}

impl Group {
    /// Whether this group's rows go through the row kernel, alone as in any batch.
    fn row_kernel(&self) -> bool {
        self.decode || BlockMatrix::row_kernel_for(self.rows.len())
    }
}

/// `x · Wᵢᵀ` for each row group of `x` (rows of `width`), the results in row order. Every
/// group that takes the row kernel (the decode rows and the short prompt chunks) is
/// multiplied in one call, so the step reads the weights once for all of them; the long
/// prompt chunks go to the tiled path together. Each row's arithmetic is what it would be
/// if its group ran alone.
fn grouped<const N: usize>(
    groups: &[Group],
    width: usize,
    x: &[f32],
    mats: [&BlockMatrix; N],
) -> [Vec<f32>; N] {
    let rows_of = |group: &Group| &x[group.rows.start * width..group.rows.end * width];
    if let [only] = groups {
        let m = only.rows.len();
        return if only.decode {
            BlockMatrix::matmul_rows(mats, rows_of(only), m)
        } else {
            BlockMatrix::matmul_many(mats, rows_of(only), m)
        };
    }
    let total = groups.iter().map(|g| g.rows.len()).sum::<usize>();
    let mut out: [Vec<f32>; N] = mats.map(|w| vec![0f32; total * w.rows()]);
    let mut place = |group: &Group, part: &[Vec<f32>; N], first: usize| {
        for ((out, part), w) in out.iter_mut().zip(part).zip(mats) {
            let (at, len) = (first * w.rows(), group.rows.len() * w.rows());
            out[group.rows.start * w.rows()..][..len].copy_from_slice(&part[at..at + len]);
        }
    };
    let (row_groups, tiled): (Vec<&Group>, Vec<&Group>) =
        groups.iter().partition(|g| g.row_kernel());
    // The row-kernel groups in one call, and the long prompt chunks in another: gemm sums
    // each output over the inner dimension in the same order whatever the number of rows,
    // so a chunk's values are those of its call alone, and the weights are expanded once
    // for all chunks instead of once per chunk.
    for (kind, multiply) in [
        (
            row_groups,
            BlockMatrix::matmul_rows::<N> as fn(_, &_, _) -> _,
        ),
        (tiled, BlockMatrix::matmul_many::<N>),
    ] {
        if kind.is_empty() {
            continue;
        }
        let gathered: Vec<f32> = kind.iter().flat_map(|g| rows_of(g)).copied().collect();
        let part = multiply(mats, &gathered, gathered.len() / width.max(1));
        let mut first = 0;
        for group in kind {
            place(group, &part, first);
            first += group.rows.len();
        }
    }
    out
}

/// A generation's keys and values on the CPU path, one [`KvCache`] per layer.
#[derive(Debug)]
pub struct CpuCache {
    layers: Vec<KvCache>,
    /// Positions already in the cache.
    len: usize,
}

/// One layer's keys and values in host memory, `[nkv, capacity, hd]` each: a head's
/// positions are contiguous, so scoring a query against them is one pass over memory.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    heads: usize,
    head_dim: usize,
    capacity: usize,
}

/// Work (query values × positions seen) from which attention rows are split across the
/// pool: for SmolLM2's decode step (9 heads × 64) from about 110 cached positions on; below
/// that a row is a few microseconds and dispatch would cost more than it saves.
const PARALLEL_ATTENTION_WORK: usize = 1 << 16;

impl KvCache {
    fn new(heads: usize, head_dim: usize, capacity: usize) -> Self {
        let len = heads * capacity * head_dim;
        Self {
            keys: vec![0.0; len],
            values: vec![0.0; len],
            heads,
            head_dim,
            capacity,
        }
    }

    /// Stores `k`, `v` `[s, nkv, hd]` at positions `start..start + s`.
    fn append(&mut self, k: &[f32], v: &[f32], start: usize) {
        let (hd, cap) = (self.head_dim, self.capacity);
        let s = k.len() / (self.heads * hd);
        assert!(start + s <= cap, "KV cache of {cap} positions is full");
        for (i, (k, v)) in k
            .chunks_exact(self.heads * hd)
            .zip(v.chunks_exact(self.heads * hd))
            .enumerate()
        {
            for (g, (k, v)) in k.chunks_exact(hd).zip(v.chunks_exact(hd)).enumerate() {
                let at = (g * cap + start + i) * hd;
                self.keys[at..at + hd].copy_from_slice(k);
                self.values[at..at + hd].copy_from_slice(v);
            }
        }
    }

    /// `softmax(q·Kᵀ / √hd) · V` for queries `q` `[s, nh, hd]` at `positions`, each seeing
    /// the cached positions up to its own (causal); query head `h` reads kv head
    /// `h / (nh / nkv)`. Returns `[s, nh, hd]`.
    fn attend(&self, q: &[f32], nh: usize, positions: Range<usize>) -> Vec<f32> {
        let hd = self.head_dim;
        let rep = nh / self.heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; q.len()];
        let simd = Simd::detect();
        let row = |(r, out): (usize, &mut [f32])| {
            let (i, h) = (r / nh, r % nh);
            let seen = positions.start + i + 1;
            let base = (h / rep) * self.capacity * hd;
            let keys = &self.keys[base..base + seen * hd];
            let values = &self.values[base..base + seen * hd];
            let q = &q[r * hd..(r + 1) * hd];
            match simd {
                // SAFETY: `Simd::Avx2` means the CPU has AVX2 and FMA.
                #[cfg(target_arch = "x86_64")]
                Simd::Avx2 { .. } => unsafe { attend_row_avx2(q, keys, values, scale, out) },
                Simd::Portable => attend_row(q, keys, values, scale, out),
            }
        };
        let work = q.len() * positions.end;
        if work >= PARALLEL_ATTENTION_WORK {
            out.par_chunks_mut(hd).enumerate().for_each(row);
        } else {
            out.chunks_mut(hd).enumerate().for_each(row);
        }
        out
    }
}

/// One query row against `seen` cached positions (`keys`, `values` `[seen, hd]`), into
/// `out` `[hd]`.
#[inline(always)]
fn attend_row(q: &[f32], keys: &[f32], values: &[f32], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    // A plain loop rather than `map().collect()`: the closure of an iterator adapter is
    // compiled on its own, without the caller's AVX2.
    let mut scores = Vec::with_capacity(keys.len() / hd);
    for k in keys.chunks_exact(hd) {
        scores.push(dot(q, k) * scale);
    }
    // `out += softmax(scores) · values`.
    let total = exp_from_max(&mut scores);
    add_weighted(&scores, total, values, out);
}

/// `scores` replaced by `exp(score - max)`; returns their sum (softmax's denominator).
#[inline(always)]
fn exp_from_max(scores: &mut [f32]) -> f32 {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut total = 0f32;
    for x in scores.iter_mut() {
        *x = (*x - max).exp();
        total += *x;
    }
    total
}

/// `out += (weights / total) · values`, key by key.
#[inline(always)]
fn add_weighted(weights: &[f32], total: f32, values: &[f32], out: &mut [f32]) {
    let hd = out.len();
    for (p, v) in weights.iter().zip(values.chunks_exact(hd)) {
        let p = p / total;
        for (o, v) in out.iter_mut().zip(v) {
            *o += p * v;
        }
    }
}

/// [`attend_row`] for AVX2: the scores of eight keys at a time, their lanes summed by one
/// transpose (with a horizontal sum per key, the sums were most of a score's work; the
/// attention of a 4-client decode step was a twelfth of it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_row_avx2(q: &[f32], keys: &[f32], values: &[f32], scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = q.len();
    if !hd.is_multiple_of(8) {
        return attend_row(q, keys, values, scale, out);
    }
    let seen = keys.len() / hd;
    let mut scores = vec![0f32; seen];
    let mut eights = keys.chunks_exact(8 * hd);
    for (eight, scores) in eights.by_ref().zip(scores.chunks_exact_mut(8)) {
        // SAFETY: `eight` holds 8 keys of `hd` values, `q` `hd` values, `scores` 8; AVX2 and
        // FMA are enabled.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..hd).step_by(8) {
                let qc = _mm256_loadu_ps(q.as_ptr().add(c));
                for (t, acc) in acc.iter_mut().enumerate() {
                    let k = _mm256_loadu_ps(eight.as_ptr().add(t * hd + c));
                    *acc = _mm256_fmadd_ps(qc, k, *acc);
                }
            }
            // Pairwise sums: [key 0..3 of lanes 0..3 | of lanes 4..7], then the halves added.
            let low = _mm256_hadd_ps(
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[2], acc[3]),
            );
            let high = _mm256_hadd_ps(
                _mm256_hadd_ps(acc[4], acc[5]),
                _mm256_hadd_ps(acc[6], acc[7]),
            );
            let sums = _mm256_add_ps(
                _mm256_permute2f128_ps(low, high, 0x20),
                _mm256_permute2f128_ps(low, high, 0x31),
            );
            _mm256_storeu_ps(
                scores.as_mut_ptr(),
                _mm256_mul_ps(sums, _mm256_set1_ps(scale)),
            );
        }
    }
    let done = seen - seen % 8;
    for (score, k) in scores[done..]
        .iter_mut()
        .zip(eights.remainder().chunks_exact(hd))
    {
        *score = dot(q, k) * scale;
    }
    let total = exp_from_max(&mut scores);
    // `out += p · v` over the keys with `out` held in registers, 64 values at a time (the
    // portable loop loaded and stored `out` for every key: half of this function's time).
    if !hd.is_multiple_of(64) {
        return add_weighted(&scores, total, values, out);
    }
    for (strip, at) in out.chunks_exact_mut(64).zip((0..hd).step_by(64)) {
        // SAFETY: every load is inside `values` (row `j`, values `at..at + 64`) and every
        // store inside `strip`; AVX2 and FMA are enabled.
        unsafe {
            let mut acc: [__m256; 8] =
                std::array::from_fn(|c| _mm256_loadu_ps(strip.as_ptr().add(8 * c)));
            for (j, score) in scores.iter().enumerate() {
                let p = _mm256_set1_ps(score / total);
                let v = values.as_ptr().add(j * hd + at);
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(p, _mm256_loadu_ps(v.add(8 * c)), *acc);
                }
            }
            for (c, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(strip.as_mut_ptr().add(8 * c), *acc);
            }
        }
    }
}

/// Dot product in eight independent lanes, so it vectorizes without reassociation.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (a, b) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for k in 0..8 {
            lanes[k] += a[k] * b[k];
        }
    }
    let tail: f32 = a
        .chunks_exact(8)
        .remainder()
        .iter()
        .zip(b.chunks_exact(8).remainder())
        .map(|(a, b)| a * b)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// `out = x / rms(x) · gamma`, row by row (rows of `gamma.len()`), as Burn's `RmsNorm`.
fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
    let width = gamma.len();
    for (row, out) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let rms = (mean_square + eps).sqrt();
        for ((o, v), g) in out.iter_mut().zip(row).zip(gamma) {
            *o = v / rms * g;
        }
    }
}

/// `gate = silu(gate) · up`.
fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

#[cfg(test)]
mod tests {
    use ::burn::module::Param;
    use ::burn::tensor::{Tensor, TensorData};

    use super::*;
    use crate::load::{self, WeightPlan};
    use crate::model::Model;
    use crate::model::burn::{BurnModel, ParamMut};
    use crate::{DeviceChoice, Engine, LoadOptions, SamplingParams, WeightFormat};

    /// Every matrix replaced by its Q8_0 blocks expanded back: weights that both forms hold
    /// exactly, so what differs between them is the arithmetic alone.
    fn round_through_blocks(model: &mut BurnModel) {
        for (_, param) in model.named_params_mut() {
            let p = match param {
                ParamMut::Proj(proj) => &mut proj.weight,
                ParamMut::Matrix(p) => p,
                ParamMut::Vector(_) => continue,
            };
            let [rows, cols] = p.shape().dims();
            let device = p.device();
            let values = p.val().into_data().try_into_vec::<f32>().unwrap();
            let blocks = BlockMatrix::quantize(&values, rows, cols).unwrap();
            let mut rounded = vec![0f32; rows * cols];
            for (r, row) in rounded.chunks_exact_mut(cols).enumerate() {
                blocks.expand_row(r, row);
            }
            let data = TensorData::new(rounded, [rows, cols]);
            *p = Param::from_tensor(Tensor::from_data(data, &device));
        }
    }

    /// Largest minus smallest logit of `ids`'s forward pass.
    fn spread(engine: &Engine, ids: &[u32]) -> f32 {
        let logits = engine.logits(ids).unwrap();
        let max = logits.iter().fold(f32::MIN, |m, &v| m.max(v));
        let min = logits.iter().fold(f32::MAX, |m, &v| m.min(v));
        max - min
    }

    /// The CPU model and Burn's layers on the same weights (the tiny fixtures, rounded to
    /// Q8_0; Qwen2's has q/k/v biases): prefill logits agree to float rounding, and greedy
    /// decoding through each one's KV cache gives the same tokens.
    #[test]
    fn cpu_model_matches_burn_model() {
        let greedy = SamplingParams::greedy(24);
        let ids = [1, 5, 9, 42, 7, 300, 12, 64];
        for fixture in ["tiny-llama", "tiny-qwen2"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(fixture);
            let options = |weights| LoadOptions {
                device: DeviceChoice::Cpu,
                weights,
                ..LoadOptions::default()
            };
            let auto = Engine::load(&path, &options(WeightFormat::Auto)).unwrap();
            assert!(
                matches!(auto.core.model, Model::Cpu(_)),
                "{fixture}: the CPU's default plan is blocks"
            );

            let f32 = options(WeightFormat::F32);
            let checkpoint = load::load(&path, &f32).unwrap();
            let Model::Burn(mut burn) = checkpoint.model else {
                panic!("{fixture}: f32 weights load Burn's layers");
            };
            round_through_blocks(&mut burn.model);
            let cpu = load::finish_burn_model(
                burn.model.clone(),
                &checkpoint.config,
                WeightPlan::CpuBlocks,
                &burn.device,
            )
            .unwrap();
            let engine = |model| {
                let checkpoint = load::load(&path, &f32).unwrap();
                Engine::from_checkpoint(
                    load::Checkpoint {
                        model,
                        ..checkpoint
                    },
                    &path,
                    &f32,
                )
                .unwrap()
            };
            let burn = engine(Model::Burn(burn));
            let cpu = engine(cpu);
            // A prompt long enough for the gemm path multiplies f32 by f32 as Burn does:
            // agreement to float rounding. A short one takes the integer path, whose i16
            // activations round to 1/65534 of each block's largest value: agreement to
            // 1e-4 of the logits' spread.
            let long: Vec<u32> = (0..crate::quant::GEMM_MIN_ROWS + 4)
                .map(|k| ids[k % ids.len()] + k as u32)
                .collect();
            for (prompt, tolerance) in [(&long[..], 1e-4), (&ids[..], 1e-4 * spread(&burn, &ids))] {
                let burn_logits = burn.logits(prompt).unwrap();
                let max_error = cpu
                    .logits(prompt)
                    .unwrap()
                    .iter()
                    .zip(&burn_logits)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    max_error < tolerance,
                    "{fixture}, {} tokens: logits differ by {max_error}",
                    prompt.len()
                );
            }
            let (_, burn_tokens) = burn.generate_ids(&ids, &greedy).unwrap();
            let (_, cpu_tokens) = cpu.generate_ids(&ids, &greedy).unwrap();
            assert_eq!(cpu_tokens, burn_tokens, "{fixture}: greedy tokens");
        }
    }

    #[test]
    fn rms_norm_and_swiglu_match_their_definitions() {
        let x = [3.0f32, -4.0, 1.0, 2.0];
        let gamma = [1.0f32, 0.5];
        let mut out = [0f32; 4];
        rms_norm(&x, &gamma, 0.0, &mut out);
        // Rows [3, -4] (rms √12.5) and [1, 2] (rms √2.5).
        let (r0, r1) = (12.5f32.sqrt(), 2.5f32.sqrt());
        assert_eq!(out, [3.0 / r0, -4.0 / r0 * 0.5, 1.0 / r1, 2.0 / r1 * 0.5]);
        let mut gate = [0.0f32, 2.0];
        swiglu(&mut gate, &[5.0, 3.0]);
        assert_eq!(gate, [0.0, 2.0 / (1.0 + (-2.0f32).exp()) * 3.0]);
    }

    /// The AVX2 attention row (eight keys at a time, `out` in registers) against the
    /// portable one, for head widths on and off its fast paths and key counts around eight.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_attention_row_matches_the_portable_one() {
        if !matches!(Simd::detect(), Simd::Avx2 { .. }) {
            return;
        }
        let mut state = 7u32;
        let mut next = move || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        };
        for hd in [64, 128, 40, 12] {
            for seen in [1, 7, 8, 19, 64] {
                let q: Vec<f32> = (0..hd).map(|_| next()).collect();
                let keys: Vec<f32> = (0..seen * hd).map(|_| next()).collect();
                let values: Vec<f32> = (0..seen * hd).map(|_| next()).collect();
                let start: Vec<f32> = (0..hd).map(|_| next()).collect();
                let (mut want, mut got) = (start.clone(), start);
                attend_row(&q, &keys, &values, 0.125, &mut want);
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { attend_row_avx2(&q, &keys, &values, 0.125, &mut got) };
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "hd {hd}, {seen} keys: {g} vs {w}"
                    );
                }
            }
        }
    }
}
