//! The worker's identity and lifecycle status, as `/info` and the heartbeat report them.
//!
//! `starting` (loading the model) → `ready` → `busy` while requests run → `ready`;
//! `stopped` on shutdown. Changes are published on a watch channel so the heartbeat can send
//! a beat at once on each change.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::watch;

/// Lowercase on the wire, as the upstream contract says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerStatus {
    Starting,
    Ready,
    Busy,
    Stopped,
}

/// The upstream `WorkerInfo` schema.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerInfo {
    pub id: String,
    pub model_id: String,
    pub device: String,
    pub port: u16,
    pub status: WorkerStatus,
    pub implementation: String,
    pub version: String,
}

/// The upstream enum has no entry for a WebAssembly-hosted worker; rbee-host is an rbee LLM
/// worker, so it reports the bespoke worker's implementation name and a queen accepts it.
pub const IMPLEMENTATION: &str = "llm-worker-rbee";

pub struct Status {
    info: watch::Sender<WorkerInfo>,
    /// Requests running now; `busy` while above zero.
    running: Mutex<usize>,
}

impl Status {
    pub fn new(id: String, model_id: String, device: String, port: u16) -> Self {
        let info = WorkerInfo {
            id,
            model_id,
            device,
            port,
            status: WorkerStatus::Starting,
            implementation: IMPLEMENTATION.into(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        Self {
            info: watch::Sender::new(info),
            running: Mutex::new(0),
        }
    }

    pub fn info(&self) -> WorkerInfo {
        self.info.borrow().clone()
    }

    pub fn status(&self) -> WorkerStatus {
        self.info.borrow().status
    }

    /// Notified on every change of the info (status, model, device, port).
    pub fn subscribe(&self) -> watch::Receiver<WorkerInfo> {
        self.info.subscribe()
    }

    pub fn set_port(&self, port: u16) {
        self.info
            .send_if_modified(|info| replace(&mut info.port, port));
    }

    /// The model is loaded: record where it runs and start serving. (The model's id is the
    /// served name, known from the start.)
    pub fn model_ready(&self, device: String) {
        let running = *self.lock_running();
        self.info.send_if_modified(|info| {
            info.device = device;
            if info.status == WorkerStatus::Starting {
                info.status = if running > 0 {
                    WorkerStatus::Busy
                } else {
                    WorkerStatus::Ready
                };
            }
            true
        });
    }

    pub fn stopped(&self) {
        self.set(WorkerStatus::Stopped);
    }

    /// Marks a request as running until the guard is dropped.
    pub fn request_started(self: &Arc<Self>) -> RunningRequest {
        let mut running = self.lock_running();
        *running += 1;
        if *running == 1 && self.status() == WorkerStatus::Ready {
            self.set(WorkerStatus::Busy);
        }
        RunningRequest {
            status: self.clone(),
        }
    }

    fn request_finished(&self) {
        let mut running = self.lock_running();
        *running -= 1;
        if *running == 0 && self.status() == WorkerStatus::Busy {
            self.set(WorkerStatus::Ready);
        }
    }

    fn set(&self, status: WorkerStatus) {
        self.info
            .send_if_modified(|info| replace(&mut info.status, status));
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, usize> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Sets `slot` to `value`, telling whether it changed.
fn replace<T: PartialEq>(slot: &mut T, value: T) -> bool {
    let changed = *slot != value;
    *slot = value;
    changed
}

/// Keeps the worker `busy` while alive.
pub struct RunningRequest {
    status: Arc<Status>,
}

impl Drop for RunningRequest {
    fn drop(&mut self) {
        self.status.request_finished();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Arc<Status> {
        Arc::new(Status::new("w".into(), "m".into(), "CPU-0".into(), 9301))
    }

    #[test]
    fn lifecycle_transitions() {
        let status = status();
        assert_eq!(status.status(), WorkerStatus::Starting);
        status.model_ready("CPU-0".into());
        assert_eq!(status.status(), WorkerStatus::Ready);
        assert_eq!(status.info().model_id, "m");
        {
            let _first = status.request_started();
            let _second = status.request_started();
            assert_eq!(status.status(), WorkerStatus::Busy);
        }
        assert_eq!(status.status(), WorkerStatus::Ready);
        status.stopped();
        let _late = status.request_started();
        assert_eq!(status.status(), WorkerStatus::Stopped);
    }

    #[test]
    fn serializes_as_upstream_worker_info() {
        let json = serde_json::to_value(status().info()).unwrap();
        assert_eq!(json["status"], "starting");
        assert_eq!(json["implementation"], "llm-worker-rbee");
        for field in ["id", "model_id", "device", "port", "version"] {
            assert!(json.get(field).is_some(), "{field} missing");
        }
    }

    #[test]
    fn changes_are_published() {
        let status = status();
        let mut changes = status.subscribe();
        status.model_ready("CPU-0".into());
        assert!(changes.has_changed().unwrap());
        assert_eq!(changes.borrow_and_update().status, WorkerStatus::Ready);
        status.set_port(9301);
        assert!(
            !changes.has_changed().unwrap(),
            "an unchanged port is not a change"
        );
    }
}
