"""HostPool: the host tier's persistent layout inside one region (ARCHITECTURE §4).

Layout of the region::

    [header 4 KiB][slab table: 16 B per slab][slot table: 64 B per possible slot][pad][slabs]

The slot table is the durable truth: one record per slot with its state, key, length and
checksum. Only the sidecar writes it. A record becomes COMMITTED only after the worker's
copy has completed (the state byte is written last), and FREE is written before a slot is
reused, so after a SIGKILL the table never names a half-written chunk as committed:
:meth:`HostPool.open` rebuilds COMMITTED records and frees WRITING ones (warm restart).
"""

from __future__ import annotations

import enum
import logging
import os
import struct
import time
from dataclasses import dataclass

from lmkv_mp.memory.allocator import SlabAllocator, SlotId, Span, round_slot
from lmkv_mp.memory.region import HostRegion

log = logging.getLogger("lmkv.memory")

MAGIC = b"LMKVPOOL"
LAYOUT_VERSION = 1
HEADER_BYTES = 4096
_HEADER = struct.Struct("<8sII16sQQQIIQQQ")
_SLAB = struct.Struct("<QII")           # slot_bytes (0 = free/continuation), nslabs, flags
_RECORD = struct.Struct("<B7xQQQ16s16s")  # state, length, checksum, last_use_ns, namespace, hash
_DATA_ALIGN = 2 << 20
DEFAULT_MIN_SLOT_BYTES = 16 << 10


class SlotState(enum.IntEnum):
    FREE = 0
    WRITING = 1
    COMMITTED = 2


