//! The Llama-family decoder in Burn, read top to bottom: cache → attention → MLP → block →
//! model → forward. This is the path for the GPU (wgpu) and for f32 weights on the CPU (the
//! reference format); the CPU's default block format runs in `cpu` instead. Module fields are
//! named like the Hugging Face tensors (`model.layers.0.self_attn.q_proj.weight`, ...), so a
//! safetensors checkpoint loads by name.
//!
//! A pass takes a step's rows: any mix of sequences' decode rows, drafts and prompt chunks,
//! at any positions, one row each in the batch dimension (`[rows, 1, h]`). Every projection
//! is one matmul over the rows; keys and values go to the KV pools and attention reads them
//! there, each row over its own sequence's positions (`device_kv`).
//!
//! Shapes: `rows` the step's rows, `nh`/`nkv` query/key-value heads, `hd` head dim.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, RmsNorm, RmsNormConfig};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Device, Int, Tensor};

use super::ModelConfig;
use super::device_kv::{DeviceKv, StepLayout};
use super::proj::Proj;
use super::rope::RopeTables;

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

    /// `x` `[rows, 1, h]`, the step's rows (`layout`): one matmul per projection over all
    /// of them, the keys and values written to the layer's pools, each row attending over
    /// its own sequence's positions there.
    fn forward(
        &self,
        x: Tensor<3>,
        rotation: &(Tensor<4>, Tensor<4>),
        kv: &mut DeviceKv,
        layout: &StepLayout,
        layer: usize,
    ) -> Tensor<3> {
        let [rows, _, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // `[rows, 1, heads·hd]` → `[rows, heads, 1, hd]`: the same bytes, so a reshape (a
        // swap of dimensions would be a copy kernel on the device).
        let heads = |x: Tensor<3>, heads: usize| x.reshape([rows, heads, 1, hd]);
        let (cos, sin) = rotation;
        let rotate = |x: Tensor<4>| RopeTables::rotate(x, cos.clone(), sin.clone());
        let (q, k, v) = match &self.qkv {
            // One matmul, and one RoPE pass over all its heads, of which the query and key
            // heads are kept (rotating the value heads too costs nothing in the fused
            // kernel; rotating a narrowed view of several rows would copy it first). The
            // heads are split as views.
            Some(qkv) => {
                let y = heads(qkv.forward(x), nh + 2 * nkv);
                let rotated = rotate(y.clone());
                let v = y.narrow(1, nh + nkv, nkv);
                (
                    rotated.clone().narrow(1, 0, nh),
                    rotated.narrow(1, nh, nkv),
                    v,
                )
            }
            None => {
                let [q, k, v] = Proj::forward_each(x, [&self.q_proj, &self.k_proj, &self.v_proj]);
                (rotate(heads(q, nh)), rotate(heads(k, nkv)), heads(v, nkv))
            }
        };
        let (keys, values) = kv.write(layer, layout, k, v);
        let out = attend(q, keys, values, layout);
        self.o_proj.forward(out.reshape([rows, 1, nh * hd]))
    }
}

/// `q` `[rows, nh, 1, hd]` over the KV pools, each row over its sequence's positions
/// through its own: one launch of the engine's paged kernel on a GPU (`device_kernels`)
/// where it takes the types and head size, else [`StepLayout::attend_by_gathering`].
fn attend(q: Tensor<4>, keys: Tensor<4>, values: Tensor<4>, layout: &StepLayout) -> Tensor<4> {
    #[cfg(feature = "wgpu")]
    if q.device() != Device::flex()
        && [&q, &keys, &values].iter().all(|t| t.dtype() == DType::F32)
        && super::device_kernels::attends_head_dim(q.dims()[3])
    {
        return super::device_kernels::attend_paged(q, keys, values, layout);
    }
    layout.attend_by_gathering(q, &keys, &values)
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
        rotation: &(Tensor<4>, Tensor<4>),
        kv: &mut DeviceKv,
        layout: &StepLayout,
        layer: usize,
    ) -> (Tensor<3>, Tensor<3>) {
        let attention = &self.self_attn;
        let qkv = attention.qkv.as_ref().unwrap_or(&attention.q_proj);
        let (x, normed) = add_rms_norm(&self.input_layernorm, x, delta, qkv.dtype());
        let attended = attention.forward(normed, rotation, kv, layout, layer);
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

    /// One step: `tokens` `[rows, 1]` at the rows' positions (`layout`), their keys and
    /// values written to `kv`; returns the logits `[wanted, vocab]` of the rows `wanted`.
    /// Skipping the others saves most of the output projection's work while a prompt is
    /// read.
    pub fn forward(
        &self,
        tokens: Tensor<2, Int>,
        rope: &RopeTables,
        kv: &mut DeviceKv,
        layout: &StepLayout,
        wanted: WantedRows,
    ) -> Option<Tensor<2>> {
        assert_eq!(tokens.dims(), [layout.rows(), 1], "one token per row");
        // The embedding table may be kept in a half type; the residual stream is f32.
        let mut x = self.model.embed_tokens.forward(tokens).cast(DType::F32);
        // Every layer rotates at the same positions: their angles gathered once.
        let rotation = rope.at(layout.positions.clone());
        let mut delta = None;
        for (i, layer) in self.model.layers.iter().enumerate() {
            let (stream, output) = layer.forward(x, delta, &rotation, kv, layout, i);
            (x, delta) = (stream, Some(output));
        }
        let wanted_rows = |x: Tensor<3>| match &wanted {
            WantedRows::These(rows) => x.select(0, rows.as_ref().clone()),
            _ => x,
        };
        if let WantedRows::Nothing = wanted {
            return None;
        }
        let output_dtype = match &self.lm_head {
            Some(head) => head.dtype(),
            None => self.model.embed_tokens.weight.dtype(),
        };
        let (x, delta) = (wanted_rows(x), delta.map(wanted_rows));
        let (_, x) = add_rms_norm(&self.model.norm, x, delta, output_dtype);
        let logits = match &self.lm_head {
            Some(head) => head.forward(x),
            None => tied_output(x, self.model.embed_tokens.weight.val()),
        };
        Some(logits.flatten(0, 1))
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

/// The rows of a step whose logits [`BurnModel::forward`] computes.
pub enum WantedRows {
    All,
    /// These rows `[wanted]`, in this order.
    These(Box<Tensor<1, Int>>),
    /// None: the step reads prompts only (its keys and values are what it is for).
    Nothing,
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
