#!/usr/bin/env bash
# Speculative decoding from the context (engine/BENCHMARKS.md): rbee-host with --speculative
# off and ngram, llama-server plain and with its n-gram drafting, on the same GGUF, in turns,
# one command:
#   scripts/bench_speculative.sh [MODEL.gguf]   (default: SmolLM2-135M-Instruct, fetched if absent)
# Workloads (WORKLOADS, default copy,short,free): input that the answer repeats, the serving
# benchmark's short prompts, prose; CLIENTS (default 1,4); REPEATS passes (default 2), medians
# reported. llama-server: LLAMA_SERVER=PATH, else ../shared/tools/build-llama-server.sh builds
# it; its drafting: LLAMA_SPEC_TYPE (default ngram-simple). BASELINE=PATH adds another
# rbee-host binary (an earlier commit's, copied aside) with --speculative ngram.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
model=${1:-$("$root/scripts/fetch-model.sh")}
llama=${LLAMA_SERVER:-$("$root/../shared/tools/build-llama-server.sh")}

# The workspace's feature set, as scripts/test.sh and serve.sh build it (`-p rbee-host`
# alone resolves other features and builds the whole tree a second time).
cargo build -q --workspace --bins --examples
"${CARGO_TARGET_DIR:-$root/target}/debug/examples/bench_speculative" --model "$model" \
    --llama-server "$llama" --repeats "${REPEATS:-2}" --clients "${CLIENTS:-1,4}" \
    --workloads "${WORKLOADS:-copy,short,free}" \
    --llama-spec-type "${LLAMA_SPEC_TYPE:-ngram-simple}" \
    ${BASELINE:+--baseline-rbee-host "$BASELINE"}
