"""Cache memory: regions (shm/file), the slab allocator and the persisted slot table."""

from lmkv_mp.memory.allocator import SlabAllocator, SlotId
from lmkv_mp.memory.pool import HostPool, Record, SlotState, pool_uuid
from lmkv_mp.memory.region import HostRegion, RegionError, shm_name_for

__all__ = ["HostPool", "HostRegion", "Record", "RegionError", "SlabAllocator", "SlotId", "SlotState", "pool_uuid",
           "shm_name_for"]
