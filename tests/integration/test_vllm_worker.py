"""The connector's worker half against a real sidecar: a store job lands in the pool, a load
job scatters it byte-identically into other blocks, and every doubt (stale boot id, a layout
that does not match the KV spec) becomes a reported load error, never wrong blocks."""

from __future__ import annotations

import logging
from typing import Any, Callable

import pytest
import torch

from lmkv_mp.integration.plan import LoadJob, StepPlan, StoreJob
from lmkv_mp.integration.vllm_worker import WorkerSide
from lmkv_mp.wire.keys import chain_hashes
from lmkv_mp.engine.copy_path import CpuPath
from lmkv_mp.engine.paged import PagedKV
from tests.conftest import SidecarHandle

NB, BLOCK, CHUNK = 40, 32, 64
BPC = CHUNK // BLOCK
NS = bytes(range(16))


def cache(seed: int) -> PagedKV:
    """vLLM CPU layout: per layer [blocks, heads, block, 2*head] views of one buffer."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randint(0, 100, (2 * NB * 2 * BLOCK * 64,), generator=g).to(torch.bfloat16)
    return PagedKV([buf[i * NB * 4096:(i + 1) * NB * 4096].view(NB, 2, BLOCK, 64) for i in range(2)], num_blocks=NB)


def plan(loads: list[LoadJob] = (), stores: list[StoreJob] = ()) -> StepPlan:
    return StepPlan(CHUNK, BLOCK, [NS], ["test"], list(loads), list(stores))


def blocks(paged: PagedKV, ids: list[int]) -> list[torch.Tensor]:
    return [p[ids].clone() for p in paged.parts]


@pytest.fixture
def handle(sidecar: Callable[..., SidecarHandle]) -> SidecarHandle:
    return sidecar()


def worker(handle: SidecarHandle, paged: PagedKV, expected: int | None = None, **overrides: Any) -> WorkerSide:
    return WorkerSide(handle.client("worker", **overrides), paged, 0,
                      paged.chunk_bytes(1) if expected is None else expected)


@pytest.mark.parametrize("copy_threads", [1, 2])
def test_store_then_load_into_other_blocks(handle: SidecarHandle, copy_threads: int) -> None:
    """Also with lmkv.copy_threads = 2: each chunk's copy split over two threads."""
    a, b = cache(1), cache(2)
    wa = worker(handle, a, copy_threads=copy_threads)
    assert isinstance(wa.path, CpuPath) and wa.path.threads.total == copy_threads
    tokens = list(range(3 * CHUNK))
    key = handle.client("scheduler")
    assert key.connect()
    hashes = chain_hashes(tokens, CHUNK, key.hello.hash_key)
    wa.submit_stores(plan(stores=[StoreJob("r1", hashes, list(range(0, 3 * BPC)))]))
    wa.wait_for_inflight()
    assert wa.finished({"r1"}) == ({"r1"}, None)   # store done: vLLM may free r1's blocks

    found = key.lookup([NS], hashes, pin=True)
    assert found.hits == 3
    wb = worker(handle, b, copy_threads=copy_threads)
    dst = list(range(10, 10 + 3 * BPC))
    wb.submit_loads(plan(loads=[LoadJob("r2", found.boot_id, [found.offsets[0].tolist()], [], dst, 0,
                                        lease_id=found.lease_id)]))
    wb.wait_for_inflight()
    assert wb.finished(set()) == (None, {"r2"})
    assert wb.load_errors() == set()
    for got, want in zip(blocks(b, dst), blocks(a, list(range(0, 3 * BPC)))):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    key.release(found.lease_id)


def test_stale_boot_id_is_a_reported_load_error(handle: SidecarHandle) -> None:
    b = cache(3)
    before = blocks(b, [4, 5])
    wb = worker(handle, b)
    assert wb.client.connect()
    wb.submit_loads(plan(loads=[LoadJob("r3", b"another-boot-id!", [[4096]], [], [4, 5], 0)]))
    wb.wait_for_inflight()
    assert wb.load_errors() == {4, 5}
    assert wb.finished(set()) == (None, {"r3"})   # reported done, so vLLM recomputes instead of waiting
    assert all(torch.equal(x, y) for x, y in zip(blocks(b, [4, 5]), before))


def two_chunks_pinned(handle: SidecarHandle, seed: int) -> tuple[Any, Any, WorkerSide]:
    """Two chunks stored by one worker and pinned by a scheduler (its client, the LOOKUP),
    and a second worker to load them."""
    wa = worker(handle, cache(seed))
    key = handle.client("scheduler")
    assert key.connect()
    hashes = chain_hashes(list(range(seed, seed + 2 * CHUNK)), CHUNK, key.hello.hash_key)
    wa.submit_stores(plan(stores=[StoreJob(f"store-{seed}", hashes, list(range(2 * BPC)))]))
    wa.wait_for_inflight()
    found = key.lookup([NS], hashes, pin=True)
    assert found.hits == 2
    return key, found, worker(handle, cache(seed + 1))


