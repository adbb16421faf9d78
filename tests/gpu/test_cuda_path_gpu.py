"""The worker's GPU copy path (cuda_path.py) on a GPU, against a real sidecar: a CUDA worker
stores chunks that another CUDA worker and a CPU worker load byte-identically; the host pool
is pinned while used and unpinned at close; a store waits for the engine's queued writes.
Skipped without a GPU (bench/gpu_check.sh runs these on one)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from lmkv_mp.engine.cuda_path import CudaHostPath
from lmkv_mp.integration.plan import LoadJob, StoreJob
from lmkv_mp.wire.keys import chain_hashes
from lmkv_mp.engine.paged import PagedKV
# bench/gpu_check.py runs tests/gpu with --noconftest: the fixtures come in by name.
from tests.conftest import SidecarHandle, procs, sidecar  # noqa: F401
from tests.integration.test_vllm_worker import BLOCK, BPC, CHUNK, NB, NS, blocks, cache, plan, worker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="NO GPU: these tests did not run (tests/gpu needs an NVIDIA GPU; "
                              "bench/gpu_check.sh runs them on one)"),
]


@pytest.fixture
def handle(sidecar: Callable[..., SidecarHandle]) -> SidecarHandle:
    return sidecar()


def on_gpu(seed: int) -> PagedKV:
    """``cache(seed)`` (vLLM's CPU layout: views of one buffer) with the same bytes on the GPU."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randint(0, 100, (2 * NB * 2 * BLOCK * 64,), generator=g).to(torch.bfloat16).cuda()
    n = NB * 2 * BLOCK * 64
    return PagedKV([buf[i * n:(i + 1) * n].view(NB, 2, BLOCK, 64) for i in range(2)], num_blocks=NB)


def store(handle: SidecarHandle, paged: PagedKV, hashes: bytes, ids: list[int]) -> None:
    w = worker(handle, paged)
    assert not w.disabled, w.disabled
    w.submit_stores(plan(stores=[StoreJob("s", hashes, ids)]))
    w.wait_for_inflight()
    assert w.stats["store_chunks"] == len(ids) // BPC and w.stats["store_failures"] == 0
    w.close()


def load(handle: SidecarHandle, paged: PagedKV, hashes: bytes, dst: list[int]) -> None:
    key = handle.client("scheduler")
    found = key.lookup([NS], hashes, pin=True)
    assert found.hits == len(dst) // BPC
    w = worker(handle, paged)
    w.submit_loads(plan(loads=[LoadJob("l", found.boot_id, [found.offsets[0].tolist()], [], dst, 0,
                                       lease_id=found.lease_id)]))
    w.wait_for_inflight()
    assert w.load_errors() == set() and w.stats["load_chunks"] == len(dst) // BPC
    key.release(found.lease_id)
    w.close()


def hashes_for(handle: SidecarHandle, n: int, salt: int) -> bytes:
    key = handle.client("scheduler")
    assert key.connect()
    return chain_hashes([salt + t for t in range(n * CHUNK)], CHUNK, key.hello.hash_key)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.cpu().view(torch.int16), y.cpu().view(torch.int16)) for x, y in zip(a, b))


def test_gpu_worker_stores_what_gpu_and_cpu_workers_load(handle: SidecarHandle) -> None:
    src, gpu_dst, cpu_dst = on_gpu(1), on_gpu(2), cache(3)
    hashes = hashes_for(handle, 3, 0)
    ids = [7, 3, 12, 13, 0, 31]  # scattered and consecutive runs
    store(handle, src, hashes, ids)
    dst = list(range(20, 20 + 3 * BPC))
    load(handle, gpu_dst, hashes, dst)
    load(handle, cpu_dst, hashes, dst)
    assert same(blocks(gpu_dst, dst), blocks(src, ids))
    assert same(blocks(cpu_dst, dst), blocks(src, ids))


def test_cpu_worker_stores_what_a_gpu_worker_loads(handle: SidecarHandle) -> None:
    src, dst_cache = cache(4), on_gpu(5)
    hashes = hashes_for(handle, 2, 1000)
    store(handle, src, hashes, list(range(4)))
    load(handle, dst_cache, hashes, [9, 8, 30, 31])
    assert same(blocks(dst_cache, [9, 8, 30, 31]), blocks(src, list(range(4))))


def test_host_pool_is_pinned_while_used_and_unpinned_at_close(handle: SidecarHandle) -> None:
    w = worker(handle, on_gpu(6))
    w.submit_stores(plan(stores=[StoreJob("p", hashes_for(handle, 1, 2000), [0, 1])]))
    w.wait_for_inflight()
    host = w.client.host_tensor()
    assert host is not None and host.is_pinned()
    assert isinstance(w.path, CudaHostPath) and host.data_ptr() in w.path._pinned
    view = host[:16].clone()  # the mapping stays mapped while this test holds ``host``
    w.path.close()
    assert not host.is_pinned() and torch.equal(host[:16], view)
    w.close()


def test_a_store_waits_for_the_engines_queued_writes(handle: SidecarHandle) -> None:
    """The engine writes the blocks behind a long GPU sleep and submits the store at once:
    the stored chunk must hold the new bytes, not those before the write."""
    paged = on_gpu(7)
    w = worker(handle, paged)
    hashes = hashes_for(handle, 1, 3000)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the engine's (current) stream
    for p in paged.parts:
        p[[4, 5]] = 7.0
    w.submit_stores(plan(stores=[StoreJob("e", hashes, [4, 5])]))
    w.wait_for_inflight()
    w.close()
    dst = on_gpu(8)
    load(handle, dst, hashes, [10, 11])
    assert all(torch.all(p[[10, 11]] == 7.0) for p in dst.parts)
