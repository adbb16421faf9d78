"""The GPU check of issue #6: the CUDA gather/scatter kernels on one GPU, in one JSON file.

1. ``tests/gpu`` (pytest, in a subprocess): kernels vs the torch reference over layouts,
   dtypes, alignments and random layouts; the CUDA worker's copy path (cuda_path.py)
   against a real sidecar: GPU and CPU workers sharing chunks byte-identically through
   the pinned host pool, and a store ordered after the engine stream's queued writes; the
   sidecar's GPU tier (``--gpu-pool-size``): a sidecar and two worker processes on one GPU
   sharing chunks through it (VMM fd or IPC handle, device to device), byte-identical.
2. Serving-size caches (below), each: the kernels' slot equals the torch path's on the GPU
   and on the CPU, and a scatter then a gather gives the slot back.
3. D2D throughput of one chunk's gather and scatter against ``cudaMemcpy`` D2D of the same
   bytes between two contiguous buffers, both timed the same way: CUDA events around 50
   back-to-back copies queued behind a GPU sleep (so the GPU time is measured, not Python's
   launch time, which is reported on its own as ``host_us``). Target: ratio >= 0.8.
4. Informational: the tile size against throughput; the kernels copying straight into or
   out of host memory (torch's pinned memory, and a shared mapping pinned with
   cudaHostRegister like the host pool would be) against ``cudaMemcpy`` D2H/H2D of the same
   bytes.
5. The CUDA worker's path to the host pool (cuda_path.py: gather into a device staging
   slot, DMA to a pinned shared mapping; a load the reverse) against ``cudaMemcpy`` D2H/H2D
   of the same bytes to the same mapping, byte-checked first. Target: ratio >= 0.8.

Caches (bf16 unless named): ``flash``: 32 layers ``[2, nb, 16, 8, 128]`` (vLLM's flash
layout, Llama-3-8B shard); ``flash-hnd``: the same presented NHD but stored HND (256-byte
rows); ``cross-layer``: per-layer views of one block-major ``[nb, 32, 2, 16, 8, 128]``
buffer; ``mla``: 61 layers ``[nb, 64, 576]`` (DeepSeek-V3, 64-token blocks); ``split-kv``:
32 layers of separate K and V ``[nb, 16, 8, 128]``; ``flash-fp8``: ``flash`` in
float8_e4m3fn. A chunk is 256 tokens.

Prints one JSON line per result and writes everything to ``--out`` (one JSON object).
Needs a torch CUDA build, cuda-python and NVRTC (bench/gpu_check.sh finds or installs them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lmkv_mp.engine import kernels
from lmkv_mp.engine.kernels import KernelCopier
from lmkv_mp.engine.paged import PagedKV

ROOT = Path(__file__).resolve().parents[1]

TARGET = 0.8
DEVICE = torch.device("cuda")
RESULTS: dict[str, Any] = {}


def emit(section: str, record: dict[str, Any]) -> None:
    print(json.dumps({"bench": "gpu_check", "section": section, **record}, sort_keys=True), flush=True)
    RESULTS.setdefault(section, []).append(record)


def caches(name: str, nb: int) -> tuple[PagedKV, int]:
    """(the cache, blocks per 256-token chunk)."""
    dev = DEVICE
    bf = torch.bfloat16
    if name in ("flash", "flash-fp8"):
        parts = [torch.empty(2, nb, 16, 8, 128, dtype=bf, device=dev) for _ in range(32)]
        if name == "flash-fp8":
            parts = [torch.empty(2, nb, 16, 8, 128, dtype=torch.float8_e4m3fn, device=dev) for _ in range(32)]
        return PagedKV(parts, num_blocks=nb, block_dim=1), 16
    if name == "flash-hnd":
        return PagedKV([torch.empty(2, nb, 8, 16, 128, dtype=bf, device=dev).transpose(2, 3) for _ in range(32)],
                       num_blocks=nb, block_dim=1), 16
    if name == "cross-layer":
        buf = torch.empty(nb, 32, 2, 16, 8, 128, dtype=bf, device=dev)
        return PagedKV([buf[:, i] for i in range(32)], num_blocks=nb, block_dim=0), 16
    if name == "mla":
        return PagedKV([torch.empty(nb, 64, 576, dtype=bf, device=dev) for _ in range(61)], num_blocks=nb,
                       block_dim=0), 4
    if name == "split-kv":
        return PagedKV({f"l{i}": (torch.empty(nb, 16, 8, 128, dtype=bf, device=dev),
                                  torch.empty(nb, 16, 8, 128, dtype=bf, device=dev)) for i in range(32)},
                       num_blocks=nb, block_dim=0), 16
    raise ValueError(name)


LAYOUTS = ("flash", "flash-hnd", "cross-layer", "mla", "split-kv", "flash-fp8")


def randomize(paged: PagedKV) -> None:
    for p in paged.parts:
        p.view(torch.uint8).copy_(torch.randint(0, 256, p.view(torch.uint8).shape, dtype=torch.uint8,
                                                device=p.device))


def gpu_time(fn: Callable[[], None], iters: int) -> float:
    """Seconds per call of the GPU work ``fn`` queues: the calls wait behind a GPU sleep,
    so they run back to back however slowly Python queues them."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)  # ~25 ms at 2 GHz: longer than queueing the calls
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def host_time(fn: Callable[[], None], iters: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = (time.perf_counter() - t) / iters
    torch.cuda.synchronize()
    return dt


def run_tests(quick: bool) -> None:
    cmd = [sys.executable, "-m", "pytest", "--noconftest", "-q", "-p", "no:cacheprovider", "tests/gpu"]
    if quick:
        cmd += ["-x"]
    t = time.monotonic()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=360,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    emit("tests_gpu", {"rc": proc.returncode, "summary": lines[-1] if lines else "", "seconds":
                       round(time.monotonic() - t, 1), "tail": "" if proc.returncode == 0 else
                       (proc.stdout[-4000:] + proc.stderr[-2000:])})


def check_layout(name: str, nb: int) -> None:
    paged, bpc = caches(name, nb)
    randomize(paged)
    copier = KernelCopier(paged)
    g = torch.Generator().manual_seed(1)
    ids = torch.randperm(nb, generator=g)[:bpc].tolist()
    n = paged.chunk_bytes(bpc)
    got, want = (torch.empty(n, dtype=torch.uint8, device=DEVICE) for _ in range(2))
    copier.gather(ids, got)
    paged.gather(ids, want)
    gather_equal = bool(torch.equal(got, want))
    cpu = PagedKV([p.cpu() for p in paged.parts], num_blocks=nb, block_dim=paged.specs[0].block_dim)
    cpu_slot = torch.empty(n, dtype=torch.uint8)
    cpu.gather(ids, cpu_slot)
    cpu_equal = bool(torch.equal(got.cpu(), cpu_slot))
    dst = torch.randperm(nb, generator=g)[:bpc].tolist()
    copier.scatter(got, dst)
    back = torch.empty_like(got)
    paged.gather(dst, back)
    emit("correctness", {"layout": name, "bytes": n, "gather_equal": gather_equal, "cpu_equal": cpu_equal,
                         "scatter_equal": bool(torch.equal(back, want)), "uses_kernels": copier.uses_kernels,
                         "reason": copier.reason})


def throughput(name: str, nb: int, iters: int, chunks: int = 1, tile: int = kernels.TILE_BYTES,
               section: str = "throughput") -> None:
    paged, bpc = caches(name, nb)
    copier = KernelCopier(paged, tile_bytes=tile)
    blocks = bpc * chunks
    ids = torch.randperm(nb)[:blocks].tolist()
    n = paged.chunk_bytes(blocks)
    slot, other = (torch.empty(n, dtype=torch.uint8, device=DEVICE) for _ in range(2))
    memcpy = gpu_time(lambda: other.copy_(slot), iters)
    for op, fn, ref in (("gather", lambda: copier.gather(ids, slot), lambda: paged.gather(ids, slot)),
                        ("scatter", lambda: copier.scatter(slot, ids), lambda: paged.scatter(slot, ids))):
        k = gpu_time(fn, iters)
        rec = {"layout": name, "op": op, "blocks": blocks, "bytes": n, "tile_bytes": tile,
               "kernel_gbps": round(n / k / 1e9, 1), "memcpy_gbps": round(n / memcpy / 1e9, 1),
               "ratio": round(memcpy / k, 3)}
        if section == "throughput":
            rec["torch_gbps"] = round(n / gpu_time(ref, max(3, iters // 5)) / 1e9, 1)
            rec["host_us"] = round(host_time(fn, iters) * 1e6, 1)
            rec["target"] = TARGET
        emit(section, rec)


def pinned(name: str, nb: int, iters: int, memory: str) -> None:
    """Kernels with a slot in host memory, reached through UVA, against cudaMemcpy D2H/H2D of
    the same bytes. ``memory``: ``torch-pinned`` (cudaHostAlloc) or ``registered-mmap`` (a
    shared mapping like the host pool's, cudaHostRegister'ed as a worker would pin it)."""
    paged, bpc = caches(name, nb)
    copier = KernelCopier(paged)
    kern = copier._kernels
    if kern is None:
        return
    ids_list = torch.randperm(nb)[:bpc].tolist()
    ids = torch.tensor(ids_list, device=DEVICE)
    n = paged.chunk_bytes(bpc)
    mm = None
    if memory == "torch-pinned":
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    else:
        mm = mmap.mmap(-1, n, flags=mmap.MAP_SHARED)
        host = torch.frombuffer(mm, dtype=torch.uint8)
        host.fill_(0)  # fault the pages in, as the pool is pre-faulted
        torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), n, 0))
    try:
        dev = torch.empty(n, dtype=torch.uint8, device=DEVICE)
        args, grid = kernels.launch_args(copier.plan, parts=copier._parts.data_ptr(),
                                         tile_part=copier._tile_part.data_ptr(), ids=ids.data_ptr(),
                                         slot=host.data_ptr(), n=bpc)
        check = torch.empty(n, dtype=torch.uint8, device=DEVICE)
        paged.gather(ids_list, check)
        kern.launch("gather", args, grid, kern.stream())
        torch.cuda.synchronize()
        equal = bool(torch.equal(host.to(DEVICE), check))
        for op, fn, ref in (("d2h_gather", lambda: kern.launch("gather", args, grid, kern.stream()),
                             lambda: host.copy_(dev, non_blocking=True)),
                            ("h2d_scatter", lambda: kern.launch("scatter", args, grid, kern.stream()),
                             lambda: dev.copy_(host, non_blocking=True))):
            k, m = gpu_time(fn, iters), gpu_time(ref, iters)
            emit("pinned", {"layout": name, "memory": memory, "op": op, "bytes": n,
                            "kernel_gbps": round(n / k / 1e9, 1), "memcpy_gbps": round(n / m / 1e9, 1),
                            "ratio": round(m / k, 3), "gather_equal": equal})
    finally:
        torch.cuda.synchronize()
        if mm is not None:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(host.data_ptr()))
            del host
            with contextlib.suppress(BufferError):  # a view still alive: the mapping goes with it
                mm.close()


