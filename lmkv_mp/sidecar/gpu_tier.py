"""GpuTier: what the sidecar holds for its GPU tier, and what it tells clients about it.

One exported region per device (:class:`~lmkv_mp.memory.gpu.GpuRegion`, region ids from 1
in ``--gpu-devices`` order), the handle socket through which VMM regions' fds reach workers
(:mod:`lmkv_mp.memory.handles`) and the slot bookkeeping the index drives
(:class:`~lmkv_mp.sidecar.index.gpu_copies.GpuCopies`). The loop owns it: it polls :attr:`handles`,
answers HELLO with :meth:`infos` and :meth:`region_for`, and closes it last, after the
sockets, so no client is told about a region that is gone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lmkv_mp.wire import protocol as P
from lmkv_mp.sidecar.index.gpu_copies import GpuCopies
from lmkv_mp.memory.gpu import format_uuid
from lmkv_mp.config.common import GPU_HANDLES_SOCKET
from lmkv_mp.memory.handles import HandleServer


class GpuTier:
    """``regions``: opened GpuRegions (or objects with their attributes: ordinal, size, uuid,
    device_uuid, kind, handle, fd, close). Takes ownership: :meth:`close` closes them, also
    when the constructor fails."""

    def __init__(self, regions: Sequence[Any], run_dir: Path, slab_size: int, min_slot_bytes: int, umask: int,
                 gid: int | None) -> None:
        self.regions = list(regions)
        self.handles: HandleServer | None = None
        try:
            self.copies = GpuCopies({i + 1: r.size for i, r in enumerate(self.regions)}, slab_size, min_slot_bytes)
            shared = {r.uuid: r.fd for r in self.regions if r.kind == "cuda-vmm"}
            if shared:
                self.handles = HandleServer(run_dir / GPU_HANDLES_SOCKET, shared, umask, gid)
        except BaseException:
            self.close()
            raise

    def region_for(self, device_uuid: bytes) -> int:
        """The region id on the device with this uuid (a CUDA worker's HELLO), 0 for none."""
        return next((i + 1 for i, r in enumerate(self.regions) if device_uuid and device_uuid == r.device_uuid), 0)

    def infos(self) -> list[P.RegionInfo]:
        """The regions as HELLO announces them: a VMM region named by the handle socket that
        hands out its fd, a legacy one by its device, with its IPC handle."""
        return [P.RegionInfo(i + 1, r.kind, str(self.handles.path) if r.kind == "cuda-vmm" and self.handles
                             else format_uuid(r.device_uuid), r.size, r.uuid, r.ordinal, r.handle, r.device_uuid)
                for i, r in enumerate(self.regions)]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per region, its ``snapshot["tiers"]`` entry, labelled ``gpu<ordinal>``."""
        return {f"gpu{self.regions[rid - 1].ordinal}": s for rid, s in self.copies.stats().items()}

    def close(self) -> None:
        if self.handles is not None:
            self.handles.close()
            self.handles = None
        for r in self.regions:
            r.close()
        self.regions = []
