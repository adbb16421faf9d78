"""kernels.py on the CPU: the kernels' arguments and index math (run by tests/helpers/kernel_emu.py)
give the torch reference's slot bytes and block contents over every layout, dtype, tile size
and slot alignment; the structs match cuda/paged_copy.cuh; cuda/*.cu compile without a
warning (nvcc for sm_80 and sm_90, and NVRTC); without a GPU the copier takes the torch path
and says so once. The CUDA code itself runs in tests/gpu."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkv_mp.engine import kernels
from lmkv_mp.engine.kernels import (
    ARGS_DTYPE,
    CUDA_DIR,
    PART_DTYPE,
    TILE_BYTES,
    CopyPlan,
    KernelCopier,
    KernelsUnavailable,
    Unsupported,
    launch_args,
    part_geometry,
    plan_copies,
)
from lmkv_mp.engine.paged import _BITS as BITS
from lmkv_mp.engine.paged import PagedKV
from tests.helpers.kernel_emu import EmulatedKernels, Memory, emulate
from tests.engine.test_paged import CHUNKS, DTYPES, LAYOUTS, NB, block, make, new_slot, same

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI") == "true"


def emu_gather(paged: PagedKV, ids: Sequence[int], slot: torch.Tensor, tile_bytes: int = TILE_BYTES) -> None:
    plan = plan_copies(paged.specs, [t.data_ptr() for t in paged.parts], tile_bytes)
    args, _ = launch_args(plan, parts=0, tile_part=0, ids=0, slot=slot.data_ptr(), n=len(ids))
    emulate("gather", plan, args, np.asarray(ids, np.int64), Memory(slot, *paged.parts))


def emu_scatter(paged: PagedKV, slot: torch.Tensor, ids: Sequence[int], first: int = 0, total: int | None = None,
                tile_bytes: int = TILE_BYTES) -> None:
    plan = plan_copies(paged.specs, [t.data_ptr() for t in paged.parts], tile_bytes)
    args, _ = launch_args(plan, parts=0, tile_part=0, ids=0, slot=slot.data_ptr(), n=len(ids), first=first,
                          total=total)
    emulate("scatter", plan, args, np.asarray(ids, np.int64), Memory(slot, *paged.parts))


@pytest.mark.parametrize("tile", [16, 96, TILE_BYTES], ids=lambda t: f"tile{t}")
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_math_gives_the_reference_slot_and_blocks(layout: str, dtype: torch.dtype, chunk: str,
                                                          tile: int) -> None:
    src_ids, dst_ids = CHUNKS[chunk]
    src = make(layout, dtype, seed=1)
    want, got = new_slot(src, len(src_ids)), new_slot(src, len(src_ids))
    src.gather(src_ids, want)
    emu_gather(src, src_ids, got, tile)
    assert torch.equal(got, want)
    ref, dst = make(layout, dtype, seed=2), make(layout, dtype, seed=2)
    ref.scatter(want, dst_ids)
    emu_scatter(dst, want, dst_ids, tile_bytes=tile)
    assert all(same(block(dst, b), block(ref, b)) for b in range(NB))


@pytest.mark.parametrize("offset", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("layout", ["cpu-views", "flash-hnd", "innermost-strided", "kv-concat"])
def test_a_slot_at_any_alignment_narrows_the_words(layout: str, offset: int) -> None:
    """The kernel takes words no wider than the slot address allows (the emulation asserts
    every access is aligned), even where the torch path refuses such a slot."""
    src = make(layout, torch.bfloat16, seed=3)
    ids = [5, 1, 33, 34]
    want = new_slot(src, 4)
    src.gather(ids, want)
    pool = torch.zeros(offset + want.numel(), dtype=torch.uint8)
    emu_gather(src, ids, pool[offset:])
    assert torch.equal(pool[offset:], want)
    ref, dst = make(layout, torch.bfloat16, seed=4), make(layout, torch.bfloat16, seed=4)
    ref.scatter(want, [7, 8, 9, 10])
    emu_scatter(dst, pool[offset:], [7, 8, 9, 10])
    assert all(same(block(dst, b), block(ref, b)) for b in range(NB))


@pytest.mark.parametrize("layout", ["flash-permuted", "mla", "split-kv-halves"])
def test_partial_scatter_copies_the_tail_of_a_chunk(layout: str) -> None:
    src = make(layout, torch.float16, seed=5)
    slot = new_slot(src, 4)
    src.gather([1, 2, 3, 4], slot)
    ref, dst = make(layout, torch.float16, seed=6), make(layout, torch.float16, seed=6)
    for ids, first in (([21, 22], 2), ([30, 27], 1), ([12], 3)):
        ref.scatter(slot, ids, first=first, total=4)
        emu_scatter(dst, slot, ids, first=first, total=4)
    assert all(same(block(dst, b), block(ref, b)) for b in range(NB))


@dataclass(frozen=True)
class PartRecipe:
    """A tensor of a random layout: logical ``shape`` stored in the dim order ``order``
    (outermost first), each stored dim padded by ``pad``, starting ``offset`` elements into
    its buffer."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    order: tuple[int, ...]
    pad: tuple[int, ...]
    offset: int

    def build(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the part, its whole buffer, filled with random bytes)."""
        stored = [self.shape[d] + self.pad[d] for d in self.order]
        n = int(np.prod(stored)) + self.offset
        flat = torch.empty(n, dtype=self.dtype)
        g = torch.Generator().manual_seed(seed)
        raw = flat.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))
        view = flat[self.offset:].view(stored)[tuple(slice(0, self.shape[d]) for d in self.order)]
        return view.permute([self.order.index(d) for d in range(len(self.shape))]), flat


@st.composite
def recipes(draw: st.DrawFn) -> tuple[int, list[PartRecipe]]:
    nb = draw(st.integers(5, 7))  # other dims are 1..4, so the block dim is the one of size nb
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        ndim = draw(st.integers(1, 5))
        shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
        shape[draw(st.integers(0, ndim - 1))] = nb
        dtype = draw(st.sampled_from([torch.uint8, torch.bfloat16, torch.float32, torch.float64, torch.complex128]))
        parts.append(PartRecipe(dtype, tuple(shape), tuple(draw(st.permutations(range(ndim)))),
                                tuple(draw(st.lists(st.sampled_from([0, 0, 1, 3]), min_size=ndim, max_size=ndim))),
                                draw(st.sampled_from([0, 0, 1, 2, 3]))))
    return nb, parts


def test_the_copier_launches_one_checked_kernel_per_chunk() -> None:
    """KernelCopier's host side end to end, on the emulated kernels."""
    src, ref = make("flash-hnd", torch.bfloat16, seed=11), make("flash-hnd", torch.bfloat16, seed=12)
    dst = make("flash-hnd", torch.bfloat16, seed=12)
    chunks = [[1, 2, 3, 4], [9, 8, 7, 6], [20, 0, 39, 5]]
    slots = [new_slot(src, 4) for _ in chunks]
    emu = EmulatedKernels(*src.parts, *dst.parts, *slots)
    gather, scatter = KernelCopier(src, kernels=emu), KernelCopier(dst, kernels=emu)  # type: ignore[arg-type]
    assert gather.uses_kernels
    gather.gather_many([(torch.tensor(chunks[0]), slots[0]), (chunks[1], slots[1])])
    gather.gather(chunks[2], slots[2])
    for ids, slot in zip(chunks, slots):
        want = new_slot(src, 4)
        src.gather(ids, want)
        assert torch.equal(slot, want)
    scatter.scatter_many([(slots[0], [30, 31, 32, 33]), (slots[1], [10, 11, 12, 13])])
    scatter.scatter(slots[2], [21, 22], first=2)
    scatter.scatter(slots[2], [25], first=1, total=4)
    ref.scatter_many([(slots[0], [30, 31, 32, 33]), (slots[1], [10, 11, 12, 13])])
    ref.scatter(slots[2], [21, 22], first=2)
    ref.scatter(slots[2], [25], first=1, total=4)
    assert all(same(block(dst, b), block(ref, b)) for b in range(NB))
    assert [op for op, _ in emu.launches] == ["gather"] * 3 + ["scatter"] * 4

    emu.launches.clear()
    with pytest.raises(ValueError, match="block ids"):
        gather.gather_many([([1], slots[0][:src.chunk_bytes(1)]), ([NB], slots[1][:src.chunk_bytes(1)])])
    with pytest.raises(ValueError, match="two chunks"):
        scatter.scatter_many([(slots[0], [1, 2, 3, 4]), (slots[1], [4, 5, 6, 7])])
    with pytest.raises(ValueError, match="bytes"):
        scatter.scatter(slots[0], [1, 2])
    with pytest.raises(ValueError, match="does not fit"):
        scatter.scatter(slots[0], [1, 2], first=3, total=4)
    gather.gather([], torch.empty(0, dtype=torch.uint8))
    assert emu.launches == []  # nothing launched for a bad batch, nor for no blocks


