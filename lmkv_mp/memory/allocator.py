"""SlabAllocator: equal-size slots carved from slabs, one size class per slab (pure state).

The pool is ``num_slabs`` base slabs of ``slab_size`` bytes. A size class (a rounded
chunk size) takes *spans* of contiguous base slabs: one slab when its slots fit in a
slab, ``ceil(slot_bytes / slab_size)`` slabs otherwise, so a chunk larger than a slab still
has a home. A span that becomes empty goes back to the free slabs, so memory flows to
whichever namespaces are in use. Nothing here touches memory; :mod:`pool` persists it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NewType

SLOT_ALIGN = 4096
"""Slots are page aligned: DMA-friendly, and any dtype's vector loads are aligned."""

SlotId = NewType("SlotId", int)
"""Index of a slot's record in the slot table: ``head_slab * max_slots_per_slab + i``."""


def round_slot(nbytes: int, min_slot_bytes: int) -> int:
    """The slot size that holds ``nbytes``: at least ``min_slot_bytes``, page aligned."""
    n = max(nbytes, min_slot_bytes)
    return (n + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN


@dataclass(slots=True)
class Span:
    head: int             # first base slab
    nslabs: int
    slot_bytes: int
    nslots: int
    free: list[int] = field(default_factory=list)   # slot indices within the span

    @property
    def used(self) -> int:
        return self.nslots - len(self.free)


class SlabAllocator:
    """Allocates slots by size class. Invariant: a slot is either in its span's free list or
    handed out exactly once; a span with no used slots is returned to the free slabs."""

    def __init__(self, num_slabs: int, slab_size: int, max_slots_per_slab: int) -> None:
        if num_slabs <= 0:
            raise ValueError("the pool must hold at least one slab")
        self.num_slabs = num_slabs
        self.slab_size = slab_size
        self.max_slots_per_slab = max_slots_per_slab
        self._slab_span: list[Span | None] = [None] * num_slabs   # every slab of a span points at it
        self._partial: dict[int, dict[int, Span]] = {}             # slot_bytes -> head -> span with free slots
        self.used_bytes = 0

    # -- queries -----------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self.num_slabs * self.slab_size

    def free_slabs(self) -> int:
        return sum(1 for s in self._slab_span if s is None)

    def span_of(self, slot: SlotId) -> Span:
        span = self._slab_span[slot // self.max_slots_per_slab]
        if span is None or span.head != slot // self.max_slots_per_slab:
            raise KeyError(f"slot {slot} is not in an allocated span")
        return span

    def offset(self, slot: SlotId) -> int:
        """Byte offset of the slot from the start of the slab area."""
        span = self.span_of(slot)
        return span.head * self.slab_size + (slot % self.max_slots_per_slab) * span.slot_bytes

    def is_live(self, span: Span) -> bool:
        """Whether ``span`` is still allocated (not freed, nor its slabs reused since)."""
        return self._slab_span[span.head] is span

    def spans(self) -> list[Span]:
        seen: dict[int, Span] = {}
        for s in self._slab_span:
            if s is not None:
                seen[s.head] = s
        return list(seen.values())

    def slots_per_span(self, slot_bytes: int) -> tuple[int, int]:
        """(base slabs per span, slots per span) for a size class."""
        nslabs = max(1, -(-slot_bytes // self.slab_size))
        nslots = min(nslabs * self.slab_size // slot_bytes, nslabs * self.max_slots_per_slab)
        return nslabs, nslots

    # -- allocation --------------------------------------------------------------------

    def alloc(self, slot_bytes: int) -> SlotId | None:
        """A free slot of exactly ``slot_bytes`` (already rounded), or None when no slot of
        that class is free and no span of free slabs is left (the caller evicts)."""
        partial = self._partial.get(slot_bytes)
        if partial:
            span = next(iter(partial.values()))
        else:
            span = self._new_span(slot_bytes)
            if span is None:
                return None
        i = span.free.pop()
        if not span.free:
            del self._partial[slot_bytes][span.head]
        self.used_bytes += slot_bytes
        return SlotId(span.head * self.max_slots_per_slab + i)

    def free(self, slot: SlotId) -> Span | None:
        """Return a slot. Returns the span if it became empty and went back to the free slabs."""
        span = self.span_of(slot)
        i = slot % self.max_slots_per_slab
        if i >= span.nslots or i in span.free:
            raise ValueError(f"double free of slot {slot}")
        span.free.append(i)
        self.used_bytes -= span.slot_bytes
        if span.used == 0:
            self._partial.get(span.slot_bytes, {}).pop(span.head, None)
            for s in range(span.head, span.head + span.nslabs):
                self._slab_span[s] = None
            return span
        self._partial.setdefault(span.slot_bytes, {})[span.head] = span
        return None

    def restore_span(self, head: int, slot_bytes: int, used: set[int]) -> Span:
        """Rebuild a span found in a persisted slab table with ``used`` slot indices taken."""
        nslabs, nslots = self.slots_per_span(slot_bytes)
        if head + nslabs > self.num_slabs or any(self._slab_span[s] for s in range(head, head + nslabs)):
            raise ValueError(f"persisted span at slab {head} overlaps another or the pool end")
        span = Span(head, nslabs, slot_bytes, nslots, [i for i in range(nslots - 1, -1, -1) if i not in used])
        for s in range(head, head + nslabs):
            self._slab_span[s] = span
        self.used_bytes += len(used) * slot_bytes
        if span.free:
            self._partial.setdefault(slot_bytes, {})[head] = span
        return span

    def _new_span(self, slot_bytes: int) -> Span | None:
        nslabs, nslots = self.slots_per_span(slot_bytes)
        run = 0
        for s in range(self.num_slabs):
            run = run + 1 if self._slab_span[s] is None else 0
            if run == nslabs:
                head = s - nslabs + 1
                span = Span(head, nslabs, slot_bytes, nslots, list(range(nslots - 1, -1, -1)))
                for t in range(head, head + nslabs):
                    self._slab_span[t] = span
                self._partial.setdefault(slot_bytes, {})[head] = span
                return span
        return None
