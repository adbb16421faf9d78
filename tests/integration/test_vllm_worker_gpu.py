"""A CUDA rank's use of the GPU tier, on a machine without a GPU: which slots it fills, which
copy it reads, and that a GPU slot it cannot fill is never published.

Two stand-ins replace what needs a device: the sidecar's GPU regions (test_server_gpu's
StandInRegion: no device allocation) and the rank's :class:`~lmkv_mp.engine.cuda_path.CudaHostPath`
(:class:`StandInGpuPath` below: a :class:`~lmkv_mp.engine.copy_path.CopyPath` on a device, with
CPU tensors for the mapped regions and the package's CPU copies). The sidecar is the real one,
serving on its loop in a thread; the worker is the real :class:`WorkerSide` over a real client,
built with that path. CudaHostPath itself runs in tests/gpu/test_cuda_path_gpu.py, on a GPU only.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
import torch

from lmkv_mp.engine.client import SidecarClient
from lmkv_mp.engine.copy_path import CpuPath, LoadChunk
from lmkv_mp.engine.paged import PagedKV
from lmkv_mp.config import load_sidecar_config
from lmkv_mp.integration.plan import LoadJob, StoreJob
from lmkv_mp.integration.vllm_worker import WorkerSide
from lmkv_mp.wire.keys import chain_hashes
from lmkv_mp.wire.protocol import RegionInfo
from lmkv_mp.sidecar.server import Sidecar

from tests.conftest import client_config, unlink_shm
from tests.sidecar.test_server_gpu import DEV0, DEV1, StandInRegion
from tests.integration.test_vllm_worker import BPC, CHUNK, NS, blocks, cache, plan

MiB = 1 << 20


class StandInGpuPath(CpuPath):
    """A copy path on the CUDA device ``device`` (by uuid), with CPU tensors for the regions
    it maps (by region uuid; none where not ``mappable``); ``loaded_from`` records where each
    loaded chunk came from."""

    def __init__(self, paged: PagedKV, device: bytes, mappable: bool = True) -> None:
        super().__init__(paged)
        self.device_uuid = device
        self.mappable = mappable
        self.regions: dict[bytes, torch.Tensor] = {}
        self.loaded_from: list[str] = []
        self.dropped = 0
        self.announced: list[bytes] = []

    def drop_stale_regions(self, announced: Sequence[bytes]) -> int:
        self.announced = list(announced)
        stale = [u for u in self.regions if u not in announced]
        for u in stale:
            del self.regions[u]
        self.dropped += len(stale)
        return len(stale)

    def gpu_region(self, info: RegionInfo) -> torch.Tensor | None:
        assert info.uuid in self.announced and not [u for u in self.regions if u not in self.announced], \
            "stale mappings are dropped before a region is mapped"
        if not self.mappable:
            return None
        return self.regions.setdefault(info.uuid, torch.zeros(info.size, dtype=torch.uint8))

    def load(self, host: torch.Tensor, chunks: Sequence[LoadChunk], nbytes: int, after: Any = None) -> None:
        self.loaded_from.extend("host" if c.gpu_slot is None else "gpu" for c in chunks)
        super().load(host, chunks, nbytes, after)


class Served:
    """A real sidecar with two stand-in GPU regions (devices DEV0, DEV1), serving in a thread;
    :meth:`restart` stops it and starts a new one on the same run dir (new regions)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("lmkv_mp.sidecar.server.open_gpu_regions",
                            lambda cfg: [StandInRegion(0, 4 * MiB, DEV0), StandInRegion(1, 4 * MiB, DEV1)])
        self.run_dir = Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp"))
        self._start()

    def _start(self) -> None:
        self.sidecar = Sidecar(load_sidecar_config(
            ["--run-dir", str(self.run_dir), "--host-pool-size", "64MiB", "--slab-size", "4MiB", "--metrics-port", "0",
             "--gpu-pool-size", "4MiB"], env={}))
        self.loop = threading.Thread(target=self.sidecar.run, name="sidecar-loop", daemon=True)
        self.loop.start()

    def stop(self) -> None:
        self.sidecar.request_stop()
        self.loop.join(10)

    def restart(self) -> None:
        self.stop()
        self._start()


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    s = Served(monkeypatch)
    try:
        yield s.run_dir
    finally:
        s.stop()
        unlink_shm(s.run_dir)
        shutil.rmtree(s.run_dir, ignore_errors=True)


