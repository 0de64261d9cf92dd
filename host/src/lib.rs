//! rbee-host as a library: the worker's parts, one module per concern. The `rbee-host` binary
//! is `worker::run`; benchmarks and tests use the parts directly.
//!
//! - `http`: the HTTP server (the rbee worker API and the admin endpoints), one module per
//!   route family; it owns the wire formats.
//! - `guest`: the guest runtime (wasmtime, the sandbox, the compile cache, hot-swap, and the
//!   host side of the WIT); the guest owns request policy.
//! - `metrics`: `/metrics`, Prometheus metrics named like vLLM's.
//! - `queen`: the worker's status as the queen sees it, and the heartbeats that report it.
//! - `admission`: how many requests run and wait; `reload`: the guest file watch and SIGHUP;
//!   `cli`: the command line; `worker`: start-up and shutdown, tying the rest together;
//!   `clock`: timestamps.
//!
//! The model itself is the `rbee_engine` crate, which owns what it can run.

pub mod admission;
pub mod cache_dir;
pub mod cli;
pub mod clock;
pub mod guest;
pub mod http;
pub mod metrics;
pub mod queen;
pub mod reload;
pub mod worker;
