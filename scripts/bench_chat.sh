#!/usr/bin/env bash
# Chat at scale over /v1/chat/completions (the prefix cache and the KV pool of
# engine/BENCHMARKS.md): rbee-host with and without --no-prefix-cache and llama-server (its
# default cache_prompt) on the same GGUF, in turns, one command:
#   scripts/bench_chat.sh [MODEL.gguf]      (default: SmolLM2-135M-Instruct, fetched if absent)
# Workloads (WORKLOADS, default all): a 12-turn conversation (TTFT per turn), 8 clients
# sharing an ~800-token system prompt (TTFT p50/p95, tokens/s, prefix hits), 16 chats without
# max_tokens (how many run at once, tokens/s over WINDOW seconds); REPEATS passes (default 2),
# medians reported. llama-server: LLAMA_SERVER=PATH, else ../shared/tools/build-llama-server.sh
# builds it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
model=${1:-$("$root/scripts/fetch-model.sh")}
llama=${LLAMA_SERVER:-$("$root/../shared/tools/build-llama-server.sh")}

# The workspace's feature set, as scripts/test.sh and serve.sh build it (`-p rbee-host`
# alone resolves other features and builds the whole tree a second time).
cargo build -q --workspace --bins --examples
"${CARGO_TARGET_DIR:-$root/target}/debug/examples/bench_chat" --model "$model" \
    --llama-server "$llama" --repeats "${REPEATS:-2}" --window "${WINDOW:-30}" \
    --workloads "${WORKLOADS:-conversation,shared-prompt,no-max-tokens}"
