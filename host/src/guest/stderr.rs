//! A guest's stderr, as the host keeps it: the end of what the guest wrote (a Rust panic
//! message, a Python traceback), kept to explain a trap (`failure`). stdout is discarded.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

// The `bytes` crate's `Bytes`, which WASI streams carry, as axum re-exports it.
use axum::body::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Bytes of guest stderr kept per request.
const STDERR_TAIL: usize = 64 * 1024;

/// A guest's stderr as the host keeps it: the last [`STDERR_TAIL`] bytes, older ones dropped.
/// The end is what matters (a panic message or a traceback comes last), and a guest that
/// writes without end costs a fixed buffer and never fails its writes.
#[derive(Clone, Default)]
pub struct StderrTail(Arc<Mutex<VecDeque<u8>>>);

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
