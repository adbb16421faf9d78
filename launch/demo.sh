#!/usr/bin/env bash
# Set up the virtualenv (once) and run the end-to-end demo: a sidecar and two real vLLM
# (CPU) engines sharing KV over a multi-turn conversation, their answers checked bit for bit
# against the same computation without lmkv (exit 1 if one differs). Arguments go to the
# demo (`--turns N`, `--keep`, ...; see `python -m lmkv_mp.demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. launch/setup-venv.sh
exec python -m lmkv_mp.demo "$@"
