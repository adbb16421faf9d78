"""Leases and what each owner holds through them (pure state, no sockets, no slots).

A lease is a client's claim on index entries: a read lease pins them, a write lease owns
the WRITING entries it reserved. :class:`LeaseTable` numbers leases (ids are never reused
within one sidecar's life, so a lease alive now was alive all along), finds them by owner,
and keeps the two per-owner accounts the quotas read: slot bytes held in write leases, and
slot bytes of the distinct chunks held pinned. What a lease's end does to its entries is
the index's business (``lmkv_mp.sidecar.index.chunk_index``).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable

if TYPE_CHECKING:
    from lmkv_mp.sidecar.index.entry import Entry

Owner = Hashable


class LeaseKind(enum.Enum):
    READ = "read"
    WRITE = "write"


@dataclass(slots=True, eq=False)
class Lease:
    id: int
    kind: LeaseKind
    owner: Owner
    entries: list[Entry] = field(default_factory=list)
    slot_bytes: int = 0  # write leases: the slot bytes reserved (the owner's write quota counts them)


class LeaseError(KeyError):
    """A lease id the owner does not hold."""


class LeaseTable:
    """Every live lease, by id and by owner, and the owners' quota accounts.

    Invariants: an owner's write bytes are the sum of ``slot_bytes`` over its write leases;
    its pin bytes are the slot bytes of the distinct entries its read leases hold (an entry
    pinned by several of its leases counts once: a scheduler pins a shared prefix once per
    request)."""

    def __init__(self) -> None:
        self._leases: dict[int, Lease] = {}
        self._by_owner: dict[Owner, set[int]] = {}
        self._write_bytes: dict[Owner, int] = {}
        self._pins: dict[Owner, dict[Entry, int]] = {}   # owner -> entry -> read leases holding it
        self._pin_bytes: dict[Owner, int] = {}
        self._ids = itertools.count(1)

    def new(self, owner: Owner, kind: LeaseKind) -> Lease:
        lease = Lease(next(self._ids), kind, owner)
        self._leases[lease.id] = lease
        self._by_owner.setdefault(owner, set()).add(lease.id)
        return lease

    def take(self, owner: Owner, lease_id: int, kind: LeaseKind | None) -> Lease:
        """Remove and return the owner's lease (of ``kind``, if given), settling its write
        bytes; the caller ends it (and a read lease's pins with :meth:`unpin`). Raises
        LeaseError when the owner holds no such lease."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.owner != owner or (kind is not None and lease.kind is not kind):
            raise LeaseError(f"lease {lease_id} is not held by this client (expired or already ended)")
        del self._leases[lease_id]
        self._by_owner[owner].discard(lease_id)
        if lease.slot_bytes:
            left = self._write_bytes[owner] - lease.slot_bytes
            if left:
                self._write_bytes[owner] = left
            else:
                del self._write_bytes[owner]
        return lease

    def get(self, lease_id: int) -> Lease | None:
        return self._leases.get(lease_id)

    def owned(self, owner: Owner) -> list[int]:
        return list(self._by_owner.get(owner, ()))

    def forget(self, owner: Owner) -> None:
        """Drop an owner that holds no lease any more."""
        self._by_owner.pop(owner, None)

    # -- quota accounts -----------------------------------------------------------------

    def add_write(self, lease: Lease, slot_bytes: int) -> None:
        lease.slot_bytes += slot_bytes
        self._write_bytes[lease.owner] = self._write_bytes.get(lease.owner, 0) + slot_bytes

    def write_bytes(self, owner: Owner) -> int:
        """Slot bytes the owner's write leases hold."""
        return self._write_bytes.get(owner, 0)

    def pinned(self, owner: Owner) -> tuple[dict[Entry, int], int]:
        """The entries the owner holds pinned (entry -> leases) and their slot bytes."""
        return self._pins.get(owner) or {}, self._pin_bytes.get(owner, 0)

    def pin_room(self, owner: Owner, cols: list[list[Entry]], max_pin_bytes: int) -> int:
        """How many of the leading hits ``cols`` (one column of entries per namespace) the
        owner may pin with the slot bytes of its distinct pinned chunks staying within
        ``max_pin_bytes``; a chunk it holds pinned already costs nothing more."""
        hits = len(cols[0])
        mine, used = self.pinned(owner)
        if used + hits * sum(col[0].slot_bytes for col in cols) <= max_pin_bytes:
            return hits
        room = max_pin_bytes - used       # near the share: count what is new, hit by hit
        for i in range(hits):
            room -= sum(col[i].slot_bytes for col in cols if col[i] not in mine)
            if room < 0:
                return i
        return hits

    def pin(self, lease: Lease, entries: list[Entry]) -> None:
        """Count ``entries`` (all of one size class) as held by the read ``lease`` too."""
        mine = self._pins.setdefault(lease.owner, {})
        fresh = 0
        for e in entries:
            n = mine.get(e, 0)
            fresh += not n
            mine[e] = n + 1
        if fresh:
            self._pin_bytes[lease.owner] = self._pin_bytes.get(lease.owner, 0) + fresh * entries[0].slot_bytes
        lease.entries.extend(entries)

    def unpin(self, lease: Lease) -> None:
        """Take a read lease's entries off its owner's pin account."""
        mine = self._pins[lease.owner]
        freed = 0
        for e in lease.entries:
            n = mine[e]
            if n == 1:
                del mine[e]
                freed += e.slot_bytes
            else:
                mine[e] = n - 1
        if not mine:
            del self._pins[lease.owner]
            self._pin_bytes.pop(lease.owner, None)
        elif freed:
            self._pin_bytes[lease.owner] -= freed

    # -- stats ----------------------------------------------------------------------------

    def alive(self, lease_ids: list[int]) -> bytes:
        """One byte per id: 1 while that lease lives (not yet ended, released or reaped)."""
        return bytes(int(i in self._leases) for i in lease_ids)

    def count(self, owner: Owner) -> int:
        return len(self._by_owner.get(owner, ()))

    def by_kind(self) -> dict[str, int]:
        out = {k.value: 0 for k in LeaseKind}
        for lease in self._leases.values():
            out[lease.kind.value] += 1
        return out
