"""Faults: writers and sidecars SIGKILLed mid-flight, and hostile frames on the control socket.

The promises (ARCHITECTURE §7): a dead writer's slots come back within the lease timeout
and nothing it half-wrote is ever visible; a dead sidecar is a miss within the client's
deadline, never a hang or an exception, and after a restart the same client recovers on
its own and finds the host tier warm; bad input gets an error reply with a stable code
while everyone else keeps being served.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from typing import Any, Callable

import msgpack
import pytest
import torch
import zmq

from lmkv_mp import protocol as P
from lmkv_mp.client import SidecarClient

from tests.conftest import CLIENT_DEFAULTS, LEASE_TIMEOUT, Procs, SidecarHandle, stats, wait_for
from tests.procs import kvproc as K

SEED = 11
A_IDS = list(range(40, 56))      # the writer's blocks for 4 chunks
B_IDS = list(range(3, 35, 2))    # where a reader scatters them
N = 4
TIMEOUT = CLIENT_DEFAULTS["timeout"]


def ns_info(tp: int = 1, rank: int = 0) -> P.NamespaceInfo:
    return K.namespace_for(K.PagedKV(K.make_cache(None)), "tiny", "bfloat16", tp, rank)


def spec(h: SidecarHandle, prompt_seed: int, **kw: Any) -> dict[str, Any]:
    return {"run_dir": str(h.run_dir), "rank": 0, "tp": 1, "seed": SEED, "prompt_seed": prompt_seed,
            "chunks": N, "block_ids": A_IDS, "client": CLIENT_DEFAULTS, **kw}


def host(h: SidecarHandle) -> dict[str, Any]:
    return stats(h)["tiers"]["host"]


def load_and_check(client: SidecarClient, ns: P.NamespaceInfo, hashes: bytes) -> None:
    """Pinned LOOKUP, scatter into a zeroed cache at B_IDS in this process, compare with the
    writer's blocks regenerated from its seed, RELEASE."""
    found = client.lookup([ns.id], hashes, pin=True)
    assert found.hits == len(hashes) // 16
    region = client.host_tensor()
    assert region is not None
    cache = K.make_cache(None)
    kv = K.PagedKV(cache)
    for i, off in enumerate(found.offsets[0].tolist()):
        kv.scatter(region[off:off + ns.chunk_bytes], K.chunk_blocks(B_IDS, i))
    got = K.block_bytes(cache, B_IDS[:found.hits * K.BLOCKS_PER_CHUNK])
    want = K.block_bytes(K.make_cache(K.rank_seed(SEED, 0)), A_IDS[:found.hits * K.BLOCKS_PER_CHUNK])
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert client.release(found.lease_id)


@pytest.mark.slow
def test_writer_killed_between_reserve_and_commit(sidecar: Callable[..., SidecarHandle], procs: Procs) -> None:
    h = sidecar()
    ns = ns_info()
    other = h.client(role="worker", namespaces=[ns])
    assert other.connect()
    hashes = K.prompt_hashes(5, N, other.hello.hash_key)  # type: ignore[union-attr]
    baseline = host(h)["used_bytes"]

    writer = procs.kvproc("reserve-and-hang", spec(h, 5))
    line = procs.read_line(writer)
    assert line.startswith("RESERVED"), line
    s = stats(h)
    assert s["leases"]["write"] == 1 and s["tiers"]["host"]["entries_by_state"]["writing"] == N
    assert s["tiers"]["host"]["used_bytes"] > baseline
    assert other.lookup([ns.id], hashes).hits == 0, "WRITING chunks are invisible"
    busy = other.reserve(ns.id, hashes)
    assert busy is not None and busy.lease_id == 0 and set(busy.status) == {P.SlotStatus.BUSY}

    writer.kill()
    writer.wait()
    t0 = time.monotonic()
    assert other.lookup([ns.id], hashes).hits == 0
    wait_for(lambda: (s := stats(h))["leases"]["write"] == 0 and s["tiers"]["host"]["used_bytes"] == baseline,
             LEASE_TIMEOUT + 3.0, "the dead writer's lease to expire and its slots to return")
    assert time.monotonic() - t0 <= LEASE_TIMEOUT + 3.0
    s = stats(h)
    assert s["tiers"]["host"]["entries"] == 0 and s["aborted_writes"] == N
    assert s["clients"] == {"worker": 1}, "the dead writer was reaped, the live client kept"
    assert other.lookup([ns.id], hashes).hits == 0

    stored = procs.result(procs.kvproc("store", spec(h, 5)))
    assert stored["written"] == N and stored["committed"] == N
    loaded = procs.result(procs.kvproc("load", spec(h, 5, seed=None, block_ids=B_IDS,
                                                     out=str(procs.log_dir / "loaded.pt"))))
    assert loaded["loaded"] == N and loaded["released"]
    got = torch.load(procs.log_dir / "loaded.pt")
    want = K.block_bytes(K.make_cache(K.rank_seed(SEED, 0)), A_IDS)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert stats(h)["leases"] == {"read": 0, "write": 0}


