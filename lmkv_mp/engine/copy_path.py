"""A worker's copy path: how whole chunks move between its paged KV cache and the slots.

A rank holds one :class:`CopyPath`, chosen when its KV cache is registered: :class:`CpuPath`
for a cache in host memory, :class:`~lmkv_mp.engine.cuda_path.CudaHostPath` for one on a
CUDA device. The connector's worker half decides what a job copies (which blocks, which host
slot, which GPU tier slot) and hands the chunks to its path; only the path knows how the
bytes move and when they are in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch

from lmkv_mp.engine.copy_threads import CopyThreads
from lmkv_mp.engine.paged import BlockIds, PagedKV
from lmkv_mp.wire.protocol import RegionInfo

GpuSlot = torch.Tensor
"""A chunk's slot in a mapped GPU tier region (a 1-D uint8 view of ``chunk bytes``)."""


class StoreChunk(NamedTuple):
    """Gather blocks ``block_ids`` into the host slot at ``offset`` and, where given, into
    ``gpu_slot`` (the chunk's GPU tier copy) too."""

    block_ids: BlockIds
    offset: int
    gpu_slot: GpuSlot | None


class LoadChunk(NamedTuple):
    """Scatter blocks ``first .. first + len(block_ids)`` of a chunk of ``total`` blocks into
    ``block_ids``: from ``gpu_slot`` (a GPU tier copy on this rank's device) where given,
    else from the host slot at ``offset``."""

    offset: int
    block_ids: BlockIds
    first: int
    total: int
    gpu_slot: GpuSlot | None


class CopyPath(Protocol):
    """Stores and loads of whole chunks between one paged KV cache and the host tier's slots
    (``host``: the mapped pool as one uint8 tensor, ``nbytes``: one chunk's bytes), and the GPU
    tier regions the path can map.

    Used from one thread, the rank's copy thread, except :meth:`engine_event`, which the
    engine thread calls when it submits a job. ``device_uuid`` is the uuid of the CUDA device
    whose GPU tier slots the path fills and reads (the rank names it to the sidecar), ``b""``
    where it has none.
    """

    device_uuid: bytes

    def engine_event(self) -> Any:
        """What a job submitted now waits for before it copies (an event on the engine's
        stream: a store reads what the forward pass wrote), or None."""
        ...

    def store(self, host: torch.Tensor, chunks: Sequence[StoreChunk], nbytes: int, after: Any) -> None:
        """Copy each chunk into ``host[offset:offset + nbytes]`` (and its GPU slot, where
        given), after ``after``; return once every byte is in place. On a failure, raise
        after every copy it started has ended: the caller then gives the slots back."""
        ...

    def load(self, host: torch.Tensor, chunks: Sequence[LoadChunk], nbytes: int, after: Any) -> None:
        """Copy each chunk into its blocks, after ``after``; return once the blocks hold their
        bytes. On a failure, raise after every copy it started has ended: the caller has the
        engine recompute all of the job's blocks."""
        ...

    def gpu_region(self, info: RegionInfo) -> torch.Tensor | None:
        """The GPU tier region ``info`` as a uint8 tensor that chunks' GPU slots are views
        of, mapped once per region uuid; None where the path cannot use it. Call
        :meth:`drop_stale_regions` first, once per job."""
        ...

    def drop_stale_regions(self, announced: Sequence[bytes]) -> int:
        """Let go of the regions whose uuid is not in ``announced`` (the sidecar's current
        HELLO: a restarted sidecar has new ones); how many. Call between jobs."""
        ...

    def close(self) -> None:
        """Let go of what the path holds; call when no copy runs, before the client unmaps
        the host pool."""
        ...


class CpuPath:
    """The :class:`CopyPath` of a KV cache in host memory: :class:`PagedKV`'s own copies,
    each chunk's copy split over ``copy_threads`` threads (the caller's and ``copy_threads -
    1`` helpers of :attr:`threads`). It maps no GPU tier region, so the chunks it is given
    carry no GPU slot; it copies to and from one where a chunk does."""

    device_uuid = b""

    def __init__(self, paged: PagedKV, copy_threads: int = 1) -> None:
        if paged.device.type != "cpu":
            raise ValueError(f"CpuPath needs a KV cache in host memory, not on {paged.device}")
        self.paged = paged
        self.threads = CopyThreads(copy_threads)

    def engine_event(self) -> None:
        return None  # the engine's CPU work is done when it submits the job

    def store(self, host: torch.Tensor, chunks: Sequence[StoreChunk], nbytes: int, after: Any = None) -> None:
        for block_ids, off, gpu_slot in chunks:
            self.paged.gather(block_ids, host[off:off + nbytes], self.threads)
            if gpu_slot is not None:
                gpu_slot.copy_(host[off:off + nbytes])

    def load(self, host: torch.Tensor, chunks: Sequence[LoadChunk], nbytes: int, after: Any = None) -> None:
        for off, block_ids, first, total, gpu_slot in chunks:
            src = host[off:off + nbytes] if gpu_slot is None else gpu_slot
            self.paged.scatter(src, block_ids, first=first, total=total, threads=self.threads)

    def gpu_region(self, info: RegionInfo) -> torch.Tensor | None:
        return None

    def drop_stale_regions(self, announced: Sequence[bytes]) -> int:
        return 0

    def close(self) -> None:
        self.threads.close()
