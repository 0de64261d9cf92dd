//! The weight plan: how the weights are held, chosen once per load from the header's config
//! before any weight is read, and handed down to the format's loader; and a Burn model
//! (filled with f32 weights) put into the plan's form.

use burn::tensor::{DType, Device};

use super::from_burn::FromBurn;
use crate::WeightFormat;
use crate::device::Selected;
use crate::model::burn::BurnModel;
use crate::model::cpu::{self, CpuModel};
use crate::model::{DeviceModel, Model, ModelConfig};

/// How the weights are held, decided once per load from the device, the requested format
/// and the model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightPlan {
    /// Burn tensors of this dtype on the device.
    Burn(DType),
    /// Block weights in host memory (`model::cpu`): decoding on a CPU is bound by the bytes
    /// each token reads, and blocks are 4× (Q8_0) to 6.4× (Q4_1) fewer than f32.
    CpuBlocks,
}

impl WeightPlan {
    pub fn choose(format: WeightFormat, device: &Selected, config: &ModelConfig) -> Self {
        match format {
            WeightFormat::F32 => WeightPlan::Burn(DType::F32),
            // f16 halves the bytes each decode step reads, and GPUs multiply f16 natively;
            // an adapter without f16 shaders (wgpu's SHADER_F16) computes in f32.
            WeightFormat::Auto if device.is_gpu => {
                if device.device.supports_dtype(DType::F16) {
                    tracing::info!("f16 weights on the GPU");
                    WeightPlan::Burn(DType::F16)
                } else {
                    tracing::info!("the GPU has no f16 arithmetic: f32 weights");
                    WeightPlan::Burn(DType::F32)
                }
            }
            WeightFormat::Auto if cpu::fits(config) => WeightPlan::CpuBlocks,
            WeightFormat::Auto => {
                tracing::info!("matrix widths are not whole 32-blocks: f32 weights on the CPU");
                WeightPlan::Burn(DType::F32)
            }
        }
    }
}

/// `model` (Burn's layers filled with f32 weights) in `plan`'s form: cast for the device, or
/// moved into blocks for the CPU layers.
pub(crate) fn finish_burn_model(
    model: BurnModel,
    config: &ModelConfig,
    plan: WeightPlan,
    device: &Device,
) -> Result<Model, String> {
    Ok(match plan {
        WeightPlan::Burn(dtype) => {
            Model::Burn(Box::new(DeviceModel::new(model, config, dtype, device)))
        }
        WeightPlan::CpuBlocks => {
            Model::Cpu(CpuModel::load(config, &mut FromBurn { model, device })?)
        }
    })
}
