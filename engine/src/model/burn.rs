//! The Llama-family decoder in Burn, read top to bottom: cache → attention → MLP → block →
//! model → forward. This is the path for the GPU (wgpu) and for f32 weights on the CPU (the
//! reference format); the CPU's default block format runs in `cpu` instead. Module fields are
//! named like the Hugging Face tensors (`model.layers.0.self_attn.q_proj.weight`, ...), so a
//! safetensors checkpoint loads by name.
//!
//! Shapes: `b` batch (sequences: one, or several of one position each), `s` new positions, `t` cached + new positions,
//! `nh`/`nkv` query/key-value heads, `hd` head dim.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, RmsNorm, RmsNormConfig};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Int, Tensor};

use super::ModelConfig;
use super::proj::Proj;
use super::rope::RopeTables;
use crate::kv::BLOCK_SIZE;

// ---------------------------------------------------------------------------------------
// KV cache: per layer, keys and values of every position seen so far, in a buffer
// `[b, nkv, capacity, hd]` written in place (Flex writes a uniquely owned tensor's slice
// without copying), so a step costs the new position only, not a copy of everything cached
// so far. The buffer grows as the sequence reaches new positions, to twice what it holds:
// a sequence is copied a few times in its life, and none holds room for `max_tokens` it
// may never produce. (The scheduler counts the positions against the KV pool in blocks all
// the same.)
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct BurnCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// Positions already in the cache.
    len: usize,
}

impl BurnCache {
    /// An empty cache, for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Writes `k`, `v` `[b, nkv, s, hd]` at positions `len..len + s` and returns views of
    /// positions `0..len + s`.
    fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let [b, nkv, s, hd] = k.dims();
        let (start, end) = (self.len, self.len + s);
        let (ck, cv) = match self.layers[layer].take() {
            Some((ck, cv)) if ck.dims()[2] >= end => (ck, cv),
            held => {
                let capacity = end.max(2 * start).next_multiple_of(BLOCK_SIZE);
                let empty = || Tensor::zeros([b, nkv, capacity, hd], &k.device());
                let (mut ck, mut cv) = (empty(), empty());
                if let Some((old_k, old_v)) = held.filter(|_| start > 0) {
                    let kept = [0..b, 0..nkv, 0..start, 0..hd];
                    ck = ck.slice_assign(kept.clone(), old_k.narrow(2, 0, start));
                    cv = cv.slice_assign(kept, old_v.narrow(2, 0, start));
                }
                (ck, cv)
            }
        };
        let range = [0..b, 0..nkv, start..end, 0..hd];
        let ck = ck.slice_assign(range.clone(), k);
        let cv = cv.slice_assign(range, v);
        let views = (ck.clone().narrow(2, 0, end), cv.clone().narrow(2, 0, end));
        self.layers[layer] = Some((ck, cv));
        views
    }
}

