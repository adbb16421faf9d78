"""A numpy emulation of the gather/scatter kernels' index math (``cuda/paged_copy.cuh``).

:func:`emulate` runs a launch as the CUDA code would, on host memory: every CTA of the grid
decodes its tile, computes its rows' offsets (``row_offsets``) and copies its byte ranges in
words of the width it picked. It asserts what the kernel silently assumes: each word access
is aligned to its width, unsigned 32-bit quantities do not wrap, and no destination byte is
written twice (for a gather, every slot byte exactly once). Comparing its result with
``transfer.py``'s torch copy checks :func:`lmkv_mp.engine.kernels.plan_copies` and
:func:`~lmkv_mp.engine.kernels.launch_args` on the CPU; ``tests/gpu`` checks the CUDA code itself.
Keep the two in step: each block below names the C lines it mirrors.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from lmkv_mp.engine.kernels import ARGS_DTYPE, MAX_DIMS, PART_DTYPE, CopyPlan

U32 = 1 << 32


class Memory:
    """Host memory by address: the storages of the given CPU tensors, as numpy byte arrays
    that share their memory (writes land in the tensors). Every access is bounds-checked
    against its storage, so a wrong offset fails instead of touching other memory."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        spans: dict[int, np.ndarray] = {}
        for t in tensors:
            st = t.untyped_storage()
            spans[st.data_ptr()] = torch.empty(0, dtype=torch.uint8).set_(st).numpy()
        self.starts = np.array(sorted(spans), dtype=np.int64)
        self.arrays = [spans[s] for s in sorted(spans)]

    def locate(self, addr: np.ndarray, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(storage number, offset) of each range [addr, addr+nbytes); asserts it lies in one."""
        k = np.searchsorted(self.starts, addr, side="right") - 1
        assert (k >= 0).all(), "an address below every storage"
        off = addr - self.starts[k]
        ends = np.array([a.size for a in self.arrays])[k]
        assert (off + nbytes <= ends).all(), "a range runs past the end of its storage"
        return k, off

    def copy(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """Copy byte ranges (all reads before any write, as src and dst never overlap);
        returns the address of every byte written, once per write."""
        sk, so = self.locate(src, nbytes)
        dk, do = self.locate(dst, nbytes)
        total = int(nbytes.sum())
        row = np.repeat(np.arange(nbytes.size), nbytes)
        within = np.arange(total) - np.repeat(np.cumsum(nbytes) - nbytes, nbytes)
        vals = np.empty(total, np.uint8)
        for k, arr in enumerate(self.arrays):
            sel = sk[row] == k
            vals[sel] = arr[so[row[sel]] + within[sel]]
        for k, arr in enumerate(self.arrays):
            sel = dk[row] == k
            arr[do[row[sel]] + within[sel]] = vals[sel]
        return dst[row] + within


class EmulatedKernels:
    """Stands in for :class:`lmkv_mp.engine.kernels.CudaKernels` on the CPU, so KernelCopier's
    host side (checks, arguments, one launch per chunk) runs here: :meth:`launch` reads the
    argument record and, through its pointers (host addresses here), the plan and the ids,
    then emulates the launch on the storages of ``tensors`` (the cache parts and the slots)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = list(tensors)
        self.launches: list[tuple[str, int]] = []

    def stream(self) -> int:
        return 0

    def launch(self, op: str, args: np.ndarray, grid: int, stream: int) -> None:
        a = args[0]
        tile_part = _read(int(a["tile_part"]), 4 * int(a["tiles_per_block"])).view(np.uint32)
        parts = _read(int(a["parts"]), PART_DTYPE.itemsize * (int(tile_part.max()) + 1)).view(PART_DTYPE)
        ids = _read(int(a["ids"]), 8 * int(a["n"])).view(np.int64)
        assert grid == int(a["n"]) * tile_part.size
        row_bytes = int(parts["region"][-1]) + int(parts["rows"][-1]) * int(parts["run"][-1])
        emulate(op, CopyPlan(parts, tile_part, row_bytes), args, ids, Memory(*self.tensors))
        self.launches.append((op, grid))


def _read(addr: int, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr)).copy()


