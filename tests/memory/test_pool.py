"""Tests for lmkv_mp.memory.region and lmkv_mp.memory.pool: shm regions, the persisted slot
table and warm restart. Every segment has a name unique to the test and is unlinked at teardown."""

from __future__ import annotations

import os
import stat
import struct
import uuid
from pathlib import Path
from typing import Callable, Iterator

import posix_ipc
import pytest
import torch

from lmkv_mp.memory import HostPool, HostRegion, RegionError, SlotState
from lmkv_mp.memory.allocator import SlotId
from lmkv_mp.memory.pool import DEFAULT_MIN_SLOT_BYTES, HEADER_BYTES, MAGIC, Geometry

KiB, MiB = 1 << 10, 1 << 20
SIZE = 32 * MiB
SLAB = 1 * MiB
NS_A = b"A" * 16
NS_B = b"B" * 16


def unique_name() -> str:
    return f"/lmkv-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def shm_path(name: str) -> Path:
    return Path("/dev/shm") / name.lstrip("/")


def unlink(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def close_quietly(region: HostRegion) -> None:
    try:
        region.close()
    except BufferError:
        pass  # a failing test left a tensor alive: the mapping goes with it


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = unique_name()
    try:
        yield name
    finally:
        unlink(name)
    assert not shm_path(name).exists()


@pytest.fixture
def opened(shm_name: str) -> Iterator[Callable[..., HostRegion]]:
    """Factory for regions on this test's segment; every one is closed at teardown."""
    regions: list[HostRegion] = []

    def open_region(size: int = SIZE, attach: bool = False, **kw: object) -> HostRegion:
        r = HostRegion.attach("shm", shm_name, size) if attach else HostRegion.create_or_attach(shm_name, size, **kw)
        regions.append(r)
        return r

    yield open_region
    for r in regions:
        close_quietly(r)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, n: int) -> bytes:
    return (bytes([i % 251 + 1]) * 7 + i.to_bytes(4, "little")) * (n // 11) + b"\xee" * (n % 11)


# -- region -----------------------------------------------------------------------------------


def test_region_is_created_owner_only(opened: Callable[..., HostRegion], shm_name: str) -> None:
    r = opened()
    assert r.created and r.kind == "shm" and r.name == shm_name and r.size == SIZE
    st = os.stat(shm_path(shm_name))
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert st.st_size == SIZE


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o660])
def test_region_mode_is_exact_despite_umask(shm_name: str, mode: int) -> None:
    old = os.umask(0o077)
    try:
        r = HostRegion.create_or_attach(shm_name, 4 * MiB, mode=mode)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(shm_path(shm_name)).st_mode) == mode
    finally:
        r.close()


def test_region_reattach_same_size_keeps_contents(opened: Callable[..., HostRegion]) -> None:
    a = opened()
    a.view[100:105] = b"hello"
    a.close()
    b = opened()
    assert not b.created
    assert bytes(b.view[100:105]) == b"hello"


def test_region_of_other_size_is_recreated(opened: Callable[..., HostRegion], shm_name: str) -> None:
    a = opened(4 * MiB)
    a.view[0:5] = b"hello"
    a.close()
    b = opened(8 * MiB)
    assert b.created and b.size == 8 * MiB
    assert bytes(b.view[0:5]) == b"\0" * 5
    assert os.stat(shm_path(shm_name)).st_size == 8 * MiB


def test_attach_sees_the_same_bytes_both_ways(opened: Callable[..., HostRegion]) -> None:
    owner = opened()
    worker = opened(attach=True)
    assert not worker.created and worker.size == SIZE
    owner.view[SIZE - 3:SIZE] = b"abc"
    assert bytes(worker.view[SIZE - 3:SIZE]) == b"abc"
    worker.view[0:3] = b"xyz"
    assert bytes(owner.view[0:3]) == b"xyz"


