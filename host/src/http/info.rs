//! `GET /health` and `GET /info`: what anyone may ask of the worker, at any time (while the
//! model loads, too).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::AppState;
use crate::guest::GuestStatus;
use crate::queen::WorkerInfo;

pub(super) async fn health() -> &'static str {
    "ok"
}

/// `/info`: the upstream `WorkerInfo`, plus the guest that serves requests.
#[derive(Serialize)]
pub(super) struct InfoBody {
    #[serde(flatten)]
    worker: WorkerInfo,
    guest: GuestStatus,
}

pub(super) async fn info(State(app): State<Arc<AppState>>) -> Json<InfoBody> {
    Json(InfoBody {
        worker: app.status.info(),
        guest: app.guests.status(),
    })
}
