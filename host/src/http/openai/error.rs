//! Errors in the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`, which the
//! OpenAI SDKs turn into their typed exceptions (`BadRequestError`, `NotFoundError`, ...).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::http::ApiError;

#[derive(Debug)]
pub struct OpenAiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
pub(super) struct Detail<'a> {
    message: &'a str,
    r#type: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

impl OpenAiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// A 400 about one field of the request.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// A field this server does not implement, set to a value that would change the result.
    pub fn unsupported(param: &str, why: &str) -> Self {
        Self::invalid(
            param,
            format!("`{param}` is not supported by this server: {why}"),
        )
        .with_code("unsupported_parameter")
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// OpenAI's `type` for a status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 404 | 405 | 413 | 422 => "invalid_request_error",
            401 | 403 => "authentication_error",
            429 | 503 => "server_overloaded",
            _ => "server_error",
        }
    }

    /// The body's `error` object, also what a stream's error event carries.
    pub(super) fn detail(&self) -> Detail<'_> {
        Detail {
            message: &self.message,
            r#type: self.kind(),
            param: self.param.as_deref(),
            code: self.code,
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(Body {
                error: self.detail(),
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// The rbee routes' errors (admission, readiness, the guest's failures) in this shape.
impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        let code = match error.status.as_u16() {
            503 => Some("unavailable"),
            504 => Some("timeout"),
            _ => None,
        };
        Self {
            code,
            ..Self::new(error.status, error.message)
        }
    }
}