def documented_gather(paged: PagedKV, ids: Sequence[int]) -> torch.Tensor:
    """The slot transfer.py's docstring defines: each part's ``index_select`` of the ids,
    row-major, parts in order."""
    idx = torch.tensor(ids)
    return torch.cat([torch.index_select(p.view(BITS[p.element_size()]), s.block_dim, idx).contiguous()
                      .flatten().view(torch.uint8) for s, p in zip(paged.specs, paged.parts)])


def documented_scatter(paged: PagedKV, slot: torch.Tensor, ids: Sequence[int]) -> None:
    off, idx = 0, torch.tensor(ids)
    for s, p in zip(paged.specs, paged.parts):
        n = s.block_bytes * len(ids)
        ints = p.view(BITS[p.element_size()])
        shape = [len(ids) if d == s.block_dim else k for d, k in enumerate(s.shape)]
        ints.index_copy_(s.block_dim, idx, slot[off:off + n].clone().view(ints.dtype).view(shape))
        off += n


def transfer_refuses(e: ValueError) -> bool:
    """transfer.py cannot move a part whose innermost dim is strided into a slot region
    that is not aligned to its item size (its region follows an odd-sized part); the kernels
    can, and the documented layout is the reference there."""
    return "not aligned" in str(e)


@settings(max_examples=150, deadline=None)
@given(recipe=recipes(), data=st.data())
def test_random_layouts_match_the_reference(recipe: tuple[int, list[PartRecipe]], data: st.DataObject) -> None:
    nb, parts = recipe
    tile = data.draw(st.sampled_from([16, 48, 256, TILE_BYTES]), label="tile_bytes")
    gather_ids = data.draw(st.lists(st.integers(0, nb - 1), min_size=1, max_size=2 * nb), label="gather ids")
    scatter_ids = data.draw(st.permutations(range(nb)), label="scatter ids")[:data.draw(st.integers(1, nb))]
    offset = data.draw(st.sampled_from([0, 1, 2, 4, 8, 16]), label="slot offset")

    src = PagedKV([p.build(seed=i)[0] for i, p in enumerate(parts)], num_blocks=nb)
    want = documented_gather(src, gather_ids)
    pool = torch.zeros(offset + want.numel(), dtype=torch.uint8)
    emu_gather(src, gather_ids, pool[offset:], tile)
    assert torch.equal(pool[offset:], want)
    ref_slot = new_slot(src, len(gather_ids))
    try:
        src.gather(gather_ids, ref_slot)
        assert torch.equal(ref_slot, want)
    except ValueError as e:
        if not transfer_refuses(e):
            raise

    slot = torch.randint(0, 256, (src.chunk_bytes(len(scatter_ids)),), dtype=torch.uint8)
    pool = torch.zeros(offset + slot.numel(), dtype=torch.uint8)
    pool[offset:] = slot
    ref = [p.build(seed=10 + i) for i, p in enumerate(parts)]
    dst = [p.build(seed=10 + i) for i, p in enumerate(parts)]
    ref_paged = PagedKV([t for t, _ in ref], num_blocks=nb)
    try:
        ref_paged.scatter(slot, scatter_ids)
    except ValueError as e:
        if not transfer_refuses(e):
            raise
        documented_scatter(ref_paged, slot, scatter_ids)
    emu_scatter(PagedKV([t for t, _ in dst], num_blocks=nb), pool[offset:], scatter_ids, tile_bytes=tile)
    for (_, a), (_, b) in zip(ref, dst):  # whole buffers: padding and other blocks untouched
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_geometry_of_the_vllm_layouts() -> None:
    BS, H, D, isz = 16, 8, 128, 2
    flash = torch.empty(2, 10, BS, H, D, dtype=torch.bfloat16)
    assert part_geometry(flash.shape, flash.stride(), isz, 1) == kernels.PartGeometry(
        (2,), (10 * BS * H * D * isz,), 1, BS * H * D * isz)
    hnd = torch.empty(2, 10, H, BS, D, dtype=torch.bfloat16).transpose(2, 3)
    assert part_geometry(hnd.shape, hnd.stride(), isz, 1) == kernels.PartGeometry(
        (2, BS, H), (10 * H * BS * D * isz, D * isz, BS * D * isz), 1, D * isz)
    per_layer = torch.empty(10, 32, H, 2 * BS, D)[:, 3]  # views of one block-major buffer
    assert part_geometry(per_layer.shape, per_layer.stride(), 4, 0) == kernels.PartGeometry(
        (), (), 0, H * 2 * BS * D * 4)
    mla = torch.empty(10, 64, 576, dtype=torch.bfloat16)
    assert part_geometry(mla.shape, mla.stride(), 2, 0).run == 64 * 576 * 2
    blocks_last = torch.empty(H, D, 10)
    assert part_geometry(blocks_last.shape, blocks_last.stride(), 4, 2) == kernels.PartGeometry(
        (H * D,), (40,), 1, 4)


