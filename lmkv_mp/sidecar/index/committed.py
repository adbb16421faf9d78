"""The host tier's COMMITTED entries: by key for lookups, by last use for eviction (no sockets).

Only what is here is visible to lookups; the index adds an entry when it commits and
removes it when it leaves the cache or is hidden while pinned. Per size class (slot bytes)
the entries are also kept least recently used first. When an allocation finds no slot,
:meth:`CommittedEntries.victims` names what to give up: the oldest unpinned entry of the
class that needs the slot (with ``prefer_clean``, one a lower tier holds a copy of, among
the ``CLEAN_SCAN`` oldest, so evicting it loses nothing), else every entry of one whole
span of another class, the span whose newest entry is oldest. Pinned and WRITING entries
are never victims. Choosing evicts nothing: the index does that.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from typing import Mapping

from lmkv_mp.sidecar.index.entry import Entry, EntryState
from lmkv_mp.wire.hashes import HashList
from lmkv_mp.wire.keys import HASH_BYTES
from lmkv_mp.memory.allocator import SlotId, Span
from lmkv_mp.memory.pool import HostPool

CLEAN_SCAN = 256  # oldest entries eviction searches for one with a lower-tier copy


class CommittedEntries:
    """The visible entries by namespace and hash, and LRU lists of them, one per size class.

    ``by_slot`` is the index's map of every slot it holds to its entry (read here, to tell
    whether a whole span can go)."""

    def __init__(self, pool: HostPool, by_slot: Mapping[SlotId, Entry]) -> None:
        self.pool = pool
        self._by_slot = by_slot
        self._visible: dict[bytes, dict[bytes, Entry]] = {}    # namespace -> hash -> COMMITTED entry
        self._lru: dict[int, OrderedDict[Entry, None]] = {}    # slot_bytes -> committed, oldest first

    def add(self, e: Entry) -> None:
        """``e`` became COMMITTED: visible, and the most recently used of its class."""
        self._visible.setdefault(e.key[:HASH_BYTES], {})[e.key[HASH_BYTES:]] = e
        self._lru.setdefault(e.slot_bytes, OrderedDict())[e] = None

    def remove(self, e: Entry) -> None:
        visible = self._visible.get(e.key[:HASH_BYTES])
        if visible is not None and visible.get(e.key[HASH_BYTES:]) is e:
            del visible[e.key[HASH_BYTES:]]
        lru = self._lru.get(e.slot_bytes)
        if lru is not None:
            lru.pop(e, None)

    def forget(self, namespace: bytes) -> None:
        """Drop a namespace that holds no entry any more (its empty map)."""
        if not self._visible.get(namespace, True):
            del self._visible[namespace]

    def get(self, key: bytes) -> Entry | None:
        """The entry of ``key`` (namespace + hash), if visible."""
        visible = self._visible.get(key[:HASH_BYTES])
        return visible.get(key[HASH_BYTES:]) if visible is not None else None

    def leading(self, namespaces: list[bytes], hashes: HashList, touch: bool = True) -> list[list[Entry]]:
        """Per namespace, the entries of the leading chunks committed in all of them; with
        ``touch``, refreshed in LRU order.

        The hot path of every LOOKUP, so the per-chunk work runs in C: one ``map`` of
        ``dict.get`` over the hash slices per namespace, and LRU refresh via ``map`` too.
        """
        keys = hashes.split()
        cols: list[list[Entry]] = []
        n = len(keys)
        for ns in namespaces:
            visible = self._visible.get(ns)
            if visible is None or n == 0:
                return []
            col: list[Entry | None] = list(map(visible.get, keys[:n]))
            if None in col:
                n = col.index(None)
            cols.append(col)  # type: ignore[arg-type]
        if n == 0:
            return []
        cols = [col[:n] for col in cols]
        if touch:
            for col in cols:
                deque(map(self._lru[col[0].slot_bytes].move_to_end, col), maxlen=0)
        return cols

    def touch(self, e: Entry) -> None:
        self._lru[e.slot_bytes].move_to_end(e)

    def cold_dirty(self, limit: int, scan: int) -> list[Entry]:
        """Up to ``limit`` least recently used unpinned entries that no lower tier holds yet,
        among the ``scan`` oldest of each size class."""
        out: list[Entry] = []
        for lru in self._lru.values():
            for e in itertools.islice(lru, scan):
                if len(out) >= limit:
                    return out
                if not e.in_lower and e.pins == 0:
                    out.append(e)
        return out

    def victims(self, slot_bytes: int, ranked: dict[int, list[Span]], prefer_clean: bool) -> list[Entry] | None:
        """What to evict to free room for one slot of ``slot_bytes``; None if nothing can go.

        When no entry of that class can go, whole spans of other classes go, the one whose
        newest entry is oldest first. Ranking them walks every slot of the pool, so it is done
        once per request and kept in ``ranked`` (evicting never reorders the entries left);
        each candidate is checked again when its turn comes."""
        lru = self._lru.get(slot_bytes)
        if lru and prefer_clean:
            for e in itertools.islice(lru, CLEAN_SCAN):
                if e.pins == 0 and e.in_lower:
                    return [e]
        if lru:
            for e in lru:
                if e.pins == 0:
                    return [e]
        if slot_bytes not in ranked:
            ranked[slot_bytes] = self._rank_spans(slot_bytes)
        candidates = ranked[slot_bytes]
        while candidates:
            live = self._evictable(candidates.pop())
            if live is not None:
                return live
        return None

    def _rank_spans(self, slot_bytes: int) -> list[Span]:
        """Spans of other classes that could be evicted whole, the best victim last (its
        newest entry is the oldest)."""
        ranks: dict[int, dict[bytes, int]] = {}
        ranked: list[tuple[int, int, Span]] = []
        for span in self.pool.alloc_state.spans():
            live = None if span.slot_bytes == slot_bytes else self._evictable(span)
            if not live:
                continue
            if span.slot_bytes not in ranks:
                ranks[span.slot_bytes] = {k.key: i for i, k in enumerate(self._lru[span.slot_bytes])}
            ranked.append((max(ranks[span.slot_bytes][m.key] for m in live), span.head, span))
        ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
        return [span for _rank, _head, span in ranked]

    def _evictable(self, span: Span) -> list[Entry] | None:
        """The entries of ``span`` if it is still allocated and every used slot in it holds a
        committed, unpinned entry; else None."""
        if not self.pool.alloc_state.is_live(span):
            return None
        base = span.head * self.pool.geo.max_slots_per_slab
        live = [m for m in (self._by_slot.get(SlotId(base + i)) for i in range(span.nslots)) if m is not None]
        if len(live) != span.used or any(m.pins or m.state is not EntryState.COMMITTED for m in live):
            return None
        return live
