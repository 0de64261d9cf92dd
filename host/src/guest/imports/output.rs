//! `output`: streamed text on its way to the client. The channel is bounded, so a slow client
//! makes the guest wait (back-pressure), and a client that left cancels the request.

use crate::guest::bindings::{InferError, output};
use crate::guest::request::RequestState;

impl output::Host for RequestState {
    fn emit(&mut self, text: String) -> Result<(), InferError> {
        let Some(client) = &self.client else {
            return Err(InferError::InvalidInput(
                "output.emit is only for streaming requests".into(),
            ));
        };
        if self.cancellation.is_cancelled() {
            return Err(InferError::Cancelled);
        }
        // Waiting for a slow client is off the guest's clock.
        let client = client.clone();
        let sent = self.sandbox.off_the_clock(|| client.blocking_send(text));
        sent.map_err(|_| {
            self.cancellation.client_gone();
            InferError::Cancelled
        })
    }
}
