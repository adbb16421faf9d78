#!/usr/bin/env bash
# Compile every .cu here with nvcc to a cubin per architecture, failing on any error or
# warning (spills and local memory included): `bash lmkv_mp/engine/cuda/build.sh [OUT_DIR]` (default
# cuda/build, git-ignored). lmkv_mp/engine/kernels.py loads these cubins when their SOURCES.sha256
# matches the sources and the GPU's architecture is among ARCHS; otherwise it compiles with
# NVRTC at first use. CI runs this (no GPU needed).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
archs=${ARCHS:-"80 90"}
nvcc=${NVCC:-nvcc}
command -v "$nvcc" >/dev/null || { echo "build.sh: $nvcc not found: install the CUDA toolkit (nvcc) or set NVCC" >&2; exit 127; }
mkdir -p "$out"
start=$(date +%s%N)
for src in "$here"/*.cu; do
    op=$(basename "$src" .cu)
    for arch in $archs; do
        "$nvcc" -arch="sm_$arch" --cubin -O3 -std=c++17 -lineinfo -Werror all-warnings \
            -Xptxas -warn-spills,-warn-lmem-usage -o "$out/$op.sm_$arch.cubin" "$src"
    done
done
# The hash kernels.source_hash() computes: the sources' bytes, in file-name order.
(cd "$here" && LC_ALL=C ls -- *.cu *.cuh | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1) > "$out/SOURCES.sha256"
ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "cuda/build.sh: $(cd "$here" && echo *.cu) for sm_${archs// /,sm_} in $((ms / 1000)).$((ms % 1000 / 100))s -> $out"
