"""Peer: LMCache 0.5.6's multiprocess server, driven by its own ``lmcache bench server --mode cpu``.

LMCache's MP server is the closest thing to lmkv_mp: one cache process per node, engines
talk to it over ZeroMQ, KV bytes go through a POSIX shm pool. This installs LMCache into
``bench/peers/.venv-lmcache`` (never lmkv_mp's venv), starts ``lmcache server`` on free
loopback ports with an shm pool and its usage telemetry off, and runs LMCache's own
benchmark client against it:

* datapath, in each CPU transfer mode (``--transfers``): ``engine_driven`` (the worker
  copies between its paged KV and the server's pool: PREPARE -> copy -> COMMIT, as lmkv's
  workers do) and ``lmcache_driven`` (the worker registers its KV cache in shm and the
  server copies: STORE / RETRIEVE); on bench/datapath.py's Llama-3-8B-like shard (32
  layers, 8 KV heads, head size 128, 16-bit, block size 16: 32 MiB per 256-token chunk),
  ``--chunks`` chunks per request. Each sequence is a cold request (LOOKUP miss -> STORE)
  then a warm one (LOOKUP hit -> RETRIEVE); its client times STORE and RETRIEVE alone (no
  LOOKUP, which flatters LMCache's load against ours, whose load includes its pinned
  LOOKUP). Its blocks are consecutive; datapath.py's are at random block ids (harder).
* lookup: a 32k-token prompt (128 chunks, all present on the warm pass) with a tiny KV shape
  (the key lookup does not depend on the chunk's size). LMCache's LOOKUP takes token ids and
  hashes them in the server; its client then polls QUERY_PREFETCH_STATUS until the count is
  ready: the time of both is what its benchmark reports and what vLLM waits for.

LMCache's client does the copies with torch; it runs with ``--client-threads`` torch threads
(default 1, as bench/datapath.py's copies and the vLLM connector's copy thread).
Every retrieved sequence's KV is checked by LMCache's benchmark itself (checksum of the
stored blocks vs the retrieved ones); the run fails on any mismatch. ``warm_misses``
counts warm LOOKUPs that missed a just-stored sequence (seen in ``lmcache_driven`` mode). The first ``--warmup`` sequences
are dropped (the shm pool's pages are faulted in on first use). One JSON line per op:

    {"peer":"lmcache","op":"store"|"load","transfer":…,"gbps":…,"ms":…,…}
    {"peer":"lmcache","op":"lookup","chunks":128,"p50_us":…,"p99_us":…,…}

``server_cpu_s_per_gb``: CPU seconds of the server process (not of the client, which does
the copies) per GB moved in the datapath run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYERS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE, CHUNK_TOKENS = 32, 8, 128, 16, 256  # bench/datapath.py's shard
TOKEN_BYTES = LAYERS * 2 * KV_HEADS * HEAD_SIZE * 2
LINE = re.compile(r"\[seq (\d+)/(cold|warm)\] (LOOKUP|STORE|RETRIEVE): (.*?)\((?:(\d+) tokens, )?([\d.]+) ms")
# No usage reports to the vendor's endpoint (there is no network here, and a bench must not try).
QUIET_ENV = {"LMCACHE_DISABLE_BANNER": "1", "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1",
             "LMCACHE_USAGE_TRACK_URL": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def lmcache_server(venv_bin: Path, l1_gb: float, env: dict[str, str]):
    """``lmcache server`` with an shm pool for engine-driven CPU transfer; stopped on exit."""
    rpc, http = _free_port(), _free_port()
    log = Path(tempfile.mkdtemp(prefix="lmkv-lmcache-peer-")) / "server.log"
    cmd = [str(venv_bin / "lmcache"), "server", "--host", "127.0.0.1", "--port", str(rpc), "--chunk-size",
           str(CHUNK_TOKENS), "--supported-transfer-mode", "auto", "--shm-name", f"lmkv-peer-{os.getpid()}",
           "--l1-size-gb", str(l1_gb), "--eviction-policy", "LRU", "--http-host", "127.0.0.1",
           "--http-port", str(http), "--disable-metrics", "--disable-observability"]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (_listening(rpc) and _listening(http)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lmcache server did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)  # its readiness is only visible as listening sockets
        yield proc, rpc, http
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(log.parent, ignore_errors=True)


def bench_server(venv_bin: Path, env: dict[str, str], rpc: int, http: int, shape: str, tokens: int, seqs: int,
                 start: int, transfer: str = "engine_driven") -> tuple[dict[str, list[float]], dict]:
    """One run of LMCache's own benchmark; per-sequence latencies (ms) by 'cold.STORE' etc., and its summary."""
    cmd = [str(venv_bin / "lmcache"), "bench", "server", "--mode", "cpu", "--transfer-mode", transfer,
           "--rpc-url", f"tcp://127.0.0.1:{rpc}",
           "--url", f"http://127.0.0.1:{http}", "--kvcache-shape-spec", shape, "--num-tokens", str(tokens - 1),
           "--start", str(start), "--end", str(start + seqs), "--interval", "0", "--format", "json"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, check=False)
    if run.returncode:
        raise RuntimeError(f"lmcache bench server failed ({run.returncode}):\n{(run.stdout + run.stderr)[-3000:]}")
    lat: dict[str, list[float]] = {}
    for m in LINE.finditer(run.stdout):
        lat.setdefault(f"{m[2]}.{m[3]}", []).append(float(m[6]))
    summary = json.loads(run.stdout[run.stdout.index("\n{") + 1:run.stdout.rindex("}") + 1])["metrics"]
    ok = summary["results"]
    if ok["checksum_fail"]:
        raise RuntimeError(f"LMCache returned KV that differs from what was stored: {ok}")
    # In lmcache_driven mode a warm LOOKUP right after its STORE sometimes misses (the store
    # is still being committed); that sequence has no RETRIEVE and no checksum pair.
    if len(lat.get("cold.STORE", [])) != seqs or len(lat.get("warm.RETRIEVE", [])) < 2:
        raise RuntimeError(f"could not read STORE/RETRIEVE latencies from its output:\n{run.stdout[-3000:]}")
    return lat, summary