def test_a_load_whose_lease_ended_during_the_copy_is_a_load_error(handle: SidecarHandle) -> None:
    """The scheduler's read lease is reaped while the worker copies (the scheduler was frozen
    past the lease timeout): its slots may have been evicted and rewritten under the copy, so
    the rank keeps nothing and vLLM recomputes."""
    key, found, wb = two_chunks_pinned(handle, 5)
    scatter = wb.paged.scatter

    def scatter_then_lose_the_lease(*args: Any, **kw: Any) -> None:
        scatter(*args, **kw)
        key.release(found.lease_id)   # as the reaper would: the lease ends mid-load

    wb.paged.scatter = scatter_then_lose_the_lease  # type: ignore[method-assign]
    dst = list(range(10, 10 + 2 * BPC))
    wb.submit_loads(plan(loads=[LoadJob("r7", found.boot_id, [found.offsets[0].tolist()], [], dst, 0,
                                        lease_id=found.lease_id)]))
    wb.wait_for_inflight()
    assert wb.load_errors() == set(dst)
    assert wb.finished(set()) == (None, {"r7"})
    assert wb.stats["load_chunks"] == 0


def test_a_sidecar_restart_during_the_copy_is_a_load_error(handle: SidecarHandle) -> None:
    """The sidecar is SIGKILLed and restarted while the worker copies: the lease that pinned
    the slots died with it (the new one may even hand out the same lease id), so the rank
    keeps nothing."""
    _key, found, wb = two_chunks_pinned(handle, 7)
    assert wb.client.connect()
    scatter = wb.paged.scatter
    restarted: list[bool] = []

    def scatter_across_a_restart(*args: Any, **kw: Any) -> None:
        scatter(*args, **kw)
        if not restarted:
            handle.kill()
            handle.restart()
            restarted.append(True)

    wb.paged.scatter = scatter_across_a_restart  # type: ignore[method-assign]
    dst = list(range(10, 10 + 2 * BPC))
    wb.submit_loads(plan(loads=[LoadJob("r9", found.boot_id, [found.offsets[0].tolist()], [], dst, 0,
                                        lease_id=found.lease_id)]))
    wb.wait_for_inflight()
    assert restarted and wb.load_errors() == set(dst)
    assert wb.stats["load_chunks"] == 0


class _OnCuda:
    """A CPU cache that says it is on a CUDA device (there is none here): what the worker
    sees on a GPU node."""

    def __init__(self, paged: PagedKV) -> None:
        self.paged, self.device = paged, torch.device("cuda", 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.paged, name)


@pytest.mark.parametrize("why", ["layout", "cuda"])
def test_unexpected_layout_or_a_gpu_cache_disables_the_rank(handle: SidecarHandle, why: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """One warning at registration, then every load is a miss and no store runs, rather than
    a traceback per request (a cache that says it is on a GPU torch cannot see: the GPU copy
    path cannot start)."""
    a = cache(4)
    caplog.set_level(logging.WARNING, logger="lmkv.vllm")
    wa = (worker(handle, a, expected=a.chunk_bytes(1) + 2) if why == "layout"
          else worker(handle, _OnCuda(a)))  # type: ignore[arg-type]
    assert wa.disabled and ("cuda:0" in wa.disabled) == (why == "cuda")
    assert why != "cuda" or "torch sees no CUDA device" in wa.disabled
    assert [r.message for r in caplog.records] == [f"lmkv: {wa.disabled}"]
    wa.submit_stores(plan(stores=[StoreJob("r4", bytes(16), [0, 1])]))
    wa.submit_loads(plan(loads=[LoadJob("r5", b"x" * 16, [[0]], [], [2, 3], 0)]))
    wa.wait_for_inflight()
    assert wa.load_errors() == {2, 3}
    assert wa.stats["store_chunks"] == 0


def test_a_store_whose_copy_fails_gives_its_slots_back(handle: SidecarHandle) -> None:
    """A write lease lives until released or its owner is reaped: a failed copy must release
    it at once, or a live worker holds WRITING slots (and blocks those chunks) for ever."""
    key = handle.client("scheduler")
    assert key.connect()
    hashes = chain_hashes(list(range(500, 500 + 2 * CHUNK)), CHUNK, key.hello.hash_key)
    wa = worker(handle, cache(11))

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("copy failed")

    wa.paged.gather = broken  # type: ignore[method-assign]
    wa.submit_stores(plan(stores=[StoreJob("rf", hashes, list(range(2 * BPC)))]))
    wa.wait_for_inflight()
    assert wa.stats["store_failures"] == 1 and wa.stats["store_chunks"] == 0
    wb = worker(handle, cache(12))  # another writer of the same chunks is not kept out
    wb.submit_stores(plan(stores=[StoreJob("rg", hashes, list(range(2 * BPC)))]))
    wb.wait_for_inflight()
    assert wb.stats["store_chunks"] == 2 and wb.stats["store_skipped"] == 0
