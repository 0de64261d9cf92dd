//! `inference.token-stream`: the guest's handle on a running [`Generation`]. Reading waits for
//! the model, and dropping joins the model thread; both are off the guest's clock.

use wasmtime::component::Resource;

use super::convert::{infer_error, wit_completion};
use super::inference::InferenceView;
use crate::guest::bindings::{InferError, StreamItem, inference};
use crate::guest::generation::{Generated, Generation};

impl inference::HostTokenStream for InferenceView<'_> {
    fn next(&mut self, stream: Resource<Generation>) -> Result<StreamItem, InferError> {
        let generation = self
            .table
            .get_mut(&stream)
            .map_err(|error| InferError::GuestError(format!("bad token-stream handle: {error}")))?;
        match self.sandbox.off_the_clock(|| generation.next()) {
            Generated::Text(text) => Ok(StreamItem::Text(text)),
            Generated::Finished(Ok(done)) => Ok(StreamItem::Done(wit_completion(done))),
            Generated::Finished(Err(error)) => Err(infer_error(error)),
        }
    }

    fn drop(&mut self, stream: Resource<Generation>) -> wasmtime::Result<()> {
        let generation = self.table.delete(stream)?;
        // Joining the model thread waits for at most one token step.
        self.sandbox.off_the_clock(|| drop(generation));
        Ok(())
    }
}
