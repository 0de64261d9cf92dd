//! `log`: a guest's log lines, into the worker's `tracing` output tagged with the guest's name.
//!
//! The guest is untrusted and the log is read by people and machines that trust it, so a
//! guest line is made harmless before it is written: control characters (newlines, carriage
//! returns, terminal escapes) are escaped, so one guest call is one line and cannot forge a
//! host line; a line is cut to [`MAX_LINE_BYTES`], saying how much was dropped; and a request
//! may log at most [`BURST`] lines at once and [`LINES_PER_SECOND`] after that (a token
//! bucket), the excess dropped and said once.

use std::sync::Arc;
use std::time::Instant;

use crate::guest::bindings::log;

/// Longest guest message written, in bytes of the escaped text.
const MAX_LINE_BYTES: usize = 4096;

/// Lines a request may log at once before the rate applies.
const BURST: f64 = 64.0;

/// Lines per second a request may log in the long run.
const LINES_PER_SECOND: f64 = 16.0;

/// One request's log allowance: a token bucket (a few lines of arithmetic; a rate-limiting
/// crate would bring its own clock and locking for one counter that lives in one store).
struct LogBudget {
    tokens: f64,
    refilled: Instant,
    dropped: u64,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self {
            tokens: BURST,
            refilled: Instant::now(),
            dropped: 0,
        }
    }
}

impl LogBudget {
    /// Takes one line from the allowance; false when the line must be dropped.
    fn take(&mut self, now: Instant) -> bool {
        let earned = now.duration_since(self.refilled).as_secs_f64() * LINES_PER_SECOND;
        self.tokens = (self.tokens + earned).min(BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    /// Lines dropped so far in this request.
    fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// `message` as one harmless line: control characters and Unicode line and paragraph
/// separators escaped (`\n`, `\u{1b}`), cut at [`MAX_LINE_BYTES`] with a note of the bytes of
/// the original message left out.
fn one_line(message: &str) -> String {
    let mut line = String::with_capacity(message.len().min(MAX_LINE_BYTES) + 48);
    for (at, c) in message.char_indices() {
        let before = line.len();
        if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
            line.extend(c.escape_debug());
        } else {
            line.push(c);
        }
        if line.len() > MAX_LINE_BYTES {
            line.truncate(before);
            line.push_str(&format!("… [{} more bytes dropped]", message.len() - at));
            break;
        }
    }
    line
}

/// The `log` capability of one request: whose lines they are and how many more it may write.
/// It touches nothing else, so it is its own host (`HasSelf<LogCtx>`).
pub struct LogCtx {
    guest: Arc<str>,
    budget: LogBudget,
}

impl LogCtx {
    /// A fresh allowance for a request of guest `guest`.
    pub fn new(guest: Arc<str>) -> Self {
        Self {
            guest,
            budget: LogBudget::default(),
        }
    }
}

impl log::Host for LogCtx {
    fn log(&mut self, level: log::Level, message: String) {
        let guest = &*self.guest;
        if !self.budget.take(Instant::now()) {
            if self.budget.dropped() == 1 {
                tracing::warn!(
                    guest,
                    "the guest logs more than {LINES_PER_SECOND} lines per second: \
                     further lines of this request are dropped while it does"
                );
            }
            return;
        }
        let message = one_line(&message);
        match level {
            log::Level::Trace => tracing::trace!(guest, "{message}"),
            log::Level::Debug => tracing::debug!(guest, "{message}"),
            log::Level::Info => tracing::info!(guest, "{message}"),
            log::Level::Warn => tracing::warn!(guest, "{message}"),
            log::Level::Error => tracing::error!(guest, "{message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_message_is_one_line() {
        let line = one_line("ok\nERROR rbee_host: forged\r\x1b[31mred\u{2028}x\ty");
        assert_eq!(
            line,
            "ok\\nERROR rbee_host: forged\\r\\u{1b}[31mred\\u{2028}x\\ty"
        );
        assert!(!line.chars().any(char::is_control));
        assert_eq!(one_line("plain \"text\" ünïcode"), "plain \"text\" ünïcode");
    }

    #[test]
    fn a_long_message_is_cut_saying_how_much() {
        let line = one_line(&"é".repeat(1 << 20));
        assert!(line.len() <= MAX_LINE_BYTES + 48, "{}", line.len());
        let kept = MAX_LINE_BYTES / 2;
        assert!(
            line.ends_with(&format!("… [{} more bytes dropped]", (2 << 20) - 2 * kept)),
            "{}",
            &line[line.len() - 60..]
        );
        // Escapes count against the cap too.
        assert!(one_line(&"\n".repeat(1 << 20)).len() <= MAX_LINE_BYTES + 48);
    }

    #[test]
    fn the_budget_allows_a_burst_then_the_rate() {
        let mut budget = LogBudget::default();
        let start = budget.refilled;
        let allowed = (0..1000).filter(|_| budget.take(start)).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(budget.dropped(), 1000 - BURST as u64);
        // One second later, a second's worth of lines more.
        let later = start + Duration::from_secs(1);
        let allowed = (0..1000).filter(|_| budget.take(later)).count();
        assert_eq!(allowed, LINES_PER_SECOND as usize);
    }
}
