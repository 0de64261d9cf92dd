//! The text a streaming guest emits, on its way to the client: a channel bounded in bytes,
//! not in pieces, so what the host holds for a client that does not read is fixed whatever
//! the size of the pieces. A guest that emits into a full channel waits for room (the caller
//! keeps that wait off the guest's clock); the wait ends when the client reads, leaves, or
//! the request is cancelled.

use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;

use super::bindings::{TokenLogprob, ToolCall};
use super::cancellation::Cancellation;

/// The most one `output.emit` may send, in bytes.
pub const MAX_EMIT_BYTES: usize = 256 << 10;

/// Bytes buffered between the guest and its client before `emit` waits.
const BUFFERED_BYTES: usize = 1 << 20;

/// What a piece costs beyond its text (its `String` and queue slot), so that a flood of empty
/// pieces is bounded too.
const PIECE_OVERHEAD: usize = 64;

/// How often a waiting `emit` looks at the request's cancellation (the worker's shutdown cut
/// has no way to wake it otherwise).
const CANCEL_CHECK: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Budget {
    state: Mutex<BudgetState>,
    room: Condvar,
}

#[derive(Default)]
struct BudgetState {
    buffered: usize,
    /// The client's end is gone.
    closed: bool,
}

impl Budget {
    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn release(&self, cost: usize) {
        self.lock().buffered -= cost;
        self.room.notify_all();
    }
}

fn cost(piece: &Emitted) -> usize {
    piece.size() + PIECE_OVERHEAD
}

impl Emitted {
    /// Its size in bytes, about: its text, each log-probability's tokens and numbers, and
    /// its tool call.
    pub fn size(&self) -> usize {
        let call = self.tool_call.as_ref().map_or(0, |call| {
            call.id.len() + call.name.len() + call.arguments.len()
        });
        let logprobs: usize = self
            .logprobs
            .iter()
            .map(|logprob| {
                let alternatives: usize = logprob.top.iter().map(|(t, _)| t.bytes.len() + 8).sum();
                logprob.token.bytes.len() + alternatives + 8
            })
            .sum();
        self.text.len() + logprobs + call
    }
}

/// One piece a guest emitted: its text, and the log-probabilities of its tokens when the
/// guest passed them on (`output.emit-piece`); or a whole tool call of a chat answer
/// (`output.emit-tool-call`), with no text.
#[derive(Debug, Clone, Default)]
pub struct Emitted {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub tool_call: Option<ToolCall>,
}

impl From<String> for Emitted {
    fn from(text: String) -> Self {
        Self {
            text,
            ..Self::default()
        }
    }
}

/// Why a piece did not go to the client.
#[derive(Debug, PartialEq, Eq)]
pub enum NotSent {
    /// The client went away.
    Gone,
    /// The request was cancelled while the piece waited for room.
    Cancelled,
}

/// The guest's end: sends pieces, waiting while the client has too much unread.
#[derive(Clone)]
pub struct ClientSender {
    pieces: mpsc::UnboundedSender<Emitted>,
    budget: Arc<Budget>,
    /// Whether the client's format has tool calls (a chat answer's chunks).
    takes_tool_calls: bool,
}

/// The client's end: the pieces in order, as a stream.
pub struct ClientReceiver {
    pieces: mpsc::UnboundedReceiver<Emitted>,
    budget: Arc<Budget>,
}

/// A channel from a streaming guest to its client, for text.
pub fn client_channel() -> (ClientSender, ClientReceiver) {
    channel(false)
}

/// A channel to a chat client, for text and tool calls.
pub fn chat_channel() -> (ClientSender, ClientReceiver) {
    channel(true)
}

fn channel(takes_tool_calls: bool) -> (ClientSender, ClientReceiver) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let budget = Arc::new(Budget::default());
    (
        ClientSender {
            pieces: sender,
            budget: budget.clone(),
            takes_tool_calls,
        },
        ClientReceiver {
            pieces: receiver,
            budget,
        },
    )
}

impl ClientSender {
    /// Whether the client's format has tool calls.
    pub fn takes_tool_calls(&self) -> bool {
        self.takes_tool_calls
    }

    /// Sends `piece`, first waiting (blocking) until the client has read enough for it to
    /// fit. A piece larger than the whole buffer goes alone, once the buffer is empty.
    pub fn send(
        &self,
        piece: impl Into<Emitted>,
        cancellation: &Cancellation,
    ) -> Result<(), NotSent> {
        let piece = piece.into();
        let cost = cost(&piece);
        let mut state = self.budget.lock();
        while state.buffered > 0 && state.buffered + cost > BUFFERED_BYTES {
            if state.closed {
                return Err(NotSent::Gone);
            }
            if cancellation.is_cancelled() {
                return Err(NotSent::Cancelled);
            }
            state = self
                .budget
                .room
                .wait_timeout(state, CANCEL_CHECK)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        if state.closed {
            return Err(NotSent::Gone);
        }
        state.buffered += cost;
        drop(state);
        self.pieces.send(piece).map_err(|_| NotSent::Gone)
    }
}

impl ClientReceiver {
    /// The next piece; `None` once the guest is done.
    pub async fn recv(&mut self) -> Option<Emitted> {
        std::future::poll_fn(|context| self.poll_piece(context)).await
    }

    /// [`ClientReceiver::recv`] for a thread outside any async runtime.
    pub fn blocking_recv(&mut self) -> Option<Emitted> {
        futures::executor::block_on(self.recv())
    }

    fn poll_piece(&mut self, context: &mut Context<'_>) -> Poll<Option<Emitted>> {
        let piece = std::task::ready!(self.pieces.poll_recv(context));
        if let Some(piece) = &piece {
            self.budget.release(cost(piece));
        }
        Poll::Ready(piece)
    }
}

impl Stream for ClientReceiver {
    type Item = Emitted;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Emitted>> {
        self.get_mut().poll_piece(context)
    }
}

impl Drop for ClientReceiver {
    fn drop(&mut self) {
        // Wakes a guest waiting for room: there will never be any.
        self.budget.lock().closed = true;
        self.budget.room.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn the_sender_waits_for_room_in_bytes() {
        let (sender, mut receiver) = client_channel();
        let cancellation = Cancellation::default();
        let piece = "x".repeat(BUFFERED_BYTES / 4);
        for _ in 0..3 {
            sender.send(piece.clone(), &cancellation).unwrap();
        }
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            receiver.blocking_recv().unwrap();
            receiver
        });
        // The fourth piece does not fit until the reader takes one.
        let started = Instant::now();
        sender.send(piece, &cancellation).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(90));
        let receiver = reader.join().unwrap();
        drop(receiver);
        assert_eq!(
            sender.send("more".to_string(), &cancellation),
            Err(NotSent::Gone)
        );
    }

    #[test]
    fn cancellation_ends_the_wait() {
        let (sender, _receiver) = client_channel();
        let cancellation = Cancellation::default();
        sender
            .send("x".repeat(BUFFERED_BYTES), &cancellation)
            .unwrap();
        let cancel = cancellation.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            cancel.client_gone();
        });
        let started = Instant::now();
        assert_eq!(
            sender.send("y".to_string(), &cancellation),
            Err(NotSent::Cancelled)
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
