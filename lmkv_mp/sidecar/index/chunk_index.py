"""ChunkIndex: which chunks the host tier holds, their states and leases (no sockets).

Invariants the rest of the system relies on:

* Only COMMITTED entries are visible to :meth:`lookup` and :meth:`pin`.
* A read lease pins its entries: a pinned entry is never evicted, and a cleared pinned
  entry disappears from lookups at once but its slot is freed only when the last pin goes.
* A write lease owns WRITING entries; releasing or expiring it frees their slots, so a
  writer that dies between RESERVE and COMMIT leaks nothing and exposes nothing.
* Eviction takes the least recently used unpinned COMMITTED entries, first of the size
  class that needs a slot, else a whole span of another class (``lmkv_mp.sidecar.index.committed``
  chooses them); it happens only under allocation pressure.
* An owner's write leases never hold more slot bytes than the ``max_write_bytes`` its
  RESERVE passes (one writer cannot take the whole pool); chunks past it get NO_SPACE.
* A chunk reported corrupt (:meth:`drop_corrupt`) is invisible from that moment on.
* A GPU copy (``lmkv_mp.sidecar.index.gpu_copies``) lives and dies with its entry's host slot, and is
  written and published with it: a RESERVE that names a GPU region gets both slots, one
  COMMIT makes both visible.

Owners are opaque hashable ids (the server uses client ids). Lease expiry is driven from
outside: the server calls :meth:`drop_owner` for clients that stopped heartbeating. The
leases themselves, and the per-owner quota accounts, are kept by ``lmkv_mp.sidecar.index.leases``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from lmkv_mp.sidecar.index.committed import CLEAN_SCAN, CommittedEntries
from lmkv_mp.sidecar.index.entry import Entry, EntryState
from lmkv_mp.sidecar.index.gpu_copies import GpuCopies
from lmkv_mp.wire.hashes import HashList
from lmkv_mp.wire.keys import HASH_BYTES
from lmkv_mp.sidecar.index.leases import Lease, LeaseKind, LeaseTable, Owner
from lmkv_mp.memory.allocator import SlotId, Span
from lmkv_mp.memory.pool import HostPool, Record, SlotState
from lmkv_mp.wire.protocol import SlotStatus


@dataclass(frozen=True, slots=True)
class Pinned:
    """Result of :meth:`ChunkIndex.pin`: per namespace, the locations of the leading hits
    (host offsets, and the region and offset of each hit's GPU copy, region 0 for none)."""

    hits: int
    lease_id: int
    offsets: list[list[int]]
    checksums: list[list[int]]
    gpu_regions: list[list[int]] = field(default_factory=list)
    gpu_offsets: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Reserved:
    lease_id: int           # 0 when nothing was reserved
    status: list[SlotStatus]
    offsets: list[int]
    gpu_regions: list[int] = field(default_factory=list)   # per chunk: its GPU copy's region (0: none)
    gpu_offsets: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _ReserveRun:
    """What one RESERVE carries from chunk to chunk."""

    owner: Owner
    namespace: bytes
    chunk_bytes: int
    slot_bytes: int
    held_bytes: int                  # slot bytes in the owner's write leases, this RESERVE's so far included
    max_write_bytes: int | None
    lease: Lease | None = None       # taken with the first slot
    full: bool = False               # a chunk found no space: every later one that needs a slot gets NO_SPACE
    over_quota: bool = False         # ... because of the owner's write quota
    held: list[Entry] = field(default_factory=list)   # PRESENT entries, pinned until the RESERVE returns
    victims: dict[int, list[Span]] = field(default_factory=dict)   # other classes' spans, ranked once


@dataclass(slots=True)
class IndexCounters:
    evictions: int = 0
    evicted_bytes: int = 0
    committed: int = 0
    committed_bytes: int = 0
    aborted: int = 0
    evicted_dirty: int = 0   # evicted before any lower tier had a copy (meaningful with lower tiers)
    corrupt: int = 0         # entries dropped because a loader found their checksum wrong
    quota_refused: int = 0   # chunks a RESERVE answered NO_SPACE because the owner's write quota was full
    unverified: int = 0      # restored entries dropped for lack of a checksum (restart with verify on)


class ChunkIndex:
    """The host tier's index. ``chunk_bytes`` of a namespace is fixed once declared."""

    def __init__(self, pool: HostPool, gpu: GpuCopies | None = None) -> None:
        self.pool = pool
        self.gpu = gpu
        self._entries: dict[bytes, Entry] = {}
        self._by_slot: dict[SlotId, Entry] = {}
        self._committed = CommittedEntries(pool, self._by_slot)   # the visible ones, by key and by last use
        self.leases = LeaseTable()
        self._ns_bytes: dict[bytes, int] = {}
        self._parked: dict[int, list[Entry]] = {}              # lease id -> WRITING entries of a reaped writer
        self.counters = IndexCounters()
        # With lower tiers, eviction first looks among the oldest entries for one a lower tier
        # holds a copy of, so evicting it loses nothing (set by the tier hierarchy).
        self.prefer_clean = False
        # With --verify on: the checksum of the bytes at (offset, length), for entries the
        # sidecar fills itself (promotions), which no worker checksummed (set by the server).
        self.checksum_at: Callable[[int, int], int] | None = None

    # -- restore ----------------------------------------------------------------------------

    def restore(self, records: Iterable[Record], require_checksum: bool = False) -> int:
        """Adopt COMMITTED records of a warm restart (oldest use first, so LRU order survives).
        ``require_checksum`` (verify on): records committed without one are freed, since
        nothing could tell a later reader whether their bytes are still the written ones."""
        n = 0
        for rec in sorted(records, key=lambda r: r.last_use_ns):
            key = rec.namespace + rec.hash
            slot_bytes = self.pool.alloc_state.span_of(rec.slot).slot_bytes
            if key in self._entries or (require_checksum and rec.checksum == 0):
                # A duplicate (keep the first) or an unverifiable record: free it.
                self.counters.unverified += key not in self._entries
                self.pool.free(rec.slot)
                continue
            e = Entry(key, rec.slot, self.pool.offset(rec.slot), rec.length, slot_bytes,
                      EntryState.COMMITTED, checksum=rec.checksum)
            self._entries[key] = e
            self._by_slot[rec.slot] = e
            self._committed.add(e)
            self._ns_bytes.setdefault(rec.namespace, rec.length)
            n += 1
        return n

    # -- namespaces -------------------------------------------------------------------------

    def declare(self, namespace: bytes, chunk_bytes: int) -> None:
        """Fix a namespace's chunk size. Raises ValueError if declared with another size."""
        self.declare_all([(namespace, chunk_bytes)])

    def declare_all(self, sizes: list[tuple[bytes, int]]) -> None:
        """Fix the chunk sizes of several namespaces, all or none: raises ValueError (and
        declares nothing) if one is known, or listed twice, with another size."""
        wanted: dict[bytes, int] = {}
        for namespace, chunk_bytes in sizes:
            have = wanted.setdefault(namespace, self._ns_bytes.get(namespace, chunk_bytes))
            if have != chunk_bytes:
                raise ValueError(f"namespace {namespace.hex()} holds {have}-byte chunks, not {chunk_bytes}")
        self._ns_bytes.update(wanted)

    def chunk_bytes(self, namespace: bytes) -> int | None:
        return self._ns_bytes.get(namespace)

    def namespace_count(self) -> int:
        return len(self._ns_bytes)

    def forget_namespaces(self, keep: set[bytes]) -> list[bytes]:
        """Forget every namespace not in ``keep`` that no entry (committed, being written or
        parked) uses any more, and return them. Otherwise the table only grows: one per model,
        layout, rank and tenant ever declared. A forgotten namespace is declared again by the
        next HELLO that names it, with any chunk size; one walk over the entries."""
        used = {key[:HASH_BYTES] for key in self._entries}
        gone = [ns for ns in self._ns_bytes if ns not in keep and ns not in used]
        for ns in gone:
            del self._ns_bytes[ns]
            self._committed.forget(ns)
        return gone

    # -- reads ------------------------------------------------------------------------------

    def lookup(self, namespaces: list[bytes], hashes: HashList) -> int:
        """Leading chunks COMMITTED in every namespace. A plain lookup is a question, not a
        use: it leaves LRU order alone (a pinned lookup, i.e. a load, refreshes it)."""
        cols = self._committed.leading(namespaces, hashes, touch=False)
        return len(cols[0]) if cols else 0

    def pin(self, owner: Owner, namespaces: list[bytes], hashes: HashList, max_pin_bytes: int | None = None) -> Pinned:
        """Like :meth:`lookup`, and take a read lease on the hits (0 hits: no lease).

        ``max_pin_bytes`` bounds the slot bytes of the distinct chunks the owner holds
        pinned, so one client cannot hold the pool against eviction; hits past it are not
        reported (a shorter prefix; counted in ``quota_refused``). A chunk the owner has
        pinned already costs nothing more: a scheduler pins a shared prefix once per request."""
        cols = self._committed.leading(namespaces, hashes)
        hits = len(cols[0]) if cols else 0
        room = self.leases.pin_room(owner, cols, max_pin_bytes) if hits and max_pin_bytes is not None else hits
        if room < hits:
            self.counters.quota_refused += hits - room
            hits, cols = room, [col[:room] for col in cols]
        if not hits:
            return Pinned(0, 0, [[] for _ in namespaces], [[] for _ in namespaces])
        lease = self.leases.new(owner, LeaseKind.READ)
        for col in cols:
            for e in col:
                e.pins += 1
            self.leases.pin(lease, col)
        gpu_regions, gpu_offsets = self.gpu.read(cols) if self.gpu is not None else ([], [])
        return Pinned(hits, lease.id, [[e.offset for e in col] for col in cols],
                      [[e.checksum for e in col] for col in cols], gpu_regions, gpu_offsets)

    # -- writes -----------------------------------------------------------------------------

    def reserve(self, owner: Owner, namespace: bytes, hashes: HashList, max_write_bytes: int | None = None,
                gpu_region: int = 0) -> Reserved:
        """Write slots for chunks not already present. After the first chunk that finds no
        space, later chunks get NO_SPACE too: a chain hash is useless without its prefix.
        A chunk whose slot would take the owner's write leases past ``max_write_bytes``
        finds no space either (and is counted in ``quota_refused``). With ``gpu_region``
        (the writer's device has one) each written chunk also gets a slot for its GPU copy
        there, where one can be freed; the copy does not count against the quota."""
        chunk_bytes = self._ns_bytes.get(namespace)
        if chunk_bytes is None:
            raise ValueError(f"namespace {namespace.hex()} was never declared")
        run = _ReserveRun(owner, namespace, chunk_bytes, self.pool.slot_bytes_for(chunk_bytes),
                          self.leases.write_bytes(owner), max_write_bytes)
        statuses: list[SlotStatus] = []
        offsets: list[int] = []
        gpu_regions: list[int] = []
        gpu_offsets: list[int] = []
        try:
            for i, key in enumerate(hashes.keys(namespace)):
                status, e = self._reserve_chunk(run, key)
                statuses.append(status)
                offsets.append(e.offset if e is not None else 0)
                if e is not None and gpu_region and self.gpu is not None and self.gpu.alloc(gpu_region, e):
                    if not gpu_regions:
                        gpu_regions, gpu_offsets = [0] * len(hashes), [0] * len(hashes)
                    gpu_regions[i] = e.gpu_region
                    gpu_offsets[i] = e.gpu_offset
        finally:
            for e in run.held:
                e.pins -= 1
        return Reserved(run.lease.id if run.lease else 0, statuses, offsets, gpu_regions, gpu_offsets)

    def _reserve_chunk(self, run: _ReserveRun, key: bytes) -> tuple[SlotStatus, Entry | None]:
        """One chunk of a RESERVE: PRESENT or BUSY for a key the index holds, else a new
        WRITING entry in a slot of its own (WRITE, with the entry) or NO_SPACE."""
        e = self._entries.get(key)
        if e is not None:
            if e.state is not EntryState.COMMITTED:
                return SlotStatus.BUSY, None
            # The writer's prompt uses this prefix: the allocations for the chunks that
            # follow must not evict it (PRESENT would then be a lie and the chunks written
            # after it unreachable), so hold it until the RESERVE returns.
            self._committed.touch(e)
            e.pins += 1
            run.held.append(e)
            return SlotStatus.PRESENT, None
        if not run.full and run.max_write_bytes is not None and run.held_bytes + run.slot_bytes > run.max_write_bytes:
            run.full = run.over_quota = True
        slot = None if run.full else self._alloc(run.chunk_bytes, run.victims)
        if slot is None:
            run.full = True
            self.counters.quota_refused += run.over_quota
            return SlotStatus.NO_SPACE, None
        run.held_bytes += run.slot_bytes
        if run.lease is None:
            run.lease = self.leases.new(run.owner, LeaseKind.WRITE)
        e = Entry(key, slot, self.pool.offset(slot), run.chunk_bytes,
                  self.pool.alloc_state.span_of(slot).slot_bytes, EntryState.WRITING)
        self.pool.write_record(slot, SlotState.WRITING, run.namespace, key[HASH_BYTES:], run.chunk_bytes)
        self._entries[key] = e
        self._by_slot[slot] = e
        run.lease.entries.append(e)
        self.leases.add_write(run.lease, e.slot_bytes)
        return SlotStatus.WRITE, e

    def commit(self, owner: Owner, lease_id: int, hashes: HashList = HashList(),
               checksums: Sequence[int] | None = None) -> int:
        """Publish the listed chunks of a write lease (all when ``hashes`` is empty); the lease
        ends and its unlisted chunks are freed. Returns how many became COMMITTED."""
        return len(self.commit_entries(owner, lease_id, hashes, checksums))

    def commit_entries(self, owner: Owner, lease_id: int, hashes: HashList = HashList(),
                       checksums: Sequence[int] | None = None) -> list[Entry]:
        """:meth:`commit`, returning the entries that became COMMITTED (for write-through).
        ``checksums``: none, or one per listed hash."""
        lease = self.leases.take(owner, lease_id, LeaseKind.WRITE)
        wanted: dict[bytes, int] | None = None
        if hashes:
            wanted = dict(zip(hashes, checksums or [0] * len(hashes), strict=True))
        done: list[Entry] = []
        for e in lease.entries:
            h = e.key[HASH_BYTES:]
            if wanted is not None and h not in wanted:
                self._drop(e)
                self.counters.aborted += 1
                continue
            self._make_committed(e, wanted[h] if wanted is not None else 0)
            done.append(e)
        return done

    def _make_committed(self, e: Entry, checksum: int) -> None:
        e.checksum = checksum
        self.pool.write_record(e.slot, SlotState.COMMITTED, e.key[:HASH_BYTES], e.key[HASH_BYTES:], e.length, checksum)
        e.state = EntryState.COMMITTED
        self._committed.add(e)
        if self.gpu is not None:
            self.gpu.committed(e)
        self.counters.committed += 1
        self.counters.committed_bytes += e.length

    # -- the sidecar's own reads and writes (tier movers) -------------------------------------

    def is_visible(self, key: bytes) -> bool:
        """Whether ``key`` (namespace + hash) is COMMITTED here."""
        return self._committed.get(key) is not None

    def reserve_internal(self, key: bytes) -> Entry | None:
        """A WRITING entry for the sidecar itself to fill (a promotion from a lower tier),
        evicting if needed; None when the key is present or being written, its namespace is
        undeclared, or no slot can be freed. No lease: the caller must end it with
        :meth:`finish_internal`, whatever happens."""
        chunk_bytes = self._ns_bytes.get(key[:HASH_BYTES])
        if chunk_bytes is None or key in self._entries:
            return None
        slot = self._alloc(chunk_bytes)
        if slot is None:
            return None
        e = Entry(key, slot, self.pool.offset(slot), chunk_bytes,
                  self.pool.alloc_state.span_of(slot).slot_bytes, EntryState.WRITING, in_lower=True)
        self.pool.write_record(slot, SlotState.WRITING, key[:HASH_BYTES], key[HASH_BYTES:], chunk_bytes)
        self._entries[key] = e
        self._by_slot[slot] = e
        return e

    def finish_internal(self, e: Entry, ok: bool, checksum: int | None = None) -> None:
        """Publish an entry of :meth:`reserve_internal` once its bytes are in place (``ok``),
        else free it. Its checksum is ``checksum`` (the mover hashed the slot, off the loop),
        else with :attr:`checksum_at` set that of the bytes now in its slot."""
        if ok:
            if checksum is None:
                checksum = self.checksum_at(e.offset, e.length) if self.checksum_at else 0
            self._make_committed(e, checksum)
        else:
            self._drop(e)

    def hold(self, key: bytes) -> Entry | None:
        """Pin a COMMITTED entry so its slot can be read off the loop (a demotion); None
        if absent. End with :meth:`unhold`."""
        e = self._committed.get(key)
        if e is not None:
            e.pins += 1
        return e

    def unhold(self, e: Entry) -> None:
        e.pins -= 1
        if e.pins == 0 and e.state is EntryState.DOOMED:
            self._free_slot(e)

    def cold_dirty(self, limit: int, scan: int = 4 * CLEAN_SCAN) -> list[Entry]:
        """Up to ``limit`` least recently used COMMITTED, unpinned entries that no lower tier
        holds yet, among the ``scan`` oldest of each size class (bounded work per call):
        what write-back copies down before eviction would lose them."""
        return self._committed.cold_dirty(limit, scan)

    def release(self, owner: Owner, lease_id: int) -> int:
        """End a lease: a read lease unpins, a write lease frees its uncommitted slots."""
        return self._end(self.leases.take(owner, lease_id, None))

    def park_writes(self, owner: Owner) -> list[int]:
        """End the owner's write leases that have unfinished chunks without freeing their
        slots: a writer that was only stopped (not dead) may still be copying into them, so
        they must go to no one else until :meth:`unpark`. The chunks themselves are gone
        (another writer may reserve the same hashes at once, in other slots). Returns the
        parked lease ids."""
        parked: list[int] = []
        for lease_id in self.leases.owned(owner):
            lease = self.leases.get(lease_id)
            assert lease is not None
            writing = [e for e in lease.entries if e.state is EntryState.WRITING]
            if lease.kind is not LeaseKind.WRITE or not writing:
                continue
            self.leases.take(owner, lease_id, LeaseKind.WRITE)
            for e in writing:
                if self._entries.get(e.key) is e:
                    del self._entries[e.key]
            self._parked[lease_id] = writing
            self.counters.aborted += len(writing)
            parked.append(lease_id)
        return parked

    def unpark(self, lease_id: int) -> int:
        """Free the slots of a parked lease (its writer is done with them, or gone); how many."""
        entries = self._parked.pop(lease_id, [])
        for e in entries:
            self._drop(e)
        return len(entries)

    def parked_slots(self) -> int:
        return sum(len(v) for v in self._parked.values())

    def drop_owner(self, owner: Owner) -> int:
        """End every lease of an owner (it disconnected or stopped heartbeating)."""
        n = 0
        for lease_id in self.leases.owned(owner):
            n += self._end(self.leases.take(owner, lease_id, None))
        self.leases.forget(owner)
        return n

    def drop_corrupt(self, namespace: bytes, hashes: HashList, checksums: Sequence[int]) -> int:
        """Drop the COMMITTED entries a loader found corrupt: those of ``hashes`` in
        ``namespace`` that still carry the checksum it was given (a late report about an
        entry rewritten since drops nothing) and, with :attr:`checksum_at` set, whose bytes
        really do not match it (a client cannot drop others' chunks by reporting them).
        Pinned ones vanish from lookups now and are freed when unpinned, as cleared ones.
        Returns how many were dropped."""
        n = 0
        for key, expected in zip(hashes.keys(namespace), checksums, strict=True):
            e = self._committed.get(key)
            if e is None or e.checksum != expected:
                continue
            if self.checksum_at is not None and self.checksum_at(e.offset, e.length) == e.checksum:
                continue
            n += 1
            self._discard(e)
        self.counters.corrupt += n
        return n

    def clear(self, namespace: bytes | None = None) -> int:
        """Drop COMMITTED entries (of one namespace, or all). Pinned ones vanish from lookups
        now and are freed when unpinned; WRITING ones are left to their writers."""
        n = 0
        for key, e in list(self._entries.items()):
            if e.state is not EntryState.COMMITTED or (namespace is not None and key[:HASH_BYTES] != namespace):
                continue
            n += 1
            self._discard(e)
        return n

    # -- internals --------------------------------------------------------------------------

    def _end(self, lease: Lease) -> int:
        if lease.kind is LeaseKind.READ:
            self.leases.unpin(lease)
        for e in lease.entries:
            if lease.kind is LeaseKind.READ:
                self.unhold(e)
            elif e.state is EntryState.WRITING:
                self._drop(e)
                self.counters.aborted += 1
        return len(lease.entries)

    def _discard(self, e: Entry) -> None:
        """A COMMITTED entry leaves the cache: at once, or when its last pin goes."""
        if e.pins:
            self._hide(e)
        else:
            self._drop(e)

    def _hide(self, e: Entry) -> None:
        del self._entries[e.key]
        self._committed.remove(e)
        e.state = EntryState.DOOMED
        if self.gpu is not None:
            self.gpu.hide(e)
        self.pool.write_state(e.slot, SlotState.FREE)  # never restored after a crash

    def _drop(self, e: Entry) -> None:
        if self._entries.get(e.key) is e:
            del self._entries[e.key]
        self._committed.remove(e)
        self._free_slot(e)

    def _free_slot(self, e: Entry) -> None:
        del self._by_slot[e.slot]
        self.pool.free(e.slot)
        if self.gpu is not None:
            self.gpu.free(e)

    def _alloc(self, chunk_bytes: int, victims: dict[int, list[Span]] | None = None) -> SlotId | None:
        """A slot for ``chunk_bytes``, evicting as needed; ``victims`` carries the ranked spans
        of other classes across the allocations of one request (see :meth:`CommittedEntries.victims`)."""
        victims = {} if victims is None else victims
        slot = self.pool.alloc(chunk_bytes)
        while slot is None:
            doomed = self._committed.victims(self.pool.slot_bytes_for(chunk_bytes), victims, self.prefer_clean)
            if doomed is None:
                break
            for e in doomed:
                self._evict(e)
            slot = self.pool.alloc(chunk_bytes)
        return slot

    def _evict(self, e: Entry) -> None:
        self.counters.evictions += 1
        self.counters.evicted_bytes += e.length
        if not e.in_lower:
            self.counters.evicted_dirty += 1
        self._drop(e)

    # -- stats ------------------------------------------------------------------------------

    def leases_by_kind(self) -> dict[str, int]:
        return self.leases.by_kind()

    def entry_slot_bytes(self) -> int:
        """Slot bytes held by entries of any state (written, committed, hidden while pinned,
        parked): equal to the allocator's used bytes unless a slot leaked."""
        return sum(e.slot_bytes for e in self._by_slot.values())

    def entries_by_state(self) -> dict[str, int]:
        out = {"writing": 0, "committed": 0}
        for e in self._entries.values():
            out["committed" if e.state is EntryState.COMMITTED else "writing"] += 1
        return out

    def bytes_by_namespace(self) -> dict[bytes, tuple[int, int]]:
        """namespace -> (committed entries, committed bytes)."""
        out: dict[bytes, tuple[int, int]] = {}
        for key, e in self._entries.items():
            if e.state is EntryState.COMMITTED:
                n, b = out.get(key[:HASH_BYTES], (0, 0))
                out[key[:HASH_BYTES]] = (n + 1, b + e.length)
        return out

    def owner_lease_count(self, owner: Owner) -> int:
        return self.leases.count(owner)

    def owner_write_bytes(self, owner: Owner) -> int:
        return self.leases.write_bytes(owner)

    def __len__(self) -> int:
        return len(self._entries)
