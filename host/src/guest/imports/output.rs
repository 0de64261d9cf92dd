//! `output`: streamed text on its way to the client. One call sends at most
//! [`MAX_EMIT_BYTES`], and the channel to the client is bounded in bytes, so a slow client
//! makes the guest wait (back-pressure) instead of the host buffering for it; a client that
//! left, or a cancelled request, ends the wait and the request.

use crate::guest::bindings::{InferError, output};
use crate::guest::client::{MAX_EMIT_BYTES, NotSent};
use crate::guest::request::RequestState;

impl output::Host for RequestState {
    fn emit(&mut self, text: String) -> Result<(), InferError> {
        let Some(client) = &self.client else {
            return Err(InferError::InvalidInput(
                "output.emit is only for streaming requests".into(),
            ));
        };
        if text.len() > MAX_EMIT_BYTES {
            return Err(InferError::InvalidInput(format!(
                "output.emit takes at most {MAX_EMIT_BYTES} bytes per call, got {}: \
                 emit the text in smaller pieces",
                text.len()
            )));
        }
        if self.cancellation.is_cancelled() {
            return Err(InferError::Cancelled);
        }
        // Waiting for a slow client is off the guest's clock.
        let cancellation = &self.cancellation;
        let sent = self
            .sandbox
            .off_the_clock(|| client.send(text, cancellation));
        sent.map_err(|why| {
            if why == NotSent::Gone {
                self.cancellation.client_gone();
            }
            InferError::Cancelled
        })
    }
}