def run(quick: bool = False, chunks: int | None = None, iters: int | None = None, lookup_iters: int | None = None,
        lookup_tokens: int = 32768, warmup: int = 1, client_threads: int = 1,
        transfers: tuple[str, ...] | None = None) -> list[dict]:
    """Install the peer, start its server, run its benchmark; the result lines."""
    sys.path.insert(0, str(HERE.parent))
    from common import machine, percentile, proc_cpu_seconds
    from peer_env import ensure_venv

    venv_bin = ensure_venv("lmcache", log=lambda m: print(m, file=sys.stderr)).parent
    chunks = chunks or (4 if quick else 8)
    iters = iters or (3 if quick else 10)
    lookup_iters = lookup_iters or (10 if quick else 40)
    transfers = transfers or (("engine_driven",) if quick else ("engine_driven", "lmcache_driven"))
    env = {**os.environ, **QUIET_ENV}
    env.pop("PYTHONPATH", None)
    client_env = {**env, "OMP_NUM_THREADS": str(client_threads)} if client_threads else env
    tokens = chunks * CHUNK_TOKENS
    nb = 2 * tokens // BLOCK_SIZE + CHUNK_TOKENS // BLOCK_SIZE  # room for the bench's rotating block offsets
    shape = f"(2,{nb},{BLOCK_SIZE},{KV_HEADS},{HEAD_SIZE}):float16:{LAYERS}"
    seqs = warmup + iters
    l1_gb = max(2, -(-(seqs * tokens * TOKEN_BYTES * 5 // 4) // (1 << 30)))  # every sequence fits under the watermark
    lk_nb = 2 * lookup_tokens // BLOCK_SIZE + CHUNK_TOKENS // BLOCK_SIZE
    lk_shape = f"(2,{lk_nb},{BLOCK_SIZE},1,16):float16:1"
    probe = "import importlib.metadata as m, torch; print(m.version('lmcache'), torch.__version__, " \
            "torch.get_num_threads())"
    version = subprocess.run([str(venv_bin / "python"), "-c", probe],
                             capture_output=True, text=True, env=client_env, check=True).stdout.split()
    base = {"peer": "lmcache", "lmcache": version[0], "client_torch": version[1], "client_torch_threads":
            int(version[2]), "mode": "cpu", "machine": machine()}
    out = []
    with lmcache_server(venv_bin, l1_gb * len(transfers), env) as (proc, rpc, http):
        for i, transfer in enumerate(transfers):
            cpu0 = proc_cpu_seconds(proc.pid)
            lat, summary = bench_server(venv_bin, client_env, rpc, http, shape, tokens, seqs, start=1000 * i,
                                        transfer=transfer)
            cpu = proc_cpu_seconds(proc.pid) - cpu0
            moved = tokens * TOKEN_BYTES
            per_gb = cpu / (2 * seqs * moved / 1e9)
            for op, key, section in (("store", "cold.STORE", "cold_store"), ("load", "warm.RETRIEVE", "warm_retrieve")):
                ms = lat[key][warmup:]
                med = statistics.median(ms) / 1e3
                out.append({**base, "op": op, "transfer": transfer, "gbps": round(moved / med / 1e9, 3),
                            "ms": round(med * 1e3, 2), "gbps_min": round(moved / (max(ms) / 1e3) / 1e9, 3),
                            "gbps_max": round(moved / (min(ms) / 1e3) / 1e9, 3), "chunks": chunks,
                            "chunk_bytes": CHUNK_TOKENS * TOKEN_BYTES, "iters": len(ms), "kvcache_shape_spec": shape,
                            "lookup_p50_us": round(percentile(lat["warm.LOOKUP"][warmup:], 50) * 1e3, 1),
                            "warm_misses": seqs - len(lat["warm.RETRIEVE"]),
                            "server_cpu_s_per_gb": round(per_gb, 3), "l1_size_gb": l1_gb * len(transfers),
                            # its own summary (warm-up sequences included), to cross-check this parse
                            "lmcache_summary_p50_ms": summary[section][f"{section}_p50"]})
        lk, lk_summary = bench_server(venv_bin, client_env, rpc, http, lk_shape, lookup_tokens, warmup + lookup_iters,
                                      start=10_000)
        xs = lk["warm.LOOKUP"][warmup:]
        out.append({**base, "op": "lookup", "chunks": lookup_tokens // CHUNK_TOKENS,
                    "p50_us": round(percentile(xs, 50) * 1e3, 1),
                    "p99_us": round(percentile(xs, 99) * 1e3, 1), "min_us": round(min(xs) * 1e3, 1), "iters": len(xs),
                    "transfer": transfers[0],
                    "includes": "server-side token hashing + LOOKUP + QUERY_PREFETCH_STATUS poll",
                    "kvcache_shape_spec": lk_shape,
                    "lmcache_summary_p50_ms": lk_summary["warm_lookup"]["warm_lookup_p50"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--chunks", type=int, default=None, help="chunks per request [8; quick 4]")
    ap.add_argument("--iters", type=int, default=None, help="timed sequences [10; quick 3]")
    ap.add_argument("--lookup-iters", type=int, default=None, help="timed 128-chunk lookups [40; quick 10]")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first sequences [1]")
    ap.add_argument("--client-threads", type=int, default=1,
                    help="torch threads of LMCache's benchmark client, which does the copies (default 1, as "
                         "bench/datapath.py's copies; 0 = torch's choice, which on a busy 2-core machine "
                         "can be several times slower)")
    ap.add_argument("--transfers", default=None,
                    help="comma-separated LMCache transfer modes to run [engine_driven,lmcache_driven; quick "
                         "engine_driven]")
    args = ap.parse_args()
    for rec in run(args.quick, args.chunks, args.iters, args.lookup_iters, warmup=args.warmup,
                   client_threads=args.client_threads,
                   transfers=tuple(args.transfers.split(",")) if args.transfers else None):
        print(json.dumps(rec, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
