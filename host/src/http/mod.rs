//! The HTTP server: the rbee worker API (upstream contract: `GET /health`, `GET /info`,
//! `POST /v1/infer`) and the admin endpoints for hot-swapping the guest.
//!
//! One module per route family (`info`, `infer`, `admin`), so a new family (the OpenAI
//! routes) gets a module of its own. Whatever is common to routes is an axum seam rather than
//! a check inside each handler: the body's schema and readiness are extractors
//! (`infer::InferInput`, [`ReadyModel`] in `state`, beside the [`AppState`] every handler
//! shares), the admin token and the API key are route layers (`bearer` compares them), and
//! every error is `{"error": "..."}` through [`ApiError`]. The layers around every route
//! (request timeout, panics, axum's own errors as JSON) are in `guard`; the
//! server loop and its connection limits in `server`; the way from admission to a guest's
//! answer, shared by the generating routes, in `work`; `/metrics` in `metrics`.

mod admin;
mod bearer;
mod error;
mod guard;
mod infer;
mod info;
mod metrics;
mod openai;
mod params;
mod server;
mod state;
mod work;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use bearer::{Bearer, bearer};
pub use error::ApiError;
pub use server::{ClientLimits, serve};
pub use state::{AppState, ReadyModel};

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
