//! The rbee worker HTTP API (upstream contract: `GET /health`, `GET /info`, `POST /v1/infer`)
//! and the admin endpoints for hot-swapping the guest.
//!
//! Handlers are thin: parse and check the request, take an admission slot, hand the request to
//! the guest on a blocking thread, and turn the outcome into JSON or Server-Sent Events. Every
//! error is `{"error": "..."}` with a fitting status, through [`ApiError`].

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use rbee_engine::Engine;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::admission::{Admission, Admitted};
use crate::guest::{
    Cancellation, GuestFailure, GuestRuntime, GuestSource, GuestStatus, InferError, InferRequest,
    InferResponse, Loaded, RequestContext,
};
use crate::status::{RunningRequest, Status, WorkerInfo, WorkerStatus};

/// Largest guest component the admin endpoint accepts.
const MAX_GUEST_BYTES: usize = 256 << 20;

/// Streamed pieces buffered between the guest and a slow client before the guest waits.
const SSE_BUFFER: usize = 32;

/// Everything the handlers share.
pub struct AppState {
    pub status: Arc<Status>,
    pub guests: Arc<GuestRuntime>,
    /// Set once the model has loaded; requests before that get 503.
    pub model: OnceLock<Arc<Engine>>,
    pub admission: Admission,
    /// Raised when the shutdown grace period ends: running generations stop.
    pub cut: Arc<AtomicBool>,
    pub admin_token: Option<String>,
    pub max_body_bytes: usize,
}

pub fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new()
        .route("/health", get(health))
        .route("/info", get(info))
        .route(
            "/v1/infer",
            post(infer).layer(DefaultBodyLimit::max(state.max_body_bytes)),
        );
    if state.admin_token.is_some() {
        router = router.route(
            "/v1/admin/guest",
            get(guest_status)
                .put(replace_guest)
                .layer(DefaultBodyLimit::max(MAX_GUEST_BYTES)),
        );
    }
    router.with_state(state)
}

/// An error answer: `{"error": message}` with `status`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = axum::Json(serde_json::json!({ "error": self.message }));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        Self::new(rejection.status(), rejection.body_text())
    }
}

impl From<GuestFailure> for ApiError {
    fn from(failure: GuestFailure) -> Self {
        let status = match &failure {
            GuestFailure::Returned(error) => return Self::from_guest_error(error),
            GuestFailure::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GuestFailure::OutOfMemory { .. } | GuestFailure::Trapped { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self::new(status, failure.to_string())
    }
}

impl ApiError {
    /// The WIT's error table (see `infer-error` in wit/worker.wit).
    fn from_guest_error(error: &InferError) -> Self {
        match error {
            InferError::InvalidInput(message) | InferError::ContextOverflow(message) => {
                Self::bad_request(message.clone())
            }
            InferError::Busy(message) => Self::unavailable(message.clone()),
            InferError::ModelError(message) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, message.clone())
            }
            InferError::GuestError(message) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("guest error: {message}"),
            ),
            // Nobody is listening any more; 499 is what proxies log for it.
            InferError::Cancelled => Self::new(
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "the client closed the request",
            ),
        }
    }
}

async fn health() -> &'static str {
    "ok"
}

/// `/info`: the upstream `WorkerInfo`, plus the guest that serves requests.
#[derive(Serialize)]
struct InfoBody {
    #[serde(flatten)]
    worker: WorkerInfo,
    guest: GuestStatus,
}

async fn info(State(app): State<Arc<AppState>>) -> axum::Json<InfoBody> {
    axum::Json(InfoBody {
        worker: app.status.info(),
        guest: app.guests.status(),
    })
}

/// `POST /v1/infer`'s body: the upstream fields, and sampling extensions the guest may use.
#[derive(Debug, Deserialize)]
struct InferBody {
    prompt: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    #[serde(default)]
    stream: bool,
    top_k: Option<u32>,
    top_p: Option<f32>,
    repeat_penalty: Option<f32>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Stop,
}

