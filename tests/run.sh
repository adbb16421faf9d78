#!/usr/bin/env bash
# Set up the project's virtualenv (once, see launch/setup-venv.sh) and run the whole test
# suite: `bash tests/run.sh [pytest args]`. The end-to-end tests start real vLLM engines.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. launch/setup-venv.sh
exec python -m pytest "$@"
