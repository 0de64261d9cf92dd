//! rbee-host as a library: the worker's parts, one module per concern. The `rbee-host` binary
//! is `worker::run`; benchmarks and tests use the parts directly.

pub mod admission;
pub mod api;
pub mod cli;
pub mod guest;
pub mod heartbeat;
pub mod reload;
pub mod status;
pub mod worker;
