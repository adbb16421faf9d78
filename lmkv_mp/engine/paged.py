"""Worker-side copies between a paged KV cache and contiguous slots (torch reference path).

A *slot* is one contiguous byte range (in the sidecar's shared-memory pool, or any 1-D
``uint8`` tensor) that holds one chunk: ``blocks_per_chunk`` engine blocks from every
layer. *Gather* copies blocks from the paged cache into a slot (store); *scatter* copies a
slot into blocks (load). A chunk gathered from block ids ``[3, 7, 9, 2]`` scatters
byte-identically into block ids ``[11, 0, 5, 6]`` of another process's cache, as long as
both caches have the same :meth:`PagedKV.layout_fingerprint`.

The cache is a list of *parts*: tensors that each hold some of a layer's cache and have one
*block dimension* of size ``num_blocks``. Supported, all read from shapes and strides:

* vLLM CPU attention: per layer ``[num_blocks, kv_heads, 2*block_size, head_size]``, often
  views of one buffer at different offsets;
* flash-attention style ``[2, num_blocks, block_size, kv_heads, head_size]`` (block dim 1),
  with any stride permutation (e.g. stored block-major, presented K/V-first);
* ``[num_blocks, block_size, kv_heads, head_k + head_v]`` and MLA
  ``[num_blocks, block_size, head_dim]``;
* split K/V: a layer given as a tuple or list ``(k_cache, v_cache)``.

Slot byte layout, for ids ``ids`` of ``n`` blocks: part 0's bytes, then part 1's, ... A
part's bytes are those of ``index_select(part, block_dim, ids).contiguous()``, that is the
part's shape with its block dimension replaced by ``n``, in row-major order. So a part
``[2, num_blocks, 16, 8, 128]`` puts K of all ``n`` blocks before V of all ``n`` blocks. The
physical strides of the cache never change the slot bytes; the fingerprint still includes
their order so that caches of different layouts never share entries.

Bytes are moved, never values: each part and its slot region are reinterpreted as one
integer type of the same width (or wider, up to 16-byte elements, where the innermost
dimension and the alignment allow, since the CPU index kernels cost per element), so any
fixed-size dtype works and NaN payloads survive. One call per part per chunk, no per-block
Python loop: on a CPU, a part whose blocks are each one run of bytes (block dim first) moves
through ``_rows.copy_rows`` (C: memcpy per block with streaming stores, which skip reading
each destination line before writing it; ``_rows.c`` says why), else through torch: a
strided ``copy_`` when the ids are one ascending run, else ``index_select`` (contiguous
block-first parts) or advanced indexing (other layouts) to gather, and ``index_copy_`` to
scatter. Everything is checked before the first byte moves (:meth:`PagedKV.check_gathers`,
:meth:`PagedKV.check_scatters`: the CUDA copiers check with them too).

A :class:`~lmkv_mp.engine.copy_threads.CopyThreads` splits one gather or scatter's per-part
copies over several threads (``copy_threads`` of the connector, default 1): on a host with
cores to spare a second thread lifts a load from one core's memcpy rate towards the memory
bus's; on a host whose cores the engine keeps busy it makes copies wait for a core, so it is
off by default.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lmkv_mp.engine.copy_threads import CopyThreads

try:  # built by pip install (setup.py); optional: without it every part takes the torch ops
    from lmkv_mp.engine import _rows
except ImportError:
    _rows = None

# Same-width stand-ins that the index kernels copy bit for bit (complex128 is the only
# 16-byte dtype; its copies are plain loads and stores, no arithmetic).
_BITS: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64,
                                 16: torch.complex128}

BlockIds = Sequence[int] | torch.Tensor


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One tensor that holds part of a layer's cache, as registered.

    ``block_bytes`` is the size of one block of this tensor: the product of the shape
    without ``block_dim``, times the item size. ``stride`` is in elements, as torch gives it.
    """

    name: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    block_dim: int
    block_bytes: int


