//! `inference.token-stream`: the guest's handle on a running [`Generation`]. Reading waits for
//! the model, and dropping joins the model thread; both are off the guest's clock.

use wasmtime::component::Resource;

use super::convert::{infer_error, wit_completion, wit_generation, wit_piece};
use super::inference::InferenceView;
use crate::guest::bindings::{InferError, PieceItem, StreamItem, inference};
use crate::guest::generation::{Generated, Generation};

impl InferenceView<'_> {
    /// The stream's next step, waited for off the guest's clock.
    fn next_generated(&mut self, stream: &Resource<Generation>) -> Result<Generated, InferError> {
        let generation = self
            .table
            .get_mut(stream)
            .map_err(|error| InferError::GuestError(format!("bad token-stream handle: {error}")))?;
        Ok(self.sandbox.off_the_clock(|| generation.next()))
    }
}

impl inference::HostTokenStream for InferenceView<'_> {
    fn next(&mut self, stream: Resource<Generation>) -> Result<StreamItem, InferError> {
        match self.next_generated(&stream)? {
            Generated::Piece(piece) => Ok(StreamItem::Text(piece.text)),
            Generated::Finished(Ok(done)) => Ok(StreamItem::Done(wit_completion(done))),
            Generated::Finished(Err(error)) => Err(infer_error(error)),
        }
    }

    fn next_piece(&mut self, stream: Resource<Generation>) -> Result<PieceItem, InferError> {
        match self.next_generated(&stream)? {
            Generated::Piece(piece) => Ok(PieceItem::Piece(wit_piece(piece))),
            Generated::Finished(Ok(done)) => Ok(PieceItem::Done(wit_generation(done))),
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
