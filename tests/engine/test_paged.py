"""engine/paged.py: chunks round-trip byte-identically between paged caches of every supported
layout, into other block ids, without touching other blocks; the slot holds the documented
byte layout; bad input is refused before anything is copied."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable

import pytest
import torch

from lmkv_mp.engine import paged as paged_module
from lmkv_mp.engine.copy_threads import CopyThreads
from lmkv_mp.engine.paged import PagedKV
from tests.conftest import need_c_extension

NB = 40  # blocks per cache: room for two disjoint 16-block chunks
BS, H, D = 4, 2, 16  # block size, kv heads, head size (all != NB, so the block dim is unique)
LAYERS = 3
INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8]

Caches = list | dict
Layout = Callable[[torch.dtype, int], Caches]


@pytest.fixture(autouse=True, params=["c-rows", "torch"])
def copy_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both CPU copy paths: with the C row copy (lmkv_mp.engine._rows) for the
    parts it can move, and with torch's ops alone. Without the extension the first is
    skipped, except in CI (``CI=true`` or ``LMKV_REQUIRE_C_EXT=1``, which .ci/run sets)."""
    if request.param == "torch":
        monkeypatch.setattr(paged_module, "_rows", None)
    else:
        need_c_extension("engine._rows", paged_module._rows is not None)
    return request.param


def cpu_views(dtype: torch.dtype, nb: int) -> Caches:
    """vLLM CPU attention: per layer [nb, heads, 2*block, head], contiguous views of ONE buffer."""
    per = nb * H * 2 * BS * D
    buf = torch.empty(LAYERS * per, dtype=dtype)
    return [buf[i * per:(i + 1) * per].view(nb, H, 2 * BS, D) for i in range(LAYERS)]


def cpu_views_strided(dtype: torch.dtype, nb: int) -> Caches:
    """Views of one block-major buffer [nb, layers, ...]: each layer's blocks are strided."""
    buf = torch.empty(nb, LAYERS, H, 2 * BS, D, dtype=dtype)
    return [buf[:, i] for i in range(LAYERS)]


def flash(dtype: torch.dtype, nb: int) -> Caches:
    """Flash-attention style [2, nb, block, heads, head]: block dim 1."""
    return [torch.empty(2, nb, BS, H, D, dtype=dtype) for _ in range(LAYERS)]


def flash_permuted(dtype: torch.dtype, nb: int) -> Caches:
    """Stored block-major [nb, 2, ...], presented K/V-first through a permutation."""
    return [torch.empty(nb, 2, BS, H, D, dtype=dtype).permute(1, 0, 2, 3, 4) for _ in range(LAYERS)]


def flash_hnd(dtype: torch.dtype, nb: int) -> Caches:
    """Stored [2, nb, heads, block, head], presented [2, nb, block, heads, head] (HND)."""
    return [torch.empty(2, nb, H, BS, D, dtype=dtype).transpose(2, 3) for _ in range(LAYERS)]


