//! The projection layer of Burn's layers (`nn.Linear` in the checkpoint), kept in PyTorch's
//! `[out, in]` layout: Hugging Face and GGUF both store it that way, so loading needs no
//! transpose, and the matmul reads the transposed view directly (Flex's strided gemm,
//! CubeCL's matmul).

use burn::module::{Initializer, Module, Param};
use burn::tensor::{DType, Device, Tensor};

#[derive(Module, Debug)]
pub struct Proj {
    /// `[out, in]`, f32 or a half type.
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl Proj {
    /// Zeros of the right shape, replaced when the weights load. Lazily initialised: the
    /// placeholder is never allocated when the loader replaces it (which it always does), so
    /// loading does not first allocate a whole f32 model of zeros.
    pub fn init(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Self {
        Self {
            weight: Initializer::Zeros.init([d_out, d_in], device),
            bias: bias.then(|| Initializer::Zeros.init([d_out], device)),
        }
    }

    /// One projection doing the work of `parts` (q, k and v; gate and up), which read the
    /// same input: their weights stacked by output rows (their biases likewise, zeros where a
    /// part has none), so a step runs one matmul where it ran one per part. Each part keeps
    /// a placeholder of no rows, never allocated, so the device holds the weights once.
    pub fn fuse<const N: usize>(parts: [&mut Proj; N]) -> Proj {
        let device = parts[0].weight.val().device();
        let d_in = parts[0].weight.shape().dims::<2>()[1];
        let has_bias = parts.iter().any(|p| p.bias.is_some());
        let mut weights = Vec::with_capacity(N);
        let mut biases = Vec::with_capacity(N);
        for part in parts {
            let weight = part.weight.val();
            let d_out = weight.dims()[0];
            if has_bias {
                biases.push(match part.bias.take() {
                    Some(bias) => bias.val(),
                    None => Tensor::zeros([d_out], &device),
                });
            }
            weights.push(weight);
            part.weight = Initializer::Zeros.init([0, d_in], &device);
        }
        Proj {
            weight: Param::from_tensor(Tensor::cat(weights, 0)),
            bias: has_bias.then(|| Param::from_tensor(Tensor::cat(biases, 0))),
        }
    }

    /// The weight's type: what the matmul computes in.
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// `x · Wᵀ + b` over the last dimension; computes in the weight's dtype, returns f32.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [y] = Self::forward_each(x, [self]);
        y
    }

    /// [`Proj::forward`] of several projections of the same `x` (q, k and v; gate and up),
    /// `x` cast to the weights' dtype once for all of them rather than once each: on a GPU
    /// every cast is a kernel launch, and launches, not arithmetic, bound a small model's
    /// step there.
    pub fn forward_each<const N: usize>(x: Tensor<3>, projs: [&Proj; N]) -> [Tensor<3>; N] {
        let [b, s, d_in] = x.dims();
        let x = x.reshape([b * s, d_in]);
        let mut cast: Option<(DType, Tensor<2>)> = None;
        projs.map(|proj| {
            let w = proj.weight.val();
            let dtype = w.dtype();
            let input = match &cast {
                Some((held, input)) if *held == dtype => input.clone(),
                // (Already in the weights' type where a GPU norm kernel wrote it so.)
                _ if x.dtype() == dtype => x.clone(),
                _ => {
                    let input = x.clone().cast(dtype);
                    cast = Some((dtype, input.clone()));
                    input
                }
            };
            let y = input.matmul(w.transpose());
            let y = if dtype == DType::F32 {
                y
            } else {
                y.cast(DType::F32)
            };
            let y = match &proj.bias {
                Some(bias) => y + bias.val().unsqueeze::<2>(),
                None => y,
            };
            let d_out = y.dims()[1];
            y.reshape([b, s, d_out])
        })
    }
}
