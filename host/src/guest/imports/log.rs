//! `log`: a guest's log lines, into the worker's `tracing` output tagged with the guest's name.

use crate::guest::bindings::log;
use crate::guest::request::RequestState;

impl log::Host for RequestState {
    fn log(&mut self, level: log::Level, message: String) {
        let guest = &*self.guest_name;
        match level {
            log::Level::Trace => tracing::trace!(guest, "{message}"),
            log::Level::Debug => tracing::debug!(guest, "{message}"),
            log::Level::Info => tracing::info!(guest, "{message}"),
            log::Level::Warn => tracing::warn!(guest, "{message}"),
            log::Level::Error => tracing::error!(guest, "{message}"),
        }
    }
}
