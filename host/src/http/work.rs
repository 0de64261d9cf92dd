//! A request's way from admission to its guest's answer, the same for every route that runs
//! the guest (`/v1/infer` and the OpenAI routes): take a lease on the worker (an admission
//! slot), run the guest on a blocking thread that holds the lease until the guest has
//! returned, and cancel the work when whoever answers the client lets go.

use std::sync::Arc;

use rbee_engine::Engine;
use tokio::task::JoinHandle;

use super::AppState;
use super::error::ApiError;
use crate::guest::{
    Cancellation, ClientSender, GuestFailure, GuestRuntime, LoadedGuest, RequestContext,
};
use crate::metrics::RequestMetrics;
use crate::queen::RunningRequest;

/// A request's lease on the worker, held while its work runs: its admission slot and the
/// worker's `busy` status. The guest job owns it, so the slot is released when the work has
/// stopped, not when the client left.
pub(super) struct Lease {
    _admitted: crate::admission::Admitted,
    _running: RunningRequest,
    metrics: Arc<RequestMetrics>,
}

/// Held by whatever answers the client (the handler, then the event stream); dropping it
/// (the answer ended, or the client went away) cancels the request's work.
pub(super) struct InFlight {
    cancellation: Cancellation,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Harmless when the request has finished; stops the model when it has not.
        self.cancellation.client_gone();
    }
}

/// The guest's work for one request, on its blocking thread.
pub(super) struct GuestJob<T> {
    thread: JoinHandle<Result<T, GuestFailure>>,
    metrics: Arc<RequestMetrics>,
}

/// Waits for an admission slot (503 when every slot and queue place is taken). The request's
/// clock starts here, so its time to first token includes the wait, as its client sees it.
pub(super) async fn admit(app: &AppState) -> Result<Lease, ApiError> {
    let metrics = app.metrics.request();
    let admitted = app
        .admission
        .admit()
        .await
        .map_err(|full| ApiError::unavailable(full.to_string()))?;
    Ok(Lease {
        _admitted: admitted,
        _running: app.status.request_started(),
        metrics,
    })
}

/// Runs `call` on the active guest, on a blocking thread that holds `lease` until the guest
/// has returned. `client` is where streamed text goes. Dropping the returned [`InFlight`]
/// cancels the work.
pub(super) fn start_guest<T: Send + 'static>(
    app: &AppState,
    model: Arc<Engine>,
    client: Option<ClientSender>,
    lease: Lease,
    call: impl FnOnce(&GuestRuntime, &LoadedGuest, RequestContext) -> Result<T, GuestFailure>
    + Send
    + 'static,
) -> (GuestJob<T>, InFlight) {
    let guest = app.guests.active();
    let runtime = app.guests.clone();
    let cancellation = Cancellation::for_request(app.cut.clone());
    let metrics = lease.metrics.clone();
    let context = RequestContext {
        model,
        client,
        cancellation: cancellation.clone(),
        metrics: Some(metrics.clone()),
    };
    let thread = tokio::task::spawn_blocking(move || {
        let _lease = lease;
        call(&runtime, &guest, context)
    });
    (GuestJob { thread, metrics }, InFlight { cancellation })
}

/// The guest's answer, or the HTTP error for its failure; either is counted in the metrics.
pub(super) async fn finish<T>(job: GuestJob<T>) -> Result<T, ApiError> {
    match job.thread.await {
        Ok(Ok(answer)) => {
            job.metrics.answered();
            Ok(answer)
        }
        Ok(Err(failure)) => {
            let kind = match &failure {
                GuestFailure::Timeout { .. } => Some("timeout"),
                GuestFailure::OutOfMemory { .. } => Some("memory"),
                GuestFailure::Trapped { .. } => Some("trap"),
                GuestFailure::Returned(_)
                | GuestFailure::NoOpenAi { .. }
                | GuestFailure::NoAgentOptions { .. } => None,
            };
            if let Some(kind) = kind {
                job.metrics.guest_failed(kind);
            }
            Err(ApiError::from(failure))
        }
        Err(join) => Err(ApiError::internal(format!(
            "the request's worker thread failed: {join}"
        ))),
    }
}
