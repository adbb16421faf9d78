"""Hostile input on the control socket: malformed frames of every kind one by one, and a
live fuzz of tens of thousands of random and mutated frames.

The promise (ARCHITECTURE §7): bad input gets an error reply with a stable code and the
request's id, while everyone else keeps being served; the sidecar neither crashes nor
grows without bound.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable

import msgpack
import pytest
import zmq

from lmkv_mp.wire import protocol as P

from tests.conftest import SidecarHandle, stats
from tests.faults.common import assert_no_leaks


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


# --- live fuzz ---------------------------------------------------------------------------

FUZZ_FRAMES = 24_000        # tens of thousands, in well under 30 s on a busy 2-core box
FUZZ_SOCKETS = 4
# Pipelined per socket, then every reply is read and checked: close to --client-max-inflight
# (128), the most a client may have outstanding and still get every reply (startup.bind);
# past it the ROUTER may drop replies a client has not read, so memory stays bounded.
FUZZ_BATCH = 125
RSS_GROWTH_MAX = 48 << 20   # private memory the sidecar may gain over the whole fuzz


def rss_anon(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/PID/status")


class Fuzzer:
    """Random, mutated and valid-but-random requests of every op, from a seeded RNG. It
    remembers lease ids from the replies it gets, so COMMIT and RELEASE hit real leases."""

    def __init__(self, seed: int, normal_ns: bytes) -> None:
        self.rng = random.Random(seed)
        self.leases: list[int] = [0]
        self.namespaces = [normal_ns, bytes(16)]

    def _hashes(self, most: int = 6) -> bytes:
        return self.rng.randbytes(16 * self.rng.randint(0, most))

    def valid(self) -> P.Request:
        r, rid = self.rng, self.rng.randint(0, 2**63 - 1)
        op = r.choice(list(P.Op))
        ns = r.choice(self.namespaces)
        if op is P.Op.HELLO:
            fresh = [P.NamespaceInfo(r.randbytes(16), r.choice([64 << 10, 256 << 10, 1]), r.choice(["", "fuzz"]))
                     for _ in range(r.randint(0, 2))]
            self.namespaces.extend(n.id for n in fresh)
            return P.Hello(rid, r.choice([P.PROTOCOL_VERSION, P.PROTOCOL_VERSION, 0, 99]),
                           r.choice(["worker", "scheduler", "admin", "client"]), r.randint(0, 1 << 20),
                           r.choice(["", "fuzz", "x" * 300]), fresh, r.choice([None, b"", r.randbytes(8)]))
        if op is P.Op.LOOKUP:
            return P.Lookup(rid, [r.choice(self.namespaces) for _ in range(r.randint(1, 3))], self._hashes(),
                            r.random() < 0.5)
        if op is P.Op.RESERVE:
            return P.Reserve(rid, ns, self._hashes(4))
        if op is P.Op.COMMIT:
            h = self._hashes(3)
            sums = P.pack_u64([r.getrandbits(64) for _ in range(len(h) // 16)]) if r.random() < 0.5 else b""
            return P.Commit(rid, r.choice(self.leases), h if sums or r.random() < 0.5 else b"", sums)
        if op is P.Op.RELEASE:
            return P.Release(rid, r.choice([*self.leases, r.randint(-(2**63) + 1, 2**63 - 1)]))
        if op is P.Op.CLEAR:
            return P.Clear(rid, r.choice([None, r.randbytes(12)]), r.choice([None, ns]))
        if op is P.Op.CORRUPT:
            h = self._hashes(2) or r.randbytes(16)
            return P.Corrupt(rid, ns, h, P.pack_u64([r.getrandbits(64) for _ in range(len(h) // 16)]))
        return P.Stats(rid) if op is P.Op.STATS else P.Ping(rid)

    def frames(self) -> list[bytes]:
        r = self.rng
        kind = r.random()
        if kind < 0.2:
            fr = [r.randbytes(r.randint(0, 40)) for _ in range(r.randint(1, 3))]
            if r.random() < 0.7:
                fr[0] = bytes([r.randint(0, 12)])
            return fr
        fr = P.encode_request(self.valid())
        if kind < 0.6:
            fr = list(fr)
            for _ in range(r.randint(1, 3)):
                i = r.randrange(len(fr))
                data = bytearray(fr[i])
                pos = r.randint(0, max(len(data) - 1, 0))
                how = r.randrange(5)
                if how == 0 and data:
                    data[pos] ^= 1 << r.randrange(8)
                elif how == 1:
                    del data[pos:]
                elif how == 2:
                    data[pos:pos] = r.randbytes(r.randint(1, 8))
                elif how == 3 and data:
                    del data[pos:pos + r.randint(1, 8)]
                elif how == 4:
                    # Up to 8 frames: a message of many frames must be refused whole too.
                    fr.extend(r.randbytes(r.randint(0, 16)) for _ in range(r.randint(1, 6))) if len(fr) < 3 \
                        else fr.pop()
                    continue
                fr[i] = bytes(data)
        return fr

    def check(self, sent: list[bytes], reply: list[bytes], boot: bytes) -> str:
        """The reply is well-formed and answers ``sent``; returns "ok" or the error code."""
        assert len(reply) == 2 and reply[0] in (b"\0", b"\1"), (sent, reply)
        try:
            msg: P.Request | None = P.decode_request(sent)
        except P.ProtocolError:
            msg = None
        ids = {P.peek_req_id(sent), msg.req_id if msg is not None else 0}
        if reply[0] == b"\1":
            err = P.decode_reply(P.Op.PING, reply)
            assert isinstance(err, P.ErrorReply) and err.message and err.boot_id == boot, err
            assert err.req_id in ids, (err, sent)
            return P.ErrorCode(err.code).name
        assert msg is not None, f"an OK reply to frames that do not decode: {sent}"
        out = P.decode_reply(msg.OP, reply)
        assert type(out) is P.REPLY_TYPES[msg.OP] and out.req_id == msg.req_id and out.boot_id == boot, out
        if getattr(out, "lease_id", 0):
            self.leases.append(out.lease_id)
        return "ok"


@pytest.mark.slow
def test_live_fuzz_keeps_the_sidecar_up_bounded_and_serving(sidecar: Callable[..., SidecarHandle]) -> None:
    from tests.sidecar.test_tiers import NS, chunk_hashes, load, payload, store

    h = sidecar()
    normal = h.client(namespaces=[NS])
    prompt = chunk_hashes(3, seed=50)
    assert store(normal, prompt) == 3
    boot = normal.boot_id
    raws = [Raw(h.endpoint, b"fuzz-%d" % i) for i in range(FUZZ_SOCKETS)]
    fuzzers = [Fuzzer(1000 + i, NS.id) for i in range(FUZZ_SOCKETS)]
    rss_before = rss_anon(h.pid)
    outcomes: Counter[str] = Counter()
    checked_loads = 0
    try:
        sent_total = 0
        while sent_total < FUZZ_FRAMES:
            batches = []
            for raw, fz in zip(raws, fuzzers):
                batch = [fz.frames() for _ in range(FUZZ_BATCH)]
                for fr in batch:
                    raw.send(fr)
                batches.append(batch)
            for raw, fz, batch in zip(raws, fuzzers, batches):
                for fr in batch:
                    outcomes[fz.check(fr, raw.recv(timeout=20), boot)] += 1
            sent_total += FUZZ_SOCKETS * FUZZ_BATCH
            # A normal client, meanwhile: every answer on time, every byte right.
            got = load(normal, prompt, timeout=5)
            assert got == [payload(x) for x in prompt[:len(got)]]
            if len(got) < 3:        # a fuzzer's writes may evict it (plain LRU): store it again
                assert store(normal, prompt) >= 0
            checked_loads += 1
    finally:
        for raw in raws:
            raw.close()
    assert h.alive()
    growth = rss_anon(h.pid) - rss_before
    assert growth < RSS_GROWTH_MAX, f"the sidecar's private memory grew by {growth >> 20} MiB"
    assert sum(outcomes.values()) == FUZZ_FRAMES and outcomes["ok"] > FUZZ_FRAMES // 10, outcomes
    assert len(outcomes) > 6, f"the fuzz reached few error paths: {outcomes}"
    s = stats(h)
    assert s["errors_by_code"].get("INTERNAL", 0) == 0, "no request hit a bug"
    assert store(normal, prompt) >= 0 and load(normal, prompt) == [payload(x) for x in prompt]
    assert_no_leaks(h)   # the fuzzers' leases end with them (their namespaces have other chunk sizes)
    print(f"fuzz: {FUZZ_FRAMES} frames, outcomes {dict(outcomes)}, {checked_loads} normal loads, "
          f"RssAnon +{growth >> 10} KiB")


@pytest.mark.slow
def test_a_flooding_client_waits_and_others_are_served(sidecar: Callable[..., SidecarHandle]) -> None:
    """One client pipelines thousands of large LOOKUPs and never reads a reply. ZeroMQ's
    per-client queues (``--client-max-inflight``) make it wait rather than grow the
    sidecar; the ROUTER serves clients in turn, so another client's calls stay fast."""
    import time

    from tests.sidecar.test_tiers import NS, chunk_hashes, load, payload, store

    h = sidecar("--client-max-inflight", "32")
    normal = h.client(namespaces=[NS])
    prompt = chunk_hashes(3, seed=51)
    assert store(normal, prompt) == 3
    flood = Raw(h.endpoint, b"flooder")
    flood.sock.setsockopt(zmq.SNDHWM, 64)
    hello = flood.ask(req(P.Op.HELLO, version=P.PROTOCOL_VERSION, role="scheduler"))
    assert hello[0] == b"\0"
    big = req(P.Op.LOOKUP, namespaces=[NS.id], hashes=b"".join(prompt) + bytes(16 * 8189), pin=True)
    rss_before = rss_anon(h.pid)
    queued = 0
    try:
        for _ in range(5000):
            try:
                flood.sock.send_multipart(big, zmq.NOBLOCK)
                queued += 1
            except zmq.Again:
                break
        assert queued < 5000, "the flooder is made to wait"
        worst = 0.0
        for _ in range(20):
            t = time.monotonic()
            assert load(normal, prompt, timeout=5) == [payload(x) for x in prompt]
            worst = max(worst, time.monotonic() - t)
        assert worst < 1.0, f"a normal call took {worst:.2f}s behind the flood"
        assert rss_anon(h.pid) - rss_before < RSS_GROWTH_MAX
    finally:
        flood.close()
    assert h.alive()
    assert_no_leaks(h)   # the flooder's pins end when it is reaped
