//! The host side of the WIT imports, one module per capability, each implemented on its own
//! small context (as wasmtime-wasi does), so what an import may touch is written in its file:
//! - `inference`: generation and the tokenizer ([`InferenceCtx`]), with `token_stream`, the
//!   `token-stream` resource;
//! - `output`: streaming to the client ([`OutputCtx`]);
//! - `log`: the guest's log lines ([`LogCtx`]);
//! - `clocks`: WASI's clock waits, bounded by the sandbox ([`ClocksView`]).
//!
//! `convert` turns WIT values into the engine's types and back. The request's store data
//! (`request::RequestState`) is made of these contexts and wires them into the linker; no
//! import knows it.

pub mod clocks;
mod convert;
mod inference;
mod log;
mod output;
mod token_stream;

pub use clocks::ClocksView;
pub use inference::{Inference, InferenceCtx, InferenceView};
pub use log::LogCtx;
pub use output::{Output, OutputCtx, OutputView};
