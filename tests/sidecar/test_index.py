"""Tests for lmkv_mp.sidecar.index.chunk_index.ChunkIndex: visibility, leases, LRU eviction, pins, clear, restore.

The index is pure state over a HostPool; the pool here lives in a bytearray (the pool only
needs ``size`` and ``view``), so no shared memory is involved. Geometry: 64 KiB slabs, 4 KiB
minimum slots; a 16 KiB namespace fits 4 chunks per slab.
"""

from __future__ import annotations

import dataclasses
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lmkv_mp.sidecar.index.gpu_copies import GpuCopies
from lmkv_mp.sidecar.index.chunk_index import ChunkIndex
from lmkv_mp.sidecar.index.leases import LeaseError
from lmkv_mp.memory import HostPool, SlotState
from lmkv_mp.wire.hashes import HashList
from lmkv_mp.wire.protocol import SlotStatus

KiB, MiB = 1 << 10, 1 << 20
SLAB = 64 * KiB
MIN_SLOT = 4 * KiB
SMALL = 16 * KiB   # 4 per slab
BIG = 32 * KiB     # 2 per slab
HUGE = 96 * KiB    # one per two-slab span

NS0 = b"\x00" * 15 + b"\x10"   # TP rank 0
NS1 = b"\x00" * 15 + b"\x11"   # TP rank 1
NSB = b"\x00" * 15 + b"\x20"   # a model with 32 KiB chunks
NSH = b"\x00" * 15 + b"\x30"   # a model with 96 KiB chunks

W, P_, B, N = SlotStatus.WRITE, SlotStatus.PRESENT, SlotStatus.BUSY, SlotStatus.NO_SPACE


