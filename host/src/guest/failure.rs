//! Why a request's guest call failed, in words a client can act on: the error the guest
//! returned, or which limit stopped it, or what the trap was and what the guest wrote to
//! stderr before it died (a panic message, a traceback).

use std::time::Duration;

use super::bindings::InferError;
use super::request::RequestState;
use super::sandbox::{Exceeded, Limits};

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
}

impl GuestFailure {
    /// Explains a trap of guest `guest` from what its store recorded.
    pub(super) fn from_trap(
        guest: &str,
        limits: Limits,
        state: &RequestState,
        trap: wasmtime::Error,
    ) -> Self {
        let guest = guest.to_owned();
        match state.sandbox.exceeded {
            Some(Exceeded::Time) => GuestFailure::Timeout {
                guest,
                limit: limits.time,
            },
            Some(Exceeded::Memory) => GuestFailure::OutOfMemory {
                guest,
                limit_mib: limits.memory_bytes >> 20,
            },
            None => GuestFailure::Trapped {
                guest,
                reason: trap_reason(state, &trap),
            },
        }
    }
}

/// The trap itself ("wasm `unreachable` instruction executed"), then what the guest said on
/// stderr before it died, cut to [`MAX_TRAP_MESSAGE`].
fn trap_reason(state: &RequestState, trap: &wasmtime::Error) -> String {
    let what = match trap.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => trap
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
    };
    let stderr = state.stderr.contents();
    let stderr = String::from_utf8_lossy(&stderr);
    let said: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("note: run with"))
        .collect();
    let mut reason = what;
    if !said.is_empty() {
        reason = format!("{reason}; guest stderr: {}", said.join(" | "));
    }
    reason.truncate(reason.floor_char_boundary(MAX_TRAP_MESSAGE));
    reason
}
