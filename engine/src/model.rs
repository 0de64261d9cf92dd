//! The Llama-family decoder, read top to bottom: config → RoPE → cache → attention → MLP →
//! block → model → forward. Module fields are named like the Hugging Face tensors
//! (`model.layers.0.self_attn.q_proj.weight`, ...), so a safetensors checkpoint loads by name.
//!
//! Shapes: `b` batch (always 1 here), `s` new positions, `t` cached + new positions,
//! `nh`/`nkv` query/key-value heads, `hd` head dim.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, RmsNorm, RmsNormConfig};
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};

use std::ops::Range;

use crate::config::ModelConfig;
use crate::host_layers::{HostKv, HostLayers};
use crate::linear::Proj;

// ---------------------------------------------------------------------------------------
// RoPE (rotate-half, as in Hugging Face's Llama; Burn's `RotaryEncoding` rotates adjacent
// pairs instead, which is the GGUF layout — GGUF q/k rows are un-permuted at load instead).
// ---------------------------------------------------------------------------------------

/// Precomputed cos/sin tables, `[max_positions, hd]`, each frequency repeated for both halves.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor<2>,
    sin: Tensor<2>,
    /// `1 / theta^(2i / hd)` for `i < hd / 2`, for rotating host vectors (`rotate`).
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(config: &ModelConfig, device: &Device) -> Self {
        let hd = config.head_dim;
        let half = hd / 2;
        let positions = config.max_position_embeddings;
        // transformers computes the inverse frequencies in f32; doing the same keeps the
        // angles bit-identical before cos/sin.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (config.rope_theta as f32).powf((2 * i) as f32 / hd as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions * hd);
        let mut sin = Vec::with_capacity(positions * hd);
        for p in 0..positions {
            for i in 0..hd {
                let angle = p as f32 * inv_freq[i % half];
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            cos: Tensor::from_data(TensorData::new(cos, [positions, hd]), device),
            sin: Tensor::from_data(TensorData::new(sin, [positions, hd]), device),
            inv_freq,
        }
    }

    /// Rotates host rows `[s, heads, hd]` at `positions` in place: the same angles as the
    /// tables (`apply`), computed per position.
    pub fn rotate(&self, values: &mut [f32], heads: usize, positions: Range<usize>) {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
        for (p, row) in positions.zip(values.chunks_exact_mut(heads * 2 * half)) {
            for ((c, s), f) in cos.iter_mut().zip(&mut sin).zip(&self.inv_freq) {
                let angle = p as f32 * f;
                (*c, *s) = (angle.cos(), angle.sin());
            }
            for head in row.chunks_exact_mut(2 * half) {
                let (x1, x2) = head.split_at_mut(half);
                for (((a, b), c), s) in x1.iter_mut().zip(x2).zip(&cos).zip(&sin) {
                    (*a, *b) = (*a * c - *b * s, *b * c + *a * s);
                }
            }
        }
    }

    /// Rotates `x` `[b, heads, s, hd]` whose first position is `start`.
    fn apply(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        let [_, _, s, hd] = x.dims();
        let cos = self.cos.clone().narrow(0, start, s).reshape([1, 1, s, hd]);
        let sin = self.sin.clone().narrow(0, start, s).reshape([1, 1, s, hd]);
        let x1 = x.clone().narrow(3, 0, hd / 2);
        let x2 = x.clone().narrow(3, hd / 2, hd / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos + rotated * sin
    }
}

// ---------------------------------------------------------------------------------------
// KV cache: per layer, keys and values of every position seen so far, in a buffer
// `[b, nkv, capacity, hd]` allocated once for the whole generation and written in place
// (Flex writes a uniquely owned tensor's slice without copying), so a step costs the new
// position only, not a copy of everything cached so far.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
pub struct Cache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// The same in host memory, for the host layers (`host_layers`); allocated on first use.
    host: Vec<Option<HostKv>>,
    /// Positions the buffers hold.
    capacity: usize,
    /// Positions already in the cache.
    pub len: usize,
}

impl Cache {
    /// A cache for up to `capacity` positions (prompt and generated tokens together).
    pub fn new(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            host: (0..num_layers).map(|_| None).collect(),
            capacity,
            len: 0,
        }
    }

    /// Layer `layer`'s host-memory keys and values.
    pub(crate) fn host_layer(
        &mut self,
        layer: usize,
        heads: usize,
        head_dim: usize,
    ) -> &mut HostKv {
        let capacity = self.capacity;
        self.host[layer].get_or_insert_with(|| HostKv::new(heads, head_dim, capacity))
    }

    /// Writes `k`, `v` `[b, nkv, s, hd]` at positions `len..len + s` and returns views of
    /// positions `0..len + s`.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>) {
        let [b, nkv, s, hd] = k.dims();
        let (start, end) = (self.len, self.len + s);
        assert!(
            end <= self.capacity,
            "KV cache of {} positions is full",
            self.capacity
        );
        let (ck, cv) = self.layers[layer].take().unwrap_or_else(|| {
            let empty = || Tensor::zeros([b, nkv, self.capacity, hd], &k.device());
            (empty(), empty())
        });
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
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        }
    }

    fn forward(&self, x: Tensor<3>, rope: &Rope, cache: &mut Cache, layer: usize) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let start = cache.len;

        let q = self.q_proj.forward(x.clone());
        let k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        let q = q.reshape([b, s, nh, hd]).swap_dims(1, 2);
        let k = k.reshape([b, s, nkv, hd]).swap_dims(1, 2);
        let v = v.reshape([b, s, nkv, hd]).swap_dims(1, 2);
        let q = rope.apply(q, start);
        let k = rope.apply(k, start);
        let out = attend(q, k, v, cache, layer);
        let out = out.swap_dims(1, 2).reshape([b, s, nh * hd]);
        self.o_proj.forward(out)
    }
}