class MemRegion:
    """The part of HostRegion a HostPool uses, backed by ordinary memory."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.view = memoryview(bytearray(size))


def make_index(num_slabs: int = 2, region: MemRegion | None = None, gpu_slabs: int = 0) -> ChunkIndex:
    """``gpu_slabs``: also a GPU tier region (id 1) of that many slabs (gpu_copies.py)."""
    region = region or MemRegion(2 * MiB + num_slabs * SLAB)  # metadata fits below the 2 MiB data offset
    pool, records = HostPool.open(region, SLAB, MIN_SLOT)  # type: ignore[arg-type]
    assert pool.geo.num_slabs == num_slabs
    idx = ChunkIndex(pool, GpuCopies({1: gpu_slabs * SLAB}, SLAB, MIN_SLOT) if gpu_slabs else None)
    idx.restore(records)
    for ns, size in ((NS0, SMALL), (NS1, SMALL), (NSB, BIG), (NSH, HUGE)):
        idx.declare(ns, size)
    return idx


def hs(*ids: int) -> HashList:
    return HashList(b"".join(i.to_bytes(16, "big") for i in ids))


def key_of(ns: bytes, i: int) -> bytes:
    """The index key of chunk ``i`` of namespace ``ns``."""
    return ns + hs(i).bytes


def store(idx: ChunkIndex, ns: bytes, *ids: int, owner: str = "w") -> int:
    """RESERVE + COMMIT; every chunk must get a slot. Returns the lease id."""
    r = idx.reserve(owner, ns, hs(*ids))
    assert r.status == [W] * len(ids), r.status
    assert idx.commit(owner, r.lease_id) == len(ids)
    return r.lease_id


def used(idx: ChunkIndex) -> int:
    return idx.pool.alloc_state.used_bytes


def hit(idx: ChunkIndex, ns: bytes, i: int) -> bool:
    return idx.lookup([ns], hs(i)) == 1


# -- visibility -------------------------------------------------------------------------------


def test_empty_index_has_no_hits() -> None:
    idx = make_index()
    assert idx.lookup([NS0], hs(0, 1)) == 0
    assert idx.lookup([NS0], HashList()) == 0
    assert len(idx) == 0


def test_lookup_counts_leading_committed_chunks() -> None:
    idx = make_index()
    store(idx, NS0, 0, 1, 3)
    assert idx.lookup([NS0], hs(0, 1, 2, 3)) == 2, "a gap ends the prefix"
    assert idx.lookup([NS0], hs(0, 1)) == 2
    assert idx.lookup([NS0], hs(2, 0, 1)) == 0
    assert idx.lookup([NS0], hs(3)) == 1
    assert idx.lookup([NS1], hs(0, 1)) == 0, "other namespaces never share keys"


@pytest.mark.parametrize("order", [[NS0, NS1], [NS1, NS0]])
def test_tp_lookup_needs_every_rank(order: list[bytes]) -> None:
    idx = make_index()
    store(idx, NS0, 0, 1, 2, 3)
    store(idx, NS1, 0, 1)
    assert idx.lookup([NS0], hs(0, 1, 2, 3)) == 4
    assert idx.lookup([NS1], hs(0, 1, 2, 3)) == 2
    assert idx.lookup(order, hs(0, 1, 2, 3)) == 2, "chunk 2 is only committed on rank 0"
    r = idx.reserve("w1", NS1, hs(2))  # rank 1 writing chunk 2 is still not a hit
    assert r.status == [W]
    assert idx.lookup(order, hs(0, 1, 2, 3)) == 2
    idx.commit("w1", r.lease_id)
    assert idx.lookup(order, hs(0, 1, 2, 3)) == 3


def test_tp_pin_returns_per_rank_locations() -> None:
    idx = make_index(num_slabs=4)
    store(idx, NS0, 0, 1, 2)
    store(idx, NS1, 0, 1)
    p = idx.pin("sched", [NS0, NS1], hs(0, 1, 2))
    assert p.hits == 2 and p.lease_id > 0
    assert len(p.offsets) == 2 and all(len(o) == 2 for o in p.offsets)
    assert set(p.offsets[0]).isdisjoint(p.offsets[1])
    assert len(set(p.offsets[0] + p.offsets[1])) == 4


def test_writing_entries_are_invisible() -> None:
    idx = make_index()
    r = idx.reserve("w", NS0, hs(0, 1))
    assert idx.lookup([NS0], hs(0, 1)) == 0
    p = idx.pin("s", [NS0], hs(0, 1))
    assert (p.hits, p.lease_id) == (0, 0)
    assert p.offsets == [[]]
    idx.commit("w", r.lease_id)
    assert idx.lookup([NS0], hs(0, 1)) == 2


def test_reserve_offsets_are_the_pool_slots() -> None:
    idx = make_index()
    r = idx.reserve("w", NS0, hs(0, 1, 2))
    offs = r.offsets
    assert len(set(offs)) == 3
    for off in offs:
        assert idx.pool.geo.data_off <= off <= idx.pool.region.size - SMALL
    idx.commit("w", r.lease_id)
    assert idx.pin("s", [NS0], hs(0, 1, 2)).offsets == [offs]


# -- RESERVE ----------------------------------------------------------------------------------


def test_reserve_statuses() -> None:
    idx = make_index()
    store(idx, NS0, 0)
    other = idx.reserve("other", NS0, hs(1))
    r = idx.reserve("w", NS0, hs(0, 1, 2))
    assert r.status == [P_, B, W]
    assert r.offsets[0] == 0 and r.offsets[1] == 0 and r.offsets[2] > 0
    assert r.lease_id not in (0, other.lease_id)


def test_reserve_same_chunk_twice_in_one_request_is_busy() -> None:
    idx = make_index()
    r = idx.reserve("w", NS0, hs(5, 5))
    assert r.status == [W, B]


def test_reserve_of_present_chunks_takes_no_lease() -> None:
    idx = make_index()
    store(idx, NS0, 0, 1)
    r = idx.reserve("w", NS0, hs(0, 1))
    assert r.status == [P_, P_] and r.lease_id == 0
    assert idx.owner_lease_count("w") == 0


def test_reserve_of_undeclared_namespace_fails() -> None:
    idx = make_index()
    with pytest.raises(ValueError, match="declared"):
        idx.reserve("w", b"\xff" * 16, hs(0))


def test_no_space_for_every_new_chunk_after_the_first_that_found_none() -> None:
    idx = make_index(num_slabs=1)
    r = idx.reserve("w", NS0, hs(*range(7)))
    assert r.status == [W] * 4 + [N] * 3
    assert r.offsets[4:] == [0, 0, 0]
    assert used(idx) == 4 * SMALL


def test_no_space_stops_allocating_even_when_later_space_appears() -> None:
    """Chunk 1 finds no space; chunk 2 would fit in a class with room but must not get a
    slot: a chain hash without its prefix can never be a hit. Chunks already present still
    say so (the writer skips them either way)."""
    idx = make_index(num_slabs=1)
    store(idx, NS0, 9)
    pinned = idx.pin("s", [NS0], hs(9))
    busy = idx.reserve("x", NS0, hs(10, 11, 12))
    assert busy.status == [W, W, W]
    r = idx.reserve("w", NS0, hs(0, 1, 9, 10))
    assert r.status == [N, N, P_, B]
    assert r.lease_id == 0
    idx.release("s", pinned.lease_id)
    idx.release("x", busy.lease_id)


def test_present_prefix_is_not_evicted_for_the_chunks_after_it() -> None:
    """Chunk 0 answers PRESENT; allocating chunk 1 must not evict it (the writer skips 0, so
    chunk 1 would be written behind a prefix that no longer exists). Regression test."""
    idx = make_index(num_slabs=1)
    store(idx, NSB, 0)
    store(idx, NSB, 9)
    p = idx.pin("s", [NSB], hs(9))  # 0 is the only evictable entry left
    r = idx.reserve("w", NSB, hs(0, 1))
    assert r.status == [P_, N]
    assert hit(idx, NSB, 0)
    idx.release("s", p.lease_id)
    assert idx.reserve("w", NSB, hs(0, 1)).status == [P_, W], "9 goes once unpinned; 0 stays"
    assert hit(idx, NSB, 0) and not hit(idx, NSB, 9)


# -- COMMIT / RELEASE -------------------------------------------------------------------------


def test_commit_subset_frees_the_rest() -> None:
    idx = make_index()
    r = idx.reserve("w", NS0, hs(0, 1, 2, 3))
    assert used(idx) == 4 * SMALL
    assert idx.commit("w", r.lease_id, hs(0, 2), [11, 22]) == 2
    assert used(idx) == 2 * SMALL
    assert idx.lookup([NS0], hs(0, 1)) == 1
    assert hit(idx, NS0, 2) and not hit(idx, NS0, 3)
    p = idx.pin("s", [NS0], hs(0))
    assert p.checksums == [[11]]
    assert idx.reserve("w", NS0, hs(1, 3)).status == [W, W]
    assert idx.counters.aborted == 2 and idx.counters.committed == 2


def test_commit_all_when_no_hashes_listed() -> None:
    idx = make_index()
    r = idx.reserve("w", NS0, hs(0, 1, 2))
    assert idx.commit("w", r.lease_id) == 3
    assert idx.lookup([NS0], hs(0, 1, 2)) == 3
    assert idx.counters.committed_bytes == 3 * SMALL


def test_commit_writes_durable_records() -> None:
    idx = make_index()
    r = idx.reserve("w", NS0, hs(0, 1))
    (span,) = idx.pool.alloc_state.spans()
    assert span.used == 2
    recs = [idx.pool.read_record(s) for s in range(idx.pool.geo.num_slabs * idx.pool.geo.max_slots_per_slab)]
    assert sorted(rec.hash for rec in recs if rec.state is SlotState.WRITING) == [hs(0).bytes, hs(1).bytes]
    idx.commit("w", r.lease_id, hs(1), [7])
    recs = [idx.pool.read_record(s) for s in range(idx.pool.geo.num_slabs * idx.pool.geo.max_slots_per_slab)]
    live = [rec for rec in recs if rec.state is not SlotState.FREE]
    assert [(rec.state, rec.namespace, rec.hash, rec.length, rec.checksum) for rec in live] == [
        (SlotState.COMMITTED, NS0, hs(1).bytes, SMALL, 7)]


def test_commit_ends_the_lease() -> None:
    idx = make_index()
    r = idx.reserve("w", NS0, hs(0))
    idx.commit("w", r.lease_id)
    with pytest.raises(LeaseError):
        idx.commit("w", r.lease_id)
    with pytest.raises(LeaseError):
        idx.release("w", r.lease_id)


def test_release_of_write_lease_frees_its_slots() -> None:
    idx = make_index()
    store(idx, NS0, 0)
    r = idx.reserve("w", NS0, hs(0, 1, 2))
    assert used(idx) == 3 * SMALL
    assert idx.release("w", r.lease_id) == 2
    assert used(idx) == SMALL
    assert len(idx) == 1 and idx.lookup([NS0], hs(0, 1)) == 1
    assert idx.reserve("w2", NS0, hs(1, 2)).status == [W, W], "no longer BUSY"


def test_release_of_read_lease_unpins() -> None:
    idx = make_index(num_slabs=1)
    store(idx, NS0, 0, 1, 2, 3)
    p = idx.pin("s", [NS0], hs(0, 1, 2, 3))
    assert idx.reserve("w", NS0, hs(9)).status == [N]
    assert idx.release("s", p.lease_id) == 4
    assert idx.reserve("w", NS0, hs(9)).status == [W]


def test_pins_are_counted() -> None:
    idx = make_index(num_slabs=1)
    store(idx, NS0, 0, 1, 2, 3)
    p1 = idx.pin("a", [NS0], hs(0))
    p2 = idx.pin("b", [NS0], hs(0))
    idx.release("a", p1.lease_id)
    # chunk 0 is still pinned by b: the three others are evicted first, then nothing.
    r = idx.reserve("w", NS0, hs(10, 11, 12, 13))
    assert r.status == [W, W, W, N]
    assert hit(idx, NS0, 0)
    idx.release("b", p2.lease_id)


@pytest.mark.parametrize("action", ["release", "commit"])
@pytest.mark.parametrize("case", ["other-owner", "unknown-id", "zero-id"])
def test_lease_errors(action: str, case: str) -> None:
    idx = make_index()
    r = idx.reserve("w", NS0, hs(0))
    owner, lease_id = {"other-owner": ("intruder", r.lease_id), "unknown-id": ("w", r.lease_id + 1000),
                       "zero-id": ("w", 0)}[case]
    with pytest.raises(LeaseError):
        getattr(idx, action)(owner, lease_id)
    # The real owner's lease is untouched by the failed attempt.
    assert idx.commit("w", r.lease_id) == 1


def test_commit_of_a_read_lease_is_a_lease_error() -> None:
    idx = make_index()
    store(idx, NS0, 0)
    p = idx.pin("s", [NS0], hs(0))
    with pytest.raises(LeaseError):
        idx.commit("s", p.lease_id)
    assert idx.release("s", p.lease_id) == 1


def test_lease_error_is_a_key_error() -> None:
    assert issubclass(LeaseError, KeyError)


# -- lease expiry (drop_owner) ----------------------------------------------------------------


def test_drop_owner_ends_all_its_leases() -> None:
    idx = make_index(num_slabs=2)
    store(idx, NS0, 0, 1, 2, 3)
    p = idx.pin("dead", [NS0], hs(0, 1, 2, 3))
    w1 = idx.reserve("dead", NS0, hs(10, 11))
    w2 = idx.reserve("dead", NS1, hs(0))
    keep = idx.reserve("alive", NS0, hs(20))
    assert idx.owner_lease_count("dead") == 3
    assert used(idx) == 8 * SMALL
    assert idx.drop_owner("dead") == 4 + 2 + 1
    assert idx.owner_lease_count("dead") == 0
    assert used(idx) == 5 * SMALL, "the dead writer's slots are freed"
    assert idx.reserve("x", NS0, hs(10, 11)).status == [W, W]
    # The read pins are gone: the committed chunks can be evicted now.
    r = idx.reserve("x", NS0, hs(30, 31, 32, 33))
    assert r.status == [W] * 4
    for lease_id in (p.lease_id, w1.lease_id, w2.lease_id):
        with pytest.raises(LeaseError):
            idx.release("dead", lease_id)
    assert idx.commit("alive", keep.lease_id) == 1
    assert idx.drop_owner("dead") == 0
    assert idx.drop_owner("never-seen") == 0


# -- eviction ---------------------------------------------------------------------------------


def test_no_eviction_without_pressure() -> None:
    idx = make_index(num_slabs=2)
    for i in range(8):
        store(idx, NS0, i)
    assert idx.counters.evictions == 0
    assert all(hit(idx, NS0, i) for i in range(8))


def test_eviction_is_lru_and_a_load_refreshes() -> None:
    idx = make_index(num_slabs=1)
    for i in range(4):
        store(idx, NS0, i)
    assert idx.lookup([NS0], hs(1)) == 1   # a plain lookup is a question: no refresh
    pinned = idx.pin("reader", [NS0], hs(0))
    idx.release("reader", pinned.lease_id)  # a load: 0 becomes the newest; 1 is now the oldest
    store(idx, NS0, 10)
    assert not hit(idx, NS0, 1)
    store(idx, NS0, 11)
    assert not hit(idx, NS0, 2)
    assert idx.counters.evictions == 2 and idx.counters.evicted_bytes == 2 * SMALL
    assert all(hit(idx, NS0, i) for i in (0, 3, 10, 11))


def test_pin_and_reserve_refresh_lru_too() -> None:
    idx = make_index(num_slabs=1)
    for i in range(4):
        store(idx, NS0, i)
    p = idx.pin("s", [NS0], hs(0))
    idx.release("s", p.lease_id)          # 0 refreshed, then unpinned
    assert idx.reserve("w", NS0, hs(1)).status == [P_]  # 1 refreshed by a writer's RESERVE
    store(idx, NS0, 10)
    store(idx, NS0, 11)
    assert not hit(idx, NS0, 2) and not hit(idx, NS0, 3)
    assert hit(idx, NS0, 0) and hit(idx, NS0, 1)


def test_pinned_entries_are_never_evicted() -> None:
    idx = make_index(num_slabs=1)
    store(idx, NS0, 0, 1, 2, 3)
    p = idx.pin("s", [NS0], hs(0, 1))
    store(idx, NS0, 10)     # evicts 2 (oldest unpinned)
    store(idx, NS0, 11)     # evicts 3
    assert idx.lookup([NS0], hs(0, 1)) == 2
    store(idx, NS0, 12)     # evicts 10; 0 and 1 are older but pinned
    assert idx.lookup([NS0], hs(0, 1)) == 2 and not hit(idx, NS0, 10)
    w = idx.reserve("w", NS0, hs(13, 14))  # evicts 11 and 12 (unpinned committed)
    assert w.status == [W, W]
    # Only pinned and in-flight entries remain.
    assert idx.reserve("w", NS0, hs(15)).status == [N]
    assert idx.lookup([NS0], hs(0, 1)) == 2
    idx.release("s", p.lease_id)
    assert idx.reserve("w", NS0, hs(15)).status == [W]


def test_writing_entries_are_never_evicted() -> None:
    idx = make_index(num_slabs=1)
    r = idx.reserve("w", NS0, hs(0, 1, 2, 3))
    assert idx.reserve("x", NS0, hs(4)).status == [N]
    assert idx.commit("w", r.lease_id) == 4


def load(idx: ChunkIndex, namespaces: list[bytes], key: bytes) -> None:
    """What a reader does: a pinned lookup, then release (this is what refreshes LRU)."""
    idx.release("reader", idx.pin("reader", namespaces, key).lease_id)


def test_load_of_many_namespaces_refreshes_each() -> None:
    idx = make_index(num_slabs=2)
    for i in range(4):
        store(idx, NS0, i)
        store(idx, NS1, i)
    load(idx, [NS0, NS1], hs(0))
    store(idx, NS0, 10)
    assert hit(idx, NS0, 0) and hit(idx, NS1, 0)
    assert not hit(idx, NS0, 1)


# -- cross-size-class eviction ----------------------------------------------------------------


def fill_two_small_spans(idx: ChunkIndex) -> None:
    """Chunks 0-3 in one slab, 4-7 in the other; 0 refreshed, so 4-7's span is older."""
    for i in range(8):
        store(idx, NS0, i)
    load(idx, [NS0], hs(0))


