"""The sidecar's GPU tier on a GPU (#6): a sidecar process with ``--gpu-pool-size`` and two
worker processes on one GPU share chunks through it, byte-identical.

This test process is the writer (a CUDA worker: its RESERVE gets GPU tier slots, it fills
them and the host slots); ``gpu_tier_loader.py`` is the reader, another process on the same
GPU, which maps the region through its CUDA IPC handle and scatters from the copies device
to device. A CPU worker reads the same chunks from the host slots. Skipped without a GPU
(bench/gpu_check.sh runs these on one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from lmkv_mp.engine.cuda_path import CudaHostPath
from lmkv_mp.integration.plan import StoreJob
from lmkv_mp.wire.keys import chain_hashes
# bench/gpu_check.py runs tests/gpu with --noconftest: the fixtures come in by name.
from tests.conftest import SidecarHandle, clean_env, procs, sidecar  # noqa: F401
from tests.gpu.test_cuda_path_gpu import load, on_gpu, same
from tests.integration.test_vllm_worker import BPC, CHUNK, NS, blocks, cache, plan, worker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="NO GPU: these tests did not run (tests/gpu needs an NVIDIA GPU; "
                              "bench/gpu_check.sh runs them on one)"),
]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def handle(sidecar: Callable[..., SidecarHandle]) -> SidecarHandle:
    return sidecar("--gpu-pool-size", "64MiB", "--gpu-devices", str(torch.cuda.current_device()))


def test_two_worker_processes_share_chunks_through_the_gpu_tier(handle: SidecarHandle, tmp_path: Path) -> None:
    src = on_gpu(41)
    key = handle.client("scheduler")
    assert key.connect()
    assert any(r.kind == "cuda" for r in key.hello.regions), "the sidecar announces its GPU region"
    hashes = chain_hashes([5000 + t for t in range(3 * CHUNK)], CHUNK, key.hello.hash_key)
    ids = [7, 3, 12, 13, 0, 31]
    w = worker(handle, src)
    assert not w.disabled, w.disabled
    w.submit_stores(plan(stores=[StoreJob("s", hashes, ids)]))
    w.wait_for_inflight()
    assert w.stats["store_chunks"] == 3 and w.stats["store_failures"] == 0

    found = key.lookup([NS], hashes, pin=True)
    assert found.hits == 3 and found.gpu_regions[0].tolist() == [1, 1, 1], "every chunk has a GPU copy"
    assert isinstance(w.path, CudaHostPath) and len(w.path._gpu_maps) == 1, "the writer mapped the region"
    (mapping,) = w.path._gpu_maps.values()
    host = w.client.host_tensor()
    assert host is not None
    nbytes = src.chunk_bytes(BPC)
    for off, goff in zip(found.offsets[0].tolist(), found.gpu_offsets[0].tolist()):
        assert torch.equal(mapping.tensor[goff:goff + nbytes].cpu(), host[off:off + nbytes]), \
            "the GPU copy holds the host slot's bytes"
    key.release(found.lease_id)

    out = tmp_path / "loaded.pt"
    proc = subprocess.run([sys.executable, "-m", "tests.gpu.gpu_tier_loader", str(handle.run_dir), hashes.hex(),
                           str(out)], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loaded = torch.load(out)
    assert loaded["mapped"] == 1, "the reader mapped the region and read the copies device to device"
    assert same(loaded["blocks"], blocks(src, ids))

    cpu_dst = cache(42)
    dst = list(range(20, 20 + 3 * BPC))
    load(handle, cpu_dst, hashes, dst)
    assert same(blocks(cpu_dst, dst), blocks(src, ids)), "a CPU worker reads the host slots"
    w.close()
    stats = key.stats()["tiers"]
    gpu = next(v for k, v in stats.items() if k.startswith("gpu"))
    assert gpu["entries"] == 3 and gpu["hit_chunks"] >= 4