def test_attach_smaller_announced_size_is_allowed(opened: Callable[..., HostRegion]) -> None:
    opened()
    w = opened(SIZE // 2, attach=True)
    assert w.size == SIZE // 2


def test_attach_larger_than_segment_fails(opened: Callable[..., HostRegion], shm_name: str) -> None:
    opened(4 * MiB)
    with pytest.raises(RegionError, match="announced"):
        HostRegion.attach("shm", shm_name, 8 * MiB)


@pytest.mark.parametrize("kind, name", [("shm", None), ("file", "/nonexistent/lmkv/pool"), ("cuda", "x")])
def test_attach_failures_are_region_errors(kind: str, name: str | None) -> None:
    with pytest.raises(RegionError):
        HostRegion.attach(kind, name or unique_name(), 4 * MiB)


def test_region_tensor_views_memory(opened: Callable[..., HostRegion]) -> None:
    r = opened(4 * MiB)
    t = r.tensor()
    assert t.dtype == torch.uint8 and t.shape == (4 * MiB,)
    t[10:14] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert bytes(r.view[10:14]) == b"\1\2\3\4"
    r.view[20] = 99
    assert int(t[20]) == 99
    w = opened(4 * MiB, attach=True)
    assert bytes(w.view[10:14]) == b"\1\2\3\4"


@pytest.mark.parametrize("keep", ["tensor", "slice", "reshaped"])
def test_close_raises_buffererror_while_a_tensor_view_exists(opened: Callable[..., HostRegion], keep: str) -> None:
    """A tensor of the region pins its mapping: close() refuses (it would leave the tensor
    pointing at unmapped memory), and succeeds once the tensor is gone."""
    r = opened(4 * MiB)
    t = r.tensor()
    view = {"tensor": t, "slice": t[4096:8192], "reshaped": t.view(-1, 4096)[3]}[keep]
    del t
    with pytest.raises(BufferError):
        r.close()
    assert not r.mm.closed
    view[0] = 7  # still mapped: no use-after-unmap
    del view
    r.close()
    assert r.mm.closed
    r.close()  # idempotent


def test_closed_region_view_raises(opened: Callable[..., HostRegion]) -> None:
    r = opened(4 * MiB)
    r.close()
    with pytest.raises(RegionError, match="closed"):
        r.view  # noqa: B018


def test_unlink_removes_segment(shm_name: str) -> None:
    r = HostRegion.create_or_attach(shm_name, 4 * MiB)
    r.close()
    r.unlink()
    assert not shm_path(shm_name).exists()
    r.unlink()  # a second unlink is harmless


def test_file_region_mode_and_reattach(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    r = HostRegion.create_or_attach("ignored", 4 * MiB, path=path)
    try:
        assert r.created and r.kind == "file"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        r.view[0:4] = b"data"
    finally:
        r.close()
    r = HostRegion.create_or_attach("ignored", 4 * MiB, path=path)
    try:
        assert not r.created and bytes(r.view[0:4]) == b"data"
    finally:
        r.close()


# -- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("total, slab, min_slot", [(SIZE, SLAB, 16 * KiB), (64 * MiB, 4 * MiB, 16 * KiB),
                                                   (SIZE, SLAB, 4 * KiB), (3 * MiB, SLAB, 16 * KiB)])
def test_geometry_fits_and_aligns(total: int, slab: int, min_slot: int) -> None:
    g = Geometry.plan(total, slab, min_slot)
    assert g.num_slabs >= 1
    assert g.max_slots_per_slab == slab // min_slot
    assert HEADER_BYTES <= g.slab_table_off < g.slot_table_off < g.data_off
    assert g.slot_table_off + g.num_slabs * g.max_slots_per_slab * 64 <= g.data_off
    assert g.data_off % (2 * MiB) == 0
    assert g.data_off + g.num_slabs * slab <= total
    assert g.data_off + (g.num_slabs + 1) * slab > total, "no whole slab left unused"


def test_geometry_too_small_says_what_to_change() -> None:
    with pytest.raises(ValueError, match="host-pool-size"):
        Geometry.plan(2 * MiB, SLAB, 16 * KiB)


# -- pool: format and records -----------------------------------------------------------------


def test_fresh_pool_is_formatted(opened: Callable[..., HostRegion]) -> None:
    r = opened()
    pool, records = HostPool.open(r, SLAB)
    assert records == []
    assert bytes(r.view[0:8]) == MAGIC
    assert len(pool.uuid) == 16
    assert pool.geo.num_slabs == Geometry.plan(SIZE, SLAB, DEFAULT_MIN_SLOT_BYTES).num_slabs
    assert pool.alloc_state.free_slabs() == pool.geo.num_slabs