// ---------------------------------------------------------------------------------------
// Attention (grouped-query: `nh / nkv` query heads share one key/value head).
// ---------------------------------------------------------------------------------------

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Proj,
    pub k_proj: Proj,
    pub v_proj: Proj,
    pub o_proj: Proj,
    /// q, k and v as one projection ([`BurnModel::fuse_projections`]), on a GPU.
    pub qkv: Option<Proj>,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl Attention {
    fn new(config: &ModelConfig, device: &Device) -> Self {
        let h = config.hidden_size;
        let (nh, nkv, hd) = (config.num_heads, config.num_kv_heads, config.head_dim);
        let bias = config.attention_bias;
        Self {
            q_proj: Proj::init(h, nh * hd, bias, device),
            k_proj: Proj::init(h, nkv * hd, bias, device),
            v_proj: Proj::init(h, nkv * hd, bias, device),
            o_proj: Proj::init(nh * hd, h, false, device),
            qkv: None,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        }
    }

    /// `x` `[b, s, h]`: row `i` of the batch is the sequence of `caches[i]`, at its next
    /// positions. The projections take the whole batch in one matmul each; each sequence
    /// attends over its own cache.
    fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        caches: &mut [&mut BurnCache],
        layer: usize,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let starts: Vec<usize> = caches.iter().map(|cache| cache.len).collect();

        // `[b, s, heads·hd]` → `[b, heads, s, hd]`. For one position the two layouts are the
        // same bytes, so a reshape does it; a swap of dimensions is a strided view that
        // becomes a copy kernel on the device, three per layer in every decode step.
        let heads = |x: Tensor<3>, heads: usize| {
            if s == 1 {
                x.reshape([b, heads, 1, hd])
            } else {
                x.reshape([b, s, heads, hd]).swap_dims(1, 2)
            }
        };
        let (q, k, v) = match &self.qkv {
            // One matmul, and the query and key heads rotated together: one RoPE pass.
            Some(qkv) => {
                let y = qkv.forward(x);
                let qk = heads(y.clone().narrow(2, 0, (nh + nkv) * hd), nh + nkv);
                let qk = rope.apply_each(qk, &starts);
                let v = heads(y.narrow(2, (nh + nkv) * hd, nkv * hd), nkv);
                (qk.clone().narrow(1, 0, nh), qk.narrow(1, nh, nkv), v)
            }
            None => {
                let [q, k, v] = Proj::forward_each(x, [&self.q_proj, &self.k_proj, &self.v_proj]);
                let q = rope.apply_each(heads(q, nh), &starts);
                let k = rope.apply_each(heads(k, nkv), &starts);
                (q, k, heads(v, nkv))
            }
        };
        let out = match caches {
            [cache] => attend(q, k, v, cache, layer),
            caches => {
                let row = |x: &Tensor<4>, i: usize| x.clone().narrow(0, i, 1);
                let parts = caches
                    .iter_mut()
                    .enumerate()
                    .map(|(i, cache)| attend(row(&q, i), row(&k, i), row(&v, i), cache, layer))
                    .collect();
                Tensor::cat(parts, 0)
            }
        };
        let out = if s == 1 {
            out.reshape([b, 1, nh * hd])
        } else {
            out.swap_dims(1, 2).reshape([b, s, nh * hd])
        };
        self.o_proj.forward(out)
    }
}

/// Appends `k`, `v` `[b, nkv, s, hd]` to the layer's cache and attends `q` `[b, nh, s, hd]`
/// over everything cached: Burn's fused attention (grouped-query: `nh / nkv` query heads
/// share a key/value head). Several positions are a prompt from position 0 (the generation
/// loop never prefills in chunks), so plain causal masking is right; one new position sees
/// every cached key.
fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    cache: &mut BurnCache,
    layer: usize,
) -> Tensor<4> {
    let s = q.dims()[2];
    assert!(
        s == 1 || cache.len == 0,
        "a multi-position pass must start at position 0"
    );
    let (k, v) = cache.append(layer, k, v);
    let flex = k.device() == Device::flex();
    if s == 1 && !flex {
        return attend_one_position(q, k, v);
    }
    // Flex's fused attention reads grouped K/V heads as they are. Burn's attention contract
    // (and CubeCL's kernels, which fail on it) want one K/V head per query head: elsewhere
    // each K/V head is repeated for the query heads that share it.
    let nh = q.dims()[1];
    let (k, v) = if k.dims()[1] != nh && !flex {
        (repeat_heads(k, nh), repeat_heads(v, nh))
    } else {
        (k, v)
    };
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: s > 1,
    };
    attention(q, k, v, None, None, options)
}

/// One position's attention, `q` `[b, nh, 1, hd]` over the cached `k`, `v` `[b, nkv, t, hd]`,
/// on a GPU: one launch of the engine's kernel (`device_kernels`) where it takes the types
/// and head size, else [`attend_one_position_by_matmul`].
fn attend_one_position(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "wgpu")]
    if [&q, &k, &v].iter().all(|t| t.dtype() == DType::F32)
        && super::device_kernels::attends_head_dim(q.dims()[3])
    {
        return super::device_kernels::attend_one_position(q, k, v);
    }
    attend_one_position_by_matmul(q, k, v)
}

