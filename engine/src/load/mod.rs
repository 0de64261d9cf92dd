//! Loading `--model PATH`: a Hugging Face folder (`hf`) or a GGUF file (`gguf`), told apart
//! by what is on disk, onto the chosen device. The load reads one way: [`load`] reads the
//! checkpoint's header (its config, checked against the tensors its files hold), chooses the
//! weight plan (`plan`) from it once, and hands the plan down to the format's loader, which
//! builds the model in that form and returns the checkpoint.

mod checkpoint;
mod from_burn;
mod gguf;
mod hf;
mod limits;
pub(crate) mod plan;
mod progress;

use std::path::Path;

pub use self::checkpoint::Checkpoint;

use self::checkpoint::Format;
use self::plan::WeightPlan;
use crate::device;
use crate::model::ModelConfig;
use crate::{EngineError, LoadOptions};

/// Loads `path` as `options` say.
pub fn load(path: &Path, options: &LoadOptions) -> Result<Checkpoint, EngineError> {
    let format = Format::detect(path)?;
    tracing::info!(path = %path.display(), format = format.name(), "loading model");
    let device = device::select(options.device, options.tuning_cache.as_deref())?;
    let choose = |config: &ModelConfig| WeightPlan::choose(options.weights, &device, config);
    match format {
        Format::HfFolder => {
            let header = hf::Header::read(path)?;
            let plan = choose(&header.config);
            header.load(plan, &device)
        }
        Format::Gguf => {
            let header = gguf::Header::read(path)?;
            let plan = choose(&header.config);
            header.load(plan, &device)
        }
    }
}
