//! Wall-clock timestamps as the queen and the admin endpoints show them. A neutral module so
//! that the heartbeat and the guest runtime do not borrow it from each other.

use std::time::SystemTime;

/// Now, as RFC 3339 with milliseconds (`2025-01-31T12:00:00.123Z`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
