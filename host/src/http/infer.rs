//! `POST /v1/infer`: the upstream wire schema, and the request's way through admission and the
//! guest to a JSON answer or a stream of Server-Sent Events.
//!
//! This module owns the wire schema only (the fields, their JSON types and the ranges the
//! upstream OpenAPI states; the rules it shares with the OpenAI routes are in `params`). What
//! the engine can run is the engine's own check, and defaults and policy are the guest's.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt, stream};
use rbee_engine::Engine;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::params::{StopStrings, TEMPERATURE};
use super::work::{self, GuestJob, InFlight, Lease};
use super::{AppState, ReadyModel};
use crate::guest::{ClientSender, Emitted, InferRequest, InferResponse, client_channel};

/// The wire schema's range for `max_tokens` (upstream OpenAPI).
const MAX_TOKENS: std::ops::RangeInclusive<u32> = 1..=4096;

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
    stop: StopStrings,
}

/// An infer request read from the body and checked against the wire schema; the extractor
/// answers 400 (or 413 for an oversized body) before the handler runs.
pub(super) struct InferInput(InferRequest);

impl<S: Send + Sync> FromRequest<S> for InferInput {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let body = Bytes::from_request(request, state).await?;
        parse(&body).map(InferInput)
    }
}

/// Parses and checks a body against the upstream schema.
fn parse(body: &[u8]) -> Result<InferRequest, ApiError> {
    let body: InferBody = serde_json::from_slice(body)
        .map_err(|error| ApiError::bad_request(format!("invalid request body: {error}")))?;
    if let Some(max_tokens) = body.max_tokens
        && !MAX_TOKENS.contains(&max_tokens)
    {
        return Err(ApiError::bad_request(format!(
            "max_tokens must be between {} and {}, got {max_tokens}",
            MAX_TOKENS.start(),
            MAX_TOKENS.end()
        )));
    }
    if let Some(temperature) = body.temperature
        && !TEMPERATURE.contains(&temperature)
    {
        return Err(ApiError::bad_request(format!(
            "temperature must be between {} and {}, got {temperature}",
            TEMPERATURE.start(),
            TEMPERATURE.end()
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
        stop: body.stop.into_vec(),
        stream: body.stream,
    })
}

#[derive(Serialize)]
struct InferReply {
    text: String,
    tokens_generated: u32,
    duration_ms: u64,
}

pub(super) async fn infer(
    State(app): State<Arc<AppState>>,
    ReadyModel(model): ReadyModel,
    InferInput(request): InferInput,
) -> Result<Response, ApiError> {
    let lease = work::admit(&app).await?;
    if request.stream {
        streamed(&app, model, request, lease).await
    } else {
        let started = Instant::now();
        let (job, in_flight) = start(&app, model, request, None, lease);
        let response = work::finish(job).await?;
        drop(in_flight);
        Ok(axum::Json(InferReply {
            text: response.text,
            tokens_generated: response.tokens_generated,
            duration_ms: started.elapsed().as_millis() as u64,
        })
        .into_response())
    }
}

/// The streamed answer. The first piece is awaited before answering, so that a guest that
/// fails before it emits anything gets a proper HTTP error; after that, errors can only be
/// told in the stream.
async fn streamed(
    app: &AppState,
    model: Arc<Engine>,
    request: InferRequest,
    lease: Lease,
) -> Result<Response, ApiError> {
    // Bounded in bytes: a client that does not read makes the guest wait, not the host buffer.
    let (client, mut pieces) = client_channel();
    let (job, in_flight) = start(app, model, request, Some(client), lease);
    let (first, job) = match pieces.recv().await {
        Some(first) => (Some(first), Some(job)),
        None => {
            work::finish(job).await?;
            (None, None)
        }
    };
    let pieces = stream::iter(first).chain(pieces);
    Ok(Sse::new(sse_events(pieces, job, in_flight)).into_response())
}

/// Runs the request on the guest's `handler` export.
fn start(
    app: &AppState,
    model: Arc<Engine>,
    request: InferRequest,
    client: Option<ClientSender>,
    lease: Lease,
) -> (GuestJob<InferResponse>, InFlight) {
    work::start_guest(app, model, client, lease, move |runtime, guest, context| {
        runtime.handle(guest, request, context)
    })
}

/// The event stream: each emitted piece as `data: {"token": ...}`, then `data: [DONE]`, or a
/// final `data: {"error": ...}` when the guest failed after it began streaming. The stream
/// owns `in_flight`, so a client that goes away (the stream is dropped) cancels the request.
fn sse_events(
    pieces: impl Stream<Item = Emitted>,
    job: Option<GuestJob<InferResponse>>,
    in_flight: InFlight,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let tokens = pieces
        .map(|piece| Event::default().data(serde_json::json!({ "token": piece.text }).to_string()));
    let end = stream::once(async move {
        let _in_flight = in_flight;
        let outcome = match job {
            Some(job) => work::finish(job).await.map(drop),
            None => Ok(()),
        };
        match outcome {
            Ok(()) => Event::default().data("[DONE]"),
            Err(error) => {
                Event::default().data(serde_json::json!({ "error": error.message }).to_string())
            }
        }
    });
    tokens.chain(end).map(Ok)
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    #[test]
    fn parses_the_upstream_body_and_extensions() {
        let request =
            parse(br#"{"prompt":"hi","max_tokens":5,"temperature":0,"stream":true,"stop":"\n"}"#)
                .unwrap();
        assert_eq!(request.prompt, "hi");
        assert_eq!(request.max_tokens, Some(5));
        assert!(request.stream);
        assert_eq!(request.stop, vec!["\n".to_string()]);
        let request = parse(br#"{"prompt":"","stop":["a","b"],"seed":7}"#).unwrap();
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
            let error = parse(body).unwrap_err();
            assert_eq!(
                error.status,
                StatusCode::BAD_REQUEST,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn range_messages_are_unchanged() {
        let error = parse(br#"{"prompt":"x","max_tokens":0}"#).unwrap_err();
        assert_eq!(
            error.message,
            "max_tokens must be between 1 and 4096, got 0"
        );
        let error = parse(br#"{"prompt":"x","temperature":2.5}"#).unwrap_err();
        assert_eq!(
            error.message,
            "temperature must be between 0 and 2, got 2.5"
        );
    }
}