/// [`attend_one_position`] in Burn's operations: the `nh / nkv` query heads that share a K/V head are the rows of one matmul
/// against its keys, so the cache is read as it is. Burn's attention wants the K/V heads
/// repeated for their query heads, which copies the whole cache twice a layer in every
/// decode step (its size in bytes, and two launches), and its fallback's softmax guards
/// against rows with every key masked, which one position's row never has (a few launches
/// more).
fn attend_one_position_by_matmul(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [b, nh, _, hd] = q.dims();
    let nkv = k.dims()[1];
    // Query head `h` reads K/V head `h / (nh / nkv)` (the Hugging Face `repeat_kv` order), so
    // the heads of one K/V head are consecutive.
    let q = q.reshape([b, nkv, nh / nkv, hd]);
    let scores = q.matmul(k.swap_dims(2, 3)) * (1.0 / (hd as f64).sqrt());
    softmax(scores, 3).matmul(v).reshape([b, nh, 1, hd])
}

/// `[b, nkv, t, hd]` → `[b, nh, t, hd]`, query head `i` reading K/V head `i / (nh / nkv)`
/// (the Hugging Face `repeat_kv` order).
fn repeat_heads(x: Tensor<4>, nh: usize) -> Tensor<4> {
    let [b, nkv, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, nkv, nh / nkv, t, hd])
        .reshape([b, nh, t, hd])
}

// ---------------------------------------------------------------------------------------
// MLP (SwiGLU): down(silu(gate(x)) * up(x)).
// ---------------------------------------------------------------------------------------

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Proj,
    pub up_proj: Proj,
    pub down_proj: Proj,
}

impl Mlp {
    fn new(config: &ModelConfig, device: &Device) -> Self {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        Self {
            gate_proj: Proj::init(h, i, false, device),
            up_proj: Proj::init(h, i, false, device),
            down_proj: Proj::init(i, h, false, device),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [gate, up] = Proj::forward_each(x, [&self.gate_proj, &self.up_proj]);
        self.down_proj.forward(silu(gate) * up)
    }
}

/// The residual stream `x` plus `delta` (the last block's output, not yet added), and
/// `norm` of that sum in `dtype` (the next matmul's weight type). On a GPU this is one
/// launch of the engine's kernel (`device_kernels`): Burn's fusion leaves the residual add,
/// the element-wise work after the norm's reduction and the cast as launches of their own.
/// Elsewhere (the CPU, types the kernel does not take) Burn's add and `RmsNorm`, in f32;
/// the projections cast as they need.
fn add_rms_norm<const D: usize>(
    norm: &RmsNorm,
    x: Tensor<D>,
    delta: Option<Tensor<D>>,
    dtype: DType,
) -> (Tensor<D>, Tensor<D>) {
    #[cfg(feature = "wgpu")]
    if x.device() != Device::flex()
        && x.dtype() == DType::F32
        && norm.gamma.dtype() == DType::F32
        && delta.as_ref().is_none_or(|d| d.dtype() == DType::F32)
    {
        use super::device_kernels as kernels;
        let (gamma, epsilon) = (norm.gamma.val(), norm.epsilon);
        return match delta {
            Some(delta) => kernels::add_rms_norm(x, delta, gamma, epsilon, dtype),
            None => (x.clone(), kernels::rms_norm(x, gamma, epsilon, dtype)),
        };
    }
    let _ = dtype;
    let x = match delta {
        Some(delta) => x + delta,
        None => x,
    };
    (x.clone(), norm.forward(x))
}

// ---------------------------------------------------------------------------------------
// Decoder block (pre-norm residual).
// ---------------------------------------------------------------------------------------

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(config: &ModelConfig, device: &Device) -> Self {
        let norm = RmsNormConfig::new(config.hidden_size).with_epsilon(config.rms_norm_eps);
        Self {
            self_attn: Attention::new(config, device),
            mlp: Mlp::new(config, device),
            input_layernorm: norm.init(device),
            post_attention_layernorm: norm.init(device),
        }
    }