/// `stop` as OpenAI-style APIs take it: one string or a list.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl InferBody {
    /// Parses and checks the body against the upstream schema.
    fn parse(body: &[u8]) -> Result<InferRequest, ApiError> {
        let body: InferBody = serde_json::from_slice(body)
            .map_err(|error| ApiError::bad_request(format!("invalid request body: {error}")))?;
        if let Some(max_tokens) = body.max_tokens
            && !(1..=4096).contains(&max_tokens)
        {
            return Err(ApiError::bad_request(format!(
                "max_tokens must be between 1 and 4096, got {max_tokens}"
            )));
        }
        if let Some(temperature) = body.temperature
            && !(0.0..=2.0).contains(&temperature)
        {
            return Err(ApiError::bad_request(format!(
                "temperature must be between 0 and 2, got {temperature}"
            )));
        }
        Ok(InferRequest {
            prompt: body.prompt,
            max_tokens: body.max_tokens,
            temperature: body.temperature,
            top_k: body.top_k,
            top_p: body.top_p,
            repeat_penalty: body.repeat_penalty,
            seed: body.seed,
            stop: match body.stop {
                Stop::None => Vec::new(),
                Stop::One(stop) => vec![stop],
                Stop::Many(stops) => stops,
            },
            stream: body.stream,
        })
    }
}

#[derive(Serialize)]
struct InferReply {
    text: String,
    tokens_generated: u32,
    duration_ms: u64,
}

/// Everything a running request holds; dropping it (the client went away) cancels the
/// generation and frees the slot.
struct InFlight {
    _admitted: Admitted,
    _running: RunningRequest,
    cancellation: Cancellation,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Harmless when the request has finished; stops the model when it has not.
        self.cancellation.client_gone();
    }
}

async fn infer(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = InferBody::parse(&body?)?;
    let model = match (app.status.status(), app.model.get()) {
        (WorkerStatus::Stopped, _) => {
            return Err(ApiError::unavailable("the worker is shutting down"));
        }
        (_, None) => {
            return Err(ApiError::unavailable(
                "the worker is starting: the model is still loading",
            ));
        }
        (_, Some(model)) => model.clone(),
    };
    let admitted = app
        .admission
        .admit()
        .await
        .map_err(|full| ApiError::unavailable(full.to_string()))?;
    let in_flight = InFlight {
        _admitted: admitted,
        _running: app.status.request_started(),
        cancellation: Cancellation::for_request(app.cut.clone()),
    };
    let started = Instant::now();
    let guest = app.guests.active();
    let runtime = app.guests.clone();
    let stream = request.stream;
    let (client, pieces) = if stream {
        let (sender, receiver) = mpsc::channel(SSE_BUFFER);
        (Some(sender), Some(receiver))
    } else {
        (None, None)
    };
    let context = RequestContext {
        model,
        client,
        cancellation: in_flight.cancellation.clone(),
    };
    let job = tokio::task::spawn_blocking(move || runtime.handle(&guest, request, context));
    match pieces {
        None => {
            let response = finish(job).await?;
            Ok(axum::Json(InferReply {
                text: response.text,
                tokens_generated: response.tokens_generated,
                duration_ms: started.elapsed().as_millis() as u64,
            })
            .into_response())
        }
        Some(mut pieces) => {
            // Until the guest emits, an error can still be a proper HTTP error.
            let (first, job) = match pieces.recv().await {
                Some(first) => (Some(first), Some(job)),
                None => {
                    finish(job).await?;
                    (None, None)
                }
            };
            Ok(Sse::new(sse_events(first, pieces, in_flight, job)).into_response())
        }
    }
}

type GuestJob = JoinHandle<Result<InferResponse, GuestFailure>>;

async fn finish(job: GuestJob) -> Result<InferResponse, ApiError> {
    match job.await {
        Ok(outcome) => outcome.map_err(ApiError::from),
        Err(join) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request's worker thread failed: {join}"),
        )),
    }
}

