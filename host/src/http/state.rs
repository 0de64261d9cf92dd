//! What every handler shares ([`AppState`]) and the readiness every generating route needs
//! ([`ReadyModel`], an extractor, so no handler checks it itself).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use rbee_engine::Engine;

use super::error::ApiError;
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