def kv_concat(dtype: torch.dtype, nb: int) -> Caches:
    """[nb, block, heads, head_k + head_v] with unequal K and V head sizes."""
    return [torch.empty(nb, BS, H, D + D // 2, dtype=dtype) for _ in range(LAYERS)]


def mla(dtype: torch.dtype, nb: int) -> Caches:
    """MLA latent cache [nb, block, head_dim]."""
    return [torch.empty(nb, BS, 3 * D // 2, dtype=dtype) for _ in range(LAYERS)]


def split_kv(dtype: torch.dtype, nb: int) -> Caches:
    """Older split K/V: layer name -> (k_cache, v_cache)."""
    return {f"layers.{i}": (torch.empty(nb, BS, H, D, dtype=dtype), torch.empty(nb, BS, H, D, dtype=dtype))
            for i in range(LAYERS)}


def split_kv_halves(dtype: torch.dtype, nb: int) -> Caches:
    """(k, v) pairs that are the two strided halves of one [nb, 2, ...] buffer per layer."""
    bufs = [torch.empty(nb, 2, BS, H, D, dtype=dtype) for _ in range(LAYERS)]
    return [(b[:, 0], b[:, 1]) for b in bufs]


def innermost_strided(dtype: torch.dtype, nb: int) -> Caches:
    """The head dim is not innermost in memory, so no wider element view exists."""
    return [torch.empty(nb, D, BS, H, dtype=dtype).permute(0, 2, 3, 1) for _ in range(LAYERS)]


LAYOUTS: dict[str, tuple[Layout, int | None]] = {  # builder, block_dim to pass (None: inferred)
    "cpu-views": (cpu_views, None),
    "cpu-views-strided": (cpu_views_strided, None),
    "flash": (flash, None),
    "flash-permuted": (flash_permuted, 1),
    "flash-hnd": (flash_hnd, None),
    "kv-concat": (kv_concat, None),
    "mla": (mla, 0),
    "split-kv": (split_kv, None),
    "split-kv-halves": (split_kv_halves, None),
    "innermost-strided": (innermost_strided, None),
}


def make(layout: str, dtype: torch.dtype, seed: int, nb: int = NB) -> PagedKV:
    build, block_dim = LAYOUTS[layout]
    paged = PagedKV(build(dtype, nb), num_blocks=nb, block_dim=block_dim)
    fill(paged, seed)
    return paged


def fill(paged: PagedKV, seed: int) -> None:
    """Random bytes (NaN payloads and all), written through same-width integer views."""
    g = torch.Generator().manual_seed(seed)
    for part in paged.parts:
        ints = part.view(INT[part.element_size()])
        raw = torch.randint(0, 256, (ints.numel() * part.element_size(),), dtype=torch.uint8, generator=g)
        ints.copy_(raw.view(ints.dtype).view(ints.shape))


def block(paged: PagedKV, b: int) -> list[torch.Tensor]:
    """Block ``b`` of every part, as integers (compared bit for bit)."""
    return [p.view(INT[p.element_size()]).select(s.block_dim, b).clone() for s, p in zip(paged.specs, paged.parts)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def new_slot(paged: PagedKV, blocks: int) -> torch.Tensor:
    return torch.full((paged.chunk_bytes(blocks),), 0xA5, dtype=torch.uint8)


CHUNKS = {  # (source ids, destination ids); runs of consecutive ids take a faster path
    "1-block": ([3], [11]),
    "16-scattered": ([3, 7, 9, 2, 30, 31, 32, 33, 0, 39, 14, 15, 21, 5, 17, 26],
                     [11, 0, 5, 6, 36, 37, 38, 1, 22, 23, 8, 10, 12, 13, 19, 28]),
    "16-runs": (list(range(2, 18)), list(range(20, 36))),
}


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_into_other_blocks_is_byte_identical(layout: str, dtype: torch.dtype, chunk: str) -> None:
    src, dst = make(layout, dtype, seed=1), make(layout, dtype, seed=2)
    src_ids, dst_ids = CHUNKS[chunk]
    bpc = len(src_ids)
    before = {b: block(dst, b) for b in range(NB)}
    slot = new_slot(src, bpc)
    src.gather(src_ids, slot)
    dst.scatter(slot, dst_ids)
    for s, d in zip(src_ids, dst_ids):
        assert same(block(dst, d), block(src, s)), f"block {s} -> {d}"
    for b in set(range(NB)) - set(dst_ids):
        assert same(block(dst, b), before[b]), f"untouched block {b} changed"


@pytest.mark.parametrize("ids", [[5, 1, 33], [6, 7, 8, 9]], ids=["scattered", "run"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_slot_holds_each_parts_selected_blocks_in_row_major_order(layout: str, ids: list[int]) -> None:
    paged = make(layout, torch.bfloat16, seed=3)
    slot = new_slot(paged, len(ids))
    paged.gather(torch.tensor(ids), slot)
    want = [torch.index_select(p.view(torch.int16), s.block_dim, torch.tensor(ids)).contiguous().view(torch.uint8)
            .flatten() for s, p in zip(paged.specs, paged.parts)]
    assert torch.equal(slot, torch.cat(want))


@pytest.mark.parametrize("layout", ["cpu-views", "flash-permuted", "split-kv-halves"])
def test_many_equals_one_at_a_time(layout: str) -> None:
    src = make(layout, torch.float16, seed=4)
    chunks = [[1, 2, 3, 4], [9, 8, 7, 6], [20, 21, 22, 23]]
    one = [new_slot(src, 4) for _ in chunks]
    many = [new_slot(src, 4) for _ in chunks]
    for ids, slot in zip(chunks, one):
        src.gather(ids, slot)
    src.gather_many(list(zip(chunks, many)))
    assert all(torch.equal(a, b) for a, b in zip(one, many))

    targets = [[30, 31, 32, 33], [0, 5, 10, 15], [39, 38, 37, 36]]
    a, b = make(layout, torch.float16, seed=5), make(layout, torch.float16, seed=5)
    for slot, ids in zip(one, targets):
        a.scatter(slot, ids)
    b.scatter_many(list(zip(many, targets)))
    assert all(same(block(a, i), block(b, i)) for i in range(NB))


@pytest.mark.parametrize("layout", ["cpu-views", "flash-permuted", "mla"])
def test_partial_scatter_copies_only_the_tail_of_a_chunk(layout: str) -> None:
    src, dst = make(layout, torch.bfloat16, seed=6), make(layout, torch.bfloat16, seed=7)
    slot = new_slot(src, 4)
    src.gather([1, 2, 3, 4], slot)
    before = block(dst, 20)
    dst.scatter(slot, [21, 22], first=2)  # the engine already holds the chunk's first 2 blocks
    assert same(block(dst, 21), block(src, 3)) and same(block(dst, 22), block(src, 4))
    assert same(block(dst, 20), before)
    dst.scatter(slot, [25], first=1, total=4)
    assert same(block(dst, 25), block(src, 2))
    dst.scatter(slot, [30, 27], first=1, total=4)
    assert same(block(dst, 30), block(src, 2)) and same(block(dst, 27), block(src, 3))


@pytest.mark.parametrize("offset", [0, 1, 2, 8, 4096])
@pytest.mark.parametrize("layout", ["cpu-views", "flash-permuted"])
def test_slot_in_shared_memory_at_any_alignment(layout: str, offset: int) -> None:
    dtype = torch.uint8 if offset % 2 else torch.bfloat16  # an odd address cannot hold bf16
    src, dst = make(layout, dtype, seed=8), make(layout, dtype, seed=9)
    n = src.chunk_bytes(2)
    mm = mmap.mmap(-1, offset + n)
    pool = torch.frombuffer(memoryview(mm), dtype=torch.uint8)
    slot = pool[offset:offset + n]
    src.gather([4, 5], slot)
    dst.scatter(slot, [0, 1])
    assert same(block(dst, 0), block(src, 4)) and same(block(dst, 1), block(src, 5))
    del slot, pool


@pytest.mark.parametrize("offset", [0, 8])
def test_parts_of_mixed_dtypes_and_odd_sizes(offset: int) -> None:
    """Regions start at odd offsets, so each part is moved in the widest elements its
    region allows (bytes for some, 16-byte elements for others)."""
    def build() -> list[torch.Tensor]:
        return [torch.empty(NB, 8, dtype=torch.float64), torch.empty(NB, 2, 6, dtype=torch.bfloat16),
                torch.empty(NB, 3, 5, dtype=torch.uint8), torch.empty(NB, 4, 4, dtype=torch.float32)]
    src, dst = PagedKV(build(), num_blocks=NB), PagedKV(build(), num_blocks=NB)
    fill(src, 17)
    fill(dst, 18)
    pool = torch.zeros(offset + src.chunk_bytes(3), dtype=torch.uint8)
    src.gather([1, 2, 3], pool[offset:])
    dst.scatter_many([(pool[offset:], [7, 8, 9])])
    assert all(same(block(dst, d), block(src, s)) for s, d in zip([1, 2, 3], [7, 8, 9]))


def test_misaligned_slot_for_a_strided_innermost_dim_is_refused_untouched() -> None:
    paged = make("innermost-strided", torch.bfloat16, seed=10)
    pool = torch.zeros(paged.chunk_bytes(1) + 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="align"):
        paged.gather([0], pool[1:])
    assert not pool.any()


@pytest.mark.parametrize("bad", [[-1], [NB], [0, NB + 5], [2, -3]])
def test_out_of_range_block_ids_are_refused(bad: list[int]) -> None:
    paged = make("cpu-views", torch.bfloat16, seed=11)
    slot = new_slot(paged, len(bad))
    with pytest.raises(ValueError, match="block ids"):
        paged.gather(bad, slot)
    with pytest.raises(ValueError, match="block ids"):
        paged.scatter(slot, bad)
    with pytest.raises(ValueError, match="block ids"):
        paged.scatter(slot, torch.tensor(bad))
    assert torch.all(slot == 0xA5)


@pytest.mark.parametrize("bad", [[1.0], [True], torch.tensor([1.0]), torch.tensor([[1]])])
def test_block_ids_must_be_a_flat_list_of_ints(bad: list | torch.Tensor) -> None:
    paged = make("cpu-views", torch.bfloat16, seed=12)
    with pytest.raises((TypeError, ValueError), match="block ids"):
        paged.gather(bad, new_slot(paged, 1))


def test_scatter_into_a_block_twice_is_refused() -> None:
    paged = make("cpu-views", torch.bfloat16, seed=13)
    with pytest.raises(ValueError, match="distinct"):
        paged.scatter(new_slot(paged, 2), [4, 4])
    with pytest.raises(ValueError, match="two chunks"):
        paged.scatter_many([(new_slot(paged, 1), [4]), (new_slot(paged, 1), [4])])
    slot = new_slot(paged, 2)
    paged.gather([4, 4], slot)  # reading a block twice is fine


def test_wrong_slots_are_refused() -> None:
    paged = make("cpu-views", torch.bfloat16, seed=14)
    n = paged.chunk_bytes(1)
    with pytest.raises(ValueError, match="bytes"):
        paged.gather([0], torch.empty(n - 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bytes"):
        paged.scatter(torch.empty(n + 2, dtype=torch.uint8), [0])
    with pytest.raises(TypeError, match="uint8"):
        paged.gather([0], torch.empty(n // 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="1-D"):
        paged.gather([0], torch.empty(2, n // 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        paged.gather([0], torch.empty(2 * n, dtype=torch.uint8)[::2])
    with pytest.raises(TypeError, match="torch.Tensor"):
        paged.gather([0], bytearray(n))  # type: ignore[arg-type]


def test_the_checks_copiers_share_say_what_a_copy_moves_and_refuse_before_it() -> None:
    """check_gathers / check_scatters are what the CUDA copiers run before their first
    launch: the checked chunks name the ids, their index tensor and the slot's blocks."""
    paged = make("cpu-views", torch.bfloat16, seed=16)
    slot = new_slot(paged, 3)
    (g,) = paged.check_gathers([([7, 2, 2], slot)])
    assert (g.slot is slot, g.ids, g.idx.tolist(), g.first, g.n, g.total) == (True, (7, 2, 2), [7, 2, 2], 0, 3, 3)
    a, b = paged.check_scatters([(slot, [5, 6], 1, 3), (None, torch.tensor([9]), 0, None)])
    assert (a.ids, a.first, a.n, a.total) == ((5, 6), 1, 2, 3)
    assert (b.slot, b.ids, b.total) == (None, (9,), 1), "a slot of None is left to the copier"
    with pytest.raises(ValueError, match="two chunks"):
        paged.check_scatters([(None, [4], 0, None), (None, [4], 0, None)])
    with pytest.raises(ValueError, match="does not fit"):
        paged.check_scatters([(None, [4, 5], 2, 3)])
    with pytest.raises(ValueError, match="bytes"):
        paged.check_scatters([(slot, [4], 0, None)])
    with pytest.raises(ValueError, match="block ids"):
        paged.check_gathers([([NB], new_slot(paged, 1))])


def test_a_bad_chunk_in_a_batch_leaves_everything_untouched() -> None:
    paged = make("cpu-views", torch.bfloat16, seed=15)
    good, short = new_slot(paged, 1), torch.empty(paged.chunk_bytes(1) - 1, dtype=torch.uint8)
    with pytest.raises(ValueError):
        paged.gather_many([([1], good), ([2], short)])
    assert torch.all(good == 0xA5)
    before = block(paged, 1)
    with pytest.raises(ValueError):
        paged.scatter_many([(good, [1]), (good, [NB])])
    assert same(block(paged, 1), before)


@pytest.fixture
def copy_threads() -> CopyThreads:
    threads = CopyThreads(3)
    yield threads
    threads.close()


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_copies_split_over_threads_equal_one_thread(layout: str, chunk: str, copy_threads: CopyThreads) -> None:
    """lmkv.copy_threads: the same slot bytes and the same blocks, whoever copied which part;
    a partial scatter (first > 0) and the batched calls too."""
    src, one, split = make(layout, torch.bfloat16, seed=21), make(layout, torch.bfloat16, seed=22), \
        make(layout, torch.bfloat16, seed=22)
    src_ids, dst_ids = CHUNKS[chunk]
    a, b = new_slot(src, len(src_ids)), new_slot(src, len(src_ids))
    src.gather(src_ids, a)
    src.gather(src_ids, b, copy_threads)
    assert torch.equal(a, b)
    one.scatter(a, dst_ids[1:], first=1)
    split.scatter(b, dst_ids[1:], first=1, threads=copy_threads)
    assert all(same(block(one, i), block(split, i)) for i in range(NB))
    many = [new_slot(src, len(src_ids)), new_slot(src, len(src_ids))]
    src.gather_many([(src_ids, many[0]), (src_ids[::-1], many[1])], copy_threads)
    reversed_one = new_slot(src, len(src_ids))
    src.gather(src_ids[::-1], reversed_one)
    assert torch.equal(many[0], a) and torch.equal(many[1], reversed_one)
    one.scatter_many([(many[0], dst_ids)])
    split.scatter_many([(many[0], dst_ids)], copy_threads)
    assert all(same(block(one, i), block(split, i)) for i in range(NB))


def test_copy_threads_run_every_group_on_its_own_thread_and_wait_for_all() -> None:
    threads = CopyThreads(3)
    seen: list[tuple[str, list[int]]] = []
    gate = threading.Barrier(3, timeout=10)  # all three groups must run at once to pass it

    def work(ops: list[int]) -> None:
        gate.wait()
        seen.append((threading.current_thread().name, ops))

    threads.run(work, list(range(7)))
    assert sorted(ops for _, ops in seen) == [[0, 1], [2, 3], [4, 5, 6]]
    assert len({name for name, _ in seen}) == 3
    threads.close()


def test_copy_threads_raise_the_first_failure_only_after_every_group_ended() -> None:
    threads = CopyThreads(2)
    failing, finished = threading.Event(), threading.Event()

    def work(ops: list[int]) -> None:
        if ops == [0]:  # the caller's group
            failing.set()
            raise ValueError("bad chunk")
        assert failing.wait(10)  # the helper's group is still copying when the caller's fails
        finished.set()

    with pytest.raises(ValueError, match="bad chunk"):
        threads.run(work, [0, 1])
    assert finished.is_set()
    threads.close()


def test_copy_threads_wait_for_handed_out_groups_when_handing_out_fails() -> None:
    threads = CopyThreads(3)
    real_submit, handed = threads._pool.submit, []
    release, finished = threading.Event(), threading.Event()

    def submit(fn: Callable, ops: list) -> object:
        if handed:
            release.set()
            raise RuntimeError("cannot schedule new futures after shutdown")
        handed.append(ops)
        return real_submit(fn, ops)

    def work(ops: list[int]) -> None:
        assert release.wait(10)  # still copying when the next hand-out fails
        finished.set()

    threads._pool.submit = submit  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="shutdown"):
        threads.run(work, [0, 1, 2])
    assert finished.is_set()
    threads._pool.submit = real_submit  # type: ignore[method-assign]
    threads.close()


def test_copy_threads_set_one_torch_thread_for_themselves_only() -> None:
    """torch.set_num_threads also sets the process default that threads adopt: the engine's
    threads started after ours must keep the engine's setting."""
    def in_new_thread() -> int:
        out: list[int] = []
        t = threading.Thread(target=lambda: (torch.zeros(1 << 16).add_(1), out.append(torch.get_num_threads())))
        t.start()
        t.join()
        return out[0]

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = CopyThreads(3)
        inside = {threads._pool.submit(torch.get_num_threads).result() for _ in range(6)}
        assert inside == {1}
        assert torch.get_num_threads() == 2 and in_new_thread() == 2
        threads.close()
    finally:
        torch.set_num_threads(before)


def test_a_cuda_copy_stays_on_its_callers_thread(copy_threads: CopyThreads) -> None:
    """Helper threads would queue a CUDA copy on their own streams, which the caller's
    synchronisation does not cover."""
    paged = make("cpu-views", torch.bfloat16, seed=23)
    assert paged._runner(copy_threads) == copy_threads.run
    paged.device = torch.device("cuda", 0)
    assert paged._runner(copy_threads) != copy_threads.run


@pytest.mark.parametrize("bad", [0, 65, -1, True, 1.5, "2"])
def test_copy_threads_refuse_a_bad_count(bad: object) -> None:
    with pytest.raises(ValueError, match="1..64"):
        CopyThreads(bad)  # type: ignore[arg-type]


def test_block_dim_is_inferred_or_must_be_named() -> None:
    with pytest.raises(ValueError, match="block_dim"):
        PagedKV([torch.empty(8, 8, 4)], num_blocks=8)
    with pytest.raises(ValueError, match="block_dim"):
        PagedKV([torch.empty(2, 6, 4)], num_blocks=8)
    assert PagedKV([torch.empty(8, 8, 4)], num_blocks=8, block_dim=0).chunk_bytes(1) == 8 * 4 * 4
    assert PagedKV([torch.empty(8, 8, 4)], num_blocks=8, block_dim=-2).specs[0].block_dim == 1
    assert PagedKV(flash(torch.float16, NB), num_blocks=NB).specs[0].block_dim == 1
    inferred = PagedKV(cpu_views(torch.bfloat16, NB))  # no num_blocks: dim 0 of the first part
    assert inferred.num_blocks == NB and inferred.chunk_bytes(2) == 2 * LAYERS * H * 2 * BS * D * 2


def test_parts_must_agree() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKV([torch.empty(NB, 4, 4), torch.empty(NB + 1, 4, 4)], block_dim=0)
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKV([torch.empty(NB, 4, 4), torch.empty(NB + 1, 4, 4)], num_blocks=NB)
    with pytest.raises(ValueError, match="no KV cache"):
        PagedKV([])
    with pytest.raises(TypeError):
        PagedKV([torch.empty(NB, 4), "not a tensor"])  # type: ignore[list-item]


def test_specs_describe_the_parts() -> None:
    paged = make("split-kv", torch.float32, seed=16)
    assert [s.name for s in paged.specs] == [f"layers.{i}.{j}" for i in range(LAYERS) for j in range(2)]
    spec = paged.specs[0]
    assert (spec.shape, spec.block_dim, spec.dtype, spec.block_bytes) == ((NB, BS, H, D), 0, torch.float32,
                                                                          BS * H * D * 4)
    assert paged.chunk_bytes(16) == 16 * 2 * LAYERS * BS * H * D * 4


def test_layout_fingerprint_tells_layouts_apart_but_not_cache_sizes() -> None:
    prints = {(layout, dtype): make(layout, dtype, seed=0).layout_fingerprint()
              for layout in LAYOUTS for dtype in DTYPES}
    # Parts that differ only in where their blocks sit in memory (one buffer or several,
    # padded block strides) hold the same slot bytes, so they may share entries.
    alike = {"cpu-views-strided": "cpu-views", "split-kv-halves": "split-kv"}
    for (layout, dtype), fp in prints.items():
        assert fp == prints[(alike.get(layout, layout), dtype)]
    distinct = {k: v for k, v in prints.items() if k[0] not in alike}
    assert len(set(distinct.values())) == len(distinct)
    for layout in LAYOUTS:
        assert make(layout, torch.bfloat16, seed=0, nb=NB * 3).layout_fingerprint() == \
            prints[(layout, torch.bfloat16)]
    wider_heads = PagedKV([torch.empty(NB, H, 2 * BS, 2 * D, dtype=torch.bfloat16) for _ in range(LAYERS)],
                          num_blocks=NB)
    fewer_layers = PagedKV(cpu_views(torch.bfloat16, NB)[:2], num_blocks=NB)
    as_mapping = PagedKV({f"l{i}": t for i, t in enumerate(cpu_views(torch.bfloat16, NB))}, num_blocks=NB)
    base = prints[("cpu-views", torch.bfloat16)]
    assert wider_heads.layout_fingerprint() != base
    assert fewer_layers.layout_fingerprint() != base
    assert as_mapping.layout_fingerprint() == base  # names and addresses do not matter
    assert str(NB) not in base


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["cpu-views", "flash-permuted", "innermost-strided"])
def test_cuda_round_trip_matches_the_cpu_slot_bytes(layout: str) -> None:
    cpu_src = make(layout, torch.bfloat16, seed=19)
    block_dim = LAYOUTS[layout][1]
    # Same strides on the device: new_empty_strided keeps the layout, copy_ the bytes.
    gpu_parts = [torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cuda") for p in cpu_src.parts]
    for g, c in zip(gpu_parts, cpu_src.parts):
        g.copy_(c)
    gpu_src = PagedKV(gpu_parts, num_blocks=NB, block_dim=block_dim)
    ids = [3, 7, 9, 2]
    cpu_slot, gpu_slot = new_slot(cpu_src, 4), new_slot(cpu_src, 4).cuda()
    cpu_src.gather(ids, cpu_slot)
    gpu_src.gather(ids, gpu_slot)
    assert torch.equal(gpu_slot.cpu(), cpu_slot)
    with pytest.raises(ValueError, match="device"):
        gpu_src.gather(ids, cpu_slot)
    gpu_dst = PagedKV([torch.zeros_like(p) for p in gpu_src.parts], num_blocks=NB, block_dim=block_dim)
    gpu_dst.scatter(gpu_slot, [11, 0, 5, 6])
    torch.cuda.synchronize()
    for s, d in zip(ids, [11, 0, 5, 6]):
        assert same([t.cpu() for t in block(gpu_dst, d)], block(cpu_src, s))


@pytest.mark.parametrize("layout,moved_in_c", [("cpu-views", 3), ("cpu-views-strided", 3), ("flash", 0), ("mla", 3)])
def test_block_first_parts_take_the_c_row_copy(copy_impl: str, monkeypatch: pytest.MonkeyPatch, layout: str,
                                               moved_in_c: int) -> None:
    """Parts whose blocks are each one run of bytes (block dim first, blocks possibly apart)
    move through ``_rows.copy_rows``, one call per part and chunk, and the bytes equal the
    torch path's; other parts never do."""
    calls: list[int] = []
    if paged_module._rows is not None:
        real = paged_module._rows

        class Counting:
            @staticmethod
            def copy_rows(*args: int) -> None:
                calls.append(args[6])
                real.copy_rows(*args)

        monkeypatch.setattr(paged_module, "_rows", Counting)
    src, dst = make(layout, torch.bfloat16, seed=30), make(layout, torch.bfloat16, seed=31)
    slot = new_slot(src, 4)
    src.gather([9, 2, 3, 30], slot)
    dst.scatter(slot, [1, 5, 6, 7])
    want = moved_in_c if copy_impl == "c-rows" else 0
    assert calls == [4] * want + [4] * want
    assert all(same(block(dst, d), block(src, s)) for s, d in zip([9, 2, 3, 30], [1, 5, 6, 7]))