def host_path(name: str, nb: int, iters: int, chunks: int = 8) -> None:
    """The CUDA worker's own path (cuda_path.CudaHostPath: the kernels gather into a device
    staging slot, one DMA per chunk to a shared mapping pinned as the worker pins the host
    pool; a load the reverse) for ``chunks`` 256-token chunks, against one cudaMemcpy
    D2H / H2D of the same bytes between device memory and the same pinned mapping. Both are
    timed on the host from the first call to completion, as the worker's job thread waits.
    Target: ratio >= 0.8. The bytes are checked against the torch path first."""
    from lmkv_mp.engine.cuda_path import CudaHostPath

    paged, bpc = caches(name, nb)
    randomize(paged)
    n = paged.chunk_bytes(bpc)
    mm = mmap.mmap(-1, n * chunks, flags=mmap.MAP_SHARED)
    host = torch.frombuffer(mm, dtype=torch.uint8)
    host.fill_(0)  # fault the pages in, as the pool is pre-faulted
    path = CudaHostPath(paged)
    g = torch.Generator().manual_seed(3)
    src, dst = (torch.randperm(nb, generator=g)[:bpc * chunks].tolist() for _ in range(2))
    stores = [(src[i * bpc:(i + 1) * bpc], i * n) for i in range(chunks)]
    loads = [(i * n, dst[i * bpc:(i + 1) * bpc], 0, bpc) for i in range(chunks)]
    try:
        want, back = (torch.empty(n * chunks, dtype=torch.uint8, device=DEVICE) for _ in range(2))
        for i in range(chunks):
            paged.gather(src[i * bpc:(i + 1) * bpc], want[i * n:(i + 1) * n])
        path.store(host, stores, n, None)  # pins the mapping on first use
        store_equal = bool(torch.equal(host.to(DEVICE), want))
        path.load(host, loads, n, None)
        for i in range(chunks):
            paged.gather(dst[i * bpc:(i + 1) * bpc], back[i * n:(i + 1) * n])
        load_equal = bool(torch.equal(back, want))
        dev = torch.empty(n * chunks, dtype=torch.uint8, device=DEVICE)

        def wall(fn: Callable[[], None]) -> float:
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t) / iters

        def d2h() -> None:
            host.copy_(dev, non_blocking=True)
            torch.cuda.current_stream().synchronize()

        def h2d() -> None:
            dev.copy_(host, non_blocking=True)
            torch.cuda.current_stream().synchronize()

        for op, fn, ref in (("store_d2h", lambda: path.store(host, stores, n, None), d2h),
                            ("load_h2d", lambda: path.load(host, loads, n, None), h2d)):
            k, m = wall(fn), wall(ref)
            emit("host_path", {"layout": name, "op": op, "chunks": chunks, "bytes": n * chunks,
                               "gbps": round(n * chunks / k / 1e9, 1), "memcpy_gbps": round(n * chunks / m / 1e9, 1),
                               "ratio": round(m / k, 3), "target": TARGET, "pinned": bool(path._pinned),
                               "uses_kernels": path.copier.uses_kernels, "store_equal": store_equal,
                               "load_equal": load_equal})
    finally:
        torch.cuda.synchronize()
        path.close()  # unpins before the mapping goes (with ``host``, when this returns)