    /// The seven projections with their Hugging Face names relative to the layer: the one list
    /// that loading, casting and quantising walk. Takes the two blocks rather than the layer so
    /// callers can still borrow the layer's norms beside it.
    pub fn projections_mut<'a>(
        a: &'a mut Attention,
        m: &'a mut Mlp,
    ) -> [(&'static str, &'a mut Proj); 7] {
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ]
    }

    /// The block on the residual stream `x` plus `delta` (the previous block's output, added
    /// here with the norm: [`add_rms_norm`]). Returns the stream and this block's output,
    /// likewise not yet added.
    fn forward(
        &self,
        x: Tensor<3>,
        delta: Option<Tensor<3>>,
        rope: &RopeTables,
        caches: &mut [&mut BurnCache],
        layer: usize,
    ) -> (Tensor<3>, Tensor<3>) {
        let attention = &self.self_attn;
        let qkv = attention.qkv.as_ref().unwrap_or(&attention.q_proj);
        let (x, normed) = add_rms_norm(&self.input_layernorm, x, delta, qkv.dtype());
        let attended = attention.forward(normed, rope, caches, layer);
        let norm = &self.post_attention_layernorm;
        let (h, normed) = add_rms_norm(norm, x, Some(attended), self.mlp.gate_proj.dtype());
        (h, self.mlp.forward(normed))
    }
}

// ---------------------------------------------------------------------------------------
// The model: embeddings → blocks → final norm → output projection.
// ---------------------------------------------------------------------------------------

#[derive(Module, Debug)]
pub struct LlamaModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}

/// `LlamaForCausalLM`: the HF checkpoint's top level (`model.*` and `lm_head.*`).
#[derive(Module, Debug)]
pub struct BurnModel {
    pub model: LlamaModel,
    /// `None` when the output projection is tied to `model.embed_tokens` (the transposed
    /// table then feeds the output matmul, so no second copy of the largest matrix is kept).
    pub lm_head: Option<Proj>,
}

impl BurnModel {
    /// A model of the right shape whose weights are placeholders, to be replaced by the
    /// loader (zeros, allocated only if never replaced: a weight the loader forgot shows up
    /// as wrong output, not as memory).
    pub fn new(config: &ModelConfig, device: &Device) -> Self {
        let embed = EmbeddingConfig::new(config.vocab_size, config.hidden_size)
            .with_initializer(Initializer::Zeros)
            .init(device);
        Self {
            model: LlamaModel {
                embed_tokens: embed,
                layers: (0..config.num_layers)
                    .map(|_| DecoderLayer::new(config, device))
                    .collect(),
                norm: RmsNormConfig::new(config.hidden_size)
                    .with_epsilon(config.rms_norm_eps)
                    .init(device),
            },
            lm_head: (!config.tie_word_embeddings)
                .then(|| Proj::init(config.hidden_size, config.vocab_size, false, device)),
        }
    }

    /// Runs `tokens` `[b, s]` (positions `cache.len..cache.len + s`) through the model and
    /// returns the logits `[b, s', vocab]`, where `s'` is 1 (the last position) when
    /// `last_only`, else `s`. Skipping the other positions saves most of the output
    /// projection's work in prefill.
    pub fn forward(
        &self,
        tokens: Tensor<2, Int>,
        rope: &RopeTables,
        cache: &mut BurnCache,
        last_only: bool,
    ) -> Tensor<3> {
        self.forward_each(tokens, rope, &mut [cache], last_only)
    }

