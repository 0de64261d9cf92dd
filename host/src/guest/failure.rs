//! Why a request's guest call failed, in words a client can act on: the error the guest
//! returned, or which limit stopped it, or what the trap was and what the guest wrote to
//! stderr before it died (a panic message, a traceback), of which [`StderrTail`] keeps the
//! end.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// The `bytes` crate's `Bytes`, which WASI streams carry, as axum re-exports it.
use axum::body::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

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
    #[error(
        "guest `{guest}` does not serve the OpenAI-compatible routes (it does not export \
         rbee:worker/openai; see guests/README.md); it serves POST /v1/infer"
    )]
    NoOpenAi { guest: String },
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
            Some(Exceeded::Cancelled) => GuestFailure::Returned(InferError::Cancelled),
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

/// Bytes of guest stderr kept per request.
const STDERR_TAIL: usize = 64 * 1024;

/// A guest's stderr as the host keeps it: the last [`STDERR_TAIL`] bytes, older ones dropped.
/// The end is what matters (a panic message or a traceback comes last), and a guest that
/// writes without end costs a fixed buffer and never fails its writes.
#[derive(Clone, Default)]
pub(super) struct StderrTail(Arc<Mutex<VecDeque<u8>>>);

impl StderrTail {
    pub fn contents(&self) -> Vec<u8> {
        let tail = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tail.iter().copied().collect()
    }

    fn append(&self, bytes: &[u8]) {
        let mut tail = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bytes = &bytes[bytes.len().saturating_sub(STDERR_TAIL)..];
        let overflow = (tail.len() + bytes.len()).saturating_sub(STDERR_TAIL);
        tail.drain(..overflow);
        tail.extend(bytes);
    }
}

impl OutputStream for StderrTail {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(STDERR_TAIL)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for StderrTail {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        bytes: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.append(bytes);
        std::task::Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_keeps_the_end() {
        let tail = StderrTail::default();
        tail.append(&vec![b'a'; STDERR_TAIL * 3]);
        tail.append(b"panicked at the end");
        let kept = tail.contents();
        assert_eq!(kept.len(), STDERR_TAIL);
        assert!(kept.ends_with(b"aaapanicked at the end"));
        tail.append(&vec![b'b'; STDERR_TAIL + 1]);
        assert_eq!(tail.contents(), vec![b'b'; STDERR_TAIL]);
    }
}