/// The event stream: each emitted piece as `data: {"token": ...}`, then `data: [DONE]`, or a
/// final `data: {"error": ...}` when the guest fails after it began streaming.
fn sse_events(
    first: Option<String>,
    pieces: mpsc::Receiver<String>,
    in_flight: InFlight,
    job: Option<GuestJob>,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    struct Streaming {
        first: Option<String>,
        pieces: mpsc::Receiver<String>,
        job: Option<GuestJob>,
        finished: bool,
        _in_flight: InFlight,
    }
    let state = Streaming {
        first,
        pieces,
        job,
        finished: false,
        _in_flight: in_flight,
    };
    futures::stream::unfold(state, |mut state| async move {
        if state.finished {
            return None;
        }
        let piece = match state.first.take() {
            Some(first) => Some(first),
            None => state.pieces.recv().await,
        };
        if let Some(piece) = piece {
            let event = Event::default().data(serde_json::json!({ "token": piece }).to_string());
            return Some((Ok(event), state));
        }
        state.finished = true;
        let event = match state.job.take() {
            None => Event::default().data("[DONE]"),
            Some(job) => match finish(job).await {
                Ok(_) => Event::default().data("[DONE]"),
                Err(error) => {
                    Event::default().data(serde_json::json!({ "error": error.message }).to_string())
                }
            },
        };
        Some((Ok(event), state))
    })
}

/// The admin endpoints' bearer check: 401 without credentials, 403 with wrong ones.
fn authorize(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = app.admin_token.as_deref().unwrap_or_default();
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match given {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "admin endpoints need `Authorization: Bearer <token>`",
        )),
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::FORBIDDEN, "wrong admin token")),
    }
}

/// Compares without an early exit, so response timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn guest_status(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<axum::Json<GuestStatus>, ApiError> {
    authorize(&app, &headers)?;
    Ok(axum::Json(app.guests.status()))
}

#[derive(Serialize)]
struct Swap {
    swapped: bool,
    guest: crate::guest::GuestMeta,
}

/// `PUT /v1/admin/guest`: the body is a new guest component; it goes live once it compiles and
/// fits the `worker` world, otherwise the current guest keeps serving and the answer says why.
async fn replace_guest(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Swap>, ApiError> {
    authorize(&app, &headers)?;
    let bytes = body?.to_vec();
    let runtime = app.guests.clone();
    let loaded = tokio::task::spawn_blocking(move || runtime.load(GuestSource::Upload(bytes)))
        .await
        .map_err(|join| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, join.to_string()))?
        .map_err(|error| ApiError::bad_request(format!("guest rejected: {error:#}")))?;
    Ok(axum::Json(match loaded {
        Loaded::Swapped(guest) => Swap {
            swapped: true,
            guest: guest.meta.clone(),
        },
        Loaded::Unchanged(guest) => Swap {
            swapped: false,
            guest: guest.meta.clone(),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_upstream_body_and_extensions() {
        let request = InferBody::parse(
            br#"{"prompt":"hi","max_tokens":5,"temperature":0,"stream":true,"stop":"\n"}"#,
        )
        .unwrap();
        assert_eq!(request.prompt, "hi");
        assert_eq!(request.max_tokens, Some(5));
        assert!(request.stream);
        assert_eq!(request.stop, vec!["\n".to_string()]);
        let request = InferBody::parse(br#"{"prompt":"","stop":["a","b"],"seed":7}"#).unwrap();
        assert!(!request.stream);
        assert_eq!(request.stop.len(), 2);
        assert_eq!(request.seed, Some(7));
    }

    #[test]
    fn rejects_what_the_schema_rejects() {
        for body in [
            &br#"{}"#[..],
            br#"{"prompt": 3}"#,
            br#"{"prompt":"x","max_tokens":0}"#,
            br#"{"prompt":"x","max_tokens":4097}"#,
            br#"{"prompt":"x","max_tokens":-1}"#,
            br#"{"prompt":"x","temperature":2.5}"#,
            br#"{"prompt":"x","temperature":-0.1}"#,
            br#"{"prompt":"x","stream":"yes"}"#,
            br#"not json"#,
        ] {
            let error = InferBody::parse(body).unwrap_err();
            assert_eq!(
                error.status,
                StatusCode::BAD_REQUEST,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
