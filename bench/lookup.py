"""LOOKUP latency for a long prompt, against a raw ZeroMQ round trip of the same size.

Every client is its own process. The sidecar holds all of the prompt's chunks, so each
LOOKUP walks the whole chain (the worst case). The limit is a DEALER/ROUTER echo server
that does nothing but send back a reply as large as the sidecar's, measured in the same
run with the same number of client processes. One JSON line per client count:

    {"bench":"lookup","clients":N,"p50_us":…,"p99_us":…,"zmq_p50_us":…,"ratio_p50":…}

``--percentiles`` adds the whole latency distribution of both sides, percentiles 0 to 100
in steps of 1 (``percentiles_us`` and ``zmq_percentiles_us``, 101 values each), for plots
of the tail that p50/p99 alone hide.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, percentile, sidecar  # noqa: E402

from lmkv_mp.wire import protocol as P  # noqa: E402
from lmkv_mp.engine.client import SidecarClient  # noqa: E402
from lmkv_mp.config import ClientConfig  # noqa: E402
from lmkv_mp.wire.keys import chain_hashes  # noqa: E402

NS = bytes(range(16))
WARMUP = 200


def _sidecar_client(cfg: ClientConfig, hashes: bytes, n: int, pin: bool, q: mp.Queue) -> None:
    client = SidecarClient(cfg, role="scheduler", heartbeat=False)
    client.connect()
    for _ in range(WARMUP):  # first calls pay imports, page faults and cache misses
        client.release(client.lookup([NS], hashes, pin=pin).lease_id)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.lookup([NS], hashes, pin=pin)
        lat.append(time.perf_counter() - t0)
        if pin:
            client.release(r.lease_id)
        assert r.hits == len(hashes) // 16, r
    client.close()
    q.put(lat)


def _echo_server(endpoint: str, reply_bytes: int, ready: mp.Event) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.set()
    payload = os.urandom(reply_bytes)
    while True:
        ident, _op, _body = sock.recv_multipart()
        if _op == b"q":
            break
        sock.send_multipart([ident, b"\x00", payload])


def _raw_client(endpoint: str, request: list[bytes], n: int, q: mp.Queue) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    for _ in range(WARMUP):
        sock.send_multipart(request)
        sock.recv_multipart()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        sock.send_multipart(request)
        sock.recv_multipart()
        lat.append(time.perf_counter() - t0)
    q.put(lat)


def _run_clients(target, args_for, clients: int) -> list[float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for, q)) for _ in range(clients)]
    for p in procs:
        p.start()
    lat: list[float] = []
    for _ in procs:
        lat.extend(q.get(timeout=600))
    for p in procs:
        p.join()
    return lat


def distribution_us(lat: list[float]) -> list[float]:
    """Percentiles 0, 1, ..., 100 of ``lat`` (seconds) in µs, as ``percentile`` computes p50/p99."""
    return [round(percentile(lat, q) * 1e6, 1) for q in range(101)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--pin", action="store_true", help="pinned LOOKUP (+ RELEASE, not timed)")
    ap.add_argument("--percentiles", action="store_true",
                    help="add percentiles 0..100 of ours and of the raw round trip to each line (the distribution)")
    ap.add_argument("--quick", action="store_true", help="CI-sized run (under a minute)")
    args = ap.parse_args()
    iters = 500 if args.quick else args.iters
    with sidecar("256MiB", "4MiB", "--chunk-tokens", str(args.chunk_tokens)) as sc:
        writer = SidecarClient(sc.client_config(), role="worker", heartbeat=False,
                               namespaces=[P.NamespaceInfo(NS, 16384, "bench")])
        writer.connect()
        hashes = chain_hashes(list(range(args.tokens)), args.chunk_tokens, writer.hello.hash_key)
        res = writer.reserve(NS, hashes)
        assert res is not None and writer.commit(res.lease_id) == len(hashes) // 16
        probe = P.encode_reply(P.LookupReply(1, b"b" * 16, len(hashes) // 16))
        request = P.encode_request(P.Lookup(1, [NS], hashes, args.pin))
        if args.pin:
            pinned = writer.lookup([NS], hashes, pin=True)
            probe = P.encode_reply(P.LookupReply(1, b"b" * 16, pinned.hits, pinned.lease_id,
                                                 [P.pack_u64(o) for o in pinned.offsets], [bytes(pinned.hits)]))
            writer.release(pinned.lease_id)
        reply_bytes = len(probe[1])
        raw_ep = f"ipc://{tempfile.mkdtemp(prefix='lmkv-zmq-')}/echo.sock"
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        echo = ctx.Process(target=_echo_server, args=(raw_ep, reply_bytes, ready), daemon=True)
        echo.start()
        ready.wait(30)
        for clients in [int(c) for c in args.clients.split(",")]:
            lat = _run_clients(_sidecar_client, (sc.client_config(), hashes, iters, args.pin), clients)
            raw = _run_clients(_raw_client, (raw_ep, [request[0], request[1]], iters), clients)
            p50, p99, z50 = percentile(lat, 50) * 1e6, percentile(lat, 99) * 1e6, percentile(raw, 50) * 1e6
            emit({"bench": "lookup", "clients": clients, "chunks": len(hashes) // 16, "pin": args.pin,
                  "p50_us": round(p50, 1), "p99_us": round(p99, 1), "zmq_p50_us": round(z50, 1),
                  "zmq_p99_us": round(percentile(raw, 99) * 1e6, 1), "ratio_p50": round(p50 / z50, 2),
                  "request_bytes": len(request[1]), "reply_bytes": reply_bytes, "iters": iters,
                  **({"percentiles_us": distribution_us(lat), "zmq_percentiles_us": distribution_us(raw)}
                     if args.percentiles else {}), "machine": machine()})
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(raw_ep)
        sock.send_multipart([b"q", b""])
        echo.join(5)
        writer.close()


if __name__ == "__main__":
    main()
