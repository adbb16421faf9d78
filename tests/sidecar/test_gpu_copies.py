"""Tests for lmkv_mp.sidecar.index.gpu_copies.GpuCopies through the ChunkIndex that drives it.

The GPU tier is bookkeeping here (slots in regions 1..N, no device memory): which chunks
get a copy, which copies a LOOKUP hands out, which are dropped under pressure, and that a
copy never outlives its entry. Geometry as in test_index.py: 64 KiB slabs, 4 KiB minimum
slots, 16 KiB chunks (4 per slab), 32 KiB chunks (2 per slab).
"""

from __future__ import annotations

import pytest

from lmkv_mp.sidecar.index.gpu_copies import GpuCopies
from lmkv_mp.sidecar.index.chunk_index import ChunkIndex
from lmkv_mp.memory import HostPool

from tests.sidecar.test_index import BIG, MIN_SLOT, NS0, NS1, NSB, SLAB, SMALL, MemRegion, MiB, W, hs

GPU = 1     # region id of the one GPU region in these tests


def make(gpu_slabs: int = 1, host_slabs: int = 4) -> ChunkIndex:
    pool, _ = HostPool.open(MemRegion(2 * MiB + host_slabs * SLAB), SLAB, MIN_SLOT)  # type: ignore[arg-type]
    idx = ChunkIndex(pool, GpuCopies({GPU: gpu_slabs * SLAB}, SLAB, MIN_SLOT))
    for ns, size in ((NS0, SMALL), (NS1, SMALL), (NSB, BIG)):
        idx.declare(ns, size)
    return idx


def store(idx: ChunkIndex, ns: bytes, *ids: int, gpu: int = GPU, owner: str = "w") -> list[int]:
    """RESERVE (naming GPU region ``gpu``) + COMMIT; returns each chunk's GPU region."""
    r = idx.reserve(owner, ns, hs(*ids), gpu_region=gpu)
    assert r.status == [W] * len(ids)
    assert idx.commit(owner, r.lease_id) == len(ids)
    return r.gpu_regions or [0] * len(ids)


def gpu_stats(idx: ChunkIndex) -> dict[str, int]:
    assert idx.gpu is not None
    return idx.gpu.stats()[GPU]


