//! Why a request's guest call failed, in words a client can act on: the error the guest
//! returned, or which limit stopped it, or what the trap was and what the guest wrote to
//! stderr before it died (a panic message, a traceback), of which [`StderrTail`] keeps the
//! end.

use std::time::Duration;

use super::bindings::InferError;
use super::sandbox::{Exceeded, GuestLimits};
use super::stderr::StderrTail;

/// Longest trap explanation sent to a client.
const MAX_TRAP_MESSAGE: usize = 2048;

/// Why a request's guest call failed, beyond the errors the guest returns itself.
#[derive(Debug, thiserror::Error)]
pub enum GuestFailure {
    #[error("{0:?}")]
    Returned(InferError),
    #[error("guest `{guest}` exceeded its time limit of {limit:?}")]
    Timeout { guest: String, limit: Duration },
    #[error("guest `{guest}` exceeded its memory limit of {limit_mib} MiB")]
    OutOfMemory { guest: String, limit_mib: usize },
    #[error("guest `{guest}` failed: {reason}")]
    Trapped { guest: String, reason: String },
    #[error(
        "guest `{guest}` does not serve the OpenAI-compatible routes (it does not export \
         rbee:worker/openai; see guests/README.md); it serves POST /v1/infer"
    )]
    NoOpenAi { guest: String },
    #[error(
        "guest `{guest}` does not serve `{field}` (it does not export \
         rbee:worker/openai-agents; see guests/README.md)"
    )]
    NoAgentOptions { guest: String, field: &'static str },
}

impl GuestFailure {
    /// Explains a trap of guest `guest` from what its store recorded: the limit it exceeded,
    /// if any, and its stderr.
    pub(super) fn from_trap(
        guest: &str,
        limits: GuestLimits,
        exceeded: Option<Exceeded>,
        stderr: &StderrTail,
        trap: wasmtime::Error,
    ) -> Self {
        let guest = guest.to_owned();
        match exceeded {
            Some(Exceeded::Time) => GuestFailure::Timeout {
                guest,
                limit: limits.time,
            },
            Some(Exceeded::Memory) => GuestFailure::OutOfMemory {
                guest,
                limit_mib: limits.memory_bytes >> 20,
            },
            Some(Exceeded::Cancelled) => GuestFailure::Returned(InferError::Cancelled),
            None => GuestFailure::Trapped {
                guest,
                reason: trap_reason(stderr, &trap),
            },
        }
    }
}

/// The trap itself ("wasm `unreachable` instruction executed"), then what the guest said on
/// stderr before it died, cut to [`MAX_TRAP_MESSAGE`].
fn trap_reason(stderr: &StderrTail, trap: &wasmtime::Error) -> String {
    let what = match trap.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => trap
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
    };
    let stderr = stderr.contents();
    let stderr = String::from_utf8_lossy(&stderr);
    let said: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("note: run with"))
        .collect();
    if said.is_empty() {
        return what;
    }
    // The last lines are the ones that explain the death: keep the end of what was said.
    let said = said.join(" | ");
    let room = MAX_TRAP_MESSAGE.saturating_sub(what.len() + 24);
    let mut from = said.len().saturating_sub(room);
    while !said.is_char_boundary(from) {
        from += 1;
    }
    let cut = if from > 0 { "…" } else { "" };
    format!("{what}; guest stderr: {cut}{}", &said[from..])
}
