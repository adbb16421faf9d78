"""Tests for lmkv_mp.memory.allocator.SlabAllocator (pure state, no memory touched)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lmkv_mp.memory.allocator import SLOT_ALIGN, SlabAllocator, SlotId, round_slot

KiB = 1 << 10
SLAB = 64 * KiB
MAX_SLOTS = SLAB // (4 * KiB)  # as HostPool plans it: slab_size // min_slot_bytes


def make(num_slabs: int = 4) -> SlabAllocator:
    return SlabAllocator(num_slabs, SLAB, MAX_SLOTS)


def fill(a: SlabAllocator, slot_bytes: int) -> list[SlotId]:
    out = []
    while (s := a.alloc(slot_bytes)) is not None:
        out.append(s)
    return out


def extent(a: SlabAllocator, slot: SlotId) -> tuple[int, int]:
    off = a.offset(slot)
    return off, off + a.span_of(slot).slot_bytes


def assert_disjoint_and_inside(a: SlabAllocator, slots: list[SlotId]) -> None:
    spans = sorted(extent(a, s) for s in slots)
    for lo, hi in spans:
        assert 0 <= lo < hi <= a.capacity_bytes
    for (_, hi), (lo, _) in zip(spans, spans[1:]):
        assert hi <= lo, "two live slots overlap"


# -- round_slot -------------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes, min_slot, expected", [
    (1, 4 * KiB, 4 * KiB), (4 * KiB, 4 * KiB, 4 * KiB), (4 * KiB + 1, 4 * KiB, 8 * KiB),
    (10, 16 * KiB, 16 * KiB), (100 * KiB + 3, 4 * KiB, 104 * KiB), (0, 4 * KiB, 4 * KiB),
])
def test_round_slot(nbytes: int, min_slot: int, expected: int) -> None:
    assert round_slot(nbytes, min_slot) == expected
    assert expected % SLOT_ALIGN == 0


# -- basic allocation -------------------------------------------------------------------------


def test_rejects_empty_pool() -> None:
    with pytest.raises(ValueError):
        SlabAllocator(0, SLAB, MAX_SLOTS)


@pytest.mark.parametrize("slot_bytes, per_slab", [(4 * KiB, 16), (16 * KiB, 4), (32 * KiB, 2), (64 * KiB, 1),
                                                  (24 * KiB, 2), (40 * KiB, 1)])
def test_alloc_until_full_returns_none(slot_bytes: int, per_slab: int) -> None:
    a = make(num_slabs=3)
    slots = fill(a, slot_bytes)
    assert len(slots) == 3 * per_slab
    assert len(set(slots)) == len(slots)
    assert a.alloc(slot_bytes) is None
    assert a.free_slabs() == 0
    assert a.used_bytes == len(slots) * slot_bytes
    assert_disjoint_and_inside(a, slots)


def test_slots_are_page_aligned() -> None:
    a = make()
    for s in fill(a, 12 * KiB) + fill(a, 4 * KiB):
        assert a.offset(s) % SLOT_ALIGN == 0


def test_freed_slot_is_reused_when_full() -> None:
    a = make(num_slabs=1)
    slots = fill(a, 16 * KiB)
    a.free(slots[2])
    assert a.alloc(16 * KiB) == slots[2]
    assert a.alloc(16 * KiB) is None


def test_partial_span_is_used_before_a_new_one() -> None:
    a = make(num_slabs=4)
    first = a.alloc(16 * KiB)
    assert first is not None
    assert a.free_slabs() == 3
    others = [a.alloc(16 * KiB) for _ in range(3)]
    assert a.free_slabs() == 3, "a class fills its open span before carving another"
    assert {a.span_of(s).head for s in [first, *others]} == {a.span_of(first).head}


def test_empty_span_returns_its_slabs_to_other_classes() -> None:
    a = make(num_slabs=2)
    small = fill(a, 16 * KiB)
    assert a.free_slabs() == 0
    assert a.alloc(32 * KiB) is None
    head = a.span_of(small[0]).head
    span_mates = [s for s in small if a.span_of(s).head == head]
    for s in span_mates[:-1]:
        assert a.free(s) is None
        assert a.free_slabs() == 0, "a span with live slots keeps its slab"
    returned = a.free(span_mates[-1])
    assert returned is not None and returned.head == head
    assert a.free_slabs() == 1
    big = [a.alloc(32 * KiB), a.alloc(32 * KiB)]
    assert None not in big
    assert a.alloc(32 * KiB) is None
    assert {a.span_of(s).head for s in big} == {head}
    assert_disjoint_and_inside(a, [s for s in small if s not in span_mates] + big)  # type: ignore[list-item]


def test_used_bytes_tracks_alloc_and_free() -> None:
    a = make()
    s1, s2 = a.alloc(4 * KiB), a.alloc(32 * KiB)
    assert a.used_bytes == 36 * KiB
    a.free(s1)  # type: ignore[arg-type]
    assert a.used_bytes == 32 * KiB
    a.free(s2)  # type: ignore[arg-type]
    assert a.used_bytes == 0 and a.free_slabs() == 4
    assert a.capacity_bytes == 4 * SLAB


# -- classes larger than a slab ---------------------------------------------------------------


@pytest.mark.parametrize("slot_bytes, nslabs", [(SLAB + 4 * KiB, 2), (2 * SLAB, 2), (2 * SLAB + 4 * KiB, 3),
                                                (4 * SLAB, 4)])
def test_large_class_spans_contiguous_slabs(slot_bytes: int, nslabs: int) -> None:
    a = make(num_slabs=4)
    assert a.slots_per_span(slot_bytes)[0] == nslabs
    s = a.alloc(slot_bytes)
    assert s is not None
    span = a.span_of(s)
    assert span.nslabs == nslabs and span.nslots >= 1
    lo, hi = extent(a, s)
    assert lo == span.head * SLAB and hi <= (span.head + nslabs) * SLAB
    assert a.free_slabs() == 4 - nslabs
    a.free(s)
    assert a.free_slabs() == 4


def test_large_class_needs_a_contiguous_run() -> None:
    """Two free slabs that are not adjacent cannot hold a two-slab span."""
    a = make(num_slabs=4)
    per_slab = [a.alloc(64 * KiB) for _ in range(4)]  # one slot fills one slab
    assert None not in per_slab and a.free_slabs() == 0
    by_head = {a.span_of(s).head: s for s in per_slab}  # type: ignore[arg-type]
    a.free(by_head[0])
    a.free(by_head[2])
    assert a.free_slabs() == 2
    assert a.alloc(2 * SLAB) is None
    a.free(by_head[1])
    s = a.alloc(2 * SLAB)
    assert s is not None and a.span_of(s).head == 0


def test_larger_than_pool_is_none() -> None:
    a = make(num_slabs=2)
    assert a.alloc(3 * SLAB) is None
    assert a.free_slabs() == 2 and a.used_bytes == 0


# -- misuse -----------------------------------------------------------------------------------


def test_double_free_in_a_live_span_raises() -> None:
    a = make()
    s1, s2 = a.alloc(16 * KiB), a.alloc(16 * KiB)
    a.free(s1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="double free"):
        a.free(s1)  # type: ignore[arg-type]
    assert a.used_bytes == 16 * KiB
    a.free(s2)  # type: ignore[arg-type]


def test_double_free_after_span_went_back_raises() -> None:
    """The last free returned the span; a second free of that id finds no span (KeyError)."""
    a = make()
    s = a.alloc(16 * KiB)
    a.free(s)  # type: ignore[arg-type]
    with pytest.raises((KeyError, ValueError)):
        a.free(s)  # type: ignore[arg-type]
    assert a.used_bytes == 0 and a.free_slabs() == 4


@pytest.mark.parametrize("bad", [SlotId(1), SlotId(MAX_SLOTS), SlotId(3 * MAX_SLOTS + 2)])
def test_free_of_never_allocated_slot_raises(bad: SlotId) -> None:
    a = make()
    a.alloc(32 * KiB)  # slab 0: two slots (0, 1); slot 1 is free, slabs 1.. are not carved
    with pytest.raises((KeyError, ValueError)):
        a.free(bad)


def test_offset_of_unallocated_slot_raises() -> None:
    with pytest.raises(KeyError):
        make().offset(SlotId(0))


# -- restore_span -----------------------------------------------------------------------------


def test_restore_span_rebuilds_used_and_free() -> None:
    a = make(num_slabs=4)
    span = a.restore_span(2, 16 * KiB, {0, 3})
    assert (span.head, span.nslabs, span.nslots, span.used) == (2, 1, 4, 2)
    assert a.used_bytes == 32 * KiB
    assert a.free_slabs() == 3
    got = {a.alloc(16 * KiB), a.alloc(16 * KiB)}
    assert got == {SlotId(2 * MAX_SLOTS + 1), SlotId(2 * MAX_SLOTS + 2)}, "restored span's free slots first"
    assert a.free_slabs() == 3
    assert a.span_of(SlotId(2 * MAX_SLOTS)).head == 2
    assert a.offset(SlotId(2 * MAX_SLOTS + 3)) == 2 * SLAB + 3 * 16 * KiB


def test_restore_full_span_is_not_partial() -> None:
    a = make(num_slabs=1)
    a.restore_span(0, 32 * KiB, {0, 1})
    assert a.alloc(32 * KiB) is None
    a.free(SlotId(1))
    assert a.alloc(32 * KiB) == SlotId(1)


def test_restore_multi_slab_span() -> None:
    a = make(num_slabs=4)
    span = a.restore_span(2, 2 * SLAB, {0})
    assert span.nslabs == 2 and a.free_slabs() == 2
    assert a.alloc(2 * SLAB) == SlotId(0)  # slabs 0-1, the only run left
    assert a.alloc(2 * SLAB) is None
    assert a.offset(SlotId(2 * MAX_SLOTS)) == 2 * SLAB


@pytest.mark.parametrize("head, slot_bytes", [(1, 16 * KiB), (0, 2 * SLAB), (3, 2 * SLAB), (4, 16 * KiB)])
def test_restore_span_rejects_overlap_or_pool_end(head: int, slot_bytes: int) -> None:
    a = make(num_slabs=4)
    a.restore_span(1, 16 * KiB, {0})
    with pytest.raises(ValueError):
        a.restore_span(head, slot_bytes, {0})


# -- property: random alloc/free sequences ----------------------------------------------------

CLASSES = [4 * KiB, 12 * KiB, 16 * KiB, 40 * KiB, SLAB + 8 * KiB]


class AllocatorMachine(RuleBasedStateMachine):
    """Random interleavings of several size classes, checked against a model of live slots."""

    def __init__(self) -> None:
        super().__init__()
        self.a = SlabAllocator(6, SLAB, MAX_SLOTS)
        self.live: dict[SlotId, int] = {}

    @rule(slot_bytes=st.sampled_from(CLASSES))
    def alloc(self, slot_bytes: int) -> None:
        s = self.a.alloc(slot_bytes)
        if s is None:
            # Full for this class: no open span of it, and no run of free slabs long enough.
            nslabs, _ = self.a.slots_per_span(slot_bytes)
            assert not any(sp.slot_bytes == slot_bytes and sp.free for sp in self.a.spans())
            assert self._longest_free_run() < nslabs
            return
        assert s not in self.live, "slot handed out twice"
        assert self.a.span_of(s).slot_bytes == slot_bytes
        self.live[s] = slot_bytes

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), twice=st.booleans())
    def free(self, data: st.DataObject, twice: bool) -> None:
        s = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[s]
        self.a.free(s)
        if twice:
            with pytest.raises((ValueError, KeyError)):
                self.a.free(s)

    def _longest_free_run(self) -> int:
        best = run = 0
        for s in range(self.a.num_slabs):
            run = run + 1 if self.a._slab_span[s] is None else 0
            best = max(best, run)
        return best

    @invariant()
    def no_overlap_inside_pool(self) -> None:
        assert_disjoint_and_inside(self.a, list(self.live))

    @invariant()
    def accounting(self) -> None:
        assert self.a.used_bytes == sum(self.live.values())
        spans = self.a.spans()
        assert all(sp.used > 0 for sp in spans), "an empty span must go back to the free slabs"
        assert self.a.free_slabs() == self.a.num_slabs - sum(sp.nslabs for sp in spans)
        assert sum(sp.used for sp in spans) == len(self.live)


AllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
TestAllocatorMachine = AllocatorMachine.TestCase
