//! The HTTP server loop: the router on hyper's HTTP/1 connections, with the limits a server
//! that strangers can reach needs and `axum::serve` does not set.
//!
//! - A header-read timeout: a connection that sends nothing, or a request head slowly, is
//!   closed after [`HEADER_TIMEOUT`]; the same timer bounds an idle keep-alive connection.
//! - A cap on open connections. At the cap, a new connection is served by closing the oldest
//!   one that has not yet sent a complete request head (a half-open socket, by the look of
//!   it); when every open connection has sent a request, the oldest is asked to close once
//!   its answer is done (at once when it idles between requests: hyper's graceful close, so
//!   no request in flight is cut). Neither half-open nor idle keep-alive sockets can keep
//!   `GET /health` out, however many there are, and the process never runs out of file
//!   descriptors for them.
//! - A write timeout on each socket: a client that stops reading its answer (an SSE stream
//!   above all) for [`Limits::write_timeout`] loses its connection, and with it its request
//!   (the answer's body is dropped, which cancels the work and frees its admission place).
//!
//! HTTP/1 only: the rbee contract's clients speak it, and HTTP/2 would bring its own
//! resource limits to set.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;
use tokio_io_timeout::TimeoutStream;
use tower::ServiceExt;

/// Longest a client may take to send a request head, counted from when the server starts
/// waiting for it (the connection opened, or its previous answer was sent).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a write to a client may wait for the client to read, unless the request timeout
/// is shorter (a write that waits longer than that belongs to a request past its deadline).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Open connections (lowered to what the open-file limit allows).
    pub max_connections: usize,
    pub write_timeout: Duration,
}

impl ClientLimits {
    pub fn new(max_connections: usize, request_timeout: Duration) -> Self {
        Self {
            max_connections,
            write_timeout: WRITE_TIMEOUT.min(request_timeout),
        }
    }
}

/// How often a server at its cap asks one more connection to close while it waits for one to
/// go (the one asked may be in the middle of a long answer).
const EVICT_AGAIN: Duration = Duration::from_millis(100);

/// File descriptors kept for everything but client connections (model and guest files, the
/// queen, the compile cache, the file watcher).
const RESERVED_FDS: u64 = 64;

/// Runs the server until `shutdown` resolves, then stops accepting, lets each connection
/// finish the request it is serving (idle ones close at once) and returns when all are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ClientLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let cap = connection_cap(limits.max_connections);
    if cap < limits.max_connections {
        tracing::warn!(
            "--max-connections {} lowered to {cap} to stay within the open-file limit",
            limits.max_connections
        );
    }
    let connections = Arc::new(Connections::default());
    let (stopping, stop) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    'accepting: loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors (or a connection reset before it was accepted): make
                    // room if we can and try again shortly rather than spin.
                    tracing::warn!("accepting a connection failed: {error}");
                    connections.evict_one();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        loop {
            // Asked again each time: the open-file limit can be changed while the worker runs.
            let cap = connection_cap(limits.max_connections);
            if connections.len() < cap {
                break;
            }
            connections.evict_one();
            tokio::select! {
                () = connections.wait_below(cap) => {}
                () = tokio::time::sleep(EVICT_AGAIN) => {}
                () = &mut shutdown => break 'accepting,
            }
        }
        connections.spawn(stream, router.clone(), limits.write_timeout, stop.clone());
    }
    drop(listener);
    // Idle connections close at once, busy ones once their answer is done.
    stopping.send_replace(true);
    connections.wait_below(1).await;
    Ok(())
}

/// The cap, lowered to what the process's open-file limit allows, so that connections are
/// turned away here (oldest half-open first) rather than by `accept` failing.
fn connection_cap(max_connections: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return max_connections;
    }
    let allowed = limit.rlim_cur.saturating_sub(RESERVED_FDS).max(1);
    max_connections.min(usize::try_from(allowed).unwrap_or(usize::MAX))
}

/// The open connections, oldest first.
#[derive(Default)]
struct Connections {
    open: Mutex<Open>,
    closed: Notify,
}

#[derive(Default)]
struct Open {
    next: u64,
    by_age: BTreeMap<u64, Connection>,
}

struct Connection {
    /// Set once a complete request head has arrived.
    served: Arc<AtomicBool>,
    /// Asked to close already (it stays counted until its socket is closed).
    closing: bool,
    /// Asks the connection to close once its current answer is done.
    close: Arc<Notify>,
    task: AbortHandle,
}

/// How a connection is made to close.
enum Eviction {
    /// It never sent a request head: drop it now.
    Abort(AbortHandle),
    /// It did: close it when it idles (hyper's graceful close).
    Graceful(Arc<Notify>),
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().by_age.len()
    }

    /// Makes room for one connection: closes the oldest that has not sent a complete request
    /// head, or else asks the oldest of the others to close once its answer is done.
    fn evict_one(&self) {
        let eviction = {
            let mut open = self.lock();
            let served = |connection: &Connection| connection.served.load(Ordering::Acquire);
            let open_ones = || open.by_age.iter().filter(|(_, c)| !c.closing);
            let victim = open_ones()
                .find(|(_, connection)| !served(connection))
                .or_else(|| open_ones().next())
                .map(|(&id, _)| id);
            victim
                .and_then(|id| open.by_age.get_mut(&id))
                .map(|connection| {
                    connection.closing = true;
                    match served(connection) {
                        false => Eviction::Abort(connection.task.clone()),
                        true => Eviction::Graceful(connection.close.clone()),
                    }
                })
        };
        // Out of the lock: a dropped connection takes the lock to unregister itself.
        match eviction {
            Some(Eviction::Abort(task)) => task.abort(),
            Some(Eviction::Graceful(close)) => close.notify_one(),
            None => {}
        }
    }

    async fn wait_below(&self, max: usize) {
        loop {
            let closed = self.closed.notified();
            if self.len() < max {
                return;
            }
            closed.await;
        }
    }

    fn spawn(
        self: &Arc<Self>,
        stream: TcpStream,
        router: Router,
        write_timeout: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let _ = stream.set_nodelay(true);
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(Some(write_timeout));
        let served = Arc::new(AtomicBool::new(false));
        let seen = served.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            seen.store(true, Ordering::Release);
            router.clone().oneshot(request.map(Body::new))
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(Box::pin(stream)), service);
        let close = Arc::new(Notify::new());
        let asked = close.clone();

        // Registered before the task can end, so that its removal always finds it.
        let mut open = self.lock();
        let id = open.next;
        open.next += 1;
        let this = self.clone();
        let task = tokio::spawn(async move {
            let _registered = Registered {
                connections: this,
                id,
            };
            let mut connection = pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = closing(&asked, &mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::debug!("connection ended: {error}");
            }
        });
        open.by_age.insert(
            id,
            Connection {
                served,
                closing: false,
                close,
                task: task.abort_handle(),
            },
        );
    }
}

/// Resolves when the connection is asked to close: evicted, or the server is stopping.
async fn closing(asked: &Notify, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        () = asked.notified() => {}
        _ = stop.wait_for(|&stopping| stopping) => {}
    }
}

/// Removes a connection from the open set when its task ends, aborted or not.
struct Registered {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.lock().by_age.remove(&self.id);
        self.connections.closed.notify_waiters();
    }
}
