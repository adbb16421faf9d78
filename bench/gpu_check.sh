#!/usr/bin/env bash
# The GPU check of issue #6 (bench/gpu_check.py says what it measures), under 8 minutes on
# one H200: `bash bench/gpu_check.sh [--quick] [--out FILE]`; writes
# bench/results/gpu_check.json unless --out says otherwise.
#
# Python: $PYTHON if set, else the project's .venv if its torch sees a GPU, else python3 (a
# GPU machine's image, whose torch is a CUDA build). The project's .venv holds the CPU
# torch and cannot run this. cuda-python and NVRTC are used where installed; else they are
# installed from wheels in .whl/ (for machines without internet: see
# /work/.library/device/README.md), else from PyPI. The kernels' other Python needs
# (numpy, pytest) are expected there; lmkv_mp's own dependencies (pyzmq, posix_ipc, ...)
# are installed the same way where missing (the worker tests start a real sidecar).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
py=""
for cand in "${PYTHON:-}" .venv/bin/python python3; do
    [ -n "$cand" ] || continue
    if "$cand" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        py=$cand
        break
    fi
done
if [ -z "$py" ]; then
    echo "gpu_check: no Python whose torch sees a CUDA GPU (set PYTHON to one with a torch CUDA build)" >&2
    exit 2
fi
site=${TMPDIR:-/tmp}/lmkv-gpu-site
# ensure CHECK WHAT PKG...: where `python -c CHECK` fails, install into $site from the wheels
# in .whl/ if any, else PKG... from PyPI, and check again.
ensure() {
    local check=$1 what=$2
    shift 2
    "$py" -c "$check" 2>/dev/null && return 0
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
    else
        "$py" -m pip install -q --target "$site" "$@"
    fi
    case ":${PYTHONPATH:-}:" in *":$site:"*) ;; *) export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} ;; esac
    "$py" -c "$check" || { echo "gpu_check: $what could not be imported" >&2; exit 2; }
}
ensure 'import cuda.bindings.driver, cuda.bindings.nvrtc as n; assert n.nvrtcVersion()[0] == 0' \
    "cuda-python with NVRTC" 'cuda-python>=12' nvidia-cuda-nvrtc
# tests/gpu/test_cuda_path_gpu.py starts a real sidecar and clients: lmkv_mp's own
# dependencies, where the image lacks them.
ensure 'import zmq, msgpack, posix_ipc, xxhash, prometheus_client, redis, hypothesis' \
    "lmkv_mp's dependencies" pyzmq msgpack posix_ipc xxhash prometheus-client redis hypothesis
# nvcc's cubins for this GPU (kernels.py prefers them; tests/gpu also checks NVRTC's).
if command -v nvcc >/dev/null; then
    cc=$("$py" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(a * 10 + b)')
    ARCHS="$cc" bash lmkv_mp/engine/cuda/build.sh
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$py" bench/gpu_check.py "$@"
echo "gpu_check: done in $(( $(date +%s) - start ))s" >&2
