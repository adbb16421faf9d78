"""GPU tier memory: one device allocation per GPU, exported to workers as a CUDA IPC handle.

The sidecar allocates each device's region with the CUDA driver API (cuda-python:
``cuMemAlloc`` in the device's primary context) and exports it with ``cuIpcGetMemHandle``;
the 64-byte handle travels to workers in the HELLO reply (:class:`~lmkv_mp.protocol.RegionInfo`,
``kind='cuda'``), and a worker on the same device maps it once per region uuid with
``cuIpcOpenMemHandle`` (:class:`GpuMapping`). The sidecar never copies GPU bytes itself:
workers copy between their paged KV and GPU slots, device to device.

The region is volatile: its contents and handle die with the sidecar process, so a restarted
sidecar announces a new region (new uuid) and workers drop their old mapping. Legacy IPC
handles, not VMM shareable handles (``cuMemCreate`` + a POSIX fd): an fd can only travel over
a unix socket with SCM_RIGHTS, which ZeroMQ does not carry (ARCHITECTURE §4 says so).

Nothing here imports cuda-python before it is used: a sidecar without ``--gpu-pool-size``
never loads a CUDA library.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

from lmkv_mp.memory.region import RegionError

log = logging.getLogger("lmkv.memory")

IPC_HANDLE_BYTES = 64


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError:
        try:  # cuda-python < 12.6
            from cuda import cuda as driver  # type: ignore[no-redef]
        except ImportError as e:
            raise RegionError(f"the GPU tier needs cuda-python ({e}): pip install 'lmkv_mp[gpu]'") from None
    return driver


def _check(driver: Any, result: Any, what: str) -> Any:
    """cuda-python returns ``(status, *values)``: raise RegionError on a bad status."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        name = driver.cuGetErrorName(status)[1]
        raise RegionError(f"{what} failed: {name.decode() if name else int(status)}")
    return values[0] if len(values) == 1 else tuple(values) or None


def _init(driver: Any) -> None:
    try:
        _check(driver, driver.cuInit(0), "cuInit")
    except RegionError:
        raise
    except Exception as e:  # no driver library at all: cuda-python raises its own error type
        raise RegionError(f"the GPU tier (--gpu-pool-size) needs the NVIDIA driver, which cannot be loaded "
                          f"({e}); start without --gpu-pool-size on this host") from None


def visible_devices() -> int:
    """How many CUDA devices this process sees; RegionError when none (or no driver)."""
    driver = _driver()
    _init(driver)
    count = _check(driver, driver.cuDeviceGetCount(), "cuDeviceGetCount")
    if not count:
        raise RegionError("--gpu-pool-size asks for a GPU tier, but this process sees no CUDA device")
    return count


def format_uuid(raw: bytes) -> str:
    """A device uuid the way ``nvidia-smi -L`` prints it (``GPU-8-4-4-4-12`` hex)."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class GpuRegion:
    """``size`` bytes on CUDA device ``ordinal`` (as this process numbers devices), exported.

    ``device_uuid`` (16 bytes) names the device independently of ``CUDA_VISIBLE_DEVICES``,
    so a worker that numbers devices differently still finds its device's region; ``uuid``
    (16 random bytes) names this allocation. Close it before the process exits.
    """

    def __init__(self, ordinal: int, size: int) -> None:
        driver = self._driver = _driver()
        _init(driver)
        count = _check(driver, driver.cuDeviceGetCount(), "cuDeviceGetCount")
        if not 0 <= ordinal < count:
            raise RegionError(f"--gpu-devices names CUDA device {ordinal}, but this process sees {count} "
                              "(CUDA_VISIBLE_DEVICES renumbers them)")
        self.ordinal = ordinal
        self.size = size
        self.uuid = os.urandom(16)
        self._dev = _check(driver, driver.cuDeviceGet(ordinal), "cuDeviceGet")
        self.device_uuid = bytes(_check(driver, driver.cuDeviceGetUuid(self._dev), "cuDeviceGetUuid").bytes)[:16]
        self._ctx = _check(driver, driver.cuDevicePrimaryCtxRetain(self._dev), "cuDevicePrimaryCtxRetain")
        self._ptr: Any = None
        try:
            _check(driver, driver.cuCtxPushCurrent(self._ctx), "cuCtxPushCurrent")
            try:
                self._ptr = _check(driver, driver.cuMemAlloc(size),
                                   f"allocating {size} bytes on CUDA device {ordinal} (lower --gpu-pool-size)")
                _check(driver, driver.cuMemsetD8(self._ptr, 0, size), "cuMemsetD8")
                handle = _check(driver, driver.cuIpcGetMemHandle(self._ptr), "cuIpcGetMemHandle")
                self.handle = ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)
            finally:
                driver.cuCtxPopCurrent()
        except BaseException:
            self.close()
            raise
        log.info("memory: GPU tier on CUDA device %d (%s): %d MiB", ordinal, format_uuid(self.device_uuid),
                 size >> 20)

    def close(self) -> None:
        """Free the allocation and release the context (idempotent). Importers' mappings of
        it become invalid: workers stop using it when the sidecar's boot id changes."""
        driver = self._driver
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


class GpuMapping:
    """A worker's mapping of a sidecar's :class:`GpuRegion` (``cuIpcOpenMemHandle``) as a
    1-D uint8 torch tensor on ``device``. Use from one thread; :meth:`close` only after every
    copy that used :attr:`tensor` has completed (the caller drains its stream first)."""

    def __init__(self, handle: bytes, size: int, device: Any) -> None:
        import torch

        if len(handle) != IPC_HANDLE_BYTES:
            raise RegionError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
        driver = self._driver = _driver()
        _init(driver)
        raw = driver.CUipcMemHandle()
        ctypes.memmove(raw.getPtr(), handle, IPC_HANDLE_BYTES)
        self.size = size
        self._ptr: Any = None
        with torch.cuda.device(device):
            torch.cuda.current_stream(device)  # makes torch's (primary) context current here
            self._ptr = _check(driver, driver.cuIpcOpenMemHandle(
                raw, driver.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS), "cuIpcOpenMemHandle")
        self.tensor = torch.as_tensor(_CudaArray(int(self._ptr), size), device=device)

    def close(self) -> None:
        if self._ptr is not None:
            self.tensor = None
            _check(self._driver, self._driver.cuIpcCloseMemHandle(self._ptr), "cuIpcCloseMemHandle")
            self._ptr = None


class _CudaArray:
    """``__cuda_array_interface__`` for a raw device pointer, so torch can view it (no copy)."""

    def __init__(self, ptr: int, size: int) -> None:
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3,
                                         "strides": None}
