#!/usr/bin/env bash
# The engine's CPU speed against llama.cpp and PyTorch eager on the same GGUF, one command:
#   scripts/bench.sh [MODEL.gguf]        (default: SmolLM2-135M-Instruct, fetched if absent)
# Needs python packages torch, transformers, gguf, accelerate and (optional) llama-cpp-python;
# set PYTHON to the interpreter that has them. Prints each engine's JSON line, then ratios.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
model=${1:-$("$root/scripts/fetch-model.sh")}
py=${PYTHON:-python3}
args=(--prompt-tokens "${PROMPT_TOKENS:-128}" --new-tokens "${NEW_TOKENS:-64}")
out=$(mktemp)
trap 'rm -f "$out"' EXIT

# The workspace's feature set, as scripts/test.sh and serve.sh build it (`-p rbee-engine`
# alone resolves other features and builds the whole tree a second time).
cargo build -q --workspace --bins --examples
bench="${CARGO_TARGET_DIR:-$root/target}/debug/examples/bench"
"$bench" --model "$model" --weights auto "${args[@]}" | tail -1 | tee -a "$out"
"$bench" --model "$model" --weights f32 "${args[@]}" | tail -1 | tee -a "$out"
# One process per baseline, so each peak-memory figure is its own.
"$py" scripts/bench_baseline.py "$model" --only llama.cpp "${args[@]}" | tee -a "$out" || true
"$py" scripts/bench_baseline.py "$model" --only transformers "${args[@]}" | tee -a "$out" || true

"$py" - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ours = {r["weights"]: r for r in rows if r["engine"] == "rbee-engine"}
base = {r["engine"]: r for r in rows if r["engine"] != "rbee-engine"}
for w, r in ours.items():
    print(f"rbee-engine ({w}): prefill {r['prefill_tps']:.1f} tok/s, decode {r['decode_tps']:.1f} tok/s, peak {r['peak_rss_mb']:.0f} MB")
    for name, b in base.items():
        print(f"  vs {name}: prefill x{r['prefill_tps'] / b['prefill_tps']:.2f}, decode x{r['decode_tps'] / b['decode_tps']:.2f}"
              f" ({name}: {b['prefill_tps']:.1f} / {b['decode_tps']:.1f} tok/s, peak {b['peak_rss_mb']:.0f} MB)")
PY
