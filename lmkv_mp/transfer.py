"""Worker-side copies between a paged KV cache and contiguous slots (CPU, torch).

A *slot* is one contiguous byte range that holds one chunk: ``blocks_per_chunk`` engine
blocks from every layer. Slot byte layout: part 0's blocks, then part 1's, ...; within
a part, the bytes of ``index_select(part, block_dim, ids)``, row-major. Any layout whose
blocks lie along one dimension works, read from the tensors' shapes and strides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch


@dataclass(frozen=True, slots=True)
class LayerSpec:
    name: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    block_dim: int
    block_bytes: int


class PagedKV:
    """A worker's registered paged KV cache as a list of parts with a block dimension."""

    def __init__(self, caches: Mapping[str, torch.Tensor | Sequence[torch.Tensor]] | Sequence[torch.Tensor], *,
                 num_blocks: int | None = None, block_dim: int | None = None) -> None:
        items = list(caches.items()) if isinstance(caches, Mapping) else [(str(i), t) for i, t in enumerate(caches)]
        parts: list[tuple[str, torch.Tensor]] = []
        for name, t in items:
            if isinstance(t, torch.Tensor):
                parts.append((name, t))
            else:
                parts.extend((f"{name}.{j}", x) for j, x in enumerate(t))
        if not parts:
            raise ValueError("no KV cache tensors given")
        if num_blocks is None:
            num_blocks = parts[0][1].shape[0 if block_dim is None else block_dim]
        self.num_blocks = num_blocks
        self.parts = [t for _, t in parts]
        self.specs: list[LayerSpec] = []
        for name, t in parts:
            dims = [d for d, n in enumerate(t.shape) if n == num_blocks]
            bd = block_dim if block_dim is not None else (dims[0] if len(dims) == 1 else -1)
            if bd < 0 or t.shape[bd] != num_blocks:
                raise ValueError(f"{name}: cannot tell the block dimension of shape {tuple(t.shape)} "
                                 f"with {num_blocks} blocks; pass block_dim")
            per = t.numel() // num_blocks * t.element_size()
            self.specs.append(LayerSpec(name, tuple(t.shape), tuple(t.stride()), t.dtype, bd, per))

    def chunk_bytes(self, blocks_per_chunk: int) -> int:
        return sum(s.block_bytes for s in self.specs) * blocks_per_chunk

    def layout_fingerprint(self) -> str:
        out = []
        for s in self.specs:
            shape = list(s.shape)
            shape[s.block_dim] = -1
            order = sorted(range(len(s.stride)), key=lambda d: -s.stride[d])
            out.append(f"{shape}/{s.block_dim}/{s.dtype}/{order}")
        return f"{len(self.specs)}:" + ";".join(out)

    def _ids(self, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(block_ids, dtype=torch.long)
        if idx.ndim != 1 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_blocks)):
            raise ValueError(f"block ids must be in [0, {self.num_blocks})")
        return idx

    def _views(self, slot: torch.Tensor, n: int, total: int, first: int = 0) -> list[torch.Tensor]:
        if slot.dtype != torch.uint8 or slot.ndim != 1 or not slot.is_contiguous():
            raise TypeError("slot must be a contiguous 1-D uint8 tensor")
        if slot.numel() != self.chunk_bytes(total):
            raise ValueError(f"slot holds {slot.numel()} bytes, a chunk of {total} blocks is {self.chunk_bytes(total)}")
        views, off = [], 0
        for s, part in zip(self.specs, self.parts):
            nbytes = s.block_bytes * total
            shape = list(s.shape)
            shape[s.block_dim] = total
            v = slot[off:off + nbytes].view(s.dtype).view(shape)
            views.append(v.narrow(s.block_dim, first, n))
            off += nbytes
        return views

    def gather(self, block_ids: Sequence[int] | torch.Tensor, slot: torch.Tensor) -> None:
        idx = self._ids(block_ids)
        for s, part, v in zip(self.specs, self.parts, self._views(slot, len(idx), len(idx))):
            torch.index_select(part, s.block_dim, idx, out=v)

    def scatter(self, slot: torch.Tensor, block_ids: Sequence[int] | torch.Tensor, *, first: int = 0,
                total: int | None = None) -> None:
        """Copy the chunk in ``slot`` into ``block_ids``. With ``first``, the slot holds a
        chunk of ``total`` blocks (default ``first + len(block_ids)``) and only its blocks
        from ``first`` on are copied (the engine already holds the ones before)."""
        idx = self._ids(block_ids)
        total = first + len(idx) if total is None else total
        for s, part, v in zip(self.specs, self.parts, self._views(slot, len(idx), total, first)):
            part.index_copy_(s.block_dim, idx, v)
