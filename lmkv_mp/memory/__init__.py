"""Cache memory both sides map: host regions (shm/file), GPU tier regions and their handle
socket, the slab allocator, the persisted slot table, and cuda-python loaded on first use."""

from lmkv_mp.memory.allocator import SlabAllocator, SlotId
from lmkv_mp.memory.pool import HostPool, Record, SlotState, pool_uuid
from lmkv_mp.memory.region import HostRegion, RegionError, shm_name_for

__all__ = ["HostPool", "HostRegion", "Record", "RegionError", "SlabAllocator", "SlotId", "SlotState", "pool_uuid",
           "shm_name_for"]
