"""GpuCopies: the GPU tier's slots, one allocator per device region (pure state, no CUDA).

The GPU tier holds *copies* of host entries (ARCHITECTURE §4): a chunk a CUDA worker
stores gets a host slot and, when its device has a GPU region with room, a GPU slot too;
the worker writes both and one COMMIT publishes both. The host slot stays the chunk's
truth (warm restarts, lower tiers, other devices), so dropping a GPU copy loses nothing
and needs no copy back: under pressure the oldest copies are dropped.

Invariants:

* A copy's slot belongs to its entry until :meth:`free`; the index frees it together with
  the entry's host slot, so a copy never outlives its entry.
* Only copies of COMMITTED entries are in the LRU lists and only unpinned ones are evicted:
  a WRITING entry's copy is being written, a pinned one may be being read.
* An entry has at most one copy, in the region of the worker that wrote it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from lmkv_mp.sidecar.index.entry import Entry
from lmkv_mp.memory.allocator import SlabAllocator, SlotId, round_slot


@dataclass(slots=True)
class _Region:
    alloc: SlabAllocator
    lru: dict[int, OrderedDict[Entry, None]] = field(default_factory=dict)   # slot_bytes -> oldest first
    evictions: int = 0
    evicted_bytes: int = 0
    copies: int = 0          # copies written (committed)
    hits: int = 0            # pinned lookup hits that had a copy here
    refused: int = 0         # chunks stored without a copy: no slot could be freed


class GpuCopies:
    """Slots for GPU copies in regions ``1..`` (region id -> bytes); ``slab_size`` and
    ``min_slot_bytes`` as the host pool's, so a chunk takes the same slot size in both."""

    def __init__(self, regions: dict[int, int], slab_size: int, min_slot_bytes: int) -> None:
        self.min_slot_bytes = min_slot_bytes
        self._regions: dict[int, _Region] = {}
        for rid, size in regions.items():
            if rid <= 0 or size < slab_size:
                raise ValueError(f"GPU region {rid} of {size} bytes: ids start at 1, sizes at one slab")
            self._regions[rid] = _Region(SlabAllocator(size // slab_size, slab_size, slab_size // min_slot_bytes))

    def alloc(self, region_id: int, e: Entry) -> bool:
        """Give ``e`` (WRITING, without a copy) a slot in ``region_id``, dropping the oldest
        unpinned copies as needed; False when none can be freed (it is stored host-only)."""
        r = self._regions.get(region_id)
        if r is None:
            return False
        slot_bytes = round_slot(e.length, self.min_slot_bytes)
        slot = r.alloc.alloc(slot_bytes)
        if slot is None:
            slot = self._evict_for(r, slot_bytes)
        if slot is None:
            r.refused += 1
            return False
        e.gpu_region, e.gpu_slot, e.gpu_offset = region_id, slot, r.alloc.offset(slot)
        return True

    def committed(self, e: Entry) -> None:
        """``e``'s copy holds its bytes now: it may be read, and evicted when old."""
        if e.gpu_region:
            r = self._regions[e.gpu_region]
            r.lru.setdefault(r.alloc.span_of(e.gpu_slot).slot_bytes, OrderedDict())[e] = None
            r.copies += 1

    def read(self, cols: list[list[Entry]]) -> tuple[list[list[int]], list[list[int]]]:
        """Where the copies of pinned entries are, column by column (region 0: none); each
        copy a load may now use becomes the newest."""
        for col in cols:
            for e in col:
                if e.gpu_region:
                    r = self._regions[e.gpu_region]
                    lru = r.lru.get(r.alloc.span_of(e.gpu_slot).slot_bytes)
                    if lru is not None and e in lru:
                        lru.move_to_end(e)
                        r.hits += 1
        return [[e.gpu_region for e in col] for col in cols], [[e.gpu_offset for e in col] for col in cols]

    def hide(self, e: Entry) -> None:
        """``e`` left the cache but is still pinned: never a victim; freed with the entry."""
        if e.gpu_region:
            r = self._regions[e.gpu_region]
            r.lru.get(r.alloc.span_of(e.gpu_slot).slot_bytes, {}).pop(e, None)

    def free(self, e: Entry) -> None:
        """Give back ``e``'s copy (its entry is going)."""
        if e.gpu_region:
            self.hide(e)
            self._regions[e.gpu_region].alloc.free(e.gpu_slot)
            e.gpu_region, e.gpu_slot, e.gpu_offset = 0, SlotId(0), 0

    def _evict_for(self, r: _Region, slot_bytes: int) -> SlotId | None:
        """Drop copies until a slot of ``slot_bytes`` can be allocated, and allocate it: the
        oldest unpinned copy of that size class, else the copies of whole spans of other
        classes (spans whose every slot holds an unpinned, committed copy, the span with the
        oldest copy first) until freed slabs fit this class. A span with a copy being written
        or read is left alone: dropping its other copies would free nothing. None when
        nothing can be freed."""
        victim = next((e for e in r.lru.get(slot_bytes, {}) if not e.pins), None)
        if victim is not None:
            self._evict(r, victim)
            return r.alloc.alloc(slot_bytes)
        for sb, lru in list(r.lru.items()):
            if sb == slot_bytes:
                continue
            by_span: dict[int, list[Entry]] = {}
            for e in lru:
                if not e.pins:
                    by_span.setdefault(r.alloc.span_of(e.gpu_slot).head, []).append(e)
            for copies in by_span.values():
                if len(copies) != r.alloc.span_of(copies[0].gpu_slot).used:
                    continue
                for e in copies:
                    self._evict(r, e)
                slot = r.alloc.alloc(slot_bytes)
                if slot is not None:
                    return slot
        return None

    def _evict(self, r: _Region, e: Entry) -> bool:
        """Drop ``e``'s copy (the entry stays, host-only); whether its span emptied."""
        r.evictions += 1
        r.evicted_bytes += e.length
        r.lru[r.alloc.span_of(e.gpu_slot).slot_bytes].pop(e)
        span = r.alloc.free(e.gpu_slot)
        e.gpu_region, e.gpu_slot, e.gpu_offset = 0, SlotId(0), 0
        return span is not None

    def stats(self) -> dict[int, dict[str, int]]:
        """Per region id: capacity, used bytes, copies held, and what happened to them."""
        out = {}
        for rid, r in self._regions.items():
            out[rid] = {"capacity_bytes": r.alloc.capacity_bytes, "used_bytes": r.alloc.used_bytes,
                        "entries": sum(len(lru) for lru in r.lru.values()), "evictions": r.evictions,
                        "evicted_bytes": r.evicted_bytes, "stored_chunks": r.copies, "hit_chunks": r.hits,
                        "refused": r.refused}
        return out