def test_word_width_follows_the_part_addresses_and_strides() -> None:
    buf = torch.empty(4096, dtype=torch.uint8)
    assert buf.data_ptr() % 16 == 0
    def specs(ts: list[torch.Tensor]) -> list:
        return PagedKV(ts, num_blocks=4, block_dim=0).specs

    whole = [buf[:4 * 64].view(4, 64)]
    assert plan_copies(specs(whole), [whole[0].data_ptr()]).parts["vec"].tolist() == [16]
    odd = [buf[2:2 + 4 * 64].view(4, 64)]
    assert plan_copies(specs(odd), [odd[0].data_ptr()]).parts["vec"].tolist() == [2]
    rows6 = [buf[:4 * 6].view(4, 6)]  # 6-byte runs
    assert plan_copies(specs(rows6), [rows6[0].data_ptr()]).parts["vec"].tolist() == [2]
    two = [buf[:4 * 64].view(4, 64), buf[1024:1024 + 4 * 12].view(4, 12)]  # part 1's region starts at 64
    plan = plan_copies(specs(two), [t.data_ptr() for t in two])
    assert plan.parts["vec"].tolist() == [16, 4] and plan.parts["region"].tolist() == [0, 64]
    args, grid = launch_args(plan, parts=0, tile_part=0, ids=0, slot=4096 + 8, n=3)
    assert args["slot_align"][0] == 8 and grid == 3 * plan.tiles_per_block


