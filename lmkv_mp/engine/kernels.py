"""CUDA gather/scatter kernels (``cuda/*.cu``) for a worker's paged KV cache.

:class:`KernelCopier` wraps a :class:`~lmkv_mp.engine.paged.PagedKV` and has its ``gather`` /
``scatter`` methods and contract: every part of a chunk moves in one kernel launch, on the
current torch stream, and the slot bytes are exactly those of the torch reference
(``paged.py``: a chunk stored by a CPU worker loads in a CUDA worker and back). Where the
kernels do not apply (the cache is not on a CUDA device, cuda-python or NVRTC is missing, no
GPU, a compile error, a layout beyond :data:`MAX_DIMS` dims) it calls the torch path, and the
first such fallback on a CUDA cache logs one line saying why.

The arguments are computed here, in numpy, by pure functions (:func:`plan_copies`,
:func:`launch_args`), so CPU tests check them against the torch reference through an
emulation of the kernel's index math (``tests/helpers/kernel_emu.py``). ``cuda/paged_copy.cuh``
documents the layout; :data:`PART_DTYPE` and :data:`ARGS_DTYPE` are its structs.

Kernels come from cubins that ``cuda/build.sh`` built for this GPU's architecture from the
current sources, else from NVRTC at first use, cached under ``~/.cache/lmkv_mp/kernels``
keyed by architecture, sources, options and NVRTC version. ``import lmkv_mp.engine.kernels``
imports no CUDA library; cuda-python is imported by :func:`load`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkv_mp.memory import cuda_api
from lmkv_mp.engine.copy_threads import CopyThreads
from lmkv_mp.engine.paged import BlockIds, CheckedChunk, LayerSpec, PagedKV

log = logging.getLogger("lmkv.kernels")

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
OPS = ("gather", "scatter")
# Must equal the #defines of cuda/paged_copy.cuh (tests/engine/test_kernels.py reads them).
MAX_DIMS = 6
THREADS = 256
MAX_TILE_ROWS = 256
# Bytes one CTA copies: enough to amortise its start (~2 loop trips of 256 threads x 4 x 16 B).
TILE_BYTES = 32 << 10
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "lmkv_mp" / "kernels"

PART_DTYPE = np.dtype([
    ("base", "<u8"), ("block_stride", "<i8"), ("region", "<u8"),
    ("stride", "<i8", (MAX_DIMS,)), ("size", "<u4", (MAX_DIMS,)),
    ("ndim", "<u4"), ("inner_rows", "<u4"), ("rows", "<u4"), ("run", "<u4"), ("vec", "<u4"),
    ("rows_per_tile", "<u4"), ("col_bytes", "<u4"), ("col_tiles", "<u4"), ("tiles", "<u4"),
    ("tile_start", "<u4"),
])
ARGS_DTYPE = np.dtype([
    ("parts", "<u8"), ("tile_part", "<u8"), ("ids", "<u8"), ("slot", "<u8"),
    ("tiles_per_block", "<u4"), ("n", "<u4"), ("first", "<u4"), ("total", "<u4"),
    ("slot_align", "<u4"), ("pad", "<u4"),
])
_U32 = (1 << 32) - 1
_GRID_X = (1 << 31) - 1


class Unsupported(ValueError):
    """A layout or size the kernels do not handle (the torch path copies it)."""


class KernelsUnavailable(RuntimeError):
    """The kernels cannot run here; the message says why and what to install or fix."""


@dataclass(frozen=True, slots=True)
class PartGeometry:
    """One part as the kernel sees it: a block is ``prod(sizes)`` rows of ``run`` contiguous
    bytes; ``sizes``/``strides`` (bytes) are the other dims in slot order, the first
    ``n_outer`` before the block dimension. Size-1 dims are dropped and adjacent dims that
    are contiguous in both the cache and the slot merged, which keeps the slot order."""

    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    n_outer: int
    run: int

    @property
    def inner_rows(self) -> int:
        return math.prod(self.sizes[self.n_outer:])

    @property
    def rows(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """The kernel's view of a whole cache: one :data:`PART_DTYPE` record per part and, per
    tile of a block, the part it belongs to. Depends on the parts' addresses, not on a chunk."""

    parts: np.ndarray
    tile_part: np.ndarray
    row_bytes: int

    @property
    def tiles_per_block(self) -> int:
        return int(self.tile_part.size)


