//! The CPU model's weights read out of Burn's layers, for checkpoints that load through
//! Burn (a Hugging Face folder through Burn's safetensors store).

use burn::module::Param;
use burn::tensor::{Device, Tensor};

use crate::model::burn::{BurnModel, ParamMut};
use crate::model::cpu::{CpuWeights, Embeddings};
use crate::quant::BlockMatrix;

/// The CPU model's weights taken out of a Burn model one tensor at a time (each replaced by
/// an empty placeholder), so the f32 copy shrinks as the blocks grow: Hugging Face folders
/// load through Burn's safetensors store, then move here.
pub struct FromBurn<'a> {
    pub model: BurnModel,
    pub device: &'a Device,
}

impl FromBurn<'_> {
    fn take(&mut self, name: &str) -> Result<Vec<f32>, String> {
        let device = self.device;
        let bias = name
            .strip_suffix(".bias")
            .map(|base| format!("{base}.weight"));
        let wanted = bias.as_deref().unwrap_or(name);
        let param = self
            .model
            .named_params_mut()
            .into_iter()
            .find(|(n, _)| n == wanted)
            .map(|(_, p)| p)
            .ok_or_else(|| format!("no tensor `{name}` in the model"))?;
        let taken = match (param, bias.is_some()) {
            (ParamMut::Proj(proj), true) => {
                let bias = proj
                    .bias
                    .as_mut()
                    .ok_or_else(|| format!("`{name}` is not in the model"))?;
                take_values(bias, device)
            }
            (ParamMut::Proj(proj), false) => take_values(&mut proj.weight, device),
            (ParamMut::Matrix(p), _) => take_values(p, device),
            (ParamMut::Vector(p), _) => take_values(p, device),
        };
        taken.map_err(|e| format!("`{name}`: {e}"))
    }
}

/// `param`'s values as f32, leaving an empty placeholder in its place.
fn take_values<const D: usize>(
    param: &mut Param<Tensor<D>>,
    device: &Device,
) -> Result<Vec<f32>, String> {
    let empty = Param::from_tensor(Tensor::zeros([1; D], device));
    std::mem::replace(param, empty)
        .val()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| format!("{e:?}"))
}

impl CpuWeights for FromBurn<'_> {
    fn blocks(&mut self, name: &str, rows: usize, cols: usize) -> Result<BlockMatrix, String> {
        let values = self.take(name)?;
        BlockMatrix::quantize(&values, rows, cols)
            .ok_or_else(|| format!("`{name}` is not [{rows}, {cols}] in whole blocks"))
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, String> {
        let values = self.take(name)?;
        if values.len() != len {
            return Err(format!(
                "`{name}` has {} values, expected {len}",
                values.len()
            ));
        }
        Ok(values)
    }

    fn embeddings(&mut self, vocab: usize, hidden: usize) -> Result<Embeddings, String> {
        let table = self.take("model.embed_tokens.weight")?;
        if table.len() != vocab * hidden {
            return Err(format!(
                "the embedding table has {} values, expected {vocab} × {hidden}",
                table.len()
            ));
        }
        Ok(Embeddings::F32 { table, hidden })
    }
}
