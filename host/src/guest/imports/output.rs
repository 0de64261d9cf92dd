//! `output`: streamed text (and a chat answer's tool calls) on its way to the client. One call sends at most
//! [`MAX_EMIT_BYTES`], and the channel to the client is bounded in bytes, so a slow client
//! makes the guest wait (back-pressure) instead of the host buffering for it; a client that
//! left, or a cancelled request, ends the wait and the request.
//!
//! What it may touch: its own [`OutputCtx`] (the client's channel and the request's
//! cancellation), and the sandbox, only to keep a slow client's time off the guest's clock.

use wasmtime::component::HasData;

use crate::guest::bindings::{InferError, Piece, ToolCall, output};
use crate::guest::cancellation::Cancellation;
use crate::guest::client::{ClientSender, Emitted, MAX_EMIT_BYTES, NotSent};
use crate::guest::sandbox::Sandbox;

/// The `output` capability of one request.
pub struct OutputCtx {
    /// Where `output.emit` sends text; `None` for a request that is not streamed.
    pub client: Option<ClientSender>,
    pub cancellation: Cancellation,
}

/// [`OutputCtx`] with the sandbox it keeps waits off the clock of.
pub struct OutputView<'a> {
    pub ctx: &'a OutputCtx,
    pub sandbox: &'a mut Sandbox,
}

/// The `HasData` of the `output` import: its host is an [`OutputView`].
pub struct Output;

impl HasData for Output {
    type Data<'a> = OutputView<'a>;
}

impl output::Host for OutputView<'_> {
    fn emit(&mut self, text: String) -> Result<(), InferError> {
        self.send(Emitted::from(text))
    }

    fn emit_piece(&mut self, piece: Piece) -> Result<(), InferError> {
        self.send(Emitted {
            text: piece.text,
            logprobs: piece.logprobs,
            tool_call: None,
        })
    }

    fn emit_tool_call(&mut self, call: ToolCall) -> Result<(), InferError> {
        if let Some(client) = &self.ctx.client
            && !client.takes_tool_calls()
        {
            return Err(InferError::InvalidInput(
                "output.emit-tool-call is only for streamed chat answers".into(),
            ));
        }
        self.send(Emitted {
            tool_call: Some(call),
            ..Emitted::default()
        })
    }
}

impl OutputView<'_> {
    fn send(&mut self, piece: Emitted) -> Result<(), InferError> {
        let Some(client) = &self.ctx.client else {
            return Err(InferError::InvalidInput(
                "output.emit is only for streaming requests".into(),
            ));
        };
        if piece.size() > MAX_EMIT_BYTES {
            return Err(InferError::InvalidInput(format!(
                "output.emit takes at most {MAX_EMIT_BYTES} bytes per call, got {}: \
                 emit the text in smaller pieces",
                piece.size()
            )));
        }
        let cancellation = &self.ctx.cancellation;
        if cancellation.is_cancelled() {
            return Err(InferError::Cancelled);
        }
        // Waiting for a slow client is off the guest's clock.
        let sent = self
            .sandbox
            .off_the_clock(|| client.send(piece, cancellation));
        sent.map_err(|why| {
            if why == NotSent::Gone {
                cancellation.client_gone();
            }
            InferError::Cancelled
        })
    }
}
