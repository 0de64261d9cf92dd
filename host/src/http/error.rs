//! The one error type of the HTTP layer: every failure a handler or an extractor can meet
//! becomes `{"error": message}` with a fitting status, here and nowhere else.

use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::guest::{GuestFailure, InferError};

/// An error answer: `{"error": message}` with `status`.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(super) fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    pub(super) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// The WIT's error table (see `infer-error` in wit/worker.wit).
    fn from_guest_error(error: &InferError) -> Self {
        match error {
            InferError::InvalidInput(message) | InferError::ContextOverflow(message) => {
                Self::bad_request(message.clone())
            }
            InferError::Busy(message) => Self::unavailable(message.clone()),
            InferError::ModelError(message) => Self::internal(message.clone()),
            InferError::GuestError(message) => Self::internal(format!("guest error: {message}")),
            // Nobody is listening any more; 499 is what proxies log for it.
            InferError::Cancelled => Self::new(
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "the client closed the request",
            ),
        }
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

/// A body that could not be read (413 when over the route's limit).
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
            GuestFailure::NoOpenAi { .. } => StatusCode::NOT_IMPLEMENTED,
            GuestFailure::NoAgentOptions { .. } => StatusCode::BAD_REQUEST,
            GuestFailure::OutOfMemory { .. } | GuestFailure::Trapped { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self::new(status, failure.to_string())
    }
}