@dataclass(frozen=True, slots=True)
class CheckedChunk:
    """A chunk that passed :meth:`PagedKV.check_gathers` or ``check_scatters``: blocks ``ids``
    of the cache move to or from blocks ``first .. first + n`` of ``slot``, a chunk of
    ``total`` blocks; ``idx`` is ``ids`` as int64 on the cache's device (what copies read)."""

    slot: torch.Tensor | None
    idx: torch.Tensor
    ids: tuple[int, ...]
    first: int
    total: int

    @property
    def n(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class _View:
    """A part reinterpreted as ``width``-byte elements; ``region_shape`` is its shape with
    the block dim as -1, for viewing a slot region of any number of blocks; ``rows``: it is
    contiguous with the block dim first, so each block is one run of bytes; ``row_stride``:
    bytes from one block to the next where the block dim is first and each block is one run
    of bytes (blocks need not be adjacent), else None."""

    width: int
    tensor: torch.Tensor
    region_shape: tuple[int, ...]
    rows: bool
    row_stride: int | None


class PagedKV:
    """A worker's registered paged KV cache, as a list of tensors ('parts'), each with a block dimension.

    ``caches`` is a mapping from layer name to a tensor or a ``(k_cache, v_cache)`` pair, or
    a sequence of those (parts are then named by position). The order of the parts, which
    is the order of the slot layout, is the order given.

    ``num_blocks`` is the number of engine blocks; every part must have a dimension of that
    size. Without it, it is taken from the first part's ``block_dim`` (default dim 0): pass
    it for layouts whose block dimension is not first, such as ``[2, num_blocks, ...]``.
    ``block_dim`` applies to every part; without it, each part's block dimension is its
    unique dimension of size ``num_blocks``, and a part with two such dimensions is refused
    (``ValueError``: pass ``block_dim``).

    The registered tensors are used in place and must outlive this object; nothing is
    copied at construction.
    """

    def __init__(self, caches: Mapping[str, torch.Tensor | Sequence[torch.Tensor]] | Sequence[torch.Tensor], *,
                 num_blocks: int | None = None, block_dim: int | None = None) -> None:
        named = _flatten(caches)
        if not named:
            raise ValueError("no KV cache tensors given: pass one tensor (or K/V pair) per layer")
        for name, t in named:
            _check_part(name, t)
        if num_blocks is None:
            first_name, first = named[0]
            dim = _norm_dim(first_name, first, 0 if block_dim is None else block_dim)
            num_blocks = int(first.shape[dim])
        if isinstance(num_blocks, bool) or not hasattr(num_blocks, "__index__") or operator.index(num_blocks) <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        num_blocks = operator.index(num_blocks)
        self.num_blocks: int = num_blocks
        self.parts: list[torch.Tensor] = [t for _, t in named]
        self.specs: list[LayerSpec] = [_spec(name, t, num_blocks, block_dim) for name, t in named]
        devices = {t.device for t in self.parts}
        if len(devices) > 1:
            raise ValueError(f"KV cache parts are on several devices {sorted(map(str, devices))}: "
                             "register one PagedKV per device")
        self.device: torch.device = self.parts[0].device
        self._views: list[tuple[_View, ...]] = [_byte_views(t, s) for t, s in zip(self.parts, self.specs)]
        self._block_bytes: list[int] = [s.block_bytes for s in self.specs]
        self._row_bytes: int = sum(self._block_bytes)

    def chunk_bytes(self, blocks_per_chunk: int) -> int:
        """Bytes of a slot that holds ``blocks_per_chunk`` blocks of every part."""
        if blocks_per_chunk < 0:
            raise ValueError(f"blocks_per_chunk must be >= 0, got {blocks_per_chunk}")
        return self._row_bytes * blocks_per_chunk

    def layout_fingerprint(self) -> str:
        """A stable string of everything that decides what a slot's bytes mean: part count,
        and per part its shape with the block dimension shown as ``B``, the block dimension,
        dtype and the order of its strides (dims outermost first). Independent of
        ``num_blocks``, of addresses and of part names; equal fingerprints mean slots are
        interchangeable byte for byte."""
        descs = []
        for s in self.specs:
            shape = ",".join("B" if d == s.block_dim else str(n) for d, n in enumerate(s.shape))
            descs.append(f"[{shape}]b{s.block_dim}:{str(s.dtype).removeprefix('torch.')}:"
                         f"o{''.join(map(str, _stride_order(s)))}")
        runs: list[list] = []  # run-length encoded so 80 identical layers stay short
        for d in descs:
            if runs and runs[-1][1] == d:
                runs[-1][0] += 1
            else:
                runs.append([1, d])
        return f"lmkv-layout-v1;parts={len(descs)};" + ";".join(f"{k}x{d}" for k, d in runs)

    def gather(self, block_ids: BlockIds, slot: torch.Tensor, threads: CopyThreads | None = None) -> None:
        """Copy blocks ``block_ids`` of every part into ``slot`` (store).

        ``slot`` must be a contiguous 1-D ``uint8`` tensor on the parts' device of exactly
        ``chunk_bytes(len(block_ids))`` bytes; ids must lie in ``[0, num_blocks)`` (they
        may repeat). On a CUDA device the copy is queued on the current stream; the caller
        synchronises before handing the slot on. Raises before copying anything if an
        argument is bad. ``threads`` splits the copy (CPU).
        """
        self.gather_many([(block_ids, slot)], threads)

    def scatter(self, slot: torch.Tensor, block_ids: BlockIds, *, first: int = 0, total: int | None = None,
                threads: CopyThreads | None = None) -> None:
        """Copy the chunk in ``slot`` into blocks ``block_ids`` of every part (load).

        Only the named blocks change. Ids must be distinct and in ``[0, num_blocks)``.
        ``slot`` is as for :meth:`gather`, holding a chunk of ``total`` blocks (default
        ``first + len(block_ids)``); its blocks ``first .. first+len(block_ids)`` are
        copied, so a load can skip a chunk's leading blocks that the engine already holds.
        Raises before copying anything if an argument is bad. ``threads`` splits the copy (CPU).
        """
        self._scatter([(slot, block_ids, first, total)], threads)

    def gather_many(self, chunks: Sequence[tuple[BlockIds, torch.Tensor]], threads: CopyThreads | None = None
                    ) -> None:
        """``gather(ids, slot)`` for each ``(ids, slot)``. Every chunk is checked before any
        is copied, so a bad one leaves all slots untouched. ``threads`` splits the copies."""
        ops = []
        for c in self.check_gathers(chunks):
            start = _run_start(c.ids)
            ops.extend((c.idx, start, c.n, *part) for part in self._plan(c.slot, c.n, for_gather=True))
        self._runner(threads)(_gather_ops, ops)

    def scatter_many(self, chunks: Sequence[tuple[torch.Tensor, BlockIds]], threads: CopyThreads | None = None
                     ) -> None:
        """``scatter(slot, ids)`` for each ``(slot, ids)``. Every chunk is checked before any
        is copied, so a bad one leaves the cache untouched. Ids must be distinct across all
        chunks: one load never writes a block twice. ``threads`` splits the copies."""
        self._scatter([(slot, block_ids, 0, None) for slot, block_ids in chunks], threads)

    def check_gathers(self, chunks: Sequence[tuple[BlockIds, torch.Tensor]]) -> list[CheckedChunk]:
        """A gather of each ``(ids, slot)`` checked, for any copier of this cache: ids in ``[0,
        num_blocks)`` (repeats allowed), a slot of ``len(ids)`` blocks. Raises at the first
        bad chunk, so a caller that checks first copies nothing of a bad request."""
        out = []
        for block_ids, slot in chunks:
            idx, ids = self._ids(block_ids, distinct=False)
            self._check_slot(slot, len(ids))
            out.append(CheckedChunk(slot, idx, ids, 0, len(ids)))
        return out

    def check_scatters(self, chunks: Sequence[tuple[torch.Tensor | None, BlockIds, int, int | None]]
                       ) -> list[CheckedChunk]:
        """The same for a scatter of each ``(slot, ids, first, total)`` (``total`` None:
        ``first + len(ids)``): ids also distinct across all chunks (a load writes a block
        once), blocks ``first .. first + len(ids)`` within ``total``, a slot of ``total``
        blocks (None: left to the copier that fills it)."""
        seen: set[int] = set()
        out = []
        for slot, block_ids, first, total in chunks:
            idx, ids = self._ids(block_ids, distinct=True)
            if not seen.isdisjoint(ids):
                raise ValueError("scatter_many: a block id appears in two chunks; each block may be loaded once")
            seen.update(ids)
            n = len(ids)
            total = first + n if total is None else total
            if first < 0 or total < first + n:
                raise ValueError(f"scatter of blocks {first}..{first + n} does not fit a chunk of {total} blocks")
            if slot is not None:
                self._check_slot(slot, total)
            out.append(CheckedChunk(slot, idx, ids, first, total))
        return out

    def _scatter(self, chunks: Sequence[tuple[torch.Tensor, BlockIds, int, int | None]],
                 threads: CopyThreads | None = None) -> None:
        ops = []
        for c in self.check_scatters(chunks):
            start, n = _run_start(c.ids), c.n
            for block_dim, part, src, _, row_copy in self._plan(c.slot, c.total, for_gather=False):
                ops.append((c.idx, start, n, block_dim, part,
                            src if n == c.total else src.narrow(block_dim, c.first, n), row_copy))
        self._runner(threads)(_scatter_ops, ops)

    def _runner(self, threads: CopyThreads | None) -> Callable[[Callable[[list], None], list], None]:
        """Who runs a copy's ops: ``threads`` for a CPU cache; the caller for a CUDA one (its
        ops queue on the caller's stream, which the caller synchronises)."""
        return threads.run if threads is not None and self.device.type == "cpu" else _run_here

    def _ids(self, block_ids: BlockIds, *, distinct: bool) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Block ids as an int64 tensor on the parts' device and as a list, range-checked:
        an id out of range would make the index kernels read or write outside the cache."""
        if isinstance(block_ids, torch.Tensor):
            if block_ids.dtype.is_floating_point or block_ids.dtype.is_complex or block_ids.dtype == torch.bool:
                raise TypeError(f"block ids must be integers, got a {block_ids.dtype} tensor")
            if block_ids.ndim != 1:
                raise ValueError(f"block ids must be one-dimensional, got shape {tuple(block_ids.shape)}")
            idx = block_ids.detach().to("cpu", torch.int64).contiguous()  # _rows reads it as an array
            ids: list[int] = idx.tolist()
        else:
            ids = []
            for b in block_ids:
                if isinstance(b, bool) or not hasattr(b, "__index__"):
                    raise TypeError(f"block ids must be a sequence of ints or an integer tensor, got {b!r}")
                ids.append(operator.index(b))
            idx = None
        if ids:
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= self.num_blocks:
                raise ValueError(f"block ids must be in [0, {self.num_blocks}); got {lo if lo < 0 else hi}")
            if distinct and len(set(ids)) != len(ids):
                raise ValueError("block ids to scatter into must be distinct; one block cannot hold two blocks' KV")
        if idx is None:
            idx = torch.tensor(ids, dtype=torch.int64)
        return (idx if self.device.type == "cpu" else idx.to(self.device, non_blocking=True)), tuple(ids)

    def _plan(self, slot: torch.Tensor, blocks: int, *, for_gather: bool
              ) -> list[tuple[int, torch.Tensor, torch.Tensor, bool, tuple[int, int] | None]]:
        """Pair each part with its region of ``slot``, a chunk of ``blocks`` blocks that
        passed the ``check_*`` methods: ``(block_dim, part_view, region_view, rows,
        row_copy)``, both views of one element type; ``rows`` says the part is contiguous
        with blocks first; ``row_copy`` is ``(row_stride, block_bytes)`` where the C row copy
        (``_rows``) moves this part.

        On a CPU, index_select copies whole rows (memcpy, parallel over ids) only from a
        contiguous source along dim 0; from a strided source it is far slower than advanced
        indexing, and along dim > 0 it runs on one thread. Advanced indexing and index_copy_
        are element-wise kernels that cost per element, so they get the widest type the
        alignment allows; the row copy runs faster on narrow types than on wide ones, so it
        gets the narrowest."""
        if blocks == 0:
            return []
        start, addr = slot.storage_offset(), slot.data_ptr()
        chosen, offsets, off = [], [], 0
        for views, nbytes in zip(self._views, self._block_bytes):
            for v in (reversed(views) if for_gather and views[0].rows else views):
                if (start + off) % v.width == 0 and (addr + off) % v.width == 0:
                    break
            else:
                raise ValueError(f"slot region at byte {off} is not aligned to the {views[-1].width}-byte "
                                 "elements of a part whose innermost dim is strided; align slots to 16 bytes")
            chosen.append(v)
            offsets.append(off)
            off += nbytes * blocks
        # Consecutive parts with one region shape (usually all layers) get their regions
        # from one view and one unbind: a Python-level view per part costs a visible share
        # of a whole chunk's copy.
        regions: list[torch.Tensor] = []
        i = 0
        while i < len(chosen):
            v, j = chosen[i], i + 1
            while j < len(chosen) and chosen[j].width == v.width and chosen[j].region_shape == v.region_shape:
                j += 1
            end = offsets[j] if j < len(offsets) else off
            group = slot[offsets[i]:end].view(_BITS[v.width])
            if j - i > 1:
                regions.extend(group.view((j - i, *v.region_shape)).unbind(0))
            else:
                regions.append(group.view(v.region_shape))
            i = j
        fast = _rows is not None and self.device.type == "cpu"
        return [(spec.block_dim, v.tensor, r, v.rows,
                 (v.row_stride, spec.block_bytes) if fast and v.row_stride is not None else None)
                for spec, v, r in zip(self.specs, chosen, regions)]

    def _check_slot(self, slot: torch.Tensor, blocks: int) -> None:
        if not isinstance(slot, torch.Tensor):
            raise TypeError(f"slot must be a torch.Tensor, got {type(slot).__name__}")
        if slot.dtype != torch.uint8:
            raise TypeError(f"slot must be a uint8 tensor (bytes), got {slot.dtype}; view it as torch.uint8")
        if slot.ndim != 1 or not slot.is_contiguous():
            raise ValueError(f"slot must be a contiguous 1-D tensor, got shape {tuple(slot.shape)} "
                             f"stride {tuple(slot.stride())}")
        if slot.device != self.device:
            raise ValueError(f"slot is on {slot.device} but the KV cache is on {self.device}")
        want = self.chunk_bytes(blocks)
        if slot.numel() != want:
            raise ValueError(f"slot holds {slot.numel()} bytes; a chunk of {blocks} blocks is {want} bytes")


def _run_here(fn: Callable[[list], None], ops: list) -> None:
    fn(ops)


def _gather_ops(ops: list) -> None:
    """One call per (chunk, part): the C row copy where it applies, else a torch op: a strided
    copy of a run of ids, or an index copy."""
    for idx, start, n, block_dim, part, dst, rows, row_copy in ops:
        if row_copy is not None:
            stride, row = row_copy
            _rows.copy_rows(dst.data_ptr(), row, 0, part.data_ptr(), stride, idx.data_ptr(), n, row)
        elif start is not None:
            dst.copy_(part.narrow(block_dim, start, n))
        elif rows:
            torch.index_select(part, 0, idx, out=dst)
        else:
            torch.ops.aten.index.Tensor_out(part, [None] * block_dim + [idx], out=dst)


def _scatter_ops(ops: list) -> None:
    for idx, start, n, block_dim, part, src, row_copy in ops:
        if row_copy is not None:
            stride, row = row_copy
            _rows.copy_rows(part.data_ptr(), stride, idx.data_ptr(), src.data_ptr(), row, 0, n, row)
        elif start is not None:
            part.narrow(block_dim, start, n).copy_(src)
        else:
            part.index_copy_(block_dim, idx, src)


def slot_checksum(slot: torch.Tensor) -> int:
    """The checksum ``--verify on`` stores for a chunk: xxh3-64 of the slot's bytes (the
    algorithm of the lower tiers' records, ``lmkv_mp.sidecar.tiers.base.checksum``). ``slot`` is a
    contiguous 1-D ``uint8`` CPU tensor, e.g. a view of the host pool; nothing is copied."""
    from lmkv_mp.wire.checksum import checksum

    if slot.device.type != "cpu" or slot.dtype != torch.uint8 or slot.dim() != 1 or not slot.is_contiguous():
        raise ValueError(f"slot must be a contiguous 1-D uint8 CPU tensor, got {slot.dtype} {tuple(slot.shape)} "
                         f"on {slot.device}")
    return checksum(slot.numpy())


def _run_start(ids: tuple[int, ...]) -> int | None:
    """The first id if ``ids`` are consecutive and ascending, else None. A run is one
    strided copy, faster than the index kernels (and fresh caches hand out consecutive
    blocks)."""
    if ids and ids[-1] - ids[0] == len(ids) - 1 and ids == tuple(range(ids[0], ids[0] + len(ids))):
        return ids[0]
    return None


def _flatten(caches: Mapping[str, torch.Tensor | Sequence[torch.Tensor]] | Sequence[torch.Tensor]
             ) -> list[tuple[str, torch.Tensor]]:
    if isinstance(caches, torch.Tensor):
        raise TypeError("caches must be a mapping or a sequence of tensors, not one tensor: wrap it in a list")
    items = list(caches.items()) if isinstance(caches, Mapping) else [(str(i), t) for i, t in enumerate(caches)]
    named: list[tuple[str, torch.Tensor]] = []
    for name, t in items:
        if isinstance(t, torch.Tensor):
            named.append((str(name), t))
        elif isinstance(t, (tuple, list)):
            for j, x in enumerate(t):
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"{name}[{j}]: expected a torch.Tensor, got {type(x).__name__}")
                named.append((f"{name}.{j}", x))
        else:
            raise TypeError(f"{name}: expected a tensor or a (k_cache, v_cache) pair, got {type(t).__name__}")
    return named


def _check_part(name: str, t: torch.Tensor) -> None:
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError(f"{name}: KV cache tensors must be dense (strided, not quantized), got {t.layout}")
    if t.element_size() not in _BITS:
        raise TypeError(f"{name}: dtype {t.dtype} has item size {t.element_size()}; need 1, 2, 4, 8 or 16 bytes")
    if t.ndim == 0 or t.numel() == 0:
        raise ValueError(f"{name}: a KV cache tensor needs a block dimension and no empty dims, "
                         f"got shape {tuple(t.shape)}")


def _norm_dim(name: str, t: torch.Tensor, dim: int) -> int:
    if not -t.ndim <= dim < t.ndim:
        raise ValueError(f"{name}: block_dim {dim} is out of range for shape {tuple(t.shape)}")
    return dim % t.ndim


def _spec(name: str, t: torch.Tensor, num_blocks: int, block_dim: int | None) -> LayerSpec:
    if block_dim is None:
        dims = [d for d, n in enumerate(t.shape) if n == num_blocks]
        if len(dims) != 1:
            what = "no dimension" if not dims else f"dimensions {dims}"
            raise ValueError(f"{name}: shape {tuple(t.shape)} has {what} of size num_blocks={num_blocks}, so "
                             "the block dimension is ambiguous; pass block_dim (and num_blocks) explicitly")
        bd = dims[0]
    else:
        bd = _norm_dim(name, t, block_dim)
        if t.shape[bd] != num_blocks:
            raise ValueError(f"{name}: dimension {bd} of shape {tuple(t.shape)} is not num_blocks={num_blocks}; "
                             "all parts must share num_blocks along their block dimension")
    per_block = math.prod(n for d, n in enumerate(t.shape) if d != bd) * t.element_size()
    return LayerSpec(name, tuple(t.shape), tuple(t.stride()), t.dtype, bd, per_block)


def _stride_order(s: LayerSpec) -> list[int]:
    """Dims from outermost to innermost in memory. Size-1 dims have no meaningful stride,
    so they go last, by position; ties keep dim order, so the result is deterministic."""
    return sorted(range(len(s.shape)), key=lambda d: (-(s.stride[d] if s.shape[d] > 1 else 0), d))


def _byte_views(t: torch.Tensor, spec: LayerSpec) -> tuple[_View, ...]:
    """``t`` reinterpreted as same-size integers, and, where its innermost dim is
    contiguous and not the block dim, as elements of every other width that its byte
    strides, storage offset and address allow (complex128 requires 16-byte alignment).
    Widest first."""
    isz = t.element_size()
    same = t.view(_BITS[isz])
    tensors = {isz: same}
    last = t.ndim - 1
    if last != spec.block_dim and t.stride(last) == 1:
        for w, bits in _BITS.items():
            fits = ((t.shape[last] * isz) % w == 0 and (t.storage_offset() * isz) % w == 0
                    and t.data_ptr() % w == 0 and all((st * isz) % w == 0 for st in t.stride()[:last]))
            if w != isz and fits:
                tensors[w] = same.view(bits)
    views = []
    for w in sorted(tensors, reverse=True):
        v = tensors[w]
        shape = tuple(-1 if d == spec.block_dim else n for d, n in enumerate(v.shape))
        row_stride = v.stride(0) * w if spec.block_dim == 0 and v[0].is_contiguous() else None
        if row_stride is not None and row_stride < spec.block_bytes:
            row_stride = None  # blocks that overlap: leave their order to torch's ops
        views.append(_View(w, v, shape, spec.block_dim == 0 and v.is_contiguous(), row_stride))
    return tuple(views)