def part_geometry(shape: Sequence[int], stride: Sequence[int], itemsize: int, block_dim: int) -> PartGeometry:
    """Rows, runs and dims of one part (strides in elements, as torch gives them)."""
    def merged(dims: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for size, st in dims:
            if out and out[-1][1] == size * st:
                out[-1] = (out[-1][0] * size, st)
            else:
                out.append((size, st))
        return out

    outer = [(n, s * itemsize) for d, (n, s) in enumerate(zip(shape, stride)) if d < block_dim and n > 1]
    inner = [(n, s * itemsize) for d, (n, s) in enumerate(zip(shape, stride)) if d > block_dim and n > 1]
    run = itemsize
    while inner and inner[-1][1] == run:
        run *= inner.pop()[0]
    outer, inner = merged(outer), merged(inner)
    dims = outer + inner
    return PartGeometry(tuple(n for n, _ in dims), tuple(s for _, s in dims), len(outer), run)


def align_of(x: int) -> int:
    """The largest access width (16, 8, 4, 2 or 1 bytes) that divides ``x``."""
    return next(w for w in (16, 8, 4, 2, 1) if x % w == 0)


def plan_copies(specs: Sequence[LayerSpec], addresses: Sequence[int], tile_bytes: int = TILE_BYTES) -> CopyPlan:
    """The per-part records for a cache whose parts are ``specs`` at ``addresses`` (each
    part's ``data_ptr()``). Raises :class:`Unsupported` for what the kernels cannot copy."""
    if tile_bytes <= 0 or tile_bytes % 16 or tile_bytes > _U32:
        raise ValueError(f"tile_bytes must be a positive multiple of 16, got {tile_bytes}")
    parts = np.zeros(len(specs), PART_DTYPE)
    tile_part: list[np.ndarray] = []
    region = tiles = 0
    for p, (spec, addr) in enumerate(zip(specs, addresses)):
        isz = spec.dtype.itemsize
        g = part_geometry(spec.shape, spec.stride, isz, spec.block_dim)
        where = f"{spec.name} (shape {spec.shape}, stride {spec.stride})"
        if len(g.sizes) > MAX_DIMS:
            raise Unsupported(f"{where}: {len(g.sizes)} strided dims after merging; the kernels take {MAX_DIMS}")
        if any(s == 0 for s in g.strides) or (spec.stride[spec.block_dim] == 0 and spec.shape[spec.block_dim] > 1):
            raise Unsupported(f"{where}: a dimension with stride 0 (an expanded view) would alias blocks")
        if g.rows * g.run != spec.block_bytes or g.run > _GRID_X or g.rows > _GRID_X:
            raise Unsupported(f"{where}: a block of {spec.block_bytes} bytes is too large for the kernels")
        block_stride = spec.stride[spec.block_dim] * isz
        vec = min(align_of(v) for v in (addr, block_stride, g.run, region, *g.strides))
        if g.run >= tile_bytes:
            rows_per_tile, col_bytes = 1, tile_bytes
        else:
            rows_per_tile, col_bytes = min(MAX_TILE_ROWS, tile_bytes // g.run, g.rows), g.run
        col_tiles = -(-g.run // col_bytes)
        n_tiles = -(-g.rows // rows_per_tile) * col_tiles
        rec = parts[p]
        rec["base"], rec["block_stride"], rec["region"] = addr, block_stride, region
        rec["stride"][:len(g.strides)] = g.strides
        rec["size"][:len(g.sizes)] = g.sizes
        rec["ndim"], rec["inner_rows"], rec["rows"], rec["run"], rec["vec"] = \
            len(g.sizes), g.inner_rows, g.rows, g.run, vec
        rec["rows_per_tile"], rec["col_bytes"], rec["col_tiles"] = rows_per_tile, col_bytes, col_tiles
        rec["tiles"], rec["tile_start"] = n_tiles, tiles
        tile_part.append(np.full(n_tiles, p, np.uint32))
        region += spec.block_bytes
        tiles += n_tiles
        if tiles > _GRID_X:
            raise Unsupported(f"{tiles} tiles per block: too many for one launch; raise tile_bytes")
    return CopyPlan(parts, np.concatenate(tile_part), region)


def launch_args(plan: CopyPlan, *, parts: int, tile_part: int, ids: int, slot: int, n: int,
                first: int = 0, total: int | None = None) -> tuple[np.ndarray, int]:
    """The kernel's argument struct (one :data:`ARGS_DTYPE` record) and grid size for copying
    ``n`` blocks, whose ids are at device address ``ids``, to or from blocks ``first ..
    first+n`` of a slot of ``total`` blocks at ``slot``. ``parts`` and ``tile_part`` are the
    device addresses of the plan's arrays."""
    total = first + n if total is None else total
    grid = n * plan.tiles_per_block
    if n <= 0 or first < 0 or total < first + n or total > _U32:
        raise ValueError(f"blocks {first}..{first + n} of a chunk of {total}: nothing to copy or out of range")
    if grid > _GRID_X:
        raise ValueError(f"{n} blocks need {grid} CTAs, over one launch's {_GRID_X}: copy fewer blocks per call")
    args = np.zeros(1, ARGS_DTYPE)
    args[0] = (parts, tile_part, ids, slot, plan.tiles_per_block, n, first, total, align_of(slot), 0)
    return args, grid


def source_hash(cuda_dir: Path | None = None) -> str:
    """sha256 of the kernel sources' bytes in file-name order (what cuda/build.sh stamps)."""
    cuda_dir = cuda_dir or CUDA_DIR
    h = hashlib.sha256()
    for p in sorted((*cuda_dir.glob("*.cu"), *cuda_dir.glob("*.cuh")), key=lambda p: p.name.encode()):
        h.update(p.read_bytes())
    return h.hexdigest()


def nvrtc_options(cc: int, cuda_dir: Path | None = None) -> list[str]:
    return [f"--gpu-architecture=sm_{cc}", "-std=c++17", "-lineinfo", f"-I{cuda_dir or CUDA_DIR}"]


def _cuda_python() -> tuple[Any, Any]:
    return cuda_api.bindings(KernelsUnavailable)


_status_name = cuda_api.status_name


def _check(result: Any, what: str, fix: str = "") -> Any:
    """cuda-python returns (status, *values): raise on a bad status, else the value(s)."""
    return cuda_api.check(result, what, KernelsUnavailable, fix)


def compile_cubin(op: str, cc: int, *, extra: Sequence[str] = (), cuda_dir: Path | None = None
                  ) -> tuple[bytes, str]:
    """NVRTC-compile ``cuda/<op>.cu`` to a cubin for sm_<cc>: (cubin, compiler log). Needs no GPU."""
    cuda_dir = cuda_dir or CUDA_DIR
    _, nvrtc = _cuda_python()
    src = (cuda_dir / f"{op}.cu").read_bytes()
    opts = [o.encode() for o in (*nvrtc_options(cc, cuda_dir), *extra)]
    try:
        prog = _check(nvrtc.nvrtcCreateProgram(src, f"{op}.cu".encode(), 0, [], []), "nvrtcCreateProgram")
    except KernelsUnavailable:
        raise
    except (RuntimeError, OSError) as e:  # cuda-python's loader error: no libnvrtc found
        raise KernelsUnavailable(f"NVRTC could not be loaded ({e}): pip install nvidia-cuda-nvrtc") from None
    try:
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        # NVRTC writes into the buffer: it must be a bytearray. ``b" " * 1`` (the size of an
        # empty log) is CPython's shared one-byte bytes object, and writing a NUL into it
        # turned every b" " in the process into b"\0" (torch.load then read wrong shapes).
        buf = bytearray(size)
        _check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        text = buf.rstrip(b"\0 ").decode(errors="replace")
        _check((status,), f"NVRTC compile of {op}.cu for sm_{cc}",
               f"log:\n{text}\n(an arch NVRTC does not know needs a newer nvidia-cuda-nvrtc)")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = bytearray(size)
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return bytes(cubin), text
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _cubin(op: str, cc: int, cache_dir: Path, prebuilt: bool) -> tuple[bytes, Path | None]:
    """(cubin, its file): cuda/build.sh's if current (and ``prebuilt``), else the cache's,
    else a fresh NVRTC compile, cached (file None if the cache cannot be written)."""
    digest = source_hash()
    built = CUDA_DIR / "build"
    stamp = built / "SOURCES.sha256"
    cubin_path = built / f"{op}.sm_{cc}.cubin"
    if prebuilt and cubin_path.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return cubin_path.read_bytes(), cubin_path
    _, nvrtc = _cuda_python()
    version = _check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    key = hashlib.sha256(f"{digest}|{nvrtc_options(cc)}|{version}".encode()).hexdigest()[:20]
    cached = cache_dir / f"{op}-sm_{cc}-{key}.cubin"
    if cached.exists():
        return cached.read_bytes(), cached
    cubin, _ = compile_cubin(op, cc)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cubin)
        tmp.replace(cached)  # atomic: a concurrent worker reads a whole cubin or none
    except OSError as e:  # a read-only home only costs a compile per process
        log.debug("could not cache %s: %s", cached, e)
        return cubin, None
    return cubin, cached


class CudaKernels:
    """The gather and scatter functions loaded into one device's primary context (the one
    torch uses). Build with :func:`load`; ``prebuilt=False`` ignores cuda/build's cubins
    (to check the NVRTC path where both exist)."""

    def __init__(self, device: torch.device, cache_dir: Path, *, prebuilt: bool = True) -> None:
        driver, _ = _cuda_python()
        self._driver = driver
        index = torch.cuda.current_device() if device.index is None else device.index
        self.device = torch.device("cuda", index)
        major, minor = torch.cuda.get_device_capability(self.device)
        self.cc = major * 10 + minor
        cuda_api.init_driver(driver, KernelsUnavailable, "is an NVIDIA driver installed and a GPU visible?")
        dev = _check(driver.cuDeviceGet(index), "cuDeviceGet")
        self._ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        self.functions: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        with self._context():
            for op in OPS:
                self.functions[op] = self._function(op, cache_dir, prebuilt)

    def _function(self, op: str, cache_dir: Path, prebuilt: bool) -> Any:
        """Load ``lmkv_<op>``: a prebuilt cubin the driver refuses (built by a newer nvcc,
        say) gives way to NVRTC's, and a refused cached one to a fresh compile."""
        driver, tried = self._driver, []
        for use_prebuilt in (True, False, False) if prebuilt else (False, False):
            cubin, path = _cubin(op, self.cc, cache_dir, use_prebuilt)
            status, module = driver.cuModuleLoadData(cubin)
            if int(status) == 0:
                self.sources[op] = str(path) if path is not None else "NVRTC (not cached)"
                return _check(driver.cuModuleGetFunction(module, f"lmkv_{op}".encode()),
                              f"cuModuleGetFunction(lmkv_{op})")
            tried.append(f"{path or 'a fresh NVRTC cubin'}: {_status_name(status)}")
            log.warning("the driver refused %s", tried[-1])
            if path is not None and not use_prebuilt:
                path.unlink(missing_ok=True)
        raise KernelsUnavailable(f"the driver loads no {op} kernel for sm_{self.cc} ({'; '.join(tried)}): "
                                 "update the NVIDIA driver, or nvidia-cuda-nvrtc to match it")

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        # The functions belong to the device's primary context, which a worker's copy thread
        # may not have current (torch makes it current on the threads that use the runtime);
        # the caller's context comes back after, so torch's idea of the current device stays.
        driver = self._driver
        prev = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(prev) == int(self._ctx):
            yield
            return
        _check(driver.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        try:
            yield
        finally:
            _check(driver.cuCtxSetCurrent(prev), "cuCtxSetCurrent (restoring the caller's context)")

    def stream(self) -> int:
        """The current torch stream of the device, as a CUstream handle."""
        return torch.cuda.current_stream(self.device).cuda_stream

    def launch(self, op: str, args: np.ndarray, grid: int, stream: int) -> None:
        """Queue ``op`` with one :data:`ARGS_DTYPE` record on ``stream`` (a CUstream handle)."""
        params = np.array([args.ctypes.data], dtype=np.uint64)  # void*[1] -> the struct
        with self._context():
            status = self._driver.cuLaunchKernel(self.functions[op], grid, 1, 1, THREADS, 1, 1, 0,
                                                 self._driver.CUstream(stream), params.ctypes.data, 0)
        try:
            _check(status, f"cuLaunchKernel(lmkv_{op}, grid={grid})")
        except KernelsUnavailable as e:
            raise RuntimeError(str(e)) from None  # a launch that fails is a bug, not a fallback


_loaded: dict[int, CudaKernels | KernelsUnavailable] = {}
_lock = threading.Lock()
_logged: set[str] = set()


def load(device: torch.device, cache_dir: Path | None = None) -> CudaKernels:
    """The kernels on ``device``, compiled or loaded once per process and device. Raises
    :class:`KernelsUnavailable` (the same one on every later call) when they cannot run."""
    available = torch.cuda.is_available()
    index = device.index if device.index is not None else torch.cuda.current_device() if available else 0
    with _lock:
        got = _loaded.get(index)
        if got is None:
            try:
                if not available:
                    raise KernelsUnavailable("torch sees no CUDA device")
                got = CudaKernels(torch.device("cuda", index), cache_dir or DEFAULT_CACHE_DIR)
                log.info("lmkv_mp kernels on cuda:%d (sm_%d) from %s", index, got.cc, got.sources)
            except (KernelsUnavailable, OSError) as e:
                got = e if isinstance(e, KernelsUnavailable) else KernelsUnavailable(f"reading kernel sources: {e}")
            _loaded[index] = got
    if isinstance(got, KernelsUnavailable):
        raise got
    return got


def _fallback_once(reason: str) -> None:
    with _lock:
        if reason in _logged:
            return
        _logged.add(reason)
    log.warning("lmkv_mp: CUDA copy kernels not used (%s); copies take the torch path (paged.py)", reason)


class KernelCopier:
    """``gather``/``scatter`` of a :class:`PagedKV` through the kernels where they apply,
    else through ``paged`` itself; same arguments, checks and slot bytes as ``PagedKV``'s
    methods. Everything is checked before the first launch. ``uses_kernels`` says which path
    copies; ``reason`` why not the kernels. ``kernels`` replaces those :func:`load` gives, on
    any device (tests pass a CPU emulation)."""

    def __init__(self, paged: PagedKV, *, tile_bytes: int = TILE_BYTES, cache_dir: Path | None = None,
                 kernels: CudaKernels | None = None) -> None:
        self.paged = paged
        self.reason = ""
        self._kernels: CudaKernels | None = None
        if kernels is None and paged.device.type != "cuda":
            self.reason = f"the cache is on {paged.device.type}"
            return
        try:
            self.plan = plan_copies(paged.specs, [t.data_ptr() for t in paged.parts], tile_bytes)
            self._kernels = kernels or load(paged.device, cache_dir)
        except (Unsupported, KernelsUnavailable) as e:
            self.reason = str(e)
            _fallback_once(self.reason)
            return
        # The plan lives on the device for the copier's life: a launch uploads only its ids.
        # (As bytes: torch copies few ops' worth of uint32 to a device.)
        self._parts = torch.from_numpy(self.plan.parts.view(np.uint8)).to(paged.device)
        self._tile_part = torch.from_numpy(self.plan.tile_part.view(np.uint8)).to(paged.device)

    @property
    def uses_kernels(self) -> bool:
        return self._kernels is not None

    def gather(self, block_ids: BlockIds, slot: torch.Tensor, threads: CopyThreads | None = None) -> None:
        """:meth:`PagedKV.gather`."""
        self.gather_many([(block_ids, slot)], threads)

    def scatter(self, slot: torch.Tensor, block_ids: BlockIds, *, first: int = 0, total: int | None = None,
                threads: CopyThreads | None = None) -> None:
        """:meth:`PagedKV.scatter`."""
        if self._kernels is None:
            self.paged.scatter(slot, block_ids, first=first, total=total, threads=threads)
        else:
            self._scatter([(slot, block_ids, first, total)])

    def gather_many(self, chunks: Sequence[tuple[BlockIds, torch.Tensor]], threads: CopyThreads | None = None
                    ) -> None:
        """:meth:`PagedKV.gather_many`: one launch per chunk (``threads`` only for the torch fallback)."""
        if self._kernels is None:
            self.paged.gather_many(chunks, threads)
            return
        for c in self.paged.check_gathers(chunks):
            if c.n:
                self._launch("gather", c)

    def scatter_many(self, chunks: Sequence[tuple[torch.Tensor, BlockIds]], threads: CopyThreads | None = None
                     ) -> None:
        """:meth:`PagedKV.scatter_many`: one launch per chunk (``threads`` only for the torch fallback)."""
        if self._kernels is None:
            self.paged.scatter_many(chunks, threads)
        else:
            self._scatter([(slot, block_ids, 0, None) for slot, block_ids in chunks])

    def _scatter(self, chunks: Sequence[tuple[torch.Tensor, BlockIds, int, int | None]]) -> None:
        for c in self.paged.check_scatters(chunks):
            if c.n:
                self._launch("scatter", c)

    def _launch(self, op: str, chunk: CheckedChunk) -> None:
        assert self._kernels is not None and chunk.slot is not None
        args, grid = launch_args(self.plan, parts=self._parts.data_ptr(), tile_part=self._tile_part.data_ptr(),
                                 ids=chunk.idx.data_ptr(), slot=chunk.slot.data_ptr(), n=chunk.n,
                                 first=chunk.first, total=chunk.total)
        self._kernels.launch(op, args, grid, self._kernels.stream())