def machine() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {"gpu": props.name, "cc": f"{props.major}.{props.minor}",
                            "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "python": platform.python_version(), "host": platform.node()}
    try:
        info["cuda_bindings"] = metadata.version("cuda-bindings")
    except metadata.PackageNotFoundError:  # an old cuda-python without the split package
        info["cuda_bindings"] = metadata.version("cuda-python")
    t = time.monotonic()
    k = kernels.load(torch.device("cuda", 0))
    info["kernel_load_s"] = round(time.monotonic() - t, 2)
    info["kernel_sources"] = k.sources
    t = time.monotonic()
    kernels.compile_cubin("gather", k.cc)
    info["nvrtc_compile_gather_s"] = round(time.monotonic() - t, 2)
    return info


def section(name: str, fn: Callable[[], None]) -> None:
    """Run one part of the check; a part that raises is recorded, and the rest still run."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - recorded in the results file, which is what this program is for
        emit("errors", {"section": name, "traceback": traceback.format_exc()[-4000:]})
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    ap.add_argument("--quick", action="store_true", help="fewer iterations and layouts")
    ap.add_argument("--skip-tests", action="store_true", help="do not run tests/gpu")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    RESULTS["machine"] = machine()
    print(json.dumps({"bench": "gpu_check", "machine": RESULTS["machine"]}), flush=True)
    iters = 10 if a.quick else 50
    for name in LAYOUTS:
        section(f"correctness {name}", lambda name=name: check_layout(name, 256))
    for name in LAYOUTS[: 2 if a.quick else None]:
        section(f"throughput {name}", lambda name=name: throughput(name, 1024, iters))
        section(f"throughput {name} x4", lambda name=name: throughput(name, 1024, iters, chunks=4))
    for tile in (8 << 10, 16 << 10, 64 << 10, 128 << 10):
        for name in ("flash", "flash-hnd"):
            section(f"tiles {name} {tile}",
                    lambda name=name, tile=tile: throughput(name, 1024, iters, tile=tile, section="tiles"))
    for memory in ("torch-pinned", "registered-mmap"):
        section(f"pinned {memory}", lambda memory=memory: pinned("flash", 1024, max(5, iters // 5), memory))
    for name in ("flash", "mla"):
        section(f"host_path {name}", lambda name=name: host_path(name, 1024, max(5, iters // 5)))
    if not a.skip_tests:
        section("tests_gpu", lambda: run_tests(a.quick))
    d2d = RESULTS.get("throughput", [])
    RESULTS["summary"] = {
        "errors": len(RESULTS.get("errors", [])),
        "correct": bool(RESULTS.get("correctness")) and all(
            r["gather_equal"] and r["cpu_equal"] and r["scatter_equal"] and r["uses_kernels"]
            for r in RESULTS.get("correctness", [])),
        "tests_passed": all(r["rc"] == 0 for r in RESULTS.get("tests_gpu", [{"rc": 0}])),
        "min_d2d_ratio": min((r["ratio"] for r in d2d), default=None),
        "d2d_target": TARGET,
        "d2d_target_met": bool(d2d) and all(r["ratio"] >= TARGET for r in d2d),
        "min_host_path_ratio": min((r["ratio"] for r in RESULTS.get("host_path", [])), default=None),
        "host_path_target_met": bool(RESULTS.get("host_path")) and all(
            r["ratio"] >= TARGET and r["store_equal"] and r["load_equal"] for r in RESULTS["host_path"]),
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps({"bench": "gpu_check", "summary": RESULTS["summary"]}), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(RESULTS, indent=1, sort_keys=True) + "\n")
    print(f"gpu_check: wrote {a.out}", file=sys.stderr)
    s = RESULTS["summary"]
    return 0 if s["correct"] and s["tests_passed"] and not s["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