@pytest.mark.slow
def test_sidecar_killed_and_restarted(sidecar: Callable[..., SidecarHandle], procs: Procs) -> None:
    h = sidecar()
    ns = ns_info()
    client = h.client(role="worker", namespaces=[ns])
    assert client.connect()
    key = client.hello.hash_key  # type: ignore[union-attr]
    kept, lost = K.prompt_hashes(1, N, key), K.prompt_hashes(2, N, key)

    assert procs.result(procs.kvproc("store", spec(h, 1)))["committed"] == N
    assert client.lookup([ns.id], kept).hits == N
    writer = procs.kvproc("reserve-and-hang", spec(h, 2))
    assert procs.read_line(writer).startswith("RESERVED")
    writer.kill()
    writer.wait()
    # The crash must come while the dead writer's records still say WRITING.
    assert stats(h)["tiers"]["host"]["entries_by_state"] == {"writing": N, "committed": N}
    pending = client.reserve(ns.id, K.prompt_hashes(3, 1, key))
    assert pending is not None and pending.lease_id
    h.kill(signal.SIGKILL)

    t = time.monotonic()
    assert client.lookup([ns.id], kept).hits == 0
    assert time.monotonic() - t < TIMEOUT + 0.5, "a dead sidecar is a miss within the deadline"
    t = time.monotonic()
    assert client.reserve(ns.id, kept) is None
    assert client.commit(pending.lease_id) == 0
    assert client.release(pending.lease_id) is False
    assert client.ping() is False
    assert time.monotonic() - t < TIMEOUT + 0.5
    assert client.restarts == 0

    h.restart()
    wait_for(lambda: client.lookup([ns.id], kept).hits == N, 10, "the same client to recover on its own")
    assert client.restarts == 1
    load_and_check(client, ns, kept)
    assert client.lookup([ns.id], lost).hits == 0, "a dead writer's chunks never appear"
    s = stats(h)
    assert s["tiers"]["host"]["entries_by_state"] == {"writing": 0, "committed": N}
    assert s["leases"] == {"read": 0, "write": 0}
    assert s["tiers"]["host"]["used_bytes"] == N * ns.chunk_bytes  # 64 KiB chunks fill 64 KiB slots
    redo = client.reserve(ns.id, lost)
    assert redo is not None and set(redo.status) == {P.SlotStatus.WRITE}, "their slots were freed"
    assert client.commit(redo.lease_id) == N


# --- hostile frames --------------------------------------------------------------------


class Raw:
    """A bare DEALER with a fixed routing id: sends any frames, reads raw replies."""

    def __init__(self, endpoint: str, ident: bytes) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, ident)
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 5.0) -> list[bytes]:
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return self.sock.recv_multipart()

    def ask(self, frames: list[bytes]) -> list[bytes]:
        self.send(frames)
        return self.recv()

    def close(self) -> None:
        self.sock.close(0)


def req(op: int, **body: Any) -> list[bytes]:
    """``req_id`` first, as the protocol's encoders write it (so the server can echo it)."""
    return [bytes([op]), msgpack.packb({"req_id": body.pop("req_id", 77), **body}, use_bin_type=True)]


def check_error(reply: list[bytes], code: P.ErrorCode, boot_id: bytes, req_id: int) -> None:
    assert len(reply) == 2 and reply[0] == bytes([P.Status.ERROR]), reply
    body = msgpack.unpackb(reply[1], raw=False)
    assert isinstance(body, dict)
    assert body["code"] == code, (P.ErrorCode(body["code"]).name, body["message"])
    assert isinstance(body["message"], str) and body["message"]
    assert body["boot_id"] == boot_id and body["req_id"] == req_id


