"""Entry: one chunk in the host tier, its slot and its state (the index's unit of record),
and where the GPU tier holds a copy of it (``gpu_region`` 0: nowhere).

States go ``WRITING -> COMMITTED``, and a COMMITTED entry cleared or dropped while pinned
becomes DOOMED: invisible at once, its slot freed when the last pin goes. Entries compare
by identity (leases and LRU lists hold them as keys).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lmkv_mp.memory.allocator import SlotId


class EntryState(enum.Enum):
    WRITING = 1
    COMMITTED = 2
    DOOMED = 3   # cleared or expired while pinned: invisible, freed when unpinned


@dataclass(slots=True, eq=False)
class Entry:
    key: bytes          # namespace id (16) + chain hash (16)
    slot: SlotId
    offset: int
    length: int
    slot_bytes: int
    state: EntryState
    pins: int = 0
    checksum: int = 0
    in_lower: bool = False  # a copy is in the lower tiers (written there, or promoted from there)
    gpu_region: int = 0     # GPU tier region holding a copy (0: none; see gpu_copies.py)
    gpu_slot: SlotId = SlotId(0)
    gpu_offset: int = 0
