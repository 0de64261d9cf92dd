//! The admin endpoints (only with `--admin-token`): `GET /v1/admin/guest` shows the active
//! guest and the last failed load, `PUT /v1/admin/guest` swaps in a new one.
//!
//! The bearer token is checked by a route layer, in front of the handlers and their
//! extractors, so an unauthenticated upload is refused before its body is read. Behind it, a
//! second layer lets one upload run at a time: each holds its body (up to 256 MiB) in memory
//! and compiles it, so concurrent ones would multiply both.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use axum::{Json, body::Bytes};
use serde::Serialize;
use tokio::sync::Semaphore;

use super::error::ApiError;
use super::{AppState, Bearer, bearer};
use crate::guest::{GuestMeta, GuestSource, GuestStatus, SwapOutcome};

/// Largest guest component the admin endpoint accepts.
const MAX_GUEST_BYTES: usize = 256 << 20;

/// `/v1/admin/guest`, behind the bearer check for `token`.
pub(super) fn guest_route(token: &str) -> MethodRouter<Arc<AppState>> {
    let token: Arc<str> = token.into();
    let uploads = Arc::new(Semaphore::new(1));
    get(guest_status)
        .put(replace_guest)
        .layer(DefaultBodyLimit::max(MAX_GUEST_BYTES))
        // The last route layer runs first: the token, then the one-upload gate.
        .route_layer(middleware::from_fn_with_state(
            uploads,
            one_upload_at_a_time,
        ))
        .route_layer(middleware::from_fn_with_state(token, require_token))
}

/// 429 for an upload while another one is being read or compiled.
async fn one_upload_at_a_time(
    State(uploads): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if request.method() != Method::PUT {
        return Ok(next.run(request).await);
    }
    let Ok(_uploading) = uploads.try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "another guest upload is in progress; retry once it has finished",
        ));
    };
    Ok(next.run(request).await)
}

/// The bearer check: 401 without credentials, 403 with wrong ones.
async fn require_token(State(token): State<Arc<str>>, request: Request, next: Next) -> Response {
    match authorize(&token, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refused) => {
            // The upload's body is left unread, so this connection cannot carry another
            // request; saying so keeps a client from reusing it into a broken pipe.
            let mut response = refused.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

fn authorize(expected: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    match bearer(headers, expected) {
        Bearer::Right => Ok(()),
        Bearer::Missing => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "admin endpoints need `Authorization: Bearer <token>`",
        )),
        Bearer::Wrong => Err(ApiError::new(StatusCode::FORBIDDEN, "wrong admin token")),
    }
}

async fn guest_status(State(app): State<Arc<AppState>>) -> Json<GuestStatus> {
    Json(app.guests.status())
}

#[derive(Serialize)]
struct Swap {
    swapped: bool,
    guest: GuestMeta,
}

/// `PUT /v1/admin/guest`: the body is a new guest component; it goes live once it compiles and
/// fits the `worker` world, otherwise the current guest keeps serving and the answer says why.
async fn replace_guest(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Swap>, ApiError> {
    let bytes = body?.to_vec();
    let runtime = app.guests.clone();
    let outcome = tokio::task::spawn_blocking(move || runtime.load(GuestSource::Upload(bytes)))
        .await
        .map_err(|join| ApiError::internal(join.to_string()))?
        .map_err(|error| ApiError::bad_request(format!("guest rejected: {error:#}")))?;
    let (swapped, guest) = match outcome {
        SwapOutcome::Swapped(guest) => (true, guest),
        SwapOutcome::Unchanged(guest) => (false, guest),
    };
    Ok(Json(Swap {
        swapped,
        guest: guest.meta.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_answers_401_then_403() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            authorize("secret", &headers).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        headers.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(
            authorize("secret", &headers).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        headers.insert("authorization", "Bearer secret".parse().unwrap());
        assert!(authorize("secret", &headers).is_ok());
    }
}
