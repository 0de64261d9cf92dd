#!/usr/bin/env bash
# The whole test suite, as CI runs it: checks that no two source files import each other
# (scripts/check_imports.py), builds every guest (guests/build.sh), then runs the guests' unit
# tests and the unit, engine and end-to-end tests of the workspace. Extra arguments go to
# `cargo test`.
#
# Tests that need SmolLM2 are `#[ignore = "needs SmolLM2 ..."]`: a plain `cargo test` lists
# them as ignored. When scripts/fetch-model.sh has fetched the model, this script runs them too
# (`--include-ignored`); when it has not, they stay ignored and cargo's summary counts them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# Structure first, it takes a second: no two source files may import each other.
python3 scripts/check_imports.py
guests/build.sh
# End-to-end tests start real workers; two at a time keeps a 2-core machine responsive enough
# for the timing checks (heartbeat cadence, grace periods).
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
args=("$@")
# The guests' own unit tests (the llm guest's chat templates against transformers'
# renderings) run natively, outside WebAssembly.
(cd guests && cargo test --quiet -p llm)
if [[ -s models/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
    # The OpenAI-route test runs the official openai Python client (and prometheus-client).
    RBEE_TEST_PYTHON="${RBEE_TEST_PYTHON:-$(scripts/python-clients.sh)}"
    export RBEE_TEST_PYTHON
    # After the caller's own `--`, if any: everything after it goes to the test binaries.
    separator=(--)
    for arg in "$@"; do [[ $arg == -- ]] && separator=(); done
    args+=("${separator[@]}" --include-ignored)
else
    echo "test.sh: models/SmolLM2-135M-Instruct.Q4_1.gguf is absent (scripts/fetch-model.sh):" \
        "the tests that need it are ignored" >&2
fi
cargo test --workspace "${args[@]}"
