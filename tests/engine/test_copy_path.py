"""engine/copy_path.py: the CPU copy path keeps the CopyPath contract (a store puts each chunk's
bytes in its host slot and GPU slot, a load reads a chunk from its GPU slot where given), and
both paths of the package have every member of the protocol. The CUDA path's copies run in
tests/gpu/test_cuda_path_gpu.py."""

from __future__ import annotations

import inspect

import pytest
import torch

from lmkv_mp.engine.copy_path import CopyPath, CpuPath, LoadChunk, StoreChunk
from lmkv_mp.engine.cuda_path import CudaHostPath
from tests.engine.test_paged import block, make, same


def protocol_members(proto: type) -> set[str]:
    return {n for n in (*proto.__dict__, *proto.__annotations__) if not n.startswith("_")}


@pytest.mark.parametrize("path_type", [CpuPath, CudaHostPath])
def test_each_path_has_every_member_of_the_protocol(path_type: type) -> None:
    members = protocol_members(CopyPath)
    assert {"device_uuid", "store", "load", "engine_event", "gpu_region", "drop_stale_regions", "close"} <= members
    for name in members - {"device_uuid"}:  # CudaHostPath sets device_uuid per device
        ours, theirs = inspect.signature(getattr(path_type, name)), inspect.signature(getattr(CopyPath, name))
        assert list(ours.parameters)[:len(theirs.parameters)] == list(theirs.parameters), name


def test_the_cpu_path_stores_into_host_and_gpu_slots_and_loads_from_either() -> None:
    src, dst = make("cpu-views", torch.bfloat16, seed=31), make("cpu-views", torch.bfloat16, seed=32)
    nbytes = src.chunk_bytes(2)
    host = torch.zeros(3 * nbytes, dtype=torch.uint8)
    gpu_slot = torch.zeros(nbytes, dtype=torch.uint8)
    path = CpuPath(src, copy_threads=2)
    assert path.device_uuid == b"" and path.engine_event() is None and path.threads.total == 2
    path.store(host, [StoreChunk([3, 4], 0, None), StoreChunk([7, 1], 2 * nbytes, gpu_slot)], nbytes, None)
    assert torch.equal(gpu_slot, host[2 * nbytes:]), "the GPU slot holds the chunk's bytes too"
    into = CpuPath(dst)
    host[2 * nbytes:] = 0  # a load given a GPU slot reads that, not the host slot
    into.load(host, [LoadChunk(0, [10], 1, 2, None), LoadChunk(2 * nbytes, [20, 21], 0, 2, gpu_slot)], nbytes, None)
    for got, want in [(10, 4), (20, 7), (21, 1)]:
        assert same(block(dst, got), block(src, want))
    assert path.gpu_region(None) is None and path.drop_stale_regions([b"u" * 16]) == 0  # type: ignore[arg-type]
    path.close()
    into.close()


def test_the_cpu_path_refuses_a_cache_on_another_device() -> None:
    paged = make("cpu-views", torch.bfloat16, seed=33)
    paged.device = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="host memory"):
        CpuPath(paged)