/// Appends `k`, `v` `[b, nkv, s, hd]` to the layer's cache and attends `q` `[b, nh, s, hd]`
/// over everything cached: Burn's fused attention (grouped-query: `nh / nkv` query heads
/// share a key/value head). Several positions are a prompt from position 0 (the generation
/// loop never prefills in chunks), so plain causal masking is right; one new position sees
/// every cached key.
pub(crate) fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    cache: &mut Cache,
    layer: usize,
) -> Tensor<4> {
    let s = q.dims()[2];
    assert!(
        s == 1 || cache.len == 0,
        "a multi-position pass must start at position 0"
    );
    let (k, v) = cache.append(layer, k, v);
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: s > 1,
    };
    attention(q, k, v, None, None, options)
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
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
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

    fn forward(&self, x: Tensor<3>, rope: &Rope, cache: &mut Cache, layer: usize) -> Tensor<3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, cache, layer);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
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
pub struct Llama {
    pub model: LlamaModel,
    /// `None` when the output projection is tied to `model.embed_tokens`.
    pub lm_head: Option<Proj>,
    /// The tied output projection as Q8_0 blocks (CPU default format); the embedding
    /// table itself stays float for the lookups.
    #[module(skip)]
    pub tied_q8: Option<std::sync::Arc<crate::quant::Q8Matrix>>,
    /// The layers' host-memory path on the CPU with block weights (`host_layers`).
    #[module(skip)]
    pub host: Option<std::sync::Arc<HostLayers>>,
    /// The embedding rows come from `tied_q8` (through `host`), and `embed_tokens` is an
    /// empty placeholder: set by the GGUF loader when the tied matrix is stored in blocks.
    #[module(skip)]
    pub embeddings_in_blocks: bool,
}

impl Llama {
    /// A model of the right shape whose weights are placeholders, to be replaced by the
    /// loader (zeros: cheap, and a weight the loader forgot shows up as wrong output).
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
            tied_q8: None,
            host: None,
            embeddings_in_blocks: false,
        }
    }

    /// Runs `tokens` `[b, s]` (positions `cache.len..cache.len + s`) through the model and
    /// returns the logits `[b, s', vocab]`, where `s'` is 1 (the last position) when
    /// `last_only`, else `s`. Skipping the other positions saves most of the output
    /// projection's work in prefill.
    pub fn forward(
        &self,
        tokens: Tensor<2, Int>,
        rope: &Rope,
        cache: &mut Cache,
        last_only: bool,
    ) -> Tensor<3> {
        let [b, s] = tokens.dims();
        let device = tokens.device();
        // The embedding table may be kept in a half type; the residual stream is f32.
        let embed = |tokens: Tensor<2, Int>| {
            self.model
                .embed_tokens
                .forward(tokens)
                .cast(burn::tensor::DType::F32)
        };
        let x = match &self.host {
            Some(host) => {
                let mut values = match host.embeddings() {
                    Some(table) => {
                        let ids = tokens.into_data().convert::<i64>();
                        let ids = ids.as_slice::<i64>().expect("i64 token ids");
                        embedding_rows(table, ids)
                    }
                    None => embed(tokens)
                        .into_data()
                        .try_into_vec::<f32>()
                        .expect("f32 embeddings"),
                };
                host.forward(&mut values, rope, cache);
                let h = values.len() / (b * s);
                Tensor::from_data(TensorData::new(values, [b, s, h]), &device)
            }
            None => {
                let mut x = embed(tokens);
                for (i, layer) in self.model.layers.iter().enumerate() {
                    x = layer.forward(x, rope, cache, i);
                }
                x
            }
        };
        cache.len += s;
        let x = if last_only && s > 1 {
            x.narrow(1, s - 1, 1)
        } else {
            x
        };
        let x = self.model.norm.forward(x);
        match (&self.lm_head, &self.tied_q8) {
            (Some(head), _) => head.forward(x),
            (None, Some(q8)) => {
                let [b, s, h] = x.dims();
                crate::linear::q8_matmul(q8, x.reshape([b * s, h])).reshape([b, s, q8.rows()])
            }
            (None, None) => tied_output(x, self.model.embed_tokens.weight.val()),
        }
    }
}

/// Rows `ids` of an embedding matrix kept in blocks, `[ids.len(), hidden]`.
fn embedding_rows(table: &crate::quant::Q8Matrix, ids: &[i64]) -> Vec<f32> {
    let hidden = table.cols();
    let mut x = vec![0f32; ids.len() * hidden];
    for (&id, row) in ids.iter().zip(x.chunks_exact_mut(hidden)) {
        table.expand_row(id as usize, row);
    }
    x
}

/// `x · Eᵀ` with the embedding matrix `E` `[vocab, h]`: the transposed view feeds the
/// matmul directly, so no second copy of the largest matrix is kept.
fn tied_output(x: Tensor<3>, embedding: Tensor<2>) -> Tensor<3> {
    let [b, s, h] = x.dims();
    let dtype = embedding.dtype();
    let x = x.reshape([b * s, h]).cast(dtype);
    let logits = x.matmul(embedding.transpose());
    let [_, vocab] = logits.dims();
    logits.cast(burn::tensor::DType::F32).reshape([b, s, vocab])
}

/// A parameter of the model, by kind, for loaders that fill weights by name.
pub enum ParamMut<'a> {
    Matrix(&'a mut Param<Tensor<2>>),
    Vector(&'a mut Param<Tensor<1>>),
    /// A projection's weight: the loader may hand it over still quantized.
    Proj(&'a mut Proj),
}

impl Llama {
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
