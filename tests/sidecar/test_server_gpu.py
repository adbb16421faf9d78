"""The sidecar's GPU tier on the wire: HELLO's region list, RESERVE and LOOKUP with GPU copies.

This machine has no GPU, so the device allocations (``startup.open_gpu_regions``, which
calls cuda-python) are replaced by stand-ins that carry what the sidecar reads of a
:class:`~lmkv_mp.memory.gpu.GpuRegion`: size, uuids, ordinal, a 64-byte handle, close().
Everything else is the real in-process sidecar of test_server.py. The real allocation,
export and import run in tests/gpu/ (on a GPU only).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import pytest

from lmkv_mp.wire import protocol as P
from lmkv_mp.engine.client import SidecarClient
from lmkv_mp.config import load_sidecar_config
from lmkv_mp.memory import RegionError
from lmkv_mp.memory.handles import fetch_handles
from lmkv_mp.sidecar.metrics import NamespaceLabels, prometheus_families
from lmkv_mp.sidecar.server import Sidecar
from lmkv_mp.sidecar.startup import StartupError

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from tests.conftest import client_config, unlink_shm
from tests.sidecar.test_metrics import parse, value
from tests.sidecar.test_server import CHUNK, NS_A, NS_B, Harness, hashes

MiB = 1 << 20
DEV0, DEV1, OTHER = b"\xa0" * 16, b"\xa1" * 16, b"\xff" * 16


class StandInRegion:
    """What the sidecar uses of a GpuRegion, without a device: a legacy region's IPC handle,
    or with ``vmm`` a VMM region's exported fd (a memfd holding ``b"region <ordinal>"``)."""

    def __init__(self, ordinal: int, size: int, device_uuid: bytes, vmm: bool = False) -> None:
        self.ordinal, self.size, self.device_uuid = ordinal, size, device_uuid
        self.uuid = os.urandom(16)
        self.kind = "cuda-vmm" if vmm else "cuda"
        self.handle = b"" if vmm else bytes([ordinal]) * 64
        self.fd = -1
        if vmm:
            self.fd = os.memfd_create("lmkv-test-region")
            os.write(self.fd, f"region {ordinal}".encode())
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def gpu_sc(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Harness, list[StandInRegion]]]:
    made: list[StandInRegion] = []

    def open_regions(cfg: object) -> list[StandInRegion]:
        made[:] = [StandInRegion(0, 4 * MiB, DEV0), StandInRegion(1, 4 * MiB, DEV1)]
        return list(made)

    monkeypatch.setattr("lmkv_mp.sidecar.server.open_gpu_regions", open_regions)
    h = Harness(Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp")), "--gpu-pool-size", "4MiB")
    yield h, made
    h.close()


def hello(h: Harness, ident: bytes, device: bytes, *namespaces: bytes) -> P.HelloReply:
    reply = h.ok(ident, P.Hello(1, P.PROTOCOL_VERSION, "worker", 123, ident.decode(),
                                [P.NamespaceInfo(ns, CHUNK) for ns in namespaces], device=device))
    assert isinstance(reply, P.HelloReply)
    return reply


def test_hello_announces_each_gpu_region_with_its_handle_and_device(gpu_sc: tuple[Harness, list]) -> None:
    h, made = gpu_sc
    regions = hello(h, b"w0", DEV0, NS_A).regions
    assert [r.region_id for r in regions] == [0, 1, 2]
    for info, region in zip(regions[1:], made):
        assert info.kind == "cuda" and info.handle == region.handle and info.size == region.size
        assert info.device_uuid == region.device_uuid and info.uuid == region.uuid and info.device == region.ordinal
    assert regions[1].name == "GPU-a0a0a0a0-a0a0-a0a0-a0a0-a0a0a0a0a0a0"


def test_a_worker_gets_copy_slots_on_its_own_device_only(gpu_sc: tuple[Harness, list]) -> None:
    h, _ = gpu_sc
    hello(h, b"w1", DEV1, NS_A)
    hello(h, b"cpu", b"", NS_B)
    hello(h, b"stranger", OTHER, NS_B)
    r = h.ok(b"w1", P.Reserve(2, NS_A, hashes(1, 2)))
    assert r.gpu_regions == b"\x02\x02", "device 1's region (id 2)"
    offsets = r.gpu_offsets.tolist()
    assert len(set(offsets)) == 2 and all(o + CHUNK <= 4 * MiB for o in offsets)
    assert h.ok(b"w1", P.Commit(3, r.lease_id)).committed == 2
    for ident in (b"cpu", b"stranger"):
        mine = h.ok(ident, P.Reserve(2, NS_B, hashes(ord(ident[:1]))))
        assert mine.gpu_regions == b"" and not mine.gpu_offsets, "no region on its device: host only"
        h.ok(ident, P.Commit(3, mine.lease_id))

    h.hello(b"sched", role="scheduler")
    pinned = h.lookup(b"sched", [NS_A], hashes(1, 2), pin=True)
    assert pinned.gpu_regions == [b"\x02\x02"] and pinned.gpu_offsets[0].tolist() == offsets
    plain = h.lookup(b"sched", [NS_A], hashes(1, 2))
    assert plain.hits == 2 and plain.gpu_regions == [], "an unpinned lookup hands out no locations"

    tiers = h.stats()["tiers"]
    assert tiers["gpu1"]["entries"] == 2 and tiers["gpu1"]["used_bytes"] == 2 * CHUNK
    assert tiers["gpu1"]["hit_chunks"] == 2 and tiers["gpu0"]["entries"] == 0
    assert tiers["gpu0"]["capacity_bytes"] == 4 * MiB


def test_gpu_tiers_appear_on_prometheus(gpu_sc: tuple[Harness, list]) -> None:
    h, _ = gpu_sc
    hello(h, b"w0", DEV0, NS_A)
    h.store(b"w0", NS_A, hashes(1))
    snap = h.server.snapshot()

    class Fixed:
        def collect(self) -> list:
            return prometheus_families(snap, NamespaceLabels(4))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    s = parse(generate_latest(registry).decode())
    assert value(s, "lmkv_tier_used_bytes", tier="gpu0") == CHUNK
    assert value(s, "lmkv_tier_capacity_bytes", tier="gpu1") == 4 * MiB
    assert value(s, "lmkv_stored_chunks_total", tier="gpu0") == 1
    assert value(s, "lmkv_entries", tier="gpu0", state="committed") == 1


def test_close_frees_the_gpu_regions(gpu_sc: tuple[Harness, list]) -> None:
    h, made = gpu_sc
    h.server.close()
    assert all(r.closed for r in made)
    h.server = h._new()  # the harness closes one at teardown


def test_a_vmm_regions_fd_reaches_workers_over_the_handle_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A VMM region is announced with the handle socket's path; a worker that connects gets
    the fd of that very allocation (a memfd here) while the loop serves everyone else."""
    vmm, legacy = StandInRegion(0, 4 * MiB, DEV0, vmm=True), StandInRegion(1, 4 * MiB, DEV1)
    monkeypatch.setattr("lmkv_mp.sidecar.server.open_gpu_regions", lambda cfg: [vmm, legacy])
    run_dir = Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp"))
    sc = Sidecar(load_sidecar_config(["--run-dir", str(run_dir), "--host-pool-size", "64MiB", "--slab-size",
                                      "4MiB", "--metrics-port", "0", "--gpu-pool-size", "4MiB"], env={}))
    loop = threading.Thread(target=sc.run, daemon=True)
    loop.start()
    client = SidecarClient(client_config(run_dir), role="worker", device=DEV0)
    try:
        assert client.connect()
        info = client.gpu_region(1)
        assert info is not None and info.kind == "cuda-vmm" and info.handle == b""
        assert info.name == str(run_dir / "gpu-handles.sock")
        fds = fetch_handles(info.name, 5.0)
        assert list(fds) == [vmm.uuid]
        assert os.pread(fds[vmm.uuid], 64, 0) == b"region 0"
        os.close(fds[vmm.uuid])
        assert client.gpu_region(2) is None, "another device's region is not this worker's"
        assert client.hello.regions[2].kind == "cuda" and client.hello.regions[2].handle == legacy.handle
        assert client.stats()["clients"] == {"worker": 1}, "the loop kept serving"
    finally:
        client.close()
        sc.request_stop()
        loop.join(10)
        unlink_shm(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert vmm.closed and not (run_dir / "gpu-handles.sock").exists()


def test_a_handle_socket_that_cannot_be_bound_is_a_clear_start_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Something else at gpu-handles.sock's path (here a directory): start fails saying
    which socket, the regions are freed and the run dir's lock is released."""
    vmm = StandInRegion(0, 4 * MiB, DEV0, vmm=True)
    monkeypatch.setattr("lmkv_mp.sidecar.server.open_gpu_regions", lambda cfg: [vmm] if cfg.gpu_pool_size else [])
    run_dir = Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp"))
    (run_dir / "gpu-handles.sock").mkdir()
    argv = ["--run-dir", str(run_dir), "--host-pool-size", "64MiB", "--slab-size", "4MiB", "--metrics-port", "0"]
    try:
        with pytest.raises(StartupError, match="GPU handle socket"):
            Sidecar(load_sidecar_config([*argv, "--gpu-pool-size", "4MiB"], env={}))
        assert vmm.closed
        Sidecar(load_sidecar_config(argv, env={})).close()  # the lock was released
    finally:
        unlink_shm(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_gpu_tier_without_a_cuda_driver_fails_to_start_and_leaves_nothing() -> None:
    """This machine has no NVIDIA driver: asking for a GPU tier is a start failure that says
    why, and the run dir's lock and the host pool segment are let go."""
    run_dir = Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp"))
    try:
        argv = ["--run-dir", str(run_dir), "--host-pool-size", "64MiB", "--slab-size", "4MiB",
                "--metrics-port", "0", "--gpu-pool-size", "4MiB"]
        with pytest.raises(RegionError, match="needs the NVIDIA driver|cuda-python|no CUDA device|cuInit"):
            Sidecar(load_sidecar_config(argv, env={}))
        Sidecar(load_sidecar_config(argv[:-2], env={})).close()  # the lock was released
    finally:
        unlink_shm(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