def test_slot_offsets_are_inside_data_area(opened: Callable[..., HostRegion]) -> None:
    pool, _ = HostPool.open(opened(), SLAB)
    slots = []
    while (s := pool.alloc(100 * KiB)) is not None:
        slots.append(s)
    assert len(slots) == pool.geo.num_slabs * (SLAB // pool.slot_bytes_for(100 * KiB))
    for s in slots:
        off = pool.offset(s)
        assert pool.geo.data_off <= off and off + pool.slot_bytes_for(100 * KiB) <= SIZE
        assert off % 4096 == 0


def test_write_record_round_trip(opened: Callable[..., HostRegion]) -> None:
    pool, _ = HostPool.open(opened(), SLAB)
    s = pool.alloc(20 * KiB)
    assert s is not None
    pool.write_record(s, SlotState.WRITING, NS_A, key(1), 20 * KiB)
    rec = pool.read_record(s)
    assert (rec.state, rec.namespace, rec.hash, rec.length, rec.checksum) == (SlotState.WRITING, NS_A, key(1),
                                                                              20 * KiB, 0)
    pool.write_record(s, SlotState.COMMITTED, NS_A, key(1), 20 * KiB, checksum=2**64 - 1)
    rec = pool.read_record(s)
    assert rec.state is SlotState.COMMITTED and rec.checksum == 2**64 - 1 and rec.last_use_ns > 0
    pool.free(s)
    assert pool.read_record(s).state is SlotState.FREE


# -- pool: warm restart -----------------------------------------------------------------------

CHUNKS = {  # namespace -> chunk bytes; one class spans two slabs
    NS_A: 20 * KiB,
    NS_B: SLAB + SLAB // 2,
}


@pytest.fixture(params=["shm", "file"])
def reopen(request: pytest.FixtureRequest, opened: Callable[..., HostRegion],
           tmp_path: Path) -> Callable[[], HostRegion]:
    """Open (again) the same backing store, as a restarted sidecar does."""
    if request.param == "shm":
        return lambda: opened()
    path = tmp_path / "pool"
    regions: list[HostRegion] = []

    def open_file() -> HostRegion:
        regions.append(HostRegion.create_or_attach("unused", SIZE, path=path))
        return regions[-1]

    request.addfinalizer(lambda: [close_quietly(r) for r in regions])
    return open_file


def test_warm_restart_restores_committed_and_frees_writing(reopen: Callable[[], HostRegion]) -> None:
    region = reopen()
    pool, records = HostPool.open(region, SLAB)
    assert records == []
    committed: dict[SlotId, tuple[bytes, bytes, int, int]] = {}
    writing: dict[SlotId, bytes] = {}
    i = 0
    for ns, nbytes in CHUNKS.items():
        for j in range(6 if ns == NS_A else 3):
            s = pool.alloc(nbytes)
            assert s is not None
            i += 1
            pool.write_record(s, SlotState.WRITING, ns, key(i), nbytes)
            off = pool.offset(s)
            region.view[off:off + nbytes] = payload(i, nbytes)
            if j % 3 != 2:
                pool.write_record(s, SlotState.COMMITTED, ns, key(i), nbytes, checksum=i * 1000)
                committed[s] = (ns, key(i), nbytes, i)
            else:
                writing[s] = ns
    offsets = {s: pool.offset(s) for s in committed}
    uid = pool.uuid
    pool.close()
    region.close()

    region = reopen()
    assert not region.created
    pool, records = HostPool.open(region, SLAB)
    assert pool.uuid == uid
    assert {r.slot for r in records} == set(committed)
    for rec in records:
        ns, h, nbytes, i = committed[rec.slot]
        assert rec.state is SlotState.COMMITTED
        assert (rec.namespace, rec.hash, rec.length, rec.checksum) == (ns, h, nbytes, i * 1000)
        assert pool.offset(rec.slot) == offsets[rec.slot]
        off = pool.offset(rec.slot)
        assert bytes(region.view[off:off + nbytes]) == payload(i, nbytes), "committed data must survive"
    for s in writing:
        assert pool.read_record(s).state is SlotState.FREE
    # Unfinished writes' slots are allocatable again; committed ones are not handed out.
    again: set[SlotId] = set()
    for nbytes in CHUNKS.values():
        while (s := pool.alloc(nbytes)) is not None:
            again.add(s)
    assert set(writing) <= again
    assert not again & set(committed)
    expected_used = sum(pool.slot_bytes_for(n) for _, _, n, _ in committed.values())
    assert pool.alloc_state.used_bytes == expected_used + sum(pool.alloc_state.span_of(s).slot_bytes for s in again)


def test_span_with_only_unfinished_writes_is_returned(opened: Callable[..., HostRegion]) -> None:
    region = opened()
    pool, _ = HostPool.open(region, SLAB)
    s = pool.alloc(CHUNKS[NS_B])
    assert s is not None
    pool.write_record(s, SlotState.WRITING, NS_B, key(1), CHUNKS[NS_B])
    free_before = pool.alloc_state.free_slabs()
    pool.close()
    region.close()
    pool, records = HostPool.open(opened(), SLAB)
    assert records == []
    assert pool.alloc_state.free_slabs() == free_before + 2 == pool.geo.num_slabs


def test_freed_and_cleared_slots_are_not_restored(opened: Callable[..., HostRegion]) -> None:
    region = opened()
    pool, _ = HostPool.open(region, SLAB)
    slots = [pool.alloc(20 * KiB) for _ in range(3)]
    for i, s in enumerate(slots):
        pool.write_record(s, SlotState.COMMITTED, NS_A, key(i), 20 * KiB)  # type: ignore[arg-type]
    pool.free(slots[0])  # type: ignore[arg-type]
    pool.write_state(slots[1], SlotState.FREE)  # type: ignore[arg-type]  # how a cleared, pinned entry is hidden
    region.close()
    _, records = HostPool.open(opened(), SLAB)
    assert [r.slot for r in records] == [slots[2]]


@pytest.mark.parametrize("corrupt", ["state-byte", "zero-length", "too-long"])
def test_suspicious_records_are_dropped(opened: Callable[..., HostRegion], corrupt: str) -> None:
    region = opened()
    pool, _ = HostPool.open(region, SLAB)
    good, bad = pool.alloc(20 * KiB), pool.alloc(20 * KiB)
    pool.write_record(good, SlotState.COMMITTED, NS_A, key(1), 20 * KiB)  # type: ignore[arg-type]
    length = {"state-byte": 20 * KiB, "zero-length": 0, "too-long": pool.slot_bytes_for(20 * KiB) + 1}[corrupt]
    pool.write_record(bad, SlotState.COMMITTED, NS_A, key(2), length)  # type: ignore[arg-type]
    if corrupt == "state-byte":
        region.view[pool.geo.slot_table_off + bad * 64] = 0x7F  # type: ignore[operator]
    region.close()
    pool, records = HostPool.open(opened(), SLAB)
    assert [r.slot for r in records] == [good]
    assert pool.read_record(bad).state is SlotState.FREE  # type: ignore[arg-type]


@pytest.mark.parametrize("change", ["slab_size", "min_slot_bytes"])
def test_other_geometry_formats_cold(opened: Callable[..., HostRegion], change: str) -> None:
    region = opened()
    pool, _ = HostPool.open(region, SLAB)
    s = pool.alloc(20 * KiB)
    pool.write_record(s, SlotState.COMMITTED, NS_A, key(1), 20 * KiB)  # type: ignore[arg-type]
    uid = pool.uuid
    region.close()
    kw = {"slab_size": 2 * SLAB} if change == "slab_size" else {"slab_size": SLAB, "min_slot_bytes": 8 * KiB}
    region = opened()
    pool, records = HostPool.open(region, **kw)
    assert records == [] and pool.uuid != uid
    assert pool.alloc_state.free_slabs() == pool.geo.num_slabs
    for slot in range(pool.geo.num_slabs * pool.geo.max_slots_per_slab):
        assert pool.read_record(SlotId(slot)).state is SlotState.FREE
    region.close()
    # The new geometry is now the persisted one.
    pool2, records = HostPool.open(opened(), **kw)
    assert records == [] and pool2.uuid == pool.uuid


def test_half_formatted_header_formats_again(opened: Callable[..., HostRegion]) -> None:
    """A crash mid-format leaves no magic: the next open formats instead of trusting tables."""
    region = opened()
    pool, _ = HostPool.open(region, SLAB)
    s = pool.alloc(20 * KiB)
    pool.write_record(s, SlotState.COMMITTED, NS_A, key(1), 20 * KiB)  # type: ignore[arg-type]
    region.view[0:8] = b"\0" * 8
    region.close()
    _, records = HostPool.open(opened(), SLAB)
    assert records == []


def test_inconsistent_slab_table_entry_is_dropped(opened: Callable[..., HostRegion]) -> None:
    region = opened()
    pool, _ = HostPool.open(region, SLAB)
    good = pool.alloc(20 * KiB)
    pool.write_record(good, SlotState.COMMITTED, NS_A, key(1), 20 * KiB)  # type: ignore[arg-type]
    # Slab 5 claims a 20 KiB class spanning 3 slabs: not what the allocator would carve.
    struct.pack_into("<QII", region.view, pool.geo.slab_table_off + 5 * 16, 20 * KiB, 3, 0)
    region.close()
    pool, records = HostPool.open(opened(), SLAB)
    assert [r.slot for r in records] == [good]
    assert pool.alloc_state.free_slabs() == pool.geo.num_slabs - 1


def test_pool_sees_worker_writes_through_attach(opened: Callable[..., HostRegion]) -> None:
    """The data path: the sidecar hands out an offset, a worker writes through its own mapping."""
    pool, _ = HostPool.open(opened(), SLAB)
    worker = opened(attach=True)
    s = pool.alloc(20 * KiB)
    off = pool.offset(s)  # type: ignore[arg-type]
    t = worker.tensor()
    t[off:off + 20 * KiB] = torch.arange(20 * KiB, dtype=torch.int64).remainder(256).to(torch.uint8)
    del t
    assert bytes(pool.region.view[off:off + 4]) == b"\0\1\2\3"