def emulate(op: str, plan: CopyPlan, args: np.ndarray, ids: np.ndarray, mem: Memory) -> None:
    """Run ``lmkv_<op>`` with argument record ``args`` (from ``launch_args``) and block ids
    ``ids`` on ``mem``. ``args``' device pointers to the plan and ids are not followed: the
    plan's arrays and ``ids`` stand for them."""
    assert args.dtype == ARGS_DTYPE
    a = args[0]
    tpb, n, first, total = (int(a[f]) for f in ("tiles_per_block", "n", "first", "total"))
    slot_align, slot = int(a["slot_align"]), int(a["slot"])
    assert ids.size == n and tpb == plan.tile_part.size
    grid = n * tpb
    assert grid < 2**31

    # copy_tile: decode the tile, its rows and byte range.
    cta = np.arange(grid, dtype=np.int64)
    i = cta // tpb
    t = cta - i * tpb
    P = plan.parts[plan.tile_part[t]]
    lt = t - P["tile_start"].astype(np.int64)
    rt = lt // P["col_tiles"]
    ct = lt - rt * P["col_tiles"]
    r0 = rt * P["rows_per_tile"]
    rows = np.minimum(P["rows_per_tile"], P["rows"] - r0)
    c0 = ct * P["col_bytes"]
    nbytes = np.minimum(P["col_bytes"], P["run"] - c0)
    w = np.minimum(P["vec"], slot_align)
    assert (rows >= 1).all() and (nbytes >= 1).all() and (rows <= 256).all()
    cache = P["base"].astype(np.int64) + ids[i] * P["block_stride"] + c0
    slot_base = slot + P["region"].astype(np.int64) * total + c0
    b = first + i

    # The row loop: every row of every CTA.
    which = np.repeat(cta, rows)
    r = r0[which] + (np.arange(which.size) - np.repeat(np.cumsum(rows) - rows, rows))
    R = P[which]
    assert (r < U32).all()
    cache_off, slot_off = row_offsets(R, r, b[which], total)
    if op == "gather":
        src, dst = cache[which] + cache_off, slot_base[which] + slot_off
    else:
        src, dst = slot_base[which] + slot_off, cache[which] + cache_off

    # copy_run / copy_rows: words of width w at src + c*w, c < nbytes / w.
    ww, nb = w[which].astype(np.int64), nbytes[which].astype(np.int64)
    assert (nb % ww == 0).all(), "a row's bytes are not a whole number of words"
    assert (src % ww == 0).all() and (dst % ww == 0).all(), "a misaligned word access"
    assert (rows * (nbytes // w) < U32).all()
    written = mem.copy(src, dst, nb)
    addrs, counts = np.unique(written, return_counts=True)
    assert (counts == 1).all(), "a byte was written twice"
    if op == "gather":
        size = total * plan.row_bytes
        assert addrs.size == size and addrs[0] == slot and addrs[-1] == slot + size - 1, "a slot byte was not written"


def row_offsets(P: np.ndarray, r: np.ndarray, b: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """row_offsets: (cache offset from the block, slot offset from the region) of rows ``r``."""
    inner = P["inner_rows"].astype(np.int64)
    o = r // inner
    inn = r - o * inner
    slot_off = ((o * total + b) * inner + inn) * P["run"]
    off = np.zeros_like(r)
    rem = r.copy()
    for d in range(MAX_DIMS - 1, -1, -1):  # d >= ndim: size 1 there, so a no-op as in the C loop
        active = d < P["ndim"]
        s = np.where(active, P["size"][:, d], 1).astype(np.int64)
        q = rem // s
        off += np.where(active, (rem - q * s) * P["stride"][:, d], 0)
        rem = q
    return off, slot_off