    /// [`BurnModel::forward`] of several sequences in one pass: row `i` of `tokens` `[b, s]`
    /// continues the sequence of `caches[i]` (several sequences take one position each: the
    /// decode rows of a step). Every projection is one matmul over the batch, so a step of
    /// `b` sequences launches each layer's matmul and element-wise kernels once, not `b`
    /// times; attention runs per sequence, over its own cache.
    pub fn forward_each(
        &self,
        tokens: Tensor<2, Int>,
        rope: &RopeTables,
        caches: &mut [&mut BurnCache],
        last_only: bool,
    ) -> Tensor<3> {
        let [b, s] = tokens.dims();
        assert_eq!(b, caches.len(), "one cache per row of the batch");
        assert!(b == 1 || s == 1, "several sequences take one position each");
        // The embedding table may be kept in a half type; the residual stream is f32.
        let mut x = self.model.embed_tokens.forward(tokens).cast(DType::F32);
        let mut delta = None;
        for (i, layer) in self.model.layers.iter().enumerate() {
            let (stream, output) = layer.forward(x, delta, rope, caches, i);
            (x, delta) = (stream, Some(output));
        }
        for cache in caches.iter_mut() {
            cache.len += s;
        }
        let last = |x: Tensor<3>| {
            if last_only && s > 1 {
                x.narrow(1, s - 1, 1)
            } else {
                x
            }
        };
        let output_dtype = match &self.lm_head {
            Some(head) => head.dtype(),
            None => self.model.embed_tokens.weight.dtype(),
        };
        let (_, x) = add_rms_norm(&self.model.norm, last(x), delta.map(last), output_dtype);
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => tied_output(x, self.model.embed_tokens.weight.val()),
        }
    }

    /// q, k and v made one projection (`Proj::fuse`): on a GPU every matmul is a launch and
    /// a step is bound by launches. Gate and up stay two: fused the same way, the halves of
    /// their output no longer fused into `silu(gate) · up`, and a SmolLM2 decode step
    /// launched more kernels, not fewer (1128.5 against 1068.5 on lavapipe). Not on the CPU:
    /// Flex gains nothing, and the tests that round the CPU's weights walk the parts. Done
    /// after the cast, which walks the parts too.
    pub fn fuse_projections(mut self) -> Self {
        for layer in &mut self.model.layers {
            let a = &mut layer.self_attn;
            a.qkv = Some(Proj::fuse([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj]));
        }
        self
    }

    /// Casts every matrix to `dtype`, and norms and biases to f32 (they are tiny and
    /// precision-sensitive, whatever the checkpoint stored).
    pub fn cast(mut self, dtype: DType) -> Self {
        fn cast<const D: usize>(p: &mut Param<Tensor<D>>, dtype: DType) {
            let t = p.val();
            if t.dtype() != dtype {
                *p = Param::from_tensor(t.cast(dtype));
            }
        }
        cast(&mut self.model.embed_tokens.weight, dtype);
        cast(&mut self.model.norm.gamma, DType::F32);
        if let Some(head) = &mut self.lm_head {
            cast(&mut head.weight, dtype);
        }
        for layer in &mut self.model.layers {
            cast(&mut layer.input_layernorm.gamma, DType::F32);
            cast(&mut layer.post_attention_layernorm.gamma, DType::F32);
            for (_, proj) in DecoderLayer::projections_mut(&mut layer.self_attn, &mut layer.mlp) {
                cast(&mut proj.weight, dtype);
                if let Some(bias) = &mut proj.bias {
                    cast(bias, DType::F32);
                }
            }
        }
        self
    }
}

/// `x · Eᵀ` with the embedding matrix `E` `[vocab, h]`: the transposed view feeds the
/// matmul directly, so no second copy of the largest matrix is kept.
fn tied_output(x: Tensor<3>, embedding: Tensor<2>) -> Tensor<3> {
    let [b, s, h] = x.dims();
    let dtype = embedding.dtype();
    let x = x.reshape([b * s, h]);
    let x = if x.dtype() == dtype { x } else { x.cast(dtype) };
    let logits = x.matmul(embedding.transpose());
    let [_, vocab] = logits.dims();
    logits.cast(DType::F32).reshape([b, s, vocab])
}

/// A parameter of the model, by kind, for loaders that fill weights by name.
pub enum ParamMut<'a> {
    Matrix(&'a mut Param<Tensor<2>>),
    Vector(&'a mut Param<Tensor<1>>),
    /// A projection's weight (its bias, if any, is reached through it).
    Proj(&'a mut Proj),
}

impl BurnModel {
    /// Every parameter with its Hugging Face name.
    pub fn named_params_mut(&mut self) -> Vec<(String, ParamMut<'_>)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            ParamMut::Matrix(&mut self.model.embed_tokens.weight),
        )];
        out.push((
            "model.norm.weight".into(),
            ParamMut::Vector(&mut self.model.norm.gamma),
        ));
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head.weight".into(), ParamMut::Proj(head)));
        }
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}.");
            out.push((
                format!("{p}input_layernorm.weight"),
                ParamMut::Vector(&mut layer.input_layernorm.gamma),
            ));
            out.push((
                format!("{p}post_attention_layernorm.weight"),
                ParamMut::Vector(&mut layer.post_attention_layernorm.gamma),
            ));
            for (name, proj) in DecoderLayer::projections_mut(&mut layer.self_attn, &mut layer.mlp)
            {
                // The bias is reached through the projection (`Proj::bias`) by the loader.
                out.push((format!("{p}{name}.weight"), ParamMut::Proj(proj)));
            }
        }
        out
    }
}
