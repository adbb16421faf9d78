"""transfer.py: chunks round-trip byte-identically between paged caches of any supported
layout, into other block ids, without touching other blocks; bad input is refused."""

from __future__ import annotations

import mmap
from typing import Callable

import pytest
import torch

from lmkv_mp.transfer import PagedKV

NB = 24  # blocks per cache


def cpu_layout(dtype: torch.dtype) -> list[torch.Tensor]:
    """vLLM CPU: per layer [num_blocks, kv_heads, block_size, 2*head] views of ONE buffer."""
    buf = torch.empty(3 * NB * 2 * 16 * 64, dtype=dtype)
    return [buf[i * NB * 2048:(i + 1) * NB * 2048].view(NB, 2, 16, 64) for i in range(3)]


def flash_layout(dtype: torch.dtype) -> list[torch.Tensor]:
    """GPU flash-attn style [2, num_blocks, block, heads, head], stored block-major and
    presented K/V-first through a permutation (non-contiguous views)."""
    return [torch.empty(NB, 2, 16, 2, 32, dtype=dtype).permute(1, 0, 2, 3, 4) for _ in range(2)]


def mla_layout(dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.empty(NB, 16, 96, dtype=dtype) for _ in range(2)]


def split_kv_layout(dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {f"l{i}": (torch.empty(NB, 16, 2, 32, dtype=dtype), torch.empty(NB, 16, 2, 32, dtype=dtype))
            for i in range(2)}


LAYOUTS: dict[str, tuple[Callable, int | None]] = {
    "cpu": (cpu_layout, None), "flash-permuted": (flash_layout, 1), "mla": (mla_layout, None),
    "split-kv": (split_kv_layout, None),
}


def fill(parts: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in parts:
        t.copy_(torch.randint(0, 120, t.shape, generator=g).to(t.dtype))


def block_bytes(paged: PagedKV, block: int) -> list[bytes]:
    return [p.select(s.block_dim, block).contiguous().view(torch.uint8).numpy().tobytes()
            for s, p in zip(paged.specs, paged.parts)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
@pytest.mark.parametrize("bpc", [1, 4])
def test_round_trip_into_other_blocks(layout: str, dtype: torch.dtype, bpc: int) -> None:
    make, block_dim = LAYOUTS[layout]
    src = PagedKV(make(dtype), num_blocks=NB, block_dim=block_dim)
    dst = PagedKV(make(dtype), num_blocks=NB, block_dim=block_dim)
    fill(src.parts, 1)
    fill(dst.parts, 2)
    src_ids, dst_ids = [3, 7, 9, 2][:bpc], [11, 0, 5, 6][:bpc]
    untouched = {b: block_bytes(dst, b) for b in range(NB) if b not in dst_ids}
    slot = torch.empty(src.chunk_bytes(bpc), dtype=torch.uint8)
    src.gather(src_ids, slot)
    dst.scatter(slot, dst_ids)
    for s, d in zip(src_ids, dst_ids):
        assert block_bytes(dst, d) == block_bytes(src, s)
    assert all(block_bytes(dst, b) == v for b, v in untouched.items())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_partial_scatter_copies_only_the_tail_of_a_chunk(layout: str) -> None:
    make, block_dim = LAYOUTS[layout]
    src = PagedKV(make(torch.bfloat16), num_blocks=NB, block_dim=block_dim)
    dst = PagedKV(make(torch.bfloat16), num_blocks=NB, block_dim=block_dim)
    fill(src.parts, 3)
    fill(dst.parts, 4)
    slot = torch.empty(src.chunk_bytes(4), dtype=torch.uint8)
    src.gather([1, 2, 3, 4], slot)
    before = block_bytes(dst, 20)
    dst.scatter(slot, [21, 22], first=2)  # the engine already holds the chunk's first 2 blocks
    assert block_bytes(dst, 21) == block_bytes(src, 3) and block_bytes(dst, 22) == block_bytes(src, 4)
    assert block_bytes(dst, 20) == before


def test_slot_in_shared_memory_works() -> None:
    src = PagedKV(cpu_layout(torch.bfloat16), num_blocks=NB)
    fill(src.parts, 5)
    mm = mmap.mmap(-1, src.chunk_bytes(2))
    slot = torch.frombuffer(memoryview(mm), dtype=torch.uint8)
    src.gather([4, 5], slot)
    dst = PagedKV(cpu_layout(torch.bfloat16), num_blocks=NB)
    dst.scatter(slot, [0, 1])
    assert block_bytes(dst, 0) == block_bytes(src, 4)


@pytest.mark.parametrize("bad", [[-1], [NB], [0, NB + 5]])
def test_out_of_range_block_ids_are_refused(bad: list[int]) -> None:
    paged = PagedKV(cpu_layout(torch.bfloat16), num_blocks=NB)
    slot = torch.empty(paged.chunk_bytes(len(bad)), dtype=torch.uint8)
    with pytest.raises(ValueError, match="block ids"):
        paged.gather(bad, slot)
    with pytest.raises(ValueError, match="block ids"):
        paged.scatter(slot, bad)


def test_wrong_slot_is_refused() -> None:
    paged = PagedKV(cpu_layout(torch.bfloat16), num_blocks=NB)
    with pytest.raises(ValueError, match="bytes"):
        paged.gather([0], torch.empty(paged.chunk_bytes(1) - 1, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        paged.gather([0], torch.empty(paged.chunk_bytes(1) // 2, dtype=torch.float16))


def test_ambiguous_block_dim_needs_to_be_named() -> None:
    with pytest.raises(ValueError, match="block_dim"):
        PagedKV([torch.empty(8, 8, 4)], num_blocks=8)
    assert PagedKV([torch.empty(8, 8, 4)], num_blocks=8, block_dim=0).chunk_bytes(1) == 8 * 4 * 4


def test_layout_fingerprint_tells_layouts_apart_but_not_cache_sizes() -> None:
    a = PagedKV(cpu_layout(torch.bfloat16), num_blocks=NB).layout_fingerprint()
    bigger = [torch.empty(NB * 2, 2, 16, 64, dtype=torch.bfloat16) for _ in range(3)]
    assert PagedKV(bigger, num_blocks=NB * 2).layout_fingerprint() == a
    assert PagedKV(cpu_layout(torch.float16), num_blocks=NB).layout_fingerprint() != a
    assert PagedKV(flash_layout(torch.bfloat16), num_blocks=NB, block_dim=1).layout_fingerprint() != a
