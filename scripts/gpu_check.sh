#!/usr/bin/env bash
# The GPU check (issue 21): rbee-host --device gpu against transformers on the same random-weight
# Llama models, made on the GPU machine itself, which has torch and transformers but no network.
# Two halves:
#   scripts/gpu_check.sh prepare   here: builds rbee-host and fills .gpu-check/ (ignored) with what
#                                  the GPU machine lacks: the binary (stripped, xz), the default
#                                  guest, SmolLM2's tokenizer.json (from the GGUF), and the Vulkan
#                                  loader's .debs (~25 MB in all)
#   scripts/gpu_check.sh run       there, from the repository root: unpacks the loader, points it
#                                  at NVIDIA's Vulkan driver and runs scripts/gpu_check.py
# With the device tool: command "scripts/gpu_check.sh run", carry [".gpu-check"], timeout_s 400.
# The check prints its table and writes $OUT/gpu_check.json; the workers' logs go to $OUT too.
# LOCAL=1 scripts/gpu_check.sh run: a dry run here, on the tiny fixture (no torch), on lavapipe
# (RBEE_DEVICE=gpu, the default) or the CPU (RBEE_DEVICE=cpu).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir=$root/.gpu-check

case "${1:-}" in
prepare)
    model=$("$root/scripts/fetch-model.sh")
    target=${CARGO_TARGET_DIR:-$root/target}
    # The workspace's feature set, as scripts/test.sh builds it (`-p rbee-host` alone
    # resolves other features and builds the tree again).
    cargo build -q --workspace --bins --examples
    rm -rf "$dir" && mkdir -p "$dir/gl"
    strip -o "$dir/rbee-host" "$target/debug/rbee-host"
    xz -T2 -6 -f "$dir/rbee-host"
    cp guests/llm.wasm "$dir/"
    "$target/debug/examples/gguf_tokenizer" "$model" "$dir/tokenizer.json"
    # NVIDIA's Vulkan driver is mounted on the GPU machine; the loader and the GL dispatch
    # libraries its ICD links against are not.
    (cd "$dir/gl" && apt-get download -q libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 \
        libgles2 >/dev/null)
    du -sh "$dir"
    ;;
run)
    if [[ ${LOCAL:-} != 1 ]]; then
        for deb in "$dir"/gl/*.deb; do dpkg -x "$deb" /; done
        ldconfig
        nvidia-smi -L || true
        icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
        if [[ -f $icd ]]; then
            export VK_DRIVER_FILES=$icd
            export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
        fi
    fi
    if [[ -f $dir/rbee-host.xz ]]; then
        xz -dkf "$dir/rbee-host.xz"
        chmod +x "$dir/rbee-host"
    fi
    export OUT=${OUT:-/tmp/gpu-check} PYTHONUNBUFFERED=1
    mkdir -p "$OUT"
    exec timeout "${CHECK_TIMEOUT:-380}" python3 scripts/gpu_check.py
    ;;
*)
    echo "usage: scripts/gpu_check.sh prepare|run (see the comment at its top)" >&2
    exit 2
    ;;
esac
