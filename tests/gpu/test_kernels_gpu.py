"""The CUDA gather/scatter kernels on a GPU: byte-identical to the torch reference (on the
CPU and on the GPU) over layouts, dtypes, sizes and slot alignments; from any thread; through
NVRTC as through nvcc's cubins; a D2D copy not far below cudaMemcpy of the same bytes.
Without a GPU every test here is skipped with a reason that says so; bench/gpu_check.sh runs
them on a GPU machine."""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkv_mp.engine import kernels
from lmkv_mp.engine.kernels import KernelCopier
from lmkv_mp.engine.paged import PagedKV
from tests.engine.test_kernels import PartRecipe, documented_gather, recipes
from tests.engine.test_paged import CHUNKS, LAYOUTS, NB, block, fill, make, new_slot, same

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="NO GPU: these tests did not run (tests/gpu needs an NVIDIA GPU; "
                              "bench/gpu_check.sh runs them on one)"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.float8_e4m3fn, torch.float64]


def on_gpu(layout: str, dtype: torch.dtype, seed: int, nb: int = NB) -> PagedKV:
    """``make(layout, ...)`` built on the GPU: same strides, same views, same bytes."""
    build, block_dim = LAYOUTS[layout]
    with torch.device("cuda"):
        caches = build(dtype, nb)
    paged = PagedKV(caches, num_blocks=nb, block_dim=block_dim)
    fill(paged, seed)
    return paged


def copier(paged: PagedKV, **kw: object) -> KernelCopier:
    c = KernelCopier(paged, **kw)  # type: ignore[arg-type]
    assert c.uses_kernels, f"the kernels did not load on this GPU: {c.reason}"
    return c


def gpu_blocks(paged: PagedKV, b: int) -> list[torch.Tensor]:
    return [t.cpu() for t in block(paged, b)]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernels_match_the_cpu_reference_byte_for_byte(layout: str, dtype: torch.dtype, chunk: str) -> None:
    src_ids, dst_ids = CHUNKS[chunk]
    cpu_src, gpu_src = make(layout, dtype, seed=1), on_gpu(layout, dtype, seed=1)
    want = new_slot(cpu_src, len(src_ids))
    cpu_src.gather(src_ids, want)
    got = new_slot(cpu_src, len(src_ids)).cuda()
    copier(gpu_src).gather(src_ids, got)
    assert torch.equal(got.cpu(), want)  # a chunk a CUDA worker stores loads in a CPU worker

    cpu_dst, gpu_dst = make(layout, dtype, seed=2), on_gpu(layout, dtype, seed=2)
    cpu_dst.scatter(want, dst_ids)
    copier(gpu_dst).scatter(want.cuda(), dst_ids)
    torch.cuda.synchronize()
    assert all(same(gpu_blocks(gpu_dst, b), block(cpu_dst, b)) for b in range(NB))


@pytest.mark.parametrize("offset", [1, 2, 4, 8, 16, 4096])
@pytest.mark.parametrize("layout", ["cpu-views", "flash", "flash-hnd", "mla", "innermost-strided"])
def test_slots_at_any_alignment(layout: str, offset: int) -> None:
    src = on_gpu(layout, torch.bfloat16, seed=3)
    ids = [5, 1, 33, 34, 35]
    want = new_slot(src, 5).cuda()
    copier(src).gather(ids, want)
    pool = torch.zeros(offset + want.numel(), dtype=torch.uint8, device="cuda")
    copier(src).gather(ids, pool[offset:])
    assert torch.equal(pool[offset:], want)
    a, b = on_gpu(layout, torch.bfloat16, seed=4), on_gpu(layout, torch.bfloat16, seed=4)
    copier(a).scatter(want, [7, 8, 9, 10, 11])
    copier(b).scatter(pool[offset:], [7, 8, 9, 10, 11])
    assert all(same(block(a, i), block(b, i)) for i in range(NB))


@pytest.mark.parametrize("tile", [16, 256, 4096, 64 << 10])
@pytest.mark.parametrize("layout", ["flash", "flash-hnd", "kv-concat", "split-kv-halves"])
def test_tile_sizes_do_not_change_the_bytes(layout: str, tile: int) -> None:
    src = on_gpu(layout, torch.float16, seed=5)
    ids = CHUNKS["16-scattered"][0]
    want, got = new_slot(src, 16).cuda(), new_slot(src, 16).cuda()
    src.gather(ids, want)  # the torch path on the GPU
    copier(src, tile_bytes=tile).gather(ids, got)
    assert torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(recipe=recipes(), data=st.data())
def test_random_layouts_on_the_gpu(recipe: tuple[int, list[PartRecipe]], data: st.DataObject) -> None:
    nb, parts = recipe
    ids = data.draw(st.lists(st.integers(0, nb - 1), min_size=1, max_size=2 * nb))
    cpu = PagedKV([p.build(seed=i)[0] for i, p in enumerate(parts)], num_blocks=nb)
    gpu_parts = []
    for t in cpu.parts:
        g = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
        g.copy_(t)
        gpu_parts.append(g)
    gpu = PagedKV(gpu_parts, num_blocks=nb)
    got = torch.zeros(gpu.chunk_bytes(len(ids)), dtype=torch.uint8, device="cuda")
    copier(gpu).gather(ids, got)
    assert torch.equal(got.cpu(), documented_gather(cpu, ids))


