#!/usr/bin/env bash
# Prints the path of a Python that has the clients users point at an inference server (the
# official `openai` SDK and `prometheus-client`; `jsonschema` to validate structured output), installing them into a virtual environment
# the first time: ${RBEE_PY_CLIENTS:-~/.cache/rbee-host/py-clients}. The end-to-end test
# `openai_python_client` runs them against the real binary (scripts/test.sh sets it up).
set -euo pipefail
venv="${RBEE_PY_CLIENTS:-$HOME/.cache/rbee-host/py-clients}"
python="$venv/bin/python"
if ! "$python" -c 'import openai, prometheus_client, jsonschema' 2>/dev/null; then
    echo "python-clients.sh: installing openai, prometheus-client and jsonschema into $venv" >&2
    if ! python3 -m venv "$venv" >&2; then
        # Debian's python3 has no venv module without python3-venv.
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2 ||
                { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2; }
        fi
        rm -rf "$venv"
        python3 -m venv "$venv" >&2
    fi
    "$python" -m pip install --quiet --disable-pip-version-check openai prometheus-client jsonschema >&2
fi
echo "$python"