@pytest.mark.slow
def test_hostile_frames_get_error_replies(sidecar: Callable[..., SidecarHandle]) -> None:
    h = sidecar()
    good = P.NamespaceInfo(b"G" * 16, 64 << 10, "good")
    mine = P.NamespaceInfo(b"H" * 16, 64 << 10, "hostile")
    prompt = b"".join(bytes([i]) * 16 for i in range(1, 4))
    normal = h.client(role="worker", namespaces=[good])
    res = normal.reserve(good.id, prompt)
    assert res is not None and normal.commit(res.lease_id) == 3
    boot = normal.boot_id
    theirs = normal.reserve(good.id, bytes([9]) * 16)  # another client's live write lease
    assert theirs is not None and theirs.lease_id

    raw = Raw(h.endpoint, b"hostile-1")
    lookup = dict(namespaces=[good.id], hashes=prompt)
    expected: Counter[str] = Counter()

    def expect(frames: list[bytes], code: P.ErrorCode, req_id: int = 77) -> None:
        check_error(raw.ask(frames), code, boot, req_id)
        expected[code.name] += 1
        assert normal.lookup([good.id], prompt).hits == 3, "everyone else is still served"

    expect(req(P.Op.LOOKUP, **lookup), P.ErrorCode.NOT_REGISTERED)
    hello = raw.ask(req(P.Op.HELLO, version=P.PROTOCOL_VERSION, role="worker",
                        namespaces=[{"id": mine.id, "chunk_bytes": mine.chunk_bytes}]))
    assert hello[0] == bytes([P.Status.OK])

    payload = req(P.Op.LOOKUP, **lookup)[1]
    expect([b"\x63", payload], P.ErrorCode.UNKNOWN_OP)
    expect([b"\x02\x00", payload], P.ErrorCode.BAD_FRAME, req_id=77)
    expect([b"", payload], P.ErrorCode.BAD_FRAME)
    expect([b"\x02"], P.ErrorCode.BAD_FRAME, req_id=0)
    expect([b"\x02", payload, b"extra"], P.ErrorCode.BAD_FRAME, req_id=0)
    expect([b"\x02", payload[:-7]], P.ErrorCode.BAD_FRAME)
    expect([b"\x02", msgpack.packb([77, [good.id], prompt])], P.ErrorCode.BAD_FRAME, req_id=0)
    expect([b"\x02", b"\xc1"], P.ErrorCode.BAD_FRAME, req_id=0)  # 0xc1: never valid msgpack
    expect([b"\x02", msgpack.packb({1: 2})], P.ErrorCode.BAD_FRAME, req_id=0)
    huge_bin = b"\x82\xa6req_id\x4d\xa6hashes\xc6\x7f\xff\xff\xf0" + bytes(32)  # claims ~2 GiB
    expect([b"\x02", huge_bin], P.ErrorCode.BAD_FRAME, req_id=0x4d)
    expect(req(P.Op.LOOKUP, namespaces=[good.id], hashes=prompt + b"x"), P.ErrorCode.BAD_REQUEST)
    expect(req(P.Op.LOOKUP, namespaces=[good.id[:15]], hashes=prompt), P.ErrorCode.BAD_REQUEST)
    expect(req(P.Op.LOOKUP, namespaces=good.id, hashes=prompt), P.ErrorCode.BAD_REQUEST)
    expect(req(P.Op.LOOKUP, namespaces=[good.id]), P.ErrorCode.BAD_REQUEST)
    expect(req(P.Op.LOOKUP, namespaces=[], hashes=prompt), P.ErrorCode.BAD_REQUEST)
    expect(req(P.Op.LOOKUP, namespaces=[good.id], hashes=prompt, pin="yes"), P.ErrorCode.BAD_REQUEST)
    expect(req(P.Op.RELEASE, lease_id=2**64 - 1), P.ErrorCode.BAD_REQUEST)  # beyond int64
    expect(req(P.Op.RELEASE, lease_id=-1, req_id=5), P.ErrorCode.UNKNOWN_LEASE, req_id=5)
    expect(req(P.Op.COMMIT, lease_id=987654), P.ErrorCode.UNKNOWN_LEASE)
    expect(req(P.Op.RELEASE, lease_id=987654), P.ErrorCode.UNKNOWN_LEASE)
    expect(req(P.Op.COMMIT, lease_id=theirs.lease_id), P.ErrorCode.UNKNOWN_LEASE)
    expect(req(P.Op.RELEASE, lease_id=theirs.lease_id), P.ErrorCode.UNKNOWN_LEASE)
    expect(req(P.Op.RESERVE, namespace=good.id, hashes=prompt), P.ErrorCode.UNKNOWN_NAMESPACE)
    expect(req(P.Op.RESERVE, namespace=b"Z" * 16, hashes=prompt), P.ErrorCode.UNKNOWN_NAMESPACE)
    expect(req(P.Op.LOOKUP, namespaces=[good.id], hashes=bytes(16) * 100_000), P.ErrorCode.TOO_LARGE)
    expect(req(P.Op.HELLO, version=P.PROTOCOL_VERSION + 9, role="worker"), P.ErrorCode.VERSION)
    expect(req(P.Op.HELLO, version=P.PROTOCOL_VERSION, role="worker",
               namespaces=[{"id": good.id, "chunk_bytes": 1}]), P.ErrorCode.CONFLICT)
    expect(req(P.Op.CLEAR), P.ErrorCode.UNAUTHORIZED)

    # The other client's lease is untouched by all that.
    assert normal.commit(theirs.lease_id) == 1

    # A burst of garbage, pipelined: one reply each, in order.
    for i in range(1, 301):
        raw.send([b"\xee", msgpack.packb({"req_id": i})])
    for i in range(1, 301):
        check_error(raw.recv(), P.ErrorCode.UNKNOWN_OP, boot, i)
    expected["UNKNOWN_OP"] += 300

    # Over the frame limit: ZeroMQ drops the connection; nothing to answer, nothing breaks.
    big = Raw(h.endpoint, b"hostile-2")
    big.send([bytes([P.Op.LOOKUP]), bytes(9 << 20)])
    assert normal.lookup([good.id], prompt + bytes([9]) * 16).hits == 4
    big.close()
    raw.close()

    assert h.alive()
    s = stats(h)
    assert s["errors"] == sum(expected.values())
    assert s["errors_by_code"] == dict(expected)
    assert s["tiers"]["host"]["entries"] == 4
