#!/usr/bin/env bash
# Structured output's cost (engine/BENCHMARKS.md): chat answers with and without a JSON-schema
# response_format, on rbee-host and llama-server (--jinja, the same schema), same GGUF, in
# turns, one command:
#   scripts/bench_structured.sh [MODEL.gguf]   (default: SmolLM2-135M-Instruct, fetched if absent)
# CLIENTS (default 1,4); REPEATS passes (default 2), medians reported. llama-server:
# LLAMA_SERVER=PATH, else ../shared/tools/build-llama-server.sh builds it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
model=${1:-$("$root/scripts/fetch-model.sh")}
llama=${LLAMA_SERVER:-$("$root/../shared/tools/build-llama-server.sh")}

# The workspace's feature set, as scripts/test.sh and serve.sh build it (`-p rbee-host`
# alone resolves other features and builds the whole tree a second time).
cargo build -q --workspace --bins --examples
"${CARGO_TARGET_DIR:-$root/target}/debug/examples/bench_structured" --model "$model" \
    --llama-server "$llama" --repeats "${REPEATS:-2}" --clients "${CLIENTS:-1,4}"