@pytest.fixture
def restartable(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    s = Served(monkeypatch)
    try:
        yield s
    finally:
        s.stop()
        unlink_shm(s.run_dir)
        shutil.rmtree(s.run_dir, ignore_errors=True)


def cuda_rank(run_dir: Path, paged: PagedKV, device: bytes, clients: list, mappable: bool = True) -> WorkerSide:
    """A WorkerSide as a CUDA rank on ``device`` sets itself up, with StandInGpuPath for CudaHostPath."""
    client = SidecarClient(client_config(run_dir), role="worker")
    clients.append(client)
    return WorkerSide(client, paged, 0, paged.chunk_bytes(1), path=StandInGpuPath(paged, device, mappable))


def stand_in(side: WorkerSide) -> StandInGpuPath:
    assert isinstance(side.path, StandInGpuPath)
    return side.path


@pytest.fixture
def clients() -> Iterator[list[SidecarClient]]:
    made: list[SidecarClient] = []
    yield made
    for c in made:
        c.close()


def test_a_cuda_rank_fills_its_gpu_slots_and_a_rank_on_that_device_loads_from_them(
        served: Path, clients: list) -> None:
    a, b, c = cache(21), cache(22), cache(23)
    wa = cuda_rank(served, a, DEV0, clients)
    sched = SidecarClient(client_config(served), role="scheduler")
    clients.append(sched)
    assert sched.connect()
    hashes = chain_hashes(list(range(2 * CHUNK)), CHUNK, sched.hello.hash_key)
    wa.submit_stores(plan(stores=[StoreJob("r1", hashes, list(range(2 * BPC)))]))
    wa.wait_for_inflight()
    assert wa.stats["store_chunks"] == 2

    found = sched.lookup([NS], hashes, pin=True)
    assert found.hits == 2 and found.gpu_regions[0].tolist() == [1, 1], "copies in device 0's region (id 1)"
    host = wa.client.host_tensor()
    (mapped,) = stand_in(wa).regions.values()
    nbytes = a.chunk_bytes(BPC)
    for off, goff in zip(found.offsets[0].tolist(), found.gpu_offsets[0].tolist()):
        assert torch.equal(mapped[goff:goff + nbytes], host[off:off + nbytes]), "the copy holds the chunk's bytes"

    job = LoadJob("r2", found.boot_id, [found.offsets[0].tolist()], [], list(range(10, 10 + 2 * BPC)), 0,
                  hashes, found.lease_id, [found.gpu_regions[0].tolist()], [found.gpu_offsets[0].tolist()])
    wb = cuda_rank(served, b, DEV0, clients)
    stand_in(wb).regions = stand_in(wa).regions  # one device: one region
    wc = cuda_rank(served, c, DEV1, clients)
    for w in (wb, wc):
        w.client.connect()
        w.submit_loads(plan(loads=[job]))
        w.wait_for_inflight()
        assert w.load_errors() == set()
    assert stand_in(wb).loaded_from == ["gpu", "gpu"], "same device: device to device"
    assert stand_in(wc).loaded_from == ["host", "host"], "another device: through the host tier"
    for w in (b, c):
        for got, want in zip(blocks(w, list(range(10, 10 + 2 * BPC))), blocks(a, list(range(2 * BPC)))):
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    sched.release(found.lease_id)


def test_a_gpu_slot_the_rank_cannot_fill_is_never_published(served: Path, clients: list) -> None:
    a = cache(24)
    wa = cuda_rank(served, a, DEV1, clients, mappable=False)
    sched = SidecarClient(client_config(served), role="scheduler")
    clients.append(sched)
    assert sched.connect()
    hashes = chain_hashes(list(range(7, 7 + 2 * CHUNK)), CHUNK, sched.hello.hash_key)
    wa.submit_stores(plan(stores=[StoreJob("r1", hashes, list(range(2 * BPC)))]))
    wa.wait_for_inflight()
    assert wa.stats["store_chunks"] == 0 and sched.lookup([NS], hashes).hits == 0
    assert wa.client.device == b"", "the rank stops asking for GPU slots"
    wa.submit_stores(plan(stores=[StoreJob("r2", hashes, list(range(2 * BPC)))]))
    wa.wait_for_inflight()
    assert wa.stats["store_chunks"] == 2, "its lease was released, and host-only stores go on"
    found = sched.lookup([NS], hashes, pin=True)
    assert found.hits == 2 and found.gpu_regions[0].tolist() == [0, 0]
    sched.release(found.lease_id)


def test_after_a_sidecar_restart_a_rank_lets_go_of_the_old_regions_at_its_next_job(
        restartable: Served, clients: list) -> None:
    """A VMM region's memory lives while any worker maps it: a rank must drop a region the
    new sidecar does not announce, before it maps the new one."""
    a = cache(25)
    wa = cuda_rank(restartable.run_dir, a, DEV0, clients)
    sched = SidecarClient(client_config(restartable.run_dir), role="scheduler")
    clients.append(sched)
    assert sched.connect()
    key = sched.hello.hash_key
    wa.submit_stores(plan(stores=[StoreJob("r1", chain_hashes(list(range(CHUNK)), CHUNK, key), list(range(BPC)))]))
    wa.wait_for_inflight()
    old = set(stand_in(wa).regions)
    assert len(old) == 1 and wa.stats["store_chunks"] == 1
    restartable.restart()
    hashes = chain_hashes(list(range(100, 100 + CHUNK)), CHUNK, key)
    for attempt in range(20):  # the first calls after a restart may miss while the client re-HELLOs
        wa.submit_stores(plan(stores=[StoreJob(f"r{attempt + 2}", hashes, list(range(BPC)))]))
        wa.wait_for_inflight()
        if wa.stats["store_chunks"] == 2:
            break
    assert wa.stats["store_chunks"] == 2
    assert stand_in(wa).dropped == 1 and not old & set(stand_in(wa).regions)
    assert len(stand_in(wa).regions) == 1, "the new sidecar's region is mapped"
