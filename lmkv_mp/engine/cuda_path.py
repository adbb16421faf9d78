"""A CUDA worker's copies between its paged KV cache and the sidecar's host tier (#6).

The host tier is POSIX shared memory mapped into the worker. A copy between GPU memory and
host memory runs as DMA only from pinned pages, so the worker registers its mapping with
CUDA (``cudaHostRegister``, the runtime's ``cuMemHostRegister``) once per mapping, and
unregisters it before the mapping can go (a new mapping after a sidecar restart, or close).

Each chunk moves through one staging slot in device memory: the CUDA kernels
(:class:`~lmkv_mp.engine.kernels.KernelCopier`, which falls back to the torch path with one log
line) gather the chunk's blocks from every layer into it, and one contiguous async copy
moves it to the host slot; a load is the reverse. Stream order makes one staging slot
enough: the next gather into it queues behind the copy out of it.

Everything runs on a side stream of the rank's copy thread, after an event the engine
thread recorded on the engine's stream when it submitted the job: a store's gather reads
what the forward pass wrote, and a load never writes blocks that work queued before it
still reads. The engine's stream never waits on lmkv. The copy thread waits for the side
stream before it commits a store or reports a load done, so a committed slot holds its
bytes and a loaded block is in place before vLLM schedules the request.

If pinning fails, copies still run, through the driver's pageable path (slower, the same
bytes), after one warning.

GPU tier: where the sidecar has a region on this device (announced in HELLO with its CUDA
IPC handle), a store's RESERVE may give a chunk a GPU slot too. The kernels then gather
into that slot instead of the staging slot, and the DMA to the host slot copies from it: the
copy costs no extra device pass. A load whose chunk has a copy in this device's region
scatters straight from it, device to device, with no DMA at all. The region is mapped once
per region uuid (:class:`~lmkv_mp.memory.gpu.GpuMapping`: a VMM region's fd comes from the
sidecar's handle socket and is mapped with ``cuMemMap``, else ``cuIpcOpenMemHandle``); a
mapping of a region the sidecar no longer announces (it restarted) is closed at the next
job, when no copy can still use it (every job drains its stream before it ends).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lmkv_mp.engine.copy_path import LoadChunk, StoreChunk
from lmkv_mp.engine.kernels import KernelCopier
from lmkv_mp.engine.paged import PagedKV
from lmkv_mp.memory.gpu import GpuMapping
from lmkv_mp.memory.region import RegionError
from lmkv_mp.wire.protocol import RegionInfo

log = logging.getLogger("lmkv.vllm")

# cudaHostRegisterPortable: the pages count as pinned for every CUDA context of the process.
_REGISTER_PORTABLE = 1


def device_uuid(device: torch.device) -> bytes:
    """The 16-byte uuid of a CUDA device (what the sidecar's GPU regions are matched by)."""
    text = str(torch.cuda.get_device_properties(device).uuid)
    for prefix in ("GPU-", "MIG-"):
        text = text.removeprefix(prefix)
    return uuid.UUID(text).bytes


class CudaHostPath:
    """The :class:`~lmkv_mp.engine.copy_path.CopyPath` of a KV cache on a CUDA device.

    ``cudart`` is torch's CUDA runtime module (``torch.cuda.cudart()``) unless given;
    ``copier`` is built from ``paged`` unless given.
    """

    def __init__(self, paged: PagedKV, *, copier: KernelCopier | None = None, cudart: Any = None) -> None:
        if paged.device.type != "cuda":
            raise ValueError(f"CudaHostPath needs a KV cache on a CUDA device, not {paged.device}")
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        self.paged = paged
        self.device = torch.device("cuda", paged.device.index if paged.device.index is not None
                                   else torch.cuda.current_device())
        self.device_uuid = device_uuid(self.device)
        self.copier = copier or KernelCopier(paged)
        self._cudart = cudart
        self._stream: torch.cuda.Stream | None = None
        self._staging: torch.Tensor | None = None
        self._pinned: dict[int, int] = {}     # data_ptr -> bytes, of mappings registered now
        self._unpinnable: set[int] = set()    # mappings whose registration failed (warned once)
        self._gpu_maps: dict[bytes, GpuMapping] = {}   # GPU tier region uuid -> this process's mapping
        self._unmappable: set[bytes] = set()           # region uuids whose mapping failed (warned once)

    # -- engine thread ----------------------------------------------------------------------

    def engine_event(self) -> torch.cuda.Event:
        """An event recorded now on the engine's current stream: a job waits for it."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    # -- copy thread ------------------------------------------------------------------------

    def store(self, host: torch.Tensor, chunks: Sequence[StoreChunk], nbytes: int,
              after: torch.cuda.Event | None) -> None:
        """Gather each chunk into the staging slot, or into its GPU slot where given (the GPU
        tier copy then costs no extra pass), and DMA that to ``host[offset:offset + nbytes]``;
        returns once every byte is in place. Raises on any failure, after every copy it
        queued has ended."""
        with self._queued(host, nbytes, after) as staging:
            for block_ids, off, gpu_slot in chunks:
                slot = staging if gpu_slot is None else gpu_slot
                self.copier.gather(block_ids, slot)
                host[off:off + nbytes].copy_(slot, non_blocking=True)

    def load(self, host: torch.Tensor, chunks: Sequence[LoadChunk], nbytes: int,
             after: torch.cuda.Event | None) -> None:
        """Scatter each chunk into its blocks from its GPU slot (device to device) where
        given, else from ``host[offset:offset + nbytes]`` through the staging slot; returns
        once the blocks hold their bytes. The ids are checked before anything is copied."""
        # Every chunk's ids first (in range, distinct across the load, fitting the chunk): a
        # bad one must not leave half a load behind. The slots are checked at each scatter.
        self.paged.check_scatters([(None, ids, first, total) for _, ids, first, total, _ in chunks])
        with self._queued(host, nbytes, after) as staging:
            for off, block_ids, first, total, gpu_slot in chunks:
                if gpu_slot is None:
                    staging.copy_(host[off:off + nbytes], non_blocking=True)
                self.copier.scatter(staging if gpu_slot is None else gpu_slot, block_ids, first=first, total=total)

    def gpu_region(self, info: RegionInfo) -> torch.Tensor | None:
        """The GPU tier region ``info`` as a uint8 tensor on this device, mapped once per
        region uuid; None (with one warning per region) when it cannot be mapped. Call
        :meth:`drop_stale_regions` first, once per job."""
        mapping = self._gpu_maps.get(info.uuid)
        if mapping is None:
            if info.uuid in self._unmappable:
                return None
            try:
                mapping = GpuMapping(info, self.device)
            except (RegionError, RuntimeError) as e:
                self._unmappable.add(info.uuid)
                log.warning("lmkv: cannot map the sidecar's GPU tier region on %s (%s): this rank stores and "
                            "loads through the host tier", self.device, e)
                return None
            self._gpu_maps[info.uuid] = mapping
            log.info("lmkv: mapped the sidecar's GPU tier region (%d MiB) on %s", info.size >> 20, self.device)
        return mapping.tensor

    def drop_stale_regions(self, announced: Sequence[bytes]) -> int:
        """Close the mappings of GPU tier regions not in ``announced`` (the region uuids of
        the sidecar's current HELLO): after a sidecar restart they are dead weight, and a VMM
        region's memory stays allocated while any worker maps it. Call between jobs."""
        stale = [u for u in self._gpu_maps if u not in announced]
        for uuid_ in stale:
            self._gpu_maps.pop(uuid_).close()
        return len(stale)

    def close(self) -> None:
        """Unregister every host mapping (call before the client unmaps them) and close the
        GPU tier mappings; call when no copy is queued."""
        for ptr in list(self._pinned):
            self._unpin(ptr)
        for mapping in self._gpu_maps.values():
            mapping.close()
        self._gpu_maps.clear()
        self._staging = None

    # -- internals --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _queued(self, host: torch.Tensor, nbytes: int, after: torch.cuda.Event | None) -> Iterator[torch.Tensor]:
        """Pin ``host``; queue the body's copies on the side stream, after ``after``; give
        them the staging slot; on leaving, wait for all of it (also after an error)."""
        self._prepare(host)
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(self._side()):
                if after is not None:
                    self._side().wait_event(after)
                yield self._staging_for(nbytes)
        finally:
            self._drain()

    def _drain(self) -> None:
        """Wait for everything queued on the side stream, also when a copy failed half-way:
        the caller then gives the slots back (store) or has vLLM recompute the blocks (load),
        and no copy may still be writing into them. (A sticky CUDA error makes the wait
        raise too: the process's CUDA context is lost, and the engine with it.)"""
        if self._stream is not None:
            self._stream.synchronize()

    def _side(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _staging_for(self, nbytes: int) -> torch.Tensor:
        """One chunk of device memory, allocated on the side stream (so torch's allocator
        ties it to the stream that uses it) and kept: every chunk of a rank has one size."""
        if self._staging is None or self._staging.numel() != nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._staging

    def _runtime(self) -> Any:
        if self._cudart is None:
            self._cudart = torch.cuda.cudart()
        return self._cudart

    def _prepare(self, host: torch.Tensor) -> None:
        """Pin ``host`` (the whole mapping) once; unpin mappings the client replaced, which
        it keeps mapped until it closes (their tensors may still be in use elsewhere)."""
        ptr, size = host.data_ptr(), host.numel()
        if ptr in self._pinned or ptr in self._unpinnable:
            return
        for old in list(self._pinned):
            self._unpin(old)
        start = time.perf_counter()
        with torch.cuda.device(self.device):
            status = int(self._runtime().cudaHostRegister(ptr, size, _REGISTER_PORTABLE))
        if status == 0:
            self._pinned[ptr] = size
            log.info("lmkv: host pool (%d MiB) pinned for DMA on %s in %.2f s", size >> 20, self.device,
                     time.perf_counter() - start)
        else:
            self._unpinnable.add(ptr)
            log.warning("lmkv: pinning the host pool for DMA failed (cudaHostRegister error %d); copies "
                        "to and from it take the slower pageable path", status)

    def _unpin(self, ptr: int) -> None:
        self._pinned.pop(ptr, None)
        with torch.cuda.device(self.device):
            status = int(self._runtime().cudaHostUnregister(ptr))
        if status != 0:  # nothing to undo: the pages stay pinned until the process exits
            log.warning("lmkv: unpinning a host pool mapping failed (cudaHostUnregister error %d)", status)
