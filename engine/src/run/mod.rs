//! Running the model: what every generation shares and the checks it needs (`core`), turning
//! prompts into ids (`prompt`), the scheduler that puts every running generation into each
//! forward pass (`scheduler`, counted in `stats`; its drafts of likely tokens in
//! `speculation`), a generation from its caller's side
//! (`generate`) and what stops it early (`stop`), choosing tokens (`sampling`) and streaming
//! text (`text`); what holds the output to a shape (`constraint`) and reports each token's
//! probability (`logprobs`).

mod constraint;
mod core;
mod generate;
mod logprobs;
mod prompt;
mod sampling;
mod scheduler;
mod speculation;
mod stats;
mod step_costs;
mod stop;
mod text;

pub(crate) use self::core::Core;
pub(crate) use generate::{EventReader, start_generation};
pub use prompt::{Prompt, PromptPart};
pub(crate) use scheduler::{BatchLimits, Scheduler};
pub use stats::{BatchStats, MASK_BUCKETS_MICROS, MaskHistogram};
pub use stop::Cancelled;