def check_accounting(idx: ChunkIndex) -> None:
    """The region's used bytes are exactly the slots of the entries that have a copy, and no
    two copies share a slot."""
    with_copy = [e for e in idx._by_slot.values() if e.gpu_region]
    assert gpu_stats(idx)["used_bytes"] == sum(SLAB // (SLAB // max(e.length, MIN_SLOT)) for e in with_copy)
    assert len({e.gpu_offset for e in with_copy}) == len(with_copy)


def test_a_writer_on_a_gpu_device_gets_a_copy_slot_per_chunk_published_by_its_commit() -> None:
    idx = make(gpu_slabs=2)
    r = idx.reserve("w", NS0, hs(1, 2, 3), gpu_region=GPU)
    assert r.gpu_regions == [GPU] * 3
    assert len(set(r.gpu_offsets)) == 3 and all(o % 4096 == 0 and o + SMALL <= 2 * SLAB for o in r.gpu_offsets)
    assert idx.pin("s", [NS0], hs(1)).hits == 0, "a chunk being written is invisible, copy and all"
    assert gpu_stats(idx)["entries"] == 0, "copies of WRITING chunks are not in the LRU yet"
    assert idx.commit("w", r.lease_id) == 3
    pinned = idx.pin("s", [NS0], hs(1, 2, 3))
    assert pinned.gpu_regions == [[GPU] * 3] and pinned.gpu_offsets == [r.gpu_offsets]
    assert gpu_stats(idx)["entries"] == 3 and gpu_stats(idx)["hit_chunks"] == 3
    check_accounting(idx)


def test_a_writer_without_a_gpu_region_stores_host_only() -> None:
    idx = make()
    r = idx.reserve("w", NS0, hs(1, 2), gpu_region=0)
    assert r.gpu_regions == [] and r.gpu_offsets == []
    idx.commit("w", r.lease_id)
    assert idx.pin("s", [NS0], hs(1, 2)).gpu_regions == [[0, 0]]
    unknown = idx.reserve("w", NS0, hs(3), gpu_region=9)
    assert unknown.gpu_regions == [], "a region id the index does not know gives no copy"
    assert gpu_stats(idx)["used_bytes"] == 0


def test_present_and_busy_chunks_get_no_copy_slot() -> None:
    idx = make(gpu_slabs=2)
    store(idx, NS0, 1)
    other = idx.reserve("w2", NS0, hs(2), gpu_region=GPU)
    r = idx.reserve("w", NS0, hs(1, 2, 3), gpu_region=GPU)
    assert r.gpu_regions[:2] == [0, 0] and r.gpu_regions[2] == GPU
    assert r.gpu_offsets[:2] == [0, 0]
    idx.release("w2", other.lease_id)
    check_accounting(idx)


def test_a_full_region_drops_its_oldest_unpinned_copies_and_keeps_the_chunks() -> None:
    idx = make(gpu_slabs=1)               # 4 copies of 16 KiB
    store(idx, NS0, 1, 2, 3, 4)
    idx.pin("s", [NS0], hs(1))            # pinned: its copy may be being read
    assert store(idx, NS0, 5, 6) == [GPU, GPU]
    stats = gpu_stats(idx)
    assert stats["evictions"] == 2 and stats["evicted_bytes"] == 2 * SMALL
    regions = idx.pin("s2", [NS0], hs(1, 2, 3, 4, 5, 6)).gpu_regions[0]
    assert regions == [GPU, 0, 0, GPU, GPU, GPU], "the two oldest unpinned copies went; every chunk still hits"
    check_accounting(idx)


def test_a_region_full_of_pinned_or_unwritten_copies_stores_host_only() -> None:
    idx = make(gpu_slabs=1)
    writing = idx.reserve("w", NS0, hs(1, 2), gpu_region=GPU)
    store(idx, NS0, 3, 4)
    idx.pin("s", [NS0], hs(3, 4))
    r = idx.reserve("w2", NS0, hs(5), gpu_region=GPU)
    assert r.status == [W] and r.gpu_regions == [], "no copy slot, but the chunk is still stored"
    assert gpu_stats(idx)["refused"] == 1 and gpu_stats(idx)["evictions"] == 0
    idx.commit("w2", r.lease_id)
    idx.release("w", writing.lease_id)
    assert gpu_stats(idx)["used_bytes"] == 2 * SMALL, "an aborted write frees its copy slot"
    check_accounting(idx)


def test_copies_of_another_size_class_give_way_until_a_slab_is_free() -> None:
    idx = make(gpu_slabs=1)
    store(idx, NS0, 1, 2, 3, 4)           # the one slab holds 16 KiB slots
    assert store(idx, NSB, 10) == [GPU], "a 32 KiB chunk takes the slab once its 16 KiB copies are gone"
    assert gpu_stats(idx)["evictions"] == 4
    assert idx.pin("s", [NS0], hs(1, 2, 3, 4)).gpu_regions == [[0, 0, 0, 0]]
    check_accounting(idx)


def test_only_whole_spans_of_another_class_give_way() -> None:
    """A slab with a copy being read keeps all its copies: dropping the others frees nothing."""
    idx = make(gpu_slabs=2)
    store(idx, NS0, 1, 2, 3, 4)           # slab A
    store(idx, NS0, 5, 6, 7, 8)           # slab B
    idx.pin("s", [NS0], hs(1))            # a reader holds a copy in slab A
    assert store(idx, NSB, 10) == [GPU]
    assert gpu_stats(idx)["evictions"] == 4, "slab B's four copies, none of slab A's"
    assert idx.pin("s2", [NS0], hs(1, 2, 3, 4)).gpu_regions == [[GPU] * 4]
    check_accounting(idx)


def test_a_copy_goes_with_its_entry() -> None:
    idx = make(gpu_slabs=2, host_slabs=1)  # the host tier holds 4 chunks, the GPU tier 8
    store(idx, NS0, 1, 2, 3, 4)
    store(idx, NS1, 5, 6, 7, 8)            # host eviction of 1..4 frees their copies too
    assert idx.lookup([NS0], hs(1)) == 0
    assert gpu_stats(idx)["used_bytes"] == 4 * SMALL and gpu_stats(idx)["entries"] == 4
    check_accounting(idx)


def test_a_cleared_pinned_chunk_keeps_its_copy_slot_until_unpinned_and_is_never_a_victim() -> None:
    idx = make(gpu_slabs=1)
    store(idx, NS0, 1, 2, 3, 4)
    lease = idx.pin("s", [NS0], hs(1)).lease_id
    assert idx.clear(NS0) == 4
    assert gpu_stats(idx)["used_bytes"] == SMALL, "the pinned chunk's copy stays: a reader may be copying it"
    store(idx, NS1, 5, 6, 7)
    others = idx.pin("s", [NS1], hs(5, 6, 7)).lease_id
    r = idx.reserve("w", NS1, hs(8), gpu_region=GPU)
    assert r.gpu_regions == [], "the hidden copy is not evicted for a newcomer"
    idx.release("s", lease)
    idx.release("s", others)
    assert gpu_stats(idx)["used_bytes"] == 3 * SMALL
    idx.commit("w", r.lease_id)
    check_accounting(idx)


@pytest.mark.parametrize("bad", [{0: SLAB}, {1: SLAB - 1}])
def test_region_ids_start_at_one_and_hold_a_slab(bad: dict[int, int]) -> None:
    with pytest.raises(ValueError, match="ids start at 1"):
        GpuCopies(bad, SLAB, MIN_SLOT)
