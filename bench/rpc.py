"""Latency of each data-path call, back to back and after the caller was busy or idle, against
a raw ZeroMQ round trip under the same conditions.

A worker calls the sidecar around its copies: RESERVE and COMMIT around a store's gather,
a pinned LOOKUP and RELEASE around a load's scatter. The calls are short; between them the
worker copies for milliseconds, and every thread on the path (the caller, its ZeroMQ I/O
thread, the sidecar's I/O thread and loop) may fall idle. Three modes, each a loop of
RESERVE, COMMIT, LOOKUP (pinned), RELEASE and PING on ``--chunks`` chunks of 32 MiB (never
copied: the sidecar only hands out slots; the pool holds two rounds, so RESERVE evicts as in
a full pool):

* ``back_to_back``: the calls one after another;
* ``after_copy``: before each call, the caller copies ``--copy-mib`` MiB (a prompt's gather);
* ``after_sleep``: before each call, the caller sleeps ``--sleep-ms`` (idle threads alone).

The limit is a DEALER/ROUTER echo of a small message in another process, timed in the same
mode and the same run. ``server_us`` (back_to_back only) is the sidecar's own mean time per
op, from its ``request_seconds`` histogram (decode to reply handed to ZeroMQ). One line
per mode and op:

    {"bench":"rpc","mode":…,"op":…,"p50_us":…,"raw_p50_us":…,"server_us":…}
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, sidecar  # noqa: E402

from lmkv_mp.wire import protocol as P  # noqa: E402
from lmkv_mp.engine.client import SidecarClient  # noqa: E402
from lmkv_mp.wire.keys import chain_hashes  # noqa: E402

NS = bytes(range(16))
CHUNK_BYTES = 32 << 20
OPS = ("RESERVE", "COMMIT", "LOOKUP", "RELEASE", "PING")


def _echo(endpoint: str, ready: mp.Event) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.set()
    while True:
        ident, op, _ = sock.recv_multipart()
        if op == b"q":
            break
        sock.send_multipart([ident, b"\x00", b"x" * 64])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=40, help="calls of each op per mode [40; quick 8]")
    ap.add_argument("--chunks", type=int, default=8, help="chunks per RESERVE/LOOKUP [8]")
    ap.add_argument("--copy-mib", type=int, default=256, help="MiB copied before each call in after_copy [256]")
    ap.add_argument("--sleep-ms", type=float, default=20.0, help="sleep before each call in after_sleep [20]")
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    args = ap.parse_args()
    iters = 8 if args.quick else args.iters
    copy_bytes = (16 if args.quick else args.copy_mib) << 20
    src = torch.ones(copy_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    pause: dict[str, Callable[[], None]] = {
        "back_to_back": lambda: None,
        "after_copy": lambda: dst.copy_(src),
        "after_sleep": lambda: time.sleep(args.sleep_ms / 1e3),
    }
    # Two rounds of chunks fit: from the third round on, each RESERVE evicts the chunks of
    # the round before last, as RESERVE does in a full pool.
    pool = f"{(2 * args.chunks * CHUNK_BYTES >> 20) + 64}MiB"
    with sidecar(pool, "64MiB") as sc:
        client = SidecarClient(sc.client_config(), role="worker", heartbeat=False,
                               namespaces=[P.NamespaceInfo(NS, CHUNK_BYTES, "bench")])
        if not client.connect() or client.hello is None:
            raise RuntimeError("HELLO failed")
        endpoint = f"ipc://{tempfile.mkdtemp(prefix='lmkv-rpc-')}/echo.sock"
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        echo = ctx.Process(target=_echo, args=(endpoint, ready), daemon=True)
        echo.start()
        ready.wait(30)
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.connect(endpoint)
        seq = 0
        try:
            for mode, before in pause.items():
                times: dict[str, list[float]] = {op: [] for op in (*OPS, "raw")}

                def timed(op: str, fn: Callable[[], object]) -> object:
                    before()
                    t = time.perf_counter()
                    out = fn()
                    times[op].append(time.perf_counter() - t)
                    return out

                for _ in range(iters + 2):  # the first two rounds are warm-up
                    seq += 1
                    tokens = list(range(seq * 10**6, seq * 10**6 + args.chunks * 256))
                    hashes = chain_hashes(tokens, 256, client.hello.hash_key)
                    res = timed("RESERVE", lambda: client.reserve(NS, hashes))
                    if res is None or len(res.writable()) != args.chunks:
                        raise RuntimeError("RESERVE gave no room")
                    timed("COMMIT", lambda: client.commit(res.lease_id))
                    found = timed("LOOKUP", lambda: client.lookup([NS], hashes, pin=True))
                    timed("RELEASE", lambda: client.release(found.lease_id))
                    timed("PING", client.ping)
                    timed("raw", lambda: (raw.send_multipart([b"\x06", b"ping"]), raw.recv_multipart()))
                server = {}
                if mode == "back_to_back":
                    ops = client.stats()["request_seconds"]["ops"]
                    server = {op: ops[op]["sum"] / max(1, sum(ops[op]["counts"])) * 1e6 for op in OPS if op in ops}
                raw_p50 = statistics.median(times["raw"][2:]) * 1e6
                for op in OPS:
                    p50 = statistics.median(times[op][2:]) * 1e6
                    emit({"bench": "rpc", "mode": mode, "op": op, "iters": iters, "chunks": args.chunks,
                          "p50_us": round(p50, 1), "max_us": round(max(times[op][2:]) * 1e6, 1),
                          "raw_p50_us": round(raw_p50, 1), "ratio_to_raw": round(p50 / raw_p50, 2),
                          **({"server_us": round(server[op], 1)} if op in server else {}),
                          "copy_mib": copy_bytes >> 20 if mode == "after_copy" else 0,
                          "sleep_ms": args.sleep_ms if mode == "after_sleep" else 0, "machine": machine()})
        finally:
            raw.send_multipart([b"q", b""])
            raw.close(linger=0)
            echo.join(5)
            client.close()


if __name__ == "__main__":
    main()