def test_tiles_split_long_runs_and_group_short_rows() -> None:
    long = torch.empty(3, 100_000, dtype=torch.uint8)
    p = plan_copies(PagedKV([long], num_blocks=3).specs, [long.data_ptr()], tile_bytes=32 << 10).parts[0]
    assert (p["rows_per_tile"], p["col_bytes"], p["col_tiles"], p["tiles"]) == (1, 32 << 10, 4, 4)
    short = torch.empty(3, 1000, 7).transpose(1, 2)  # 7000 rows of 4 bytes per block
    p = plan_copies(PagedKV([short], num_blocks=3).specs, [short.data_ptr()], tile_bytes=32 << 10).parts[0]
    assert (p["run"], p["rows"], p["rows_per_tile"], p["col_tiles"]) == (4, 7000, 256, 1)
    assert p["tiles"] == -(-7000 // 256)


def test_layouts_the_kernels_cannot_copy_are_refused() -> None:
    expanded = torch.empty(4, 1, 8).expand(4, 3, 8)
    with pytest.raises(Unsupported, match="stride 0"):
        plan_copies(PagedKV([expanded], num_blocks=4).specs, [expanded.data_ptr()])
    seven = torch.empty([2] * 7 + [4]).permute(7, *range(6, -1, -1))  # 7 dims that cannot merge
    with pytest.raises(Unsupported, match="7 strided dims"):
        plan_copies(PagedKV([seven], num_blocks=4, block_dim=0).specs, [seven.data_ptr()])
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_copies(PagedKV([torch.empty(4, 4)], num_blocks=4, block_dim=0).specs, [0], tile_bytes=24)


def test_launch_args_refuse_what_one_launch_cannot_do() -> None:
    plan = CopyPlan(np.zeros(1, PART_DTYPE), np.zeros(1 << 20, np.uint32), 64)
    with pytest.raises(ValueError, match="fewer blocks"):
        launch_args(plan, parts=0, tile_part=0, ids=0, slot=0, n=1 << 12)
    with pytest.raises(ValueError, match="nothing to copy"):
        launch_args(plan, parts=0, tile_part=0, ids=0, slot=0, n=0)
    with pytest.raises(ValueError, match="out of range"):
        launch_args(plan, parts=0, tile_part=0, ids=0, slot=0, n=2, first=3, total=4)


def _header() -> str:
    return (CUDA_DIR / "paged_copy.cuh").read_text()


def test_structs_and_constants_match_the_cuda_header() -> None:
    text = _header()
    for dtype, struct in ((PART_DTYPE, "LmkvPart"), (ARGS_DTYPE, "LmkvCopyArgs")):
        size = re.search(rf"sizeof\({struct}\) == (\d+)", text)
        assert size and int(size.group(1)) == dtype.itemsize, struct
        offsets = {m[0]: int(m[1]) for m in re.findall(rf"__builtin_offsetof\({struct}, (\w+)\) == (\d+)", text)}
        fields = {k: v[1] for k, v in dtype.fields.items() if k != "pad"}
        assert offsets == fields, struct
    defines = dict(re.findall(r"#define LMKV_(\w+) (\d+)", text))
    assert {k: int(v) for k, v in defines.items()} == {
        "MAX_DIMS": kernels.MAX_DIMS, "THREADS": kernels.THREADS, "MAX_TILE_ROWS": kernels.MAX_TILE_ROWS,
        "UNROLL": 4}


def test_importing_the_package_imports_no_cuda_library() -> None:
    """(torch itself imports cuda-python where it is installed; lmkv_mp adds nothing.)"""
    code = ("import sys, torch; cuda = lambda: {m for m in sys.modules if m == 'cuda' or m.startswith('cuda.')}; "
            "before = cuda(); import lmkv_mp, lmkv_mp.engine.kernels, lmkv_mp.engine.paged; "
            "added = cuda() - before; assert not added, sorted(added)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


class _FakeCudaCache:
    """A PagedKV stand-in that says it is on a CUDA device (there is none here)."""

    def __init__(self) -> None:
        self.inner = make("flash-hnd", torch.bfloat16, seed=7)
        self.specs, self.parts = self.inner.specs, self.inner.parts
        self.device = torch.device("cuda", 0)
        self.calls: list[str] = []

    def gather_many(self, chunks: list, threads: object = None) -> None:
        self.calls.append("gather_many")
        self.inner.gather_many(chunks, threads)  # type: ignore[arg-type]


def test_without_a_gpu_the_copier_takes_the_torch_path_and_says_so_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "_logged", set())
    caplog.set_level(logging.WARNING, logger="lmkv.kernels")
    fakes = [_FakeCudaCache(), _FakeCudaCache()]
    copiers = [KernelCopier(f) for f in fakes]  # type: ignore[arg-type]
    assert not any(c.uses_kernels for c in copiers)
    assert "no CUDA device" in copiers[0].reason
    assert len([r for r in caplog.records if "torch path" in r.message]) == 1
    slot = new_slot(fakes[0].inner, 2)
    copiers[0].gather([3, 4], slot)
    assert fakes[0].calls == ["gather_many"]
    want = new_slot(fakes[0].inner, 2)
    fakes[0].inner.gather([3, 4], want)
    assert torch.equal(slot, want)
    with pytest.raises(KernelsUnavailable, match="no CUDA device"):
        kernels.load(torch.device("cuda", 0))


def test_a_cpu_cache_copies_through_the_torch_path_silently(caplog: pytest.LogCaptureFixture) -> None:
    paged = make("cpu-views", torch.float16, seed=8)
    copier = KernelCopier(paged)
    assert not copier.uses_kernels and "cpu" in copier.reason
    slot, want = new_slot(paged, 3), new_slot(paged, 3)
    copier.gather([1, 5, 9], slot)
    paged.gather([1, 5, 9], want)
    assert torch.equal(slot, want)
    copier.scatter(slot, [20, 21], first=1)
    assert same(block(paged, 21), block(paged, 9))
    assert not [r for r in caplog.records if r.name == "lmkv_mp.engine.kernels"]


def require(what: str, present: bool, install: str) -> None:
    """Skip loudly without ``what``; in CI (CI=true) its absence is a failure, so the
    kernels cannot silently go unchecked."""
    if present:
        return
    if IN_CI:
        pytest.fail(f"{what} is missing in CI: {install}")
    pytest.skip(f"{what} is missing: cuda/*.cu were NOT checked by this test ({install})")


def test_nvcc_compiles_every_kernel_for_sm80_and_sm90_without_a_warning(tmp_path: Path) -> None:
    require("nvcc", shutil.which("nvcc") is not None, "install the CUDA toolkit")
    proc = subprocess.run(["bash", str(CUDA_DIR / "build.sh"), str(tmp_path)], check=False, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for op in kernels.OPS:
        for arch in (80, 90):
            assert (tmp_path / f"{op}.sm_{arch}.cubin").read_bytes()[:4] == b"\x7fELF"
    assert (tmp_path / "SOURCES.sha256").read_text().strip() == kernels.source_hash()


def test_nvrtc_compiles_every_kernel_without_a_warning() -> None:
    _require_nvrtc()
    for op in kernels.OPS:
        for cc in (80, 90):
            cubin, log = kernels.compile_cubin(
                op, cc, extra=["--ptxas-options=-warn-spills", "--ptxas-options=-warn-lmem-usage"])
            assert cubin[:4] == b"\x7fELF" and log == "", log
    # NVRTC writes its (empty, one NUL) log into the buffer it is given; a bytes object there
    # once overwrote CPython's shared b" " and broke torch.load later in the process.
    assert bytes([32])[0] == 32, "the shared one-byte b\" \" was overwritten"


def _require_nvrtc() -> None:
    try:
        import cuda.bindings  # noqa: F401
        present = True
    except ImportError:
        present = False
    require("cuda-python (NVRTC)", present, "pip install 'lmkv_mp[gpu]'")


def test_cubins_come_from_build_sh_else_the_cache_else_nvrtc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_nvrtc()
    cache = tmp_path / "cache"
    bare = tmp_path / "bare"  # the sources without a cuda/build (CI runs cuda/build.sh before the tests)
    shutil.copytree(CUDA_DIR, bare, ignore=shutil.ignore_patterns("build"))
    monkeypatch.setattr(kernels, "CUDA_DIR", bare)
    cubin, path = kernels._cubin("scatter", 90, cache, prebuilt=True)
    assert path is not None and path.parent == cache and path.read_bytes() == cubin  # no cuda/build here
    assert kernels._cubin("scatter", 90, cache, prebuilt=False) == (cubin, path)  # from the cache
    built = tmp_path / "cuda"
    shutil.copytree(CUDA_DIR, built, ignore=shutil.ignore_patterns("build"))
    (built / "build").mkdir()
    (built / "build" / "scatter.sm_90.cubin").write_bytes(b"\x7fELF prebuilt")
    (built / "build" / "SOURCES.sha256").write_text(kernels.source_hash(built) + "\n")
    monkeypatch.setattr(kernels, "CUDA_DIR", built)
    assert kernels._cubin("scatter", 90, cache, prebuilt=True) == (b"\x7fELF prebuilt",
                                                                   built / "build" / "scatter.sm_90.cubin")
    (built / "paged_copy.cuh").write_text(_header() + "\n// changed\n")  # the stamp no longer matches
    _, path2 = kernels._cubin("scatter", 90, cache, prebuilt=True)
    assert path2 is not None and path2.parent == cache and path2 != path


def test_a_compile_error_says_what_the_compiler_said(tmp_path: Path) -> None:
    _require_nvrtc()
    (tmp_path / "gather.cu").write_text('extern "C" __global__ void lmkv_gather() { undefined_thing(); }\n')
    with pytest.raises(KernelsUnavailable, match=r"(?s)NVRTC compile of gather.cu for sm_90.*undefined_thing"):
        kernels.compile_cubin("gather", 90, cuda_dir=tmp_path)
