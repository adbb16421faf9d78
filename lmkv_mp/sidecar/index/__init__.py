"""The sidecar's pure state: chunk entries, their states and leases, the LRU of committed
entries and the GPU tier's copies. No sockets, no threads."""

from lmkv_mp.sidecar.index.chunk_index import ChunkIndex

__all__ = ["ChunkIndex"]
