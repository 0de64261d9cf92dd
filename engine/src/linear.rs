//! The projection layer (`nn.Linear` in the checkpoint), kept in PyTorch's `[out, in]`
//! layout: Hugging Face and GGUF both store it that way, so loading needs no transpose, and
//! the matmul reads the transposed view directly (Flex's strided gemm, CubeCL's matmul).
//! On the CPU it can instead hold 8-bit blocks for the integer kernel in `quant`.

use std::sync::Arc;

use burn::module::{Initializer, Module, Param};
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::quant::Q8Matrix;

#[derive(Module, Debug)]
pub struct Proj {
    /// `[out, in]`, f32 or a half type; a `[1, 1]` placeholder once `q8` holds the weights.
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    /// The weights as Q8_0 blocks (CPU default format), used instead of `weight`.
    #[module(skip)]
    pub q8: Option<Arc<Q8Matrix>>,
}

impl Proj {
    /// Zeros of the right shape, replaced when the weights load. Lazily initialised: the
    /// placeholder is never allocated when the loader replaces it (which it always does), so
    /// loading does not first allocate a whole f32 model of zeros.
    pub fn init(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Self {
        Self {
            weight: Initializer::Zeros.init([d_out, d_in], device),
            bias: bias.then(|| Initializer::Zeros.init([d_out], device)),
            q8: None,
        }
    }

    /// `x · Wᵀ + b` over the last dimension; computes in the weight's dtype, returns f32.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, d_in] = x.dims();
        let y = match &self.q8 {
            Some(q8) => q8_matmul(q8, x.reshape([b * s, d_in])),
            None => {
                let w = self.weight.val();
                let dtype = w.dtype();
                let y = x.reshape([b * s, d_in]).cast(dtype).matmul(w.transpose());
                if dtype == DType::F32 {
                    y
                } else {
                    y.cast(DType::F32)
                }
            }
        };
        let d_out = y.dims()[1];
        self.add_bias(y).reshape([b, s, d_out])
    }

    fn add_bias(&self, y: Tensor<2>) -> Tensor<2> {
        match &self.bias {
            Some(bias) => y + bias.val().unsqueeze::<2>(),
            None => y,
        }
    }

    /// Moves the weights into Q8_0 blocks (dropping the Burn copy); false, and nothing
    /// changed, when the shape does not split into blocks.
    pub fn quantize_q8(&mut self) -> bool {
        let w = self.weight.val();
        let [rows, cols] = w.dims();
        let device = w.device();
        let Ok(values) = w.into_data().convert::<f32>().try_to_vec::<f32>() else {
            return false;
        };
        match Q8Matrix::quantize(&values, rows, cols) {
            Some(q8) => {
                self.q8 = Some(Arc::new(q8));
                self.weight = Param::from_tensor(Tensor::zeros([1, 1], &device));
                true
            }
            None => false,
        }
    }
}

/// `x` `[m, in]` through the integer kernel; the activations make a round trip to host
/// memory, which on the CPU backend is a copy of a few kilobytes.
pub fn q8_matmul(q8: &Q8Matrix, x: Tensor<2>) -> Tensor<2> {
    let [m, _] = x.dims();
    let device = x.device();
    let out = q8.matmul(&activations(x), m);
    Tensor::from_data(TensorData::new(out, [m, q8.rows()]), &device)
}

/// The activations `[m, in]` as host f32 values for the kernel.
fn activations(x: Tensor<2>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 activations")
}