@dataclass(frozen=True, slots=True)
class Record:
    slot: SlotId
    state: SlotState
    length: int
    checksum: int
    last_use_ns: int
    namespace: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class Geometry:
    total_size: int
    slab_size: int
    min_slot_bytes: int
    num_slabs: int
    max_slots_per_slab: int
    slab_table_off: int
    slot_table_off: int
    data_off: int

    @classmethod
    def plan(cls, total_size: int, slab_size: int, min_slot_bytes: int) -> "Geometry":
        max_slots = slab_size // min_slot_bytes
        per_slab_meta = _SLAB.size + max_slots * _RECORD.size
        num_slabs = (total_size - HEADER_BYTES) // (slab_size + per_slab_meta)
        while num_slabs > 0:
            meta_end = HEADER_BYTES + num_slabs * per_slab_meta
            data_off = -(-meta_end // _DATA_ALIGN) * _DATA_ALIGN
            if data_off + num_slabs * slab_size <= total_size:
                break
            num_slabs -= 1
        if num_slabs <= 0:
            raise ValueError(
                f"a host pool of {total_size} bytes cannot hold one {slab_size}-byte slab with its "
                "tables: raise --host-pool-size or lower --slab-size")
        slab_table_off = HEADER_BYTES
        return cls(total_size, slab_size, min_slot_bytes, num_slabs, max_slots, slab_table_off,
                   slab_table_off + num_slabs * _SLAB.size, data_off)


def pool_uuid(view: memoryview) -> bytes | None:
    """The uuid in a pool header (what the sidecar announces in HELLO), or None where the
    region holds no pool header: a worker checks it after attaching, so a segment someone
    recreated under the pool's name is never mistaken for the sidecar's."""
    if len(view) < _HEADER.size:
        return None
    magic, _version, _hdr, uuid = _HEADER.unpack_from(view, 0)[:4]
    return uuid if magic == MAGIC else None


class HostPool:
    """Slots in a region, with their records persisted in the region itself."""

    def __init__(self, region: HostRegion, geometry: Geometry, uuid: bytes) -> None:
        self.region = region
        self.geo = geometry
        self.uuid = uuid
        self.alloc_state = SlabAllocator(geometry.num_slabs, geometry.slab_size, geometry.max_slots_per_slab)
        self._buf = region.view

    # -- open / rebuild -----------------------------------------------------------------

    @classmethod
    def open(cls, region: HostRegion, slab_size: int,
             min_slot_bytes: int = DEFAULT_MIN_SLOT_BYTES) -> tuple["HostPool", list[Record]]:
        """Attach the pool in ``region``: rebuild it from the slot table when the header
        matches this geometry, else format it. Returns the pool and its COMMITTED records;
        WRITING records (writers that never committed before a crash) are freed."""
        geo = Geometry.plan(region.size, slab_size, min_slot_bytes)
        header = _HEADER.unpack_from(region.view, 0)
        magic, version, _hdr, uuid = header[:4]
        stored = header[4:]
        expected = (geo.total_size, geo.slab_size, geo.min_slot_bytes, geo.num_slabs,
                    geo.max_slots_per_slab, geo.slab_table_off, geo.slot_table_off, geo.data_off)
        if magic == MAGIC and version == LAYOUT_VERSION and tuple(stored) == expected:
            pool = cls(region, geo, uuid)
            return pool, pool._rebuild()
        if magic == MAGIC:
            log.warning("memory: host pool geometry changed (slab size or pool size): starting cold")
        pool = cls(region, geo, os.urandom(16))
        pool._format()
        return pool, []

    def _format(self) -> None:
        buf = self._buf
        buf[self.geo.slab_table_off:self.geo.data_off] = bytes(self.geo.data_off - self.geo.slab_table_off)
        _HEADER.pack_into(buf, 0, b"\0" * 8, LAYOUT_VERSION, HEADER_BYTES, self.uuid,
                          self.geo.total_size, self.geo.slab_size, self.geo.min_slot_bytes,
                          self.geo.num_slabs, self.geo.max_slots_per_slab, self.geo.slab_table_off,
                          self.geo.slot_table_off, self.geo.data_off)
        buf[0:8] = MAGIC  # last: a crash mid-format leaves no valid header

    def _rebuild(self) -> list[Record]:
        committed: list[Record] = []
        dropped = 0
        head = 0
        while head < self.geo.num_slabs:
            slot_bytes, nslabs, _flags = _SLAB.unpack_from(self._buf, self.geo.slab_table_off + head * _SLAB.size)
            if slot_bytes == 0:
                head += 1
                continue
            want_slabs, nslots = self.alloc_state.slots_per_span(slot_bytes)
            if nslabs != want_slabs or slot_bytes % 4096 or head + nslabs > self.geo.num_slabs:
                log.warning("memory: slab table entry %d is inconsistent: dropping it", head)
                self._write_slab(head, 0, 0)
                head += 1
                continue
            used: set[int] = set()
            base = head * self.geo.max_slots_per_slab
            for i in range(nslots):
                rec = self.read_record(SlotId(base + i))
                if rec.state == SlotState.COMMITTED and 0 < rec.length <= slot_bytes:
                    used.add(i)
                    committed.append(rec)
                elif rec.state != SlotState.FREE:
                    dropped += 1
                    self.write_state(rec.slot, SlotState.FREE)
            if used:
                self.alloc_state.restore_span(head, slot_bytes, used)
            else:
                self._write_slab(head, 0, 0)
            head += nslabs
        log.info("memory: warm restart: %d committed chunks restored, %d unfinished writes freed",
                 len(committed), dropped)
        return committed

    # -- slots ----------------------------------------------------------------------------

    def slot_bytes_for(self, nbytes: int) -> int:
        return round_slot(nbytes, self.geo.min_slot_bytes)

    def alloc(self, nbytes: int) -> SlotId | None:
        """A free slot for a chunk of ``nbytes``, or None (pool full for that size)."""
        slot_bytes = self.slot_bytes_for(nbytes)
        slot = self.alloc_state.alloc(slot_bytes)
        if slot is not None:
            span = self.alloc_state.span_of(slot)
            if span.used == 1:  # a span that was just carved: persist it before use
                self._write_slab(span.head, span.slot_bytes, span.nslabs)
        return slot

    def free(self, slot: SlotId) -> None:
        self.write_state(slot, SlotState.FREE)
        span: Span | None = self.alloc_state.free(slot)
        if span is not None:
            self._write_slab(span.head, 0, 0)

    def offset(self, slot: SlotId) -> int:
        """Byte offset of the slot from the start of the region (what workers receive)."""
        return self.geo.data_off + self.alloc_state.offset(slot)

    # -- records ----------------------------------------------------------------------------

    def read_record(self, slot: SlotId) -> Record:
        state, length, checksum, last_use, ns, h = _RECORD.unpack_from(self._buf, self._rec_off(slot))
        try:
            st = SlotState(state)
        except ValueError:
            st = SlotState.WRITING  # garbage: treat as unfinished, so it is freed
        return Record(slot, st, length, checksum, last_use, ns, h)

    def write_record(self, slot: SlotId, state: SlotState, namespace: bytes, key: bytes,
                     length: int, checksum: int = 0) -> None:
        off = self._rec_off(slot)
        self._buf[off] = SlotState.FREE  # invalidate first, fill, then publish the state
        _RECORD.pack_into(self._buf, off, SlotState.FREE, length, checksum, time.time_ns(), namespace, key)
        self._buf[off] = state

    def write_state(self, slot: SlotId, state: SlotState) -> None:
        self._buf[self._rec_off(slot)] = state

    def _rec_off(self, slot: SlotId) -> int:
        return self.geo.slot_table_off + slot * _RECORD.size

    def _write_slab(self, head: int, slot_bytes: int, nslabs: int) -> None:
        _SLAB.pack_into(self._buf, self.geo.slab_table_off + head * _SLAB.size, slot_bytes, nslabs, 0)

    def close(self) -> None:
        self._buf = memoryview(b"")
