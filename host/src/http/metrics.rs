//! `GET /metrics`: OpenMetrics text (see `crate::metrics`), which Prometheus scrapes and
//! which is the classic text format plus `# EOF` and `_total` only on counter samples. Open
//! like `/health`, as vLLM and llama-server serve it: scrapers rarely carry the API key.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::AppState;

pub(super) async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
}