def test_other_class_span_is_evicted_whole() -> None:
    idx = make_index(num_slabs=2)
    fill_two_small_spans(idx)
    r = idx.reserve("w", NSB, hs(100))
    assert r.status == [W]
    assert idx.counters.evictions == 4
    assert all(hit(idx, NS0, i) for i in range(4)), "the span holding the newest entry survives"
    assert not any(hit(idx, NS0, i) for i in range(4, 8))
    assert idx.reserve("w", NSB, hs(101)).status == [W], "the freed slab is the new class's span"
    assert idx.counters.evictions == 4


def test_span_with_a_pinned_entry_is_not_evicted() -> None:
    idx = make_index(num_slabs=2)
    fill_two_small_spans(idx)
    p = idx.pin("s", [NS0], hs(5))
    assert idx.reserve("w", NSB, hs(100)).status == [W]
    assert not any(hit(idx, NS0, i) for i in range(4)), "the other span went instead"
    assert all(hit(idx, NS0, i) for i in range(4, 8))
    idx.release("s", p.lease_id)


def test_span_with_a_writing_entry_is_not_evicted() -> None:
    idx = make_index(num_slabs=2)
    for i in range(4):
        store(idx, NS0, i)
    store(idx, NS0, 4, 5, 6)
    w = idx.reserve("x", NS0, hs(7))
    assert idx.reserve("w", NSB, hs(100)).status == [W]
    assert not any(hit(idx, NS0, i) for i in range(4))
    assert idx.commit("x", w.lease_id) == 1


