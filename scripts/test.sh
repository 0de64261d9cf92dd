#!/usr/bin/env bash
# The whole test suite, as CI runs it: builds every guest (guests/build.sh), then runs the
# unit, engine and end-to-end tests of the workspace. Extra arguments go to `cargo test`.
# Tests that need SmolLM2 run when scripts/fetch-model.sh has fetched it, and say so when not.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
guests/build.sh
# End-to-end tests start real workers; two at a time keeps a 2-core machine responsive enough
# for the timing checks (heartbeat cadence, grace periods).
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
cargo test --workspace "$@"
