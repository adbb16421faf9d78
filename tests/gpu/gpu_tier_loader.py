"""The reader process of tests/gpu/test_gpu_tier_gpu.py: ``python -m tests.gpu.gpu_tier_loader
RUN_DIR HASHES_HEX OUT``. A CUDA worker of its own (its own CUDA context, so the GPU tier
region is mapped through its IPC handle, as a vLLM rank's would be) pins the chunks with a
LOOKUP, loads them into blocks 20.. of a fresh cache and saves those blocks, and how many
GPU tier regions it mapped, to OUT."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmkv_mp.engine.client import SidecarClient
from lmkv_mp.engine.cuda_path import CudaHostPath
from lmkv_mp.integration.plan import LoadJob
from lmkv_mp.integration.vllm_worker import WorkerSide
from tests.conftest import client_config
from tests.gpu.test_cuda_path_gpu import on_gpu
from tests.integration.test_vllm_worker import BPC, NS, blocks, plan


def main(run_dir: Path, hashes: bytes, out: Path) -> int:
    key = SidecarClient(client_config(run_dir), role="scheduler")
    paged = on_gpu(43)
    w = WorkerSide(SidecarClient(client_config(run_dir), role="worker"), paged, 0, paged.chunk_bytes(1))
    try:
        found = key.lookup([NS], hashes, pin=True)
        n = len(hashes) // 16
        if found.hits != n or not found.gpu_regions:
            print(f"lookup found {found.hits} of {n} chunks, GPU copies {found.gpu_regions}", file=sys.stderr)
            return 1
        dst = list(range(20, 20 + n * BPC))
        w.submit_loads(plan(loads=[LoadJob("l", found.boot_id, [found.offsets[0].tolist()], [], dst, 0, hashes,
                                           found.lease_id, [found.gpu_regions[0].tolist()],
                                           [found.gpu_offsets[0].tolist()])]))
        w.wait_for_inflight()
        if w.load_errors() or w.stats["load_chunks"] != n:
            print(f"load failed: {w.stats}", file=sys.stderr)
            return 1
        assert isinstance(w.path, CudaHostPath)
        torch.save({"mapped": len(w.path._gpu_maps), "blocks": [b.cpu() for b in blocks(paged, dst)]}, out)
        key.release(found.lease_id)
        return 0
    finally:
        w.close()
        key.close()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), Path(sys.argv[3])))
