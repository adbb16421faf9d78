"""lmkv_mp.memory.gpu without a GPU: what of it runs on the CPU, runs here.

cuda-python's structs and enums work without a driver, so the values the GPU tier hands the
driver (the VMM allocation's properties, the access descriptor, the IPC handle's 64 bytes)
are built and read back here, and every driver symbol the module names must exist in the
installed cuda-python: a misspelt one would otherwise first fail on a GPU. The calls into
the driver themselves run in tests/gpu only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmkv_mp.memory import RegionError
from lmkv_mp.memory import gpu
from lmkv_mp.wire.protocol import RegionInfo

driver = pytest.importorskip("cuda.bindings.driver")


@pytest.mark.parametrize(("path", "aliases", "module", "at_least"), [
    ("memory/gpu.py", "d|driver", "driver", 30),
    ("engine/kernels.py", "driver", "driver", 5),
    ("engine/kernels.py", "nvrtc", "nvrtc", 5),
    ("memory/cuda_api.py", "driver", "driver", 3),
    ("memory/cuda_api.py", "nvrtc", "nvrtc", 2),
])
def test_every_cuda_python_symbol_the_gpu_code_names_exists(path: str, aliases: str, module: str,
                                                            at_least: int) -> None:
    """The GPU tier's allocation and import (memory/gpu.py), the kernels' loader (kernels.py)
    and the status checks both use (cuda_api.py)."""
    source = (Path(gpu.__file__).parent.parent / path).read_text()
    names = set(re.findall(rf"(?<![A-Za-z0-9_])(?:{aliases})\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)",
                           source))
    assert len(names) >= at_least, names
    mod = pytest.importorskip(f"cuda.bindings.{module}")
    for dotted in sorted(names):
        obj = mod
        for part in dotted.split("."):
            assert hasattr(obj, part), f"cuda.bindings.{module} has no {dotted} ({path})"
            obj = getattr(obj, part)


def test_the_vmm_allocation_is_pinned_device_memory_exportable_as_an_fd() -> None:
    prop = gpu.allocation_prop(driver, 3)
    assert prop.type == driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    assert prop.location.type == driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE and prop.location.id == 3
    assert prop.requestedHandleTypes == driver.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR


def test_a_mapping_is_read_write_for_the_workers_own_device() -> None:
    desc = gpu.access_desc(driver, 2)
    assert desc.location.type == driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE and desc.location.id == 2
    assert desc.flags == driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE


def test_an_ipc_handle_survives_its_trip_through_hello() -> None:
    raw = bytes(range(64))
    assert gpu.ipc_handle_bytes(gpu.ipc_handle(driver, raw)) == raw
    with pytest.raises(RegionError, match="64 bytes"):
        gpu.ipc_handle(driver, raw[:63])


def test_device_uuids_print_as_nvidia_smi_does() -> None:
    raw = bytes.fromhex("0b42632abc5cf731724b6936a19c4b24")
    assert gpu.format_uuid(raw) == "GPU-0b42632a-bc5c-f731-724b-6936a19c4b24"


def test_the_array_interface_describes_the_whole_region_as_bytes() -> None:
    iface = gpu._CudaArray(0x7F0000000000, 1 << 20).__cuda_array_interface__
    assert iface["shape"] == (1 << 20,) and iface["typestr"] == "|u1" and iface["data"] == (0x7F0000000000, False)
    assert iface["strides"] is None and iface["version"] == 3


def test_without_a_driver_a_region_fails_with_a_message_that_says_so() -> None:
    with pytest.raises(RegionError, match="needs the NVIDIA driver|cuInit|no CUDA device"):
        gpu.GpuRegion(0, 1 << 20)


@pytest.mark.parametrize(("kind", "handle", "match"), [("shm", b"", "not a GPU region"),
                                                       ("cuda", b"x" * 63, "64 bytes")])
def test_a_mapping_refuses_what_is_not_a_gpu_region_before_touching_cuda(kind: str, handle: bytes,
                                                                          match: str) -> None:
    info = RegionInfo(1, kind, "x", 1 << 20, b"u" * 16, 0, handle, b"d" * 16)
    with pytest.raises(RegionError, match=match):
        gpu.GpuMapping(info, "cuda:0")
