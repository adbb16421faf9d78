"""GPU tier memory: one device allocation per GPU, shared with workers through CUDA.

The sidecar allocates each device's region with the CUDA driver API (cuda-python) in one
of two ways, and a worker on the same device maps it once per region uuid
(:class:`GpuMapping`). The sidecar never copies GPU bytes itself: workers copy between their
paged KV and GPU slots, device to device.

* ``kind='cuda-vmm'`` (preferred, where the device supports VMM with POSIX fd handles):
  ``cuMemCreate`` + ``cuMemExportToShareableHandle``. The fd reaches workers over the
  sidecar's handle socket (:mod:`lmkv_mp.memory.handles`; ``RegionInfo.name`` is its path);
  a worker imports it, maps it with ``cuMemMap`` and holds its own reference, so the memory
  stays valid while any worker maps it, even after the sidecar died: a worker in the middle
  of a copy never touches freed memory.
* ``kind='cuda'`` (otherwise): ``cuMemAlloc`` + ``cuIpcGetMemHandle``; the 64-byte handle
  travels in HELLO (``RegionInfo.handle``) and workers open it with ``cuIpcOpenMemHandle``.
  The memory belongs to the sidecar process alone.

Either way the region is volatile: a restarted sidecar allocates new regions (new uuids) and
workers close their old mappings. Nothing here imports cuda-python before it is used: a
sidecar without ``--gpu-pool-size`` never loads a CUDA library.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

from lmkv_mp.memory import cuda_api
from lmkv_mp.memory.region import RegionError

log = logging.getLogger("lmkv.memory")

IPC_HANDLE_BYTES = 64


def _driver() -> Any:
    return cuda_api.bindings(RegionError)[0]


def _check(result: Any, what: str) -> Any:
    """cuda-python returns ``(status, *values)``: raise RegionError on a bad status."""
    return cuda_api.check(result, what, RegionError)


def _init(driver: Any) -> None:
    cuda_api.init_driver(driver, RegionError, "the GPU tier (--gpu-pool-size) needs the NVIDIA driver: start "
                         "without --gpu-pool-size on this host")


def visible_devices() -> int:
    """How many CUDA devices this process sees; RegionError when none (or no driver)."""
    driver = _driver()
    _init(driver)
    count = _check(driver.cuDeviceGetCount(), "cuDeviceGetCount")
    if not count:
        raise RegionError("--gpu-pool-size asks for a GPU tier, but this process sees no CUDA device")
    return count


def format_uuid(raw: bytes) -> str:
    """A device uuid the way ``nvidia-smi -L`` prints it (``GPU-8-4-4-4-12`` hex)."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class GpuRegion:
    """About ``size`` bytes on CUDA device ``ordinal`` (as this process numbers devices),
    exported: ``kind`` 'cuda-vmm' with ``fd`` (``size`` rounded up to the allocation
    granularity) where the device supports it and ``vmm`` is true, else 'cuda' with the IPC
    ``handle``. ``device_uuid`` (16 bytes) names the device independently of
    ``CUDA_VISIBLE_DEVICES``; ``uuid`` (16 random bytes) names this allocation. Close it
    before the process exits.
    """

    def __init__(self, ordinal: int, size: int, vmm: bool = True) -> None:
        driver = self._driver = _driver()
        _init(driver)
        count = _check(driver.cuDeviceGetCount(), "cuDeviceGetCount")
        if not 0 <= ordinal < count:
            raise RegionError(f"--gpu-devices names CUDA device {ordinal}, but this process sees {count} "
                              "(CUDA_VISIBLE_DEVICES renumbers them)")
        self.ordinal = ordinal
        self.size = size
        self.uuid = os.urandom(16)
        self.kind = "cuda"
        self.handle = b""
        self.fd = -1
        self._ptr: Any = None    # legacy allocation
        self._mem: Any = None    # VMM allocation handle
        self._dev = _check(driver.cuDeviceGet(ordinal), "cuDeviceGet")
        self.device_uuid = bytes(_check(driver.cuDeviceGetUuid(self._dev), "cuDeviceGetUuid").bytes)[:16]
        self._ctx = _check(driver.cuDevicePrimaryCtxRetain(self._dev), "cuDevicePrimaryCtxRetain")
        try:
            _check(driver.cuCtxPushCurrent(self._ctx), "cuCtxPushCurrent")
            try:
                if vmm and self._vmm_supported():
                    self._alloc_vmm()
                else:
                    self._alloc_legacy()
            finally:
                driver.cuCtxPopCurrent()
        except BaseException:
            self.close()
            raise
        log.info("memory: GPU tier on CUDA device %d (%s): %d MiB, %s", ordinal, format_uuid(self.device_uuid),
                 self.size >> 20, "VMM, shared by file descriptor" if self.kind == "cuda-vmm" else "CUDA IPC handle")

    def _vmm_supported(self) -> bool:
        d = self._driver
        return all(_check(d.cuDeviceGetAttribute(a, self._dev), "cuDeviceGetAttribute")
                   for a in (d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
                             d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED))

    def _alloc_vmm(self) -> None:
        d = self._driver
        prop = allocation_prop(d, self.ordinal)
        gran = int(_check(d.cuMemGetAllocationGranularity(
            prop, d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity"))
        self.size = -(-self.size // gran) * gran
        self._mem = _check(d.cuMemCreate(self.size, prop, 0),
                           f"allocating {self.size} bytes on CUDA device {self.ordinal} (lower --gpu-pool-size)")
        self.fd = int(_check(d.cuMemExportToShareableHandle(
            self._mem, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
            "cuMemExportToShareableHandle"))
        self.kind = "cuda-vmm"

    def _alloc_legacy(self) -> None:
        d = self._driver
        self._ptr = _check(d.cuMemAlloc(self.size),
                           f"allocating {self.size} bytes on CUDA device {self.ordinal} (lower --gpu-pool-size)")
        self.handle = ipc_handle_bytes(_check(d.cuIpcGetMemHandle(self._ptr), "cuIpcGetMemHandle"))

    def close(self) -> None:
        """Free what this process holds (idempotent). A VMM region's memory lives on while
        workers map it; a legacy region's mappings become invalid: workers stop using them
        when the sidecar's boot id changes."""
        driver = self._driver
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._mem is not None:
            driver.cuMemRelease(self._mem)
            self._mem = None
        if self._ptr is not None:
            driver.cuCtxPushCurrent(self._ctx)
            try:
                driver.cuMemFree(self._ptr)
            finally:
                driver.cuCtxPopCurrent()
            self._ptr = None
        if getattr(self, "_ctx", None) is not None:
            driver.cuDevicePrimaryCtxRelease(self._dev)
            self._ctx = None


def ipc_handle_bytes(handle: Any) -> bytes:
    """The 64 bytes of a ``CUipcMemHandle`` (what travels in HELLO)."""
    return ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)


def ipc_handle(d: Any, raw: bytes) -> Any:
    """A ``CUipcMemHandle`` holding the 64 bytes ``raw``."""
    if len(raw) != IPC_HANDLE_BYTES:
        raise RegionError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(raw)}")
    handle = d.CUipcMemHandle()
    ctypes.memmove(handle.getPtr(), raw, IPC_HANDLE_BYTES)
    return handle


def access_desc(d: Any, ordinal: int) -> Any:
    """Read-write access for device ``ordinal`` (this process's numbering) to a VMM mapping."""
    access = d.CUmemAccessDesc()
    access.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = ordinal
    access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return access


def allocation_prop(d: Any, ordinal: int) -> Any:
    """A device allocation on ``ordinal`` that can be exported as a POSIX fd (VMM)."""
    prop = d.CUmemAllocationProp()
    prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = ordinal
    prop.requestedHandleTypes = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    return prop


class GpuMapping:
    """A worker's mapping of a sidecar's :class:`GpuRegion`, described by ``info`` (a
    :class:`~lmkv_mp.wire.protocol.RegionInfo` of kind 'cuda-vmm' or 'cuda'), as a 1-D uint8
    torch tensor on ``device``. Use from one thread; :meth:`close` only after every copy
    that used :attr:`tensor` has completed (the caller drains its stream first)."""

    def __init__(self, info: Any, device: Any, timeout: float = 1.0) -> None:
        import torch

        if info.kind not in ("cuda", "cuda-vmm"):
            raise RegionError(f"region {info.region_id} is of kind {info.kind!r}, not a GPU region")
        if info.kind == "cuda" and len(info.handle) != IPC_HANDLE_BYTES:
            raise RegionError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(info.handle)}")
        driver = self._driver = _driver()
        _init(driver)
        self.size = info.size
        self.kind = info.kind
        self._ptr: Any = None
        self._reserved = False
        with torch.cuda.device(device):
            torch.cuda.current_stream(device)  # makes torch's (primary) context current here
            if info.kind == "cuda":
                self._ptr = _check(driver.cuIpcOpenMemHandle(
                    ipc_handle(driver, info.handle), driver.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                    "cuIpcOpenMemHandle")
            else:
                self._map_vmm(info, torch.device(device).index or 0, timeout)
        self.tensor = torch.as_tensor(_CudaArray(int(self._ptr), self.size), device=device)

    def _map_vmm(self, info: Any, ordinal: int, timeout: float) -> None:
        from lmkv_mp.memory.handles import fetch_handles

        d = self._driver
        fds = fetch_handles(info.name, timeout)
        try:
            if info.uuid not in fds:
                raise RegionError(f"the sidecar's handle socket {info.name} does not offer region {info.uuid.hex()}")
            mem = _check(d.cuMemImportFromShareableHandle(
                fds[info.uuid], d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                "cuMemImportFromShareableHandle")
        finally:
            for fd in fds.values():
                os.close(fd)
        try:
            self._ptr = _check(d.cuMemAddressReserve(self.size, 0, 0, 0), "cuMemAddressReserve")
            self._reserved = True
            _check(d.cuMemMap(self._ptr, self.size, 0, mem, 0), "cuMemMap")
            _check(d.cuMemSetAccess(self._ptr, self.size, [access_desc(d, ordinal)], 1), "cuMemSetAccess")
        except BaseException:
            self.close()
            raise
        finally:
            d.cuMemRelease(mem)  # the mapping holds the allocation from here on

    def close(self) -> None:
        if self._ptr is None:
            return
        self.tensor = None
        d, ptr, self._ptr = self._driver, self._ptr, None
        if self.kind == "cuda":
            _check(d.cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")
        elif self._reserved:
            d.cuMemUnmap(ptr, self.size)  # fails only where nothing was mapped yet
            _check(d.cuMemAddressFree(ptr, self.size), "cuMemAddressFree")


class _CudaArray:
    """``__cuda_array_interface__`` for a raw device pointer, so torch can view it (no copy)."""

    def __init__(self, ptr: int, size: int) -> None:
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3,
                                         "strides": None}
