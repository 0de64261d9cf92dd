//! What the queen knows about this worker and how it learns it: the worker's identity and
//! lifecycle status (`status`, the upstream `WorkerInfo`, also served by `/info`) and the
//! heartbeats that carry it to the queen (`heartbeat`). Kept apart from the HTTP server
//! because the worker is the client here, and the status is the one piece of state both
//! directions share.

pub mod heartbeat;
pub mod status;

pub use heartbeat::Heartbeats;
pub use status::{RunningRequest, Status, WorkerInfo, WorkerStatus};
