"""Peer: a local redis-server holding the same chunks as bench/datapath.py, driven by redis-py.

What many deployments use today instead of a node-local cache: a Redis next to the engine,
one value per chunk. This starts a private ``redis-server`` (no persistence, a temp dir,
a free loopback port and a unix socket) and drives it from redis-py + hiredis installed in
``bench/peers/.venv-redis`` (never in lmkv_mp's venv), over TCP and over the unix socket:

* store: SET of each chunk, and one MSET of the prompt's chunks;
* load:  GET of each chunk, and one MGET;
* lookup: is each of a 32k-token prompt's 128 chunk keys present (pipelined EXISTS per key:
  what a prefix count needs), one ``EXISTS k1 … k128`` (a count only: a lower bound), and a
  PING round trip (the floor).

The values are ready-made ``bytes`` and GET's reply is left as ``bytes``: no gather from or
scatter into a paged KV cache, which bench/datapath.py's numbers include. This flatters
Redis; a ratio that holds against it holds against a real Redis connector. Keys are 32 bytes
(namespace + chain hash), as lmkv's. One JSON line per (transport, op, api):

    {"peer":"redis","op":"store"|"load","api":"set"|"mset"|…,"gbps":…,"ms":…,…}
    {"peer":"redis","op":"lookup","api":"exists_pipelined"|"exists_multi","p50_us":…,…}

``server_cpu_s_per_gb``: redis-server's CPU seconds per GB moved in that op.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
CHUNK_BYTES = 256 * 32 * 8 * 2 * 128 * 2  # bench/datapath.py: 256 tokens x 32 layers x 8 KV heads x K+V x 128 x bf16
WARMUP = 200


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def measure(args: argparse.Namespace) -> None:
    """Child side, in the peer's venv: redis-py only, one JSON line per result on stdout."""
    import redis
    import redis.utils

    kw = {"unix_socket_path": args.unix} if args.transport == "unix" else {"host": "127.0.0.1", "port": args.port}
    r = redis.Redis(**kw, socket_timeout=60, socket_read_size=args.read_size)
    for _ in range(100):
        with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
            if r.ping():
                break
        time.sleep(0.05)  # redis-server is starting; nothing to wait on but the socket
    parser = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "python"
    common = {"peer": "redis", "transport": args.transport, "read_size": args.read_size,
              "redis_py": redis.__version__, "parser": parser}
    values = [os.urandom(args.chunk_bytes) for _ in range(args.chunks)]
    ns = os.urandom(16)

    def keys(tag: int) -> list[bytes]:
        return [ns + tag.to_bytes(8, "little") + i.to_bytes(8, "little") for i in range(args.chunks)]

    def set_each(ks: list[bytes]) -> None:
        for k, v in zip(ks, values):
            r.set(k, v)

    def get_each(ks: list[bytes]) -> None:
        got = [r.get(k) for k in ks]
        if any(g is None or len(g) != args.chunk_bytes for g in got):
            raise RuntimeError("GET missed a chunk")

    def mset(ks: list[bytes]) -> None:
        r.mset(dict(zip(ks, values)))

    def mget(ks: list[bytes]) -> None:
        got = r.mget(ks)
        if any(g is None or len(g) != args.chunk_bytes for g in got):
            raise RuntimeError("MGET missed a chunk")

    # Each iteration stores a fresh prompt and loads it back, per API, then drops it
    # (untimed) so Redis holds one prompt at a time, as bench/datapath.py's pool holds many.
    times: dict[str, list[float]] = {k: [] for k in ("set", "get", "mset", "mget")}
    cpu: dict[str, float] = dict.fromkeys(times, 0.0)
    tag = 0
    for it in range(args.iters + 1):  # iteration 0 is the warm-up
        for store, load in (("set", "get"), ("mset", "mget")):
            tag += 1
            ks = keys(tag)
            for name in (store, load):
                fn = {"set": set_each, "mset": mset, "get": get_each, "mget": mget}[name]
                c0, t0 = _cpu_seconds(args.server_pid), time.perf_counter()
                fn(ks)
                t1, c1 = time.perf_counter(), _cpu_seconds(args.server_pid)
                if it:
                    times[name].append(t1 - t0)
                    cpu[name] += c1 - c0
            if it == 0 and r.get(ks[-1]) != values[-1]:
                raise RuntimeError("the bytes read back differ from the bytes written")
            r.delete(*ks)
    moved = args.chunks * args.chunk_bytes
    for name in ("set", "mset", "get", "mget"):
        med = statistics.median(times[name])
        print(json.dumps({**common, "op": "store" if name in ("set", "mset") else "load", "api": name,
                          "gbps": round(moved / med / 1e9, 3), "ms": round(med * 1e3, 2),
                          "gbps_min": round(moved / max(times[name]) / 1e9, 3),
                          "gbps_max": round(moved / min(times[name]) / 1e9, 3),
                          "server_cpu_s_per_gb": round(cpu[name] / (moved * args.iters / 1e9), 3),
                          "chunks": args.chunks, "chunk_bytes": args.chunk_bytes, "iters": args.iters}), flush=True)

    lkeys = [ns + b"lookup\0\0" + i.to_bytes(8, "little") for i in range(args.lookup_chunks)]
    r.mset({k: b"\x01" for k in lkeys})  # existence does not depend on the value's size

    def pipelined() -> int:
        pipe = r.pipeline(transaction=False)
        for k in lkeys:
            pipe.exists(k)
        hits = 0
        for present in pipe.execute():
            if not present:
                break
            hits += 1
        return hits

    def multi() -> int:
        return r.exists(*lkeys)

    lat: dict[str, list[float]] = {}
    for name, fn in (("exists_pipelined", pipelined), ("exists_multi", multi), ("ping", r.ping)):
        for _ in range(WARMUP):
            fn()
        xs = []
        for _ in range(args.lookup_iters):
            t0 = time.perf_counter()
            got = fn()
            xs.append(time.perf_counter() - t0)
            if name != "ping" and got != args.lookup_chunks:
                raise RuntimeError(f"{name} found {got} of {args.lookup_chunks} keys")
        lat[name] = xs
    for name in ("exists_pipelined", "exists_multi"):
        print(json.dumps({**common, "op": "lookup", "api": name, "chunks": args.lookup_chunks,
                          "p50_us": round(_pct(lat[name], 50) * 1e6, 1), "p99_us": round(_pct(lat[name], 99) * 1e6, 1),
                          "ping_p50_us": round(_pct(lat["ping"], 50) * 1e6, 1), "iters": args.lookup_iters}),
              flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(max_bytes: int):
    """A private redis-server: loopback TCP port + unix socket in a temp dir, no persistence."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="lmkv-redis-peer-"))
    port, unix = _free_port(), tmp / "redis.sock"
    bulk = max(512 << 20, 2 * max_bytes)
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", str(unix), "--unixsocketperm", "700",
           "--save", "", "--appendonly", "no", "--dir", str(tmp), "--logfile", str(tmp / "redis.log"),
           "--proto-max-bulk-len", str(bulk), "--client-query-buffer-limit", str(bulk)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not unix.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(tmp / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.02)  # no readiness signal without a client library in this process
        yield proc, port, unix, exe
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def run(quick: bool = False, transports: str = "tcp,unix", chunks: int | None = None, iters: int | None = None,
        lookup_iters: int | None = None, chunk_bytes: int = CHUNK_BYTES, lookup_chunks: int = 128,
        read_size: int = 65536) -> list[dict]:
    """Parent side (lmkv_mp's venv): install the peer, start Redis, run the client; the result lines."""
    sys.path.insert(0, str(HERE.parent))
    from common import machine
    from peer_env import ensure_venv

    py = ensure_venv("redis", log=lambda m: print(m, file=sys.stderr))
    chunks = chunks or (4 if quick else 8)
    iters = iters or (3 if quick else 10)
    lookup_iters = lookup_iters or (500 if quick else 3000)
    version = subprocess.run([shutil.which("redis-server") or "redis-server", "--version"], capture_output=True,
                             text=True, check=True).stdout.split()
    out = []
    with redis_server(chunks * chunk_bytes) as (proc, port, unix, _exe):
        for transport in transports.split(","):
            child = subprocess.run(
                [str(py), __file__, "--child", "--transport", transport, "--port", str(port), "--unix", str(unix),
                 "--server-pid", str(proc.pid), "--chunks", str(chunks), "--iters", str(iters),
                 "--chunk-bytes", str(chunk_bytes), "--lookup-chunks", str(lookup_chunks),
                 "--lookup-iters", str(lookup_iters), "--read-size", str(read_size)],
                capture_output=True, text=True, check=False)
            if child.returncode:
                raise RuntimeError(f"the redis client failed:\n{child.stderr[-3000:]}")
            for line in child.stdout.splitlines():
                out.append({**json.loads(line), "redis_server": next((v.split("=", 1)[1] for v in version
                                                                      if v.startswith("v=")), "?"),
                            "machine": machine()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run (under a minute)")
    ap.add_argument("--transports", default="tcp,unix", help="comma-separated: tcp, unix")
    ap.add_argument("--chunks", type=int, default=None, help="chunks per prompt [8; quick 4]")
    ap.add_argument("--iters", type=int, default=None, help="timed prompts per API [10; quick 3]")
    ap.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES)
    ap.add_argument("--lookup-chunks", type=int, default=128)
    ap.add_argument("--lookup-iters", type=int, default=None, help="[3000; quick 500]")
    ap.add_argument("--read-size", type=int, default=65536,
                    help="redis-py's socket_read_size: bytes per recv while reading a reply [redis-py's default]")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--transport", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--unix", help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        measure(args)
        return
    for rec in run(args.quick, args.transports, args.chunks, args.iters, args.lookup_iters, args.chunk_bytes,
                   args.lookup_chunks, args.read_size):
        print(json.dumps(rec, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