def test_serving_sizes_match_the_gpu_torch_path() -> None:
    """A Llama-8B-like cache (32 layers, flash layout, bf16) and an MLA one, 16-block chunks."""
    nb = 256
    flash = PagedKV([torch.randn(2, nb, 16, 8, 128, device="cuda").to(torch.bfloat16) for _ in range(32)],
                    num_blocks=nb)
    mla = PagedKV([torch.randn(nb, 64, 576, device="cuda").to(torch.bfloat16) for _ in range(8)], num_blocks=nb)
    g = torch.Generator().manual_seed(0)
    for paged in (flash, mla):
        ids = torch.randperm(nb, generator=g)[:16].tolist()
        want, got = (torch.empty(paged.chunk_bytes(16), dtype=torch.uint8, device="cuda") for _ in range(2))
        paged.gather(ids, want)
        c = copier(paged)
        c.gather(ids, got)
        assert torch.equal(got, want)
        dst = torch.randperm(nb, generator=g)[:16].tolist()
        c.scatter(got, dst)
        back = torch.empty_like(got)
        paged.gather(dst, back)
        assert torch.equal(back, want)


def test_many_chunks_partial_scatter_and_id_tensors() -> None:
    src = on_gpu("flash-permuted", torch.bfloat16, seed=6)
    c = copier(src)
    chunks = [[1, 2, 3, 4], [9, 8, 7, 6]]
    slots = [new_slot(src, 4).cuda() for _ in chunks]
    c.gather_many([(torch.tensor(ids, device="cuda"), s) for ids, s in zip(chunks, slots)])
    for ids, s in zip(chunks, slots):
        want = new_slot(src, 4).cuda()
        src.gather(ids, want)
        assert torch.equal(s, want)
    a, b = on_gpu("flash-permuted", torch.bfloat16, seed=7), on_gpu("flash-permuted", torch.bfloat16, seed=7)
    copier(a).scatter(slots[0], [21, 22], first=2)
    b.scatter(slots[0], [21, 22], first=2)
    copier(a).scatter_many([(slots[1], [30, 31, 32, 33])])
    b.scatter_many([(slots[1], [30, 31, 32, 33])])
    assert all(same(block(a, i), block(b, i)) for i in range(NB))


def test_bad_input_is_refused_before_any_launch() -> None:
    src = on_gpu("cpu-views", torch.bfloat16, seed=8)
    c = copier(src)
    slot = new_slot(src, 2).cuda()
    with pytest.raises(ValueError, match="block ids"):
        c.gather([0, NB], slot)
    with pytest.raises(ValueError, match="device"):
        c.gather([0, 1], slot.cpu())
    with pytest.raises(ValueError, match="bytes"):
        c.gather([0], slot)
    with pytest.raises(ValueError, match="distinct"):
        c.scatter(slot, [3, 3])
    torch.cuda.synchronize()
    assert torch.all(slot.cpu() == 0xA5)


def test_a_thread_that_never_used_cuda_can_copy() -> None:
    """The functions belong to the primary context; a worker's copy thread may not have it
    current until the copier makes it so."""
    src = on_gpu("flash", torch.bfloat16, seed=9)
    c = copier(src)
    got, want = new_slot(src, 3).cuda(), new_slot(src, 3).cuda()
    src.gather([4, 2, 8], want)

    def run() -> None:
        c.gather([4, 2, 8], got)
        torch.cuda.synchronize()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(run).result()  # a failure in the thread raises here
    assert torch.equal(got, want)


def test_nvrtc_kernels_equal_the_prebuilt_ones() -> None:
    with tempfile.TemporaryDirectory() as d:
        jit = kernels.CudaKernels(torch.device("cuda", torch.cuda.current_device()), Path(d), prebuilt=False)
        assert all(Path(s).parent == Path(d) for s in jit.sources.values()), jit.sources  # compiled, cached
        src = on_gpu("flash-hnd", torch.float16, seed=10)
        a, b = new_slot(src, 4).cuda(), new_slot(src, 4).cuda()
        copier(src, kernels=jit).gather([3, 9, 1, 2], a)
        copier(src).gather([3, 9, 1, 2], b)
        assert torch.equal(a, b)
        again = kernels.CudaKernels(torch.device("cuda", torch.cuda.current_device()), Path(d), prebuilt=False)
        assert again.sources == jit.sources and len(list(Path(d).glob("*.cubin"))) == len(kernels.OPS)


def test_d2d_gather_is_not_far_below_memcpy() -> None:
    """A sanity floor (0.5x); bench/gpu_check.py measures against the 0.8x target."""
    nb = 512
    paged = PagedKV([torch.empty(2, nb, 16, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(32)],
                    num_blocks=nb)
    c = copier(paged)
    ids = torch.randperm(nb)[:64].tolist()
    slot = torch.empty(paged.chunk_bytes(64), dtype=torch.uint8, device="cuda")
    src = torch.empty_like(slot)

    def timed(fn: object) -> float:
        for _ in range(3):
            fn()  # type: ignore[operator]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()  # type: ignore[operator]
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 20

    kernel = timed(lambda: c.gather(ids, slot))
    memcpy = timed(lambda: slot.copy_(src))
    assert memcpy / kernel >= 0.5, f"gather {kernel:.3f} ms vs memcpy {memcpy:.3f} ms for {slot.numel()} bytes"
