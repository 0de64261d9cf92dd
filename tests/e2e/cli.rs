//! Out-of-range command-line values: the real binary refuses them at start, naming the flag
//! and what is wrong, before it loads anything or opens a port.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{guest, tiny_model};

/// Runs `rbee-host` with `args` (and a valid guest and model) and returns its exit status
/// and stderr; a worker that started instead of refusing is killed and fails the test.
fn refused(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rbee-host"))
        .arg("--guest")
        .arg(guest("llm"))
        .arg("--model")
        .arg(tiny_model())
        .args([
            "--device",
            "cpu",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--no-cache",
        ])
        .args(args)
        .env_remove("RBEE_ADMIN_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot start rbee-host");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            return (status.code().unwrap_or(-1), stderr);
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("rbee-host {args:?} started instead of refusing the value");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn out_of_range_values_are_refused_at_start() {
    for (args, flag, message) in [
        (
            &["--heartbeat-interval", "0"][..],
            "--heartbeat-interval",
            "positive number of seconds",
        ),
        (
            &["--heartbeat-interval", "1e30"],
            "--heartbeat-interval",
            "too long",
        ),
        (
            &["--guest-timeout", "0"],
            "--guest-timeout",
            "positive number of seconds",
        ),
        (&["--guest-timeout", "1e12"], "--guest-timeout", "too long"),
        // Rounds to a zero Duration: tokio's interval panicked on it.
        (
            &["--heartbeat-interval", "1e-12"],
            "--heartbeat-interval",
            "shorter than a nanosecond",
        ),
        (
            &["--shutdown-grace", "NaN"],
            "--shutdown-grace",
            "positive number of seconds",
        ),
        // 2^44 MiB × 2^20 wraps a u64 to 0: it used to become a guest memory limit of 0.
        (
            &["--guest-memory-mb", "17592186044416"],
            "--guest-memory-mb",
            "not in 1..=4096",
        ),
        (
            &["--guest-memory-mb", "0"],
            "--guest-memory-mb",
            "not in 1..=4096",
        ),
        (&["--max-body-kb", "0"], "--max-body-kb", "out of range"),
        // × 1024 overflows a usize: a panic (debug) or a wrapped limit (release) before.
        (
            &["--max-body-kb", "18014398509481984"],
            "--max-body-kb",
            "out of range",
        ),
        (
            &["--max-concurrent", "0"],
            "--max-concurrent",
            "not in 1..=256",
        ),
        (
            &["--queue-size", "4000000000"],
            "--queue-size",
            "not in 0..=65536",
        ),
        (&["--draft-max", "0"], "--draft-max", "not in 1..=64"),
        (&["--kv-cache-type", "q8_0"], "--kv-cache-type", "f32, f16"),
        (
            &["--draft-length", "always"],
            "--draft-length",
            "measured, max",
        ),
        (
            &["--kv-budget-tokens", "0"],
            "--kv-budget-tokens",
            "not in 1..=",
        ),
        (
            &["--admin-token", ""],
            "--admin-token",
            "the token is empty",
        ),
        (&["--admin-token", "a b"], "--admin-token", "whitespace"),
        (&["--worker-id", " "], "--worker-id", "must not be empty"),
    ] {
        let (code, stderr) = refused(args);
        assert_ne!(code, 0, "{args:?} exited 0");
        assert!(
            stderr.contains(flag) && stderr.contains(message),
            "{args:?}: stderr does not name {flag} and say {message:?}:\n{stderr}"
        );
    }
}
