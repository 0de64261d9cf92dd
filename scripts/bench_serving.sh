#!/usr/bin/env bash
# Serving throughput of rbee-host against llama.cpp's llama-server on the same GGUF, one
# command (the continuous-batching benchmark of engine/BENCHMARKS.md):
#   scripts/bench_serving.sh [MODEL.gguf]      (default: SmolLM2-135M-Instruct, fetched if absent)
# Both workloads — short prompts (8–38 tokens) that generate 128 tokens, long ones (320–1520)
# that generate 64 —
# at CLIENTS concurrent streaming clients (default 1,2,4,8), in REPEATS passes (default 3) that
# each measure every client count on both servers in turn, the medians reported; prints the
# tables and JSON lines and draws each workload into
# $OUT/serving-{short,long}.svg (default target/bench-serving).
# llama-server: LLAMA_SERVER=PATH, else ../shared/tools/build-llama-server.sh builds it (native
# flags; on a CPU that advertises features its VM does not enable, e.g. AMX, build llama.cpp with
# -DGGML_NATIVE=OFF -DGGML_AVX2=ON and pass LLAMA_SERVER).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
model=${1:-$("$root/scripts/fetch-model.sh")}
llama=${LLAMA_SERVER:-$("$root/../shared/tools/build-llama-server.sh")}
out=${OUT:-$root/target/bench-serving}
mkdir -p "$out"

# The workspace's feature set, as scripts/test.sh and serve.sh build it (`-p rbee-host`
# alone resolves other features and builds the whole tree a second time).
cargo build -q --workspace --bins --examples
bench="${CARGO_TARGET_DIR:-$root/target}/debug/examples/bench_serving"
common=(--model "$model" --llama-server "$llama" --clients "${CLIENTS:-1,2,4,8}" --rounds "${ROUNDS:-2}"
        --repeats "${REPEATS:-3}")

"$bench" "${common[@]}" --tokens 128 --plot "$out/serving-short.svg"
"$bench" "${common[@]}" --long-prompts --plot "$out/serving-long.svg"
