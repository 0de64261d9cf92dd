//! The HTTP server: the rbee worker API (upstream contract: `GET /health`, `GET /info`,
//! `POST /v1/infer`) and the admin endpoints for hot-swapping the guest.
//!
//! One module per route family (`info`, `infer`, `admin`), so a new family (the OpenAI
//! routes) gets a module of its own. Whatever is common to routes is an axum seam rather than
//! a check inside each handler: the body's schema and readiness are extractors
//! (`infer::InferInput`, [`ReadyModel`]), the admin token is a route layer, and every error is
//! `{"error": "..."}` through [`ApiError`]. The layers around every route (request timeout,
//! panics, axum's own errors as JSON) are in `guard`; the server loop and its connection
//! limits in `server`.

mod admin;
mod error;
mod guard;
mod infer;
mod info;
mod metrics;
mod openai;
mod server;
mod work;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::routing::{get, post};
use rbee_engine::Engine;

pub use error::ApiError;
pub use server::{ClientLimits, serve};

use crate::admission::Admission;
use crate::guest::GuestRuntime;
use crate::queen::{Status, WorkerStatus};

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
    /// With `--api-key`, the OpenAI routes need it as a bearer token.
    pub api_key: Option<String>,
    /// The model's name on the OpenAI routes, in `/info` and in heartbeats.
    pub served_model: String,
    /// When the worker started (Unix seconds): `/v1/models`' `created`.
    pub started_at: u64,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub max_body_bytes: usize,
    /// Wall-clock bound on a request, from its arrival to the end of its answer.
    pub request_timeout: Duration,
}

pub fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new()
        .route("/health", get(info::health))
        .route("/info", get(info::info))
        .route("/metrics", get(metrics::metrics))
        .route(
            "/v1/infer",
            post(infer::infer).layer(DefaultBodyLimit::max(state.max_body_bytes)),
        );
    if let Some(token) = &state.admin_token {
        router = router.route("/v1/admin/guest", admin::guest_route(token));
    }
    router = router.merge(openai::routes(&state));
    let request_timeout = state.request_timeout;
    // Last, so that the layers cover every route above.
    guard::apply(router.with_state(state), request_timeout)
}

/// The model, for a route that needs it; 503 while it loads and once the worker is stopping.
pub struct ReadyModel(pub Arc<Engine>);

impl FromRequestParts<Arc<AppState>> for ReadyModel {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, app: &Arc<AppState>) -> Result<Self, ApiError> {
        match (app.status.status(), app.model.get()) {
            (WorkerStatus::Stopped, _) => Err(ApiError::unavailable("the worker is shutting down")),
            (_, None) => Err(ApiError::unavailable(
                "the worker is starting: the model is still loading",
            )),
            (_, Some(model)) => Ok(Self(model.clone())),
        }
    }
}

/// What a request's `Authorization: Bearer …` says about a secret (the admin token, the
/// API key); each route family answers each case in its own shape.
#[derive(Debug, PartialEq, Eq)]
enum Bearer {
    Missing,
    Wrong,
    Right,
}

fn bearer(headers: &axum::http::HeaderMap, secret: &str) -> Bearer {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match given {
        None => Bearer::Missing,
        Some(given) if constant_time_eq(given.as_bytes(), secret.as_bytes()) => Bearer::Right,
        Some(_) => Bearer::Wrong,
    }
}

/// Compares secrets without an early exit, so response timing does not reveal them.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn bearer_check() {
        let mut headers = axum::http::HeaderMap::new();
        assert_eq!(bearer(&headers, "secret"), Bearer::Missing);
        headers.insert("authorization", "Basic secret".parse().unwrap());
        assert_eq!(bearer(&headers, "secret"), Bearer::Missing);
        headers.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(bearer(&headers, "secret"), Bearer::Wrong);
        headers.insert("authorization", "Bearer secret".parse().unwrap());
        assert_eq!(bearer(&headers, "secret"), Bearer::Right);
    }
}
