//! The HTTP server loop: the router on hyper's HTTP/1 connections, with the limits a server
//! that strangers can reach needs and `axum::serve` does not set.
//!
//! - A header-read timeout: a connection that sends nothing, or a request head slowly, is
//!   closed after [`HEADER_TIMEOUT`]; the same timer bounds an idle keep-alive connection.
//! - A cap on open connections. At the cap, a new connection is served by closing the oldest
//!   one that has not yet sent a complete request head (a half-open socket, by the look of
//!   it); only when every open connection has sent a request does the new one wait for one
//!   to close. Half-open sockets therefore cannot keep `GET /health` out, however many there
//!   are, and the process never runs out of file descriptors for them.
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
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
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
pub struct Limits {
    /// Open connections (lowered to what the open-file limit allows).
    pub max_connections: usize,
    pub write_timeout: Duration,
}

impl Limits {
    pub fn new(max_connections: usize, request_timeout: Duration) -> Self {
        Self {
            max_connections,
            write_timeout: WRITE_TIMEOUT.min(request_timeout),
        }
    }
}

/// File descriptors kept for everything but client connections (model and guest files, the
/// queen, the compile cache, the file watcher).
const RESERVED_FDS: u64 = 64;

/// Runs the server until `shutdown` resolves, then stops accepting, lets each connection
/// finish the request it is serving (idle ones close at once) and returns when all are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
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
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors (or a connection reset before it was accepted): make
                    // room if we can and try again shortly rather than spin.
                    tracing::warn!("accepting a connection failed: {error}");
                    connections.evict_oldest_unserved();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Asked again each time: the open-file limit can be changed while the worker runs.
        let cap = connection_cap(limits.max_connections);
        if connections.len() >= cap {
            // Waits for the evicted connection's socket to be closed, or, when every
            // connection is serving a request, for the first of them to end.
            connections.evict_oldest_unserved();
            tokio::select! {
                () = connections.wait_below(cap) => {}
                () = &mut shutdown => break,
            }
        }
        connections.spawn(stream, router.clone(), limits.write_timeout, &graceful);
    }
    drop(listener);
    graceful.shutdown().await;
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
    /// Closing: its task was aborted, its socket is closed when the task is dropped.
    evicted: bool,
    task: AbortHandle,
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

    /// Closes the oldest connection that has not sent a complete request head; false when
    /// there is none. It stays counted until its task is gone and its socket closed.
    fn evict_oldest_unserved(&self) -> bool {
        let victim = {
            let mut open = self.lock();
            let oldest = open.by_age.values_mut().find(|connection| {
                !connection.evicted && !connection.served.load(Ordering::Acquire)
            });
            oldest.map(|connection| {
                connection.evicted = true;
                connection.task.clone()
            })
        };
        // Aborted out of the lock: dropping the connection's future closes its socket and
        // takes the lock to unregister it.
        victim.map(|task| task.abort()).is_some()
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
        graceful: &GracefulShutdown,
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
        let connection = graceful.watch(connection);

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
            if let Err(error) = connection.await {
                tracing::debug!("connection ended: {error}");
            }
        });
        open.by_age.insert(
            id,
            Connection {
                served,
                evicted: false,
                task: task.abort_handle(),
            },
        );
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