def test_no_space_when_no_span_is_wholly_evictable() -> None:
    idx = make_index(num_slabs=2)
    for i in range(8):
        store(idx, NS0, i)
    p = idx.pin("s", [NS0], hs(1))
    p2 = idx.pin("s", [NS0], hs(6))
    assert idx.reserve("w", NSB, hs(100)).status == [N]
    assert all(hit(idx, NS0, i) for i in range(8)), "nothing evicted in vain"
    idx.release("s", p.lease_id)
    idx.release("s", p2.lease_id)


def test_one_reserve_ranks_the_other_spans_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranking victim spans walks every slot of the pool: once per RESERVE, however many of
    its chunks need a span evicted (per chunk it took seconds on a full 8 GiB pool), and the
    oldest spans still go first."""
    idx = make_index(num_slabs=8)
    for i in range(32):                         # 8 slabs of 4 small chunks each
        store(idx, NS0, i)
    load(idx, [NS0], hs(*range(16, 32)))        # slabs 4-7 are the newest now
    walks = 0
    spans = idx.pool.alloc_state.spans

    def counted() -> list:
        nonlocal walks
        walks += 1
        return spans()

    monkeypatch.setattr(idx.pool.alloc_state, "spans", counted)
    r = idx.reserve("w", NSB, hs(100, 101, 102, 103, 104, 105, 106, 107))   # 2 per slab: 4 slabs
    assert r.status == [W] * 8
    assert walks == 1
    assert not any(hit(idx, NS0, i) for i in range(16)) and all(hit(idx, NS0, i) for i in range(16, 32))


def test_multi_slab_class_evicts_enough_spans() -> None:
    idx = make_index(num_slabs=2)
    for i in range(8):
        store(idx, NS0, i)
    r = idx.reserve("w", NSH, hs(100))
    assert r.status == [W]
    assert idx.counters.evictions == 8 and len(idx) == 1
    assert used(idx) == HUGE and idx.pool.alloc_state.free_slabs() == 0
    # And back: the small class reclaims it once the huge chunk is old and unpinned.
    idx.commit("w", r.lease_id)
    store(idx, NS0, 50)
    assert not hit(idx, NSH, 100) and hit(idx, NS0, 50)


# -- clear ------------------------------------------------------------------------------------


def test_clear_all() -> None:
    idx = make_index()
    store(idx, NS0, 0, 1)
    store(idx, NS1, 0)
    assert idx.clear() == 3
    assert len(idx) == 0 and used(idx) == 0
    assert idx.lookup([NS0], hs(0)) == 0 and idx.lookup([NS1], hs(0)) == 0
    assert idx.reserve("w", NS0, hs(0)).status == [W]


def test_clear_one_namespace() -> None:
    idx = make_index()
    store(idx, NS0, 0, 1)
    store(idx, NS1, 0)
    assert idx.clear(NS0) == 2
    assert idx.lookup([NS0], hs(0)) == 0
    assert hit(idx, NS1, 0)
    assert used(idx) == SMALL
    assert idx.clear(b"\x99" * 16) == 0


def test_clear_leaves_writing_entries_to_their_writers() -> None:
    idx = make_index()
    r = idx.reserve("w", NS0, hs(0))
    assert idx.clear() == 0
    assert idx.commit("w", r.lease_id) == 1
    assert hit(idx, NS0, 0)


def test_clear_of_pinned_entry_hides_now_frees_on_release() -> None:
    idx = make_index()
    store(idx, NS0, 0, 1)
    p = idx.pin("s", [NS0], hs(0))
    slot_off = p.offsets[0][0]
    assert idx.clear(NS0) == 2
    assert idx.lookup([NS0], hs(0)) == 0, "cleared: invisible at once"
    assert used(idx) == SMALL, "the pinned slot stays allocated while a reader may copy from it"
    recs = [idx.pool.read_record(s) for s in range(idx.pool.geo.num_slabs * idx.pool.geo.max_slots_per_slab)]
    assert all(rec.state is SlotState.FREE for rec in recs), "a crash now must not restore it"
    # The key can be written again meanwhile, into another slot.
    r = idx.reserve("w", NS0, hs(0))
    assert r.status == [W] and r.offsets[0] != slot_off
    idx.commit("w", r.lease_id)
    assert used(idx) == 2 * SMALL
    assert idx.release("s", p.lease_id) == 1
    assert used(idx) == SMALL
    assert hit(idx, NS0, 0), "releasing the old pin does not touch the new entry"
    assert idx.clear() == 1 and used(idx) == 0


def test_clear_of_pinned_entry_expiring_owner_frees_it() -> None:
    idx = make_index()
    store(idx, NS0, 0)
    idx.pin("s", [NS0], hs(0))
    idx.clear()
    assert used(idx) == SMALL
    idx.drop_owner("s")
    assert used(idx) == 0


# -- namespaces -------------------------------------------------------------------------------


def test_declare_conflict_raises() -> None:
    idx = make_index()
    idx.declare(NS0, SMALL)  # same size again is fine
    with pytest.raises(ValueError, match="16384"):
        idx.declare(NS0, SMALL + 1)
    assert idx.chunk_bytes(NS0) == SMALL
    assert idx.chunk_bytes(b"\x42" * 16) is None


# -- restore (warm restart) -------------------------------------------------------------------


def reopen(idx: ChunkIndex) -> tuple[ChunkIndex, list]:
    """A restarted sidecar on the same memory: a new pool and index over the same region."""
    pool, records = HostPool.open(idx.pool.region, SLAB, MIN_SLOT)
    return ChunkIndex(pool), records


def test_restore_rebuilds_lookups() -> None:
    idx = make_index(num_slabs=2)
    store(idx, NS0, 0, 1, 2)
    store(idx, NS1, 0, 1)
    r = idx.reserve("w", NS0, hs(5, 6))
    idx.commit("w", r.lease_id, hs(5), [555])
    idx.reserve("w", NS0, hs(7))  # the writer never commits: crash
    offsets = idx.pin("s", [NS0, NS1], hs(0, 1)).offsets

    new, records = reopen(idx)
    assert len(records) == 6
    assert new.restore(records) == 6
    assert new.lookup([NS0, NS1], hs(0, 1, 2)) == 2
    assert new.lookup([NS0], hs(0, 1, 2)) == 3
    assert new.pin("s", [NS0, NS1], hs(0, 1)).offsets == offsets
    assert new.pin("s", [NS0], hs(5)).checksums == [[555]]
    assert not hit(new, NS0, 7) and not hit(new, NS0, 6)
    assert new.chunk_bytes(NS0) == SMALL
    with pytest.raises(ValueError):
        new.declare(NS0, BIG)
    assert new.pool.alloc_state.used_bytes == 6 * SMALL
    new.declare(NS0, SMALL)
    assert new.reserve("w", NS0, hs(7, 6)).status == [W, W]


def test_restore_keeps_lru_order_by_last_use() -> None:
    idx = make_index(num_slabs=1)
    for i in range(4):
        store(idx, NS0, i)
    new, records = reopen(idx)
    # Pretend chunk 3 (the newest slot) was used longest ago, then 2, 1, 0.
    last_use = {hs(i).bytes: 100 - i for i in range(4)}
    new.restore([dataclasses.replace(r, last_use_ns=last_use[r.hash]) for r in reversed(records)])
    new.declare(NS0, SMALL)
    store(new, NS0, 10)
    assert not hit(new, NS0, 3)
    store(new, NS0, 11)
    assert not hit(new, NS0, 2)
    assert hit(new, NS0, 0) and hit(new, NS0, 1)


def test_restore_drops_duplicate_keys() -> None:
    idx = make_index(num_slabs=1)
    store(idx, NS0, 0, 1)
    new, records = reopen(idx)
    dup = dataclasses.replace(records[1], hash=records[0].hash, last_use_ns=records[0].last_use_ns + 1)
    assert new.restore([records[0], dup]) == 1
    assert new.pool.alloc_state.used_bytes == SMALL
    assert new.lookup([NS0], hs(0)) == 1
    assert new.pin("s", [NS0], hs(0)).offsets == [[new.pool.offset(records[0].slot)]]


# -- stats ------------------------------------------------------------------------------------


def test_stats_views() -> None:
    idx = make_index()
    store(idx, NS0, 0, 1)
    idx.reserve("w", NS1, hs(0))
    idx.pin("s", [NS0], hs(0))
    assert idx.entries_by_state() == {"writing": 1, "committed": 2}
    assert idx.leases_by_kind() == {"read": 1, "write": 1}
    assert idx.bytes_by_namespace() == {NS0: (2, 2 * SMALL)}
    assert idx.owner_lease_count("s") == 1 and idx.owner_lease_count("w") == 1
    assert len(idx) == 3


# -- property: random operation sequences keep the index and the pool consistent -------------

NAMESPACES = [NS0, NS1, NSB, NSH]
OWNERS = ["a", "b", "c"]


class IndexMachine(RuleBasedStateMachine):
    """Random RESERVE/COMMIT/RELEASE/LOOKUP/PIN/CLEAR/expiry on a 3-slab pool with a 2-slab
    GPU tier region (writers on its device or not), checked against a model of what each
    owner holds."""

    def __init__(self) -> None:
        super().__init__()
        self.idx = make_index(num_slabs=3, gpu_slabs=1)
        self.writes: dict[int, tuple[str, bytes, list[int]]] = {}   # lease -> owner, ns, ids
        self.reads: dict[int, tuple[str, list[bytes], list[int]]] = {}  # lease -> owner, nss, ids
        self.copies: dict[int, list[tuple[object, int, int]]] = {}     # read lease -> (entry, region, offset)
        self.doomed_pins = 0

    @rule(owner=st.sampled_from(OWNERS), ns=st.sampled_from(NAMESPACES),
          ids=st.lists(st.integers(0, 11), min_size=1, max_size=6),
          cap=st.none() | st.integers(0, 3 * SLAB), on_gpu=st.booleans())
    def reserve(self, owner: str, ns: bytes, ids: list[int], cap: int | None, on_gpu: bool) -> None:
        before = self.idx.owner_write_bytes(owner)
        r = self.idx.reserve(owner, ns, hs(*ids), cap, gpu_region=1 if on_gpu else 0)
        if r.gpu_regions:
            assert on_gpu and all(g == 0 for g, s in zip(r.gpu_regions, r.status) if s != W)
        if cap is not None:
            assert self.idx.owner_write_bytes(owner) <= max(cap, before), "the write quota holds"
        assert len(r.status) == len(ids)
        if N in r.status:
            first = r.status.index(N)
            assert all(s != W for s in r.status[first:]), "no slot after the first NO_SPACE"
        mine = [i for i, s in zip(ids, r.status) if s == W]
        assert (r.lease_id != 0) == bool(mine)
        for i, s in zip(ids, r.status):
            if s == P_:
                assert hit(self.idx, ns, i)
        if mine:
            self.writes[r.lease_id] = (owner, ns, mine)

    @precondition(lambda self: bool(self.writes))
    @rule(data=st.data(), subset=st.booleans())
    def commit(self, data: st.DataObject, subset: bool) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.writes)))
        owner, ns, ids = self.writes.pop(lease_id)
        chosen = data.draw(st.lists(st.sampled_from(ids), unique=True)) if subset else []
        n = self.idx.commit(owner, lease_id, hs(*chosen))
        assert n == (len(chosen) if chosen else len(ids))
        for i in chosen or ids:
            assert hit(self.idx, ns, i)

    @precondition(lambda self: bool(self.writes) or bool(self.reads))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted([*self.writes, *self.reads])))
        owner = (self.writes.pop(lease_id, None) or self.reads.pop(lease_id))[0]
        self.copies.pop(lease_id, None)
        self.idx.release(owner, lease_id)

    @rule(owner=st.sampled_from(OWNERS), nss=st.lists(st.sampled_from(NAMESPACES), min_size=1, max_size=2,
                                                     unique=True),
          ids=st.lists(st.integers(0, 11), min_size=1, max_size=6), pin=st.booleans())
    def lookup(self, owner: str, nss: list[bytes], ids: list[int], pin: bool) -> None:
        n = self.idx.lookup(nss, hs(*ids))
        for k, i in enumerate(ids):
            all_hit = all(hit(self.idx, ns, i) for ns in nss)
            if k < n:
                assert all_hit
            else:
                assert k == n and not all_hit
                break
        if pin:
            p = self.idx.pin(owner, nss, hs(*ids))
            assert p.hits == n
            if n:
                self.reads[p.lease_id] = (owner, nss, ids[:n])
                entries = [self.idx._committed.get(key_of(ns, i)) for ns in nss for i in ids[:n]]
                self.copies[p.lease_id] = [(e, e.gpu_region, e.gpu_offset) for e in entries]
                assert [c[1] for c in self.copies[p.lease_id]] == [g for col in p.gpu_regions for g in col]

    @rule(ns=st.none() | st.sampled_from(NAMESPACES))
    def clear(self, ns: bytes | None) -> None:
        self.idx.clear(ns)
        for n in [ns] if ns else NAMESPACES:
            assert not any(hit(self.idx, n, i) for i in range(12))
        # Cleared pinned entries no longer count for their pins' model.
        for lease_id, (owner, nss, ids) in list(self.reads.items()):
            if ns is None or ns in nss:
                self.reads[lease_id] = (owner, [], [])

    @rule(owner=st.sampled_from(OWNERS))
    def expire(self, owner: str) -> None:
        self.idx.drop_owner(owner)
        for leases in (self.writes, self.reads):
            for lease_id in [k for k, v in leases.items() if v[0] == owner]:
                del leases[lease_id]
                self.copies.pop(lease_id, None)
        assert self.idx.owner_lease_count(owner) == 0

    @invariant()
    def write_bytes_match_write_leases(self) -> None:
        for owner in OWNERS:
            slots = sum(self.idx.pool.slot_bytes_for(self.idx.chunk_bytes(ns) or 0) * len(ids)
                        for o, ns, ids in self.writes.values() if o == owner)
            assert self.idx.owner_write_bytes(owner) == slots

    @invariant()
    def pinned_chunks_stay_visible(self) -> None:
        for _owner, nss, ids in self.reads.values():
            for ns in nss:
                for i in ids:
                    assert hit_quiet(self.idx, ns, i)

    @invariant()
    def pool_matches_index(self) -> None:
        idx = self.idx
        geo = idx.pool.geo
        recs = {s: idx.pool.read_record(s) for s in range(geo.num_slabs * geo.max_slots_per_slab)}
        live = [r for r in recs.values() if r.state is not SlotState.FREE]
        by_state = idx.entries_by_state()
        assert sum(1 for r in live if r.state is SlotState.COMMITTED) == by_state["committed"]
        assert sum(1 for r in live if r.state is SlotState.WRITING) == by_state["writing"]
        assert by_state["writing"] == sum(len(v[2]) for v in self.writes.values())
        # Every live record sits in an allocated slot; used bytes cover at least the live
        # entries (cleared-but-pinned ones hold their slot without a record).
        alloc = idx.pool.alloc_state
        slot_bytes = {r.slot: alloc.span_of(r.slot).slot_bytes for r in live}
        assert alloc.used_bytes >= sum(slot_bytes.values())
        extents = sorted((idx.pool.offset(s), idx.pool.offset(s) + b) for s, b in slot_bytes.items())
        for (_, hi), (lo, _) in zip(extents, extents[1:]):
            assert hi <= lo

    @invariant()
    def gpu_copies_stay_put_while_pinned_and_never_overlap(self) -> None:
        for held in self.copies.values():
            for e, region, offset in held:
                assert (e.gpu_region, e.gpu_offset) == (region, offset), "a pinned chunk's copy moved or went"  # type: ignore[attr-defined]
        with_copy = [e for e in self.idx._by_slot.values() if e.gpu_region]
        stats = self.idx.gpu.stats()[1]  # type: ignore[union-attr]
        assert stats["used_bytes"] == sum(self.idx.pool.slot_bytes_for(e.length) for e in with_copy)
        extents = sorted((e.gpu_offset, e.gpu_offset + self.idx.pool.slot_bytes_for(e.length)) for e in with_copy)
        for (_, hi), (lo, _) in zip(extents, extents[1:]):
            assert hi <= lo

    def teardown(self) -> None:
        for owner in OWNERS:
            self.idx.drop_owner(owner)
        assert self.idx.entries_by_state()["writing"] == 0
        self.idx.clear()
        assert self.idx.pool.alloc_state.used_bytes == 0, "every slot comes back once all leases end"
        assert self.idx.pool.alloc_state.free_slabs() == 3
        assert self.idx.gpu.stats()[1]["used_bytes"] == 0, "and every GPU copy slot"  # type: ignore[union-attr]


def hit_quiet(idx: ChunkIndex, ns: bytes, i: int) -> bool:
    """A hit check for invariants (it refreshes LRU, which no pinned entry depends on)."""
    return idx.lookup([ns], hs(i)) == 1


IndexMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestIndexMachine = IndexMachine.TestCase


# -- the sidecar's own reads and writes (tier movers) -------------------------------------------


def test_internal_write_is_invisible_until_finished_and_freed_on_failure() -> None:
    idx = make_index()
    key = key_of(NS0, 7)
    e = idx.reserve_internal(key)
    assert e is not None and e.in_lower
    assert not hit(idx, NS0, 7) and idx.reserve_internal(key) is None, "present (WRITING): not twice"
    assert idx.reserve("w", NS0, hs(7)).status == [B], "a client writer sees it busy"
    idx.finish_internal(e, ok=True)
    assert hit(idx, NS0, 7) and idx.pool.read_record(e.slot).state is SlotState.COMMITTED
    e2 = idx.reserve_internal(key_of(NS0, 8))
    assert e2 is not None
    before = used(idx)
    idx.finish_internal(e2, ok=False)
    assert not hit(idx, NS0, 8) and used(idx) < before
    assert idx.reserve_internal(key_of(b"\x99" * 16, 1)) is None, "undeclared namespace"


def test_internal_write_gets_the_checksum_of_its_bytes_with_verify() -> None:
    idx = make_index()
    seen: list[tuple[int, int]] = []
    idx.checksum_at = lambda off, n: seen.append((off, n)) or 4242
    e = idx.reserve_internal(key_of(NS0, 7))
    assert e is not None
    idx.finish_internal(e, ok=True)
    assert seen == [(e.offset, SMALL)] and e.checksum == 4242
    assert idx.pin("r", [NS0], hs(7)).checksums == [[4242]]
    assert idx.pool.read_record(e.slot).checksum == 4242, "persisted for a warm restart"


def test_drop_corrupt_needs_the_checksum_the_loader_was_given() -> None:
    idx = make_index()
    r = idx.reserve("w", NS0, hs(1, 2))
    idx.commit("w", r.lease_id, hs(1, 2), [5, 6])
    pinned = idx.pin("r", [NS0], hs(1, 2))
    assert idx.drop_corrupt(NS0, hs(1, 2), [5, 7]) == 1
    assert idx.lookup([NS0], hs(1, 2)) == 0 and idx.counters.corrupt == 1
    assert idx.drop_corrupt(NS0, hs(1), [5]) == 0, "gone already"
    assert idx.drop_corrupt(NS1, hs(2), [6]) == 0, "another namespace"
    before = used(idx)
    idx.release("r", pinned.lease_id)
    assert used(idx) < before, "the corrupt slot is freed once unpinned"
    assert idx.lookup([NS0], hs(2)) == 1


def test_restore_requiring_checksums_frees_records_without_one() -> None:
    region = MemRegion(2 * MiB + 2 * SLAB)
    idx = make_index(region=region)
    r = idx.reserve("w", NS0, hs(1, 2, 3))
    idx.commit("w", r.lease_id, hs(1, 2), [0, 9])   # chunk 3 is aborted
    pool, records = HostPool.open(region, SLAB, MIN_SLOT)  # type: ignore[arg-type]
    again = ChunkIndex(pool)
    assert again.restore(records, require_checksum=True) == 1
    again.declare(NS0, SMALL)
    assert again.lookup([NS0], hs(2)) == 1 and again.lookup([NS0], hs(1)) == 0
    assert again.counters.unverified == 1 and pool.alloc_state.used_bytes == SMALL


def test_write_quota_refuses_slots_past_the_owners_share() -> None:
    idx = make_index(num_slabs=2)               # 8 SMALL slots
    r = idx.reserve("w", NS0, hs(1, 2, 3, 4), max_write_bytes=3 * SMALL)
    assert r.status == [W, W, W, N] and idx.owner_write_bytes("w") == 3 * SMALL
    assert idx.counters.quota_refused == 1
    assert idx.reserve("w", NS0, hs(9), max_write_bytes=3 * SMALL).status == [N]
    assert idx.reserve("v", NS0, hs(9), max_write_bytes=3 * SMALL).status == [W], "per owner"
    idx.commit("w", r.lease_id)
    assert idx.owner_write_bytes("w") == 0
    assert idx.reserve("w", NS0, hs(10), max_write_bytes=3 * SMALL).status == [W]
    idx.drop_owner("w")
    assert idx.owner_write_bytes("w") == 0


def test_pin_quota_counts_distinct_chunks_and_reports_a_shorter_prefix() -> None:
    idx = make_index(num_slabs=2)               # 8 SMALL slots
    for i in range(1, 7):
        store(idx, NS0, i)
    p = idx.pin("s", [NS0], hs(1, 2, 3, 4), max_pin_bytes=3 * SMALL)
    assert p.hits == 3 and idx.counters.quota_refused == 1
    again = [idx.pin("s", [NS0], hs(1, 2, 3), max_pin_bytes=3 * SMALL) for _ in range(5)]
    assert [x.hits for x in again] == [3] * 5, "pinning the same chunks again costs nothing"
    assert idx.pin("s", [NS0], hs(4), max_pin_bytes=3 * SMALL).hits == 0
    assert idx.pin("t", [NS0], hs(1, 2, 3, 4), max_pin_bytes=3 * SMALL).hits == 3, "per owner"
    for i in range(1, 3):                      # two namespaces (two ranks' shards): a slot in each
        store(idx, NS1, i)
    assert idx.pin("u", [NS0, NS1], hs(1, 2), max_pin_bytes=3 * SMALL).hits == 1
    idx.release("s", p.lease_id)
    assert idx.pin("s", [NS0], hs(4), max_pin_bytes=3 * SMALL).hits == 0, "1-3 still pinned by the others"
    for x in again:
        idx.release("s", x.lease_id)
    assert idx.pin("s", [NS0], hs(1, 2, 3), max_pin_bytes=3 * SMALL).hits == 3, "released pins no longer count"
    idx.drop_owner("s")
    assert idx.pin("s", [NS0], hs(1, 2, 3), max_pin_bytes=3 * SMALL).hits == 3


def test_hold_keeps_a_cleared_entry_readable_until_unheld() -> None:
    idx = make_index()
    store(idx, NS0, 1)
    e = idx.hold(key_of(NS0, 1))
    assert e is not None and idx.hold(key_of(NS0, 2)) is None
    before = used(idx)
    assert idx.clear(NS0) == 1
    assert not hit(idx, NS0, 1) and used(idx) == before, "the slot stays while a copy reads it"
    idx.unhold(e)
    assert used(idx) < before


def test_eviction_prefers_entries_with_a_lower_copy_and_reports_dirty_ones() -> None:
    idx = make_index(num_slabs=1)           # 4 SMALL chunks
    store(idx, NS0, 1, 2, 3, 4)
    assert [x.key for x in idx.cold_dirty(2)] == [key_of(NS0, 1), key_of(NS0, 2)]
    idx.prefer_clean = True
    e = idx.hold(key_of(NS0, 3))
    assert e is not None
    e.in_lower = True                       # as a finished demotion marks it
    idx.unhold(e)
    store(idx, NS0, 5)
    assert not hit(idx, NS0, 3) and hit(idx, NS0, 1), "the clean entry went first, not the oldest"
    assert idx.counters.evicted_dirty == 0
    store(idx, NS0, 6)
    assert not hit(idx, NS0, 1) and idx.counters.evicted_dirty == 1
