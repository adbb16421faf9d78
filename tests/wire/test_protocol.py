"""Tests for lmkv_mp.wire.protocol: round trips of every message, rejection codes, hostile input."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmkv_mp.wire import protocol as P
from lmkv_mp.wire.protocol import ErrorCode, Op, ProtocolError, U64Array

NS = bytes(range(16))
NS2 = bytes(range(16, 32))
H = b"\xab" * 16
BOOT = b"\x01" * 16


def hashes(n: int) -> bytes:
    return b"".join(i.to_bytes(16, "little") for i in range(n))


# -- fixtures of valid messages ---------------------------------------------------------------

REQUESTS: dict[str, P.Request] = {
    "hello-minimal": P.Hello(req_id=1, version=P.PROTOCOL_VERSION, role="scheduler"),
    "hello-full": P.Hello(req_id=2, version=P.PROTOCOL_VERSION, role="worker", pid=1234, name="rank0",
                          namespaces=[P.NamespaceInfo(NS, 1 << 20, "llama[tp0/2]"),
                                      P.NamespaceInfo(NS2, 4096)],
                          token=b"secret", device=b"\x07" * 16),
    "hello-admin": P.Hello(req_id=3, version=P.PROTOCOL_VERSION, role="admin", token=b""),
    "hello-client": P.Hello(req_id=3, version=P.PROTOCOL_VERSION, role="client"),
    "lookup": P.Lookup(req_id=4, namespaces=[NS], hashes=hashes(3)),
    "lookup-pin-tp2": P.Lookup(req_id=5, namespaces=[NS, NS2], hashes=hashes(7), pin=True),
    "lookup-empty-hashes": P.Lookup(req_id=6, namespaces=[NS], hashes=b""),
    "reserve": P.Reserve(req_id=7, namespace=NS, hashes=hashes(4)),
    "commit-all": P.Commit(req_id=8, lease_id=99),
    "commit-subset": P.Commit(req_id=9, lease_id=99, hashes=hashes(2), checksums=U64Array([1, 2**64 - 1])),
    "release": P.Release(req_id=10, lease_id=2**63 - 1),
    "ping": P.Ping(req_id=11),
    "stats": P.Stats(req_id=12),
    "clear-all": P.Clear(req_id=13),
    "clear-ns": P.Clear(req_id=14, token=b"admin", namespace=NS),
    "corrupt": P.Corrupt(req_id=15, namespace=NS, hashes=hashes(2), checksums=U64Array([5, 2**64 - 1])),
    "req-id-zero": P.Ping(req_id=0),
    "req-id-max": P.Ping(req_id=2**63 - 1),
}

REGION = P.RegionInfo(region_id=0, kind="shm", name="/lmkv-1-abc", size=1 << 30, uuid=b"\x02" * 16)
GPU_REGION = P.RegionInfo(region_id=1, kind="cuda", name="gpu0", size=1 << 30, uuid=b"\x03" * 16,
                          device=0, handle=b"\x04" * 64, device_uuid=b"\x05" * 16)

REPLIES: dict[str, tuple[Op, P.Reply]] = {
    "hello": (Op.HELLO, P.HelloReply(req_id=1, boot_id=BOOT, client_id=5, chunk_tokens=256, hash_key=b"k" * 32,
                                     lease_timeout=5.0, heartbeat_interval=1.25, regions=[REGION, GPU_REGION],
                                     verify=True)),
    "hello-no-regions": (Op.HELLO, P.HelloReply(req_id=1, boot_id=BOOT, client_id=5, chunk_tokens=256,
                                                hash_key=b"", lease_timeout=5.0, heartbeat_interval=1.0,
                                                regions=[])),
    "lookup-miss": (Op.LOOKUP, P.LookupReply(req_id=2, boot_id=BOOT, hits=0)),
    "lookup-pinned": (Op.LOOKUP, P.LookupReply(req_id=2, boot_id=BOOT, hits=2, lease_id=7,
                                               offsets=[U64Array([4096, 8192]), U64Array([0, 1 << 40])],
                                               checksums=[U64Array(), U64Array()], pending=1)),
    "lookup-pinned-gpu": (Op.LOOKUP, P.LookupReply(req_id=2, boot_id=BOOT, hits=2, lease_id=7,
                                                   offsets=[U64Array([4096, 8192])], checksums=[],
                                                   gpu_regions=[b"\1\0"], gpu_offsets=[U64Array([0, 0])])),
    "reserve": (Op.RESERVE, P.ReserveReply(req_id=3, boot_id=BOOT, lease_id=8,
                                           status=bytes([P.SlotStatus.WRITE, P.SlotStatus.PRESENT,
                                                         P.SlotStatus.BUSY, P.SlotStatus.NO_SPACE]),
                                           offsets=U64Array([4096, 0, 0, 0]))),
    "reserve-gpu": (Op.RESERVE, P.ReserveReply(req_id=3, boot_id=BOOT, lease_id=8,
                                               status=bytes([P.SlotStatus.WRITE, P.SlotStatus.WRITE]),
                                               offsets=U64Array([4096, 8192]), gpu_regions=b"\1\0",
                                               gpu_offsets=U64Array([1 << 20, 0]))),
    "commit": (Op.COMMIT, P.CommitReply(req_id=4, boot_id=BOOT, committed=3)),
    "release": (Op.RELEASE, P.ReleaseReply(req_id=5, boot_id=BOOT, released=2)),
    "ping": (Op.PING, P.PingReply(req_id=6, boot_id=BOOT, leases=0)),
    "stats": (Op.STATS, P.StatsReply(req_id=7, boot_id=BOOT,
                                     snapshot={"entries": 3, "tiers": {"host": [1, 2]}, "name": "x", "f": 0.5})),
    "stats-empty": (Op.STATS, P.StatsReply(req_id=7, boot_id=BOOT, snapshot={})),
    "clear": (Op.CLEAR, P.ClearReply(req_id=8, boot_id=BOOT, dropped=10)),
    "corrupt": (Op.CORRUPT, P.CorruptReply(req_id=9, boot_id=BOOT, dropped=1)),
}


def frames(op: int, body: Any) -> list[bytes]:
    return [bytes((op,)), msgpack.packb(body, use_bin_type=True)]


def body_of(msg: Any) -> dict[str, Any]:
    """The wire map of a valid message, to be broken by a test."""
    return msgpack.unpackb(P.encode_request(msg)[1], raw=False)


def assert_rejected(fr: list[bytes], code: ErrorCode, match: str | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        P.decode_request(fr)
    assert info.value.code == code, info.value.message
    assert info.value.message  # says what to fix
    return info.value


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", REQUESTS.values(), ids=REQUESTS.keys())
def test_request_round_trip(msg: P.Request) -> None:
    fr = P.encode_request(msg)
    assert len(fr) == 2 and fr[0] == bytes((msg.OP,))
    assert all(isinstance(f, bytes) for f in fr)
    out = P.decode_request(fr)
    assert type(out) is type(msg)
    assert out == msg
    assert P.peek_req_id(fr) == msg.req_id


def test_every_request_type_is_covered() -> None:
    assert {type(m) for m in REQUESTS.values()} == set(P.REQUEST_TYPES.values())
    assert {op for op in Op} == set(P.REQUEST_TYPES)


@pytest.mark.parametrize("op, msg", REPLIES.values(), ids=REPLIES.keys())
def test_reply_round_trip(op: Op, msg: P.Reply) -> None:
    fr = P.encode_reply(msg)
    assert fr[0] == bytes((P.Status.OK,))
    out = P.decode_reply(op, fr)
    assert type(out) is type(msg)
    assert out == msg
    assert P.peek_req_id(fr) == msg.req_id


def test_every_reply_type_is_covered() -> None:
    assert {type(m) for _, m in REPLIES.values()} == set(P.REPLY_TYPES.values())


def test_nested_values_decode_to_dataclasses() -> None:
    hello = P.decode_request(P.encode_request(REQUESTS["hello-full"]))
    assert all(isinstance(ns, P.NamespaceInfo) for ns in hello.namespaces)
    assert hello.namespaces[1].name == ""  # an optional field of a nested value keeps its default
    reply = P.decode_reply(Op.HELLO, P.encode_reply(REPLIES["hello"][1]))
    assert [type(r) for r in reply.regions] == [P.RegionInfo, P.RegionInfo]
    assert reply.regions[1].handle == b"\x04" * 64


def test_optional_fields_may_be_absent_on_the_wire() -> None:
    """Maps are keyed by name: an older peer that omits optional fields still decodes."""
    out = P.decode_request(frames(Op.HELLO, {"req_id": 1, "version": 1, "role": "worker"}))
    assert out == P.Hello(req_id=1, version=1, role="worker")
    assert out.namespaces == [] and out.token is None and out.pid == 0
    out = P.decode_request(frames(Op.HELLO, {"req_id": 1, "version": 1, "role": "worker",
                                             "namespaces": [{"id": NS, "chunk_bytes": 10}]}))
    assert out.namespaces == [P.NamespaceInfo(NS, 10, "")]
    out = P.decode_request(frames(Op.COMMIT, {"req_id": 1, "lease_id": 3}))
    assert out == P.Commit(req_id=1, lease_id=3, hashes=b"", checksums=U64Array())
    out = P.decode_reply(Op.LOOKUP, [b"\0", msgpack.packb({"req_id": 1, "boot_id": BOOT, "hits": 0})])
    assert out == P.LookupReply(req_id=1, boot_id=BOOT, hits=0)


def test_explicit_nil_for_nullable_fields() -> None:
    out = P.decode_request(frames(Op.CLEAR, {"req_id": 1, "token": None, "namespace": None}))
    assert out == P.Clear(req_id=1)


def test_unknown_fields_are_ignored() -> None:
    """Forward compatibility: a newer peer may add optional fields."""
    out = P.decode_request(frames(Op.PING, {"req_id": 5, "future_field": [1, 2, 3]}))
    assert out == P.Ping(req_id=5)


def test_float_fields_accept_integers() -> None:
    body = msgpack.unpackb(P.encode_reply(REPLIES["hello"][1])[1], raw=False)
    body["lease_timeout"] = 5
    out = P.decode_reply(Op.HELLO, [b"\0", msgpack.packb(body, use_bin_type=True)])
    assert out.lease_timeout == 5.0 and type(out.lease_timeout) is float


def test_encode_request_req_id_override() -> None:
    fr = P.encode_request(P.Ping(req_id=1), req_id=77)
    assert P.decode_request(fr) == P.Ping(req_id=77)
    assert P.peek_req_id(fr) == 77


@pytest.mark.parametrize("op", list(Op))
def test_error_reply_round_trip_for_any_op(op: Op) -> None:
    err = P.ErrorReply(req_id=9, boot_id=BOOT, code=ErrorCode.NO_SPACE, message="pool full")
    fr = P.encode_reply(err)
    assert fr[0] == bytes((P.Status.ERROR,))
    out = P.decode_reply(op, fr)
    assert out == err
    assert P.peek_req_id(fr) == 9


def test_error_codes_are_stable() -> None:
    """Numbers never change meaning: clients and dashboards depend on them."""
    assert {c.name: c.value for c in ErrorCode} == {
        "BAD_FRAME": 1, "UNKNOWN_OP": 2, "BAD_REQUEST": 3, "VERSION": 4, "NOT_REGISTERED": 5,
        "UNKNOWN_NAMESPACE": 6, "UNKNOWN_LEASE": 7, "NO_SPACE": 8, "UNAUTHORIZED": 9, "TOO_LARGE": 10,
        "QUOTA": 11, "CONFLICT": 12, "INTERNAL": 13, "CORRUPT": 14}
    assert [s.value for s in P.SlotStatus] == [0, 1, 2, 3]


# -- decode_reply rejections ------------------------------------------------------------------


@pytest.mark.parametrize("fr", [
    [], [b"\0"], [b"\0", b"\x80", b""], [b"", b"\x80"], [b"\0\0", b"\x80"],
], ids=["0-frames", "1-frame", "3-frames", "status-empty", "status-2-bytes"])
def test_reply_frame_shape_rejected(fr: list[bytes]) -> None:
    with pytest.raises(ProtocolError) as info:
        P.decode_reply(Op.PING, fr)
    assert info.value.code == ErrorCode.BAD_FRAME


def test_reply_unknown_status_rejected() -> None:
    fr = P.encode_reply(REPLIES["ping"][1])
    with pytest.raises(ProtocolError) as info:
        P.decode_reply(Op.PING, [b"\x07", fr[1]])
    assert info.value.code == ErrorCode.BAD_FRAME


def test_reply_of_wrong_kind_rejected() -> None:
    """A PING reply read as a RESERVE reply lacks RESERVE's fields."""
    with pytest.raises(ProtocolError) as info:
        P.decode_reply(Op.RESERVE, P.encode_reply(REPLIES["ping"][1]))
    assert info.value.code == ErrorCode.BAD_REQUEST


# -- decode_request rejections ----------------------------------------------------------------

GOOD = P.encode_request(REQUESTS["ping"])


@pytest.mark.parametrize("fr", [[], [GOOD[0]], [GOOD[0], GOOD[1], b""], [b"", *GOOD], GOOD * 2],
                         ids=["0", "1", "3", "3-leading-empty", "4"])
def test_wrong_frame_count(fr: list[bytes]) -> None:
    assert_rejected(fr, ErrorCode.BAD_FRAME, "frames")


@pytest.mark.parametrize("op_frame", [b"", b"\x06\x00", b"\x00\x06", b"\x06\x06\x06"], ids=["0", "2", "2-nul", "3"])
def test_op_frame_must_be_one_byte(op_frame: bytes) -> None:
    assert_rejected([op_frame, GOOD[1]], ErrorCode.BAD_FRAME, "op frame")


@pytest.mark.parametrize("op", [0, 10, 42, 127, 255])
def test_unknown_op(op: int) -> None:
    assert_rejected([bytes((op,)), GOOD[1]], ErrorCode.UNKNOWN_OP)


@pytest.mark.parametrize("payload", [
    b"", GOOD[1][:-1], GOOD[1][:1], b"\xc1", b"\x81\xa6req_id", b"\xdf\xff\xff\xff\xff",
    b"\xc6\xff\xff\xff\xff", b"\x81\xa6req_id\x01\x01",  # trailing data
    b"\x81\xa2\xff\xfe\x01",  # invalid UTF-8 key
], ids=["empty", "truncated", "header-only", "reserved-byte", "map-without-value",
        "map-claims-4G-entries", "bin-claims-4G", "extra-data", "bad-utf8"])
def test_malformed_msgpack_is_bad_frame(payload: bytes) -> None:
    assert_rejected([bytes((Op.PING,)), payload], ErrorCode.BAD_FRAME)


@pytest.mark.parametrize("body", [[1, 2], 5, "req_id", b"\x00", None, True, 1.5],
                         ids=["array", "int", "str", "bin", "nil", "bool", "float"])
def test_non_map_payload(body: Any) -> None:
    assert_rejected(frames(Op.PING, body), ErrorCode.BAD_FRAME, "map")


def test_non_string_map_keys_rejected() -> None:
    payload = msgpack.packb({1: 2}, use_bin_type=True)
    assert_rejected([bytes((Op.PING,)), payload], ErrorCode.BAD_FRAME)


@pytest.mark.parametrize("name, field", [
    ("ping", "req_id"), ("hello-full", "version"), ("hello-full", "role"), ("lookup", "namespaces"),
    ("lookup", "hashes"), ("reserve", "namespace"), ("reserve", "hashes"), ("commit-all", "lease_id"),
    ("release", "lease_id"),
])
def test_missing_required_field(name: str, field: str) -> None:
    msg = REQUESTS[name]
    body = body_of(msg)
    del body[field]
    assert_rejected(frames(msg.OP, body), ErrorCode.BAD_REQUEST, field)


def test_missing_field_of_nested_value() -> None:
    body = body_of(REQUESTS["hello-full"])
    del body["namespaces"][0]["chunk_bytes"]
    assert_rejected(frames(Op.HELLO, body), ErrorCode.BAD_REQUEST, "chunk_bytes")


@pytest.mark.parametrize("name, field, value", [
    ("ping", "req_id", "1"),                 # str for int
    ("ping", "req_id", True),                # bool for int
    ("ping", "req_id", 1.0),                 # float for int
    ("ping", "req_id", None),                # nil for a non-nullable int
    ("ping", "req_id", [1]),
    ("release", "lease_id", False),
    ("commit-all", "lease_id", b"\x01"),
    ("reserve", "hashes", 5),                # int for bytes
    ("reserve", "hashes", "x" * 16),         # str for bytes
    ("reserve", "hashes", [H]),              # list of hashes instead of one concatenation
    ("reserve", "namespace", 7),
    ("lookup", "namespaces", NS),            # bytes for list
    ("lookup", "namespaces", [1]),           # int inside list[bytes]
    ("lookup", "pin", 1),                    # int for bool
    ("lookup", "pin", "yes"),
    ("hello-full", "role", 1),
    ("hello-full", "namespaces", [NS]),      # bytes for a nested map
    ("hello-full", "namespaces", {"id": NS, "chunk_bytes": 1}),
    ("hello-full", "token", "secret"),       # str for bytes | None
    ("hello-full", "pid", 2**63),            # beyond int64
    ("clear-ns", "namespace", 1),
], ids=lambda v: repr(v)[:20])
def test_wrong_field_types(name: str, field: str, value: Any) -> None:
    msg = REQUESTS[name]
    body = body_of(msg)
    body[field] = value
    assert_rejected(frames(msg.OP, body), ErrorCode.BAD_REQUEST, field)


@pytest.mark.parametrize("field, value", [("chunk_bytes", "10"), ("chunk_bytes", True), ("id", 5), ("name", b"x")])
def test_wrong_types_in_nested_value(field: str, value: Any) -> None:
    body = body_of(REQUESTS["hello-full"])
    body["namespaces"][1][field] = value
    assert_rejected(frames(Op.HELLO, body), ErrorCode.BAD_REQUEST, field)


@pytest.mark.parametrize("value", [2**63, 2**64 - 1, -(2**63)])
@pytest.mark.parametrize("field", ["req_id", "lease_id"])
def test_ints_beyond_int64_rejected(field: str, value: int) -> None:
    body = body_of(REQUESTS["release"])
    body[field] = value
    assert_rejected(frames(Op.RELEASE, body), ErrorCode.BAD_REQUEST, field)


def test_negative_req_id_rejected() -> None:
    assert_rejected(frames(Op.PING, {"req_id": -1}), ErrorCode.BAD_REQUEST, "req_id")


@pytest.mark.parametrize("name, field", [("lookup", "hashes"), ("reserve", "hashes"), ("commit-subset", "hashes")])
@pytest.mark.parametrize("length", [1, 15, 17, 33])
def test_hash_list_not_multiple_of_16(name: str, field: str, length: int) -> None:
    msg = REQUESTS[name]
    body = body_of(msg)
    body[field] = b"h" * length
    body.pop("checksums", None)
    assert_rejected(frames(msg.OP, body), ErrorCode.BAD_REQUEST, "multiple of 16")


@pytest.mark.parametrize("size", [0, 1, 15, 17, 32])
@pytest.mark.parametrize("where", ["lookup", "lookup-second", "reserve", "clear", "hello"])
def test_namespace_id_of_wrong_size(where: str, size: int) -> None:
    bad = b"n" * size
    if where == "lookup":
        body, op = body_of(REQUESTS["lookup"]), Op.LOOKUP
        body["namespaces"] = [bad]
    elif where == "lookup-second":
        body, op = body_of(REQUESTS["lookup"]), Op.LOOKUP
        body["namespaces"] = [NS, bad]
    elif where == "reserve":
        body, op = body_of(REQUESTS["reserve"]), Op.RESERVE
        body["namespace"] = bad
    elif where == "clear":
        body, op = body_of(REQUESTS["clear-ns"]), Op.CLEAR
        body["namespace"] = bad
    else:
        body, op = body_of(REQUESTS["hello-full"]), Op.HELLO
        body["namespaces"][0]["id"] = bad
    assert_rejected(frames(op, body), ErrorCode.BAD_REQUEST, "16 bytes")


@pytest.mark.parametrize("size", [1, 15, 17, 64])
def test_hello_device_uuid_of_wrong_size(size: int) -> None:
    body = body_of(REQUESTS["hello-full"])
    body["device"] = b"d" * size
    assert_rejected(frames(Op.HELLO, body), ErrorCode.BAD_REQUEST, "16-byte CUDA device uuid")


@pytest.mark.parametrize("count", [0, P.MAX_NAMESPACES_PER_REQUEST + 1])
def test_lookup_namespace_count_bounds(count: int) -> None:
    body = body_of(REQUESTS["lookup"])
    body["namespaces"] = [NS] * count
    err = assert_rejected(frames(Op.LOOKUP, body), ErrorCode.BAD_REQUEST)
    assert "namespaces" in err.message


def test_lookup_at_namespace_limit_accepted() -> None:
    msg = P.Lookup(req_id=1, namespaces=[NS] * P.MAX_NAMESPACES_PER_REQUEST, hashes=H)
    assert P.decode_request(P.encode_request(msg)) == msg


def test_hello_too_many_namespaces() -> None:
    msg = P.Hello(req_id=1, version=1, role="worker",
                  namespaces=[P.NamespaceInfo(NS, 1)] * (P.MAX_NAMESPACES_PER_REQUEST + 1))
    assert_rejected(P.encode_request(msg), ErrorCode.TOO_LARGE)


@pytest.mark.parametrize("chunk_bytes", [0, -1, (1 << 40) + 1])
def test_hello_chunk_bytes_out_of_range(chunk_bytes: int) -> None:
    msg = P.Hello(req_id=1, version=1, role="worker", namespaces=[P.NamespaceInfo(NS, chunk_bytes)])
    assert_rejected(P.encode_request(msg), ErrorCode.BAD_REQUEST, "chunk_bytes")


@pytest.mark.parametrize("op", [Op.LOOKUP, Op.RESERVE, Op.COMMIT])
def test_too_many_chunks(op: Op) -> None:
    big = b"\0" * (16 * (P.MAX_CHUNKS_PER_REQUEST + 1))
    msg = {Op.LOOKUP: P.Lookup(1, [NS], big), Op.RESERVE: P.Reserve(1, NS, big),
           Op.COMMIT: P.Commit(1, 1, big)}[op]
    assert_rejected(P.encode_request(msg), ErrorCode.TOO_LARGE)


def test_chunk_limit_itself_accepted() -> None:
    msg = P.Reserve(1, NS, b"\0" * (16 * P.MAX_CHUNKS_PER_REQUEST))
    assert P.decode_request(P.encode_request(msg)) == msg


@pytest.mark.parametrize("fr", [
    [bytes((Op.PING,)), msgpack.packb({"req_id": 1, "pad": b"\0" * P.MAX_FRAME_BYTES})],
    [bytes((Op.PING,)), b"\x80" + b"\0" * P.MAX_FRAME_BYTES],  # size checked before parsing
], ids=["valid-msgpack", "garbage"])
def test_oversize_payload(fr: list[bytes]) -> None:
    assert len(fr[1]) > P.MAX_FRAME_BYTES
    assert_rejected(fr, ErrorCode.TOO_LARGE)


@pytest.mark.parametrize("role", ["", "Scheduler", "root", "worker ", "admin\0"])
def test_unknown_role(role: str) -> None:
    msg = P.Hello(req_id=1, version=1, role=role)
    assert_rejected(P.encode_request(msg), ErrorCode.BAD_REQUEST, "role")


@pytest.mark.parametrize("n_sums", [1, 3])
def test_commit_checksums_must_match_hashes(n_sums: int) -> None:
    msg = P.Commit(req_id=1, lease_id=1, hashes=hashes(2), checksums=U64Array(range(n_sums)))
    assert_rejected(P.encode_request(msg), ErrorCode.BAD_REQUEST, "checksums")


def test_commit_checksums_without_hashes_rejected() -> None:
    msg = P.Commit(req_id=1, lease_id=1, checksums=U64Array([1]))
    assert_rejected(P.encode_request(msg), ErrorCode.BAD_REQUEST, "checksums")


@pytest.mark.parametrize("n_hashes, n_sums", [(0, 0), (2, 0), (2, 1), (2, 3), (0, 1)])
def test_corrupt_needs_one_checksum_per_hash(n_hashes: int, n_sums: int) -> None:
    msg = P.Corrupt(req_id=1, namespace=NS, hashes=hashes(n_hashes), checksums=U64Array(range(n_sums)))
    assert_rejected(P.encode_request(msg), ErrorCode.BAD_REQUEST, "checksum")


@pytest.mark.parametrize("field", ["namespace", "hashes", "checksums"])
def test_corrupt_missing_field(field: str) -> None:
    body = body_of(REQUESTS["corrupt"])
    del body[field]
    assert_rejected(frames(Op.CORRUPT, body), ErrorCode.BAD_REQUEST, field)


def test_corrupt_namespace_of_wrong_size() -> None:
    body = body_of(REQUESTS["corrupt"])
    body["namespace"] = NS[:15]
    assert_rejected(frames(Op.CORRUPT, body), ErrorCode.BAD_REQUEST, "16 bytes")


def test_ping_asks_about_a_bounded_number_of_leases() -> None:
    ok = P.Ping(req_id=1, leases=list(range(1, P.MAX_LEASES_PER_PING + 1)))
    assert P.decode_request(P.encode_request(ok)) == ok
    with pytest.raises(P.ProtocolError) as e:
        P.decode_request(P.encode_request(P.Ping(req_id=1, leases=list(range(P.MAX_LEASES_PER_PING + 1)))))
    assert e.value.code == P.ErrorCode.TOO_LARGE


def test_lookup_keys_are_bounded_across_namespaces() -> None:
    """Namespaces × chunks bounds one LOOKUP's walk of the index (the loop's time)."""
    n = P.MAX_KEYS_PER_LOOKUP // 16
    ok = P.Lookup(req_id=1, namespaces=[NS] * 16, hashes=bytes(16 * n))
    assert P.decode_request(P.encode_request(ok)) == ok
    assert_rejected(P.encode_request(P.Lookup(req_id=1, namespaces=[NS] * 16, hashes=bytes(16 * (n + 1)))),
                    ErrorCode.TOO_LARGE, "keys")


@pytest.mark.parametrize("payload", [
    msgpack.packb([[[[[[[[[[[1]]]]]]]]]]]),
    b"\x91" * 5000 + b"\x80",                           # 5000-deep array nesting
    b"\x81\xa6req_id" + b"\x81\xa1k" * 5000 + b"\x01",  # 5000-deep map nesting
    msgpack.packb({"req_id": msgpack.ExtType(5, b"xx")}),
    b"\x82\xa6req_id\x01\xa1x\xd7\xff" + b"\xff" * 8,  # timestamp ext, nanoseconds out of range
], ids=["nested-array", "deep-array", "deep-map", "ext", "timestamp-ext"])
def test_hostile_payloads_give_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        P.decode_request([bytes((Op.PING,)), payload])


# -- peek_req_id ------------------------------------------------------------------------------


@pytest.mark.parametrize("fr", [
    [], [b"\x06"], [b"\x06", b"", b""], [b"\x06", b""], [b"\x06", b"\xc1"], [b"\x06", b"\x80"],
    [b"\x06", msgpack.packb([1, 2])], [b"\x06", msgpack.packb({"other": 1, "req_id": 5})],
    [b"\x06", msgpack.packb({"req_id": -5})], [b"\x06", msgpack.packb({"req_id": True})],
    [b"\x06", msgpack.packb({"req_id": "7"})], [b"\x06", msgpack.packb({"req_id": 2**64 - 1})],
    [b"\x06", msgpack.packb({"req_id": 1.0})], [b"\x06", msgpack.packb({"req_id": [1]})],
    [b"\x06", b"\x81\xa6req_id"], [b"\x06", b"\x81\xa6req_"], [b"\x06", b"\x81\xa6req_id\xcf\x00"],
    [b"\x06", b"\x81\xa6req_id" + b"\x91" * 5000], [b"\x06", b"\xdf\xff\xff\xff\xff"],
    [b"\x06", b"\x81\xc6\xff\xff\xff\xff"], [b"\x06", b"\x81\xa2\xff\xfe\x01"],
    [b"\x06", b"\x81\xa6req_id\xd7\xff" + b"\xff" * 8], [b"\x06", b"\x81\xa6req_id\xd6\xff\0\0\0\1"],
], ids=lambda fr: repr(fr)[:30])
def test_peek_req_id_garbage_is_zero(fr: list[bytes]) -> None:
    assert P.peek_req_id(fr) == 0


@pytest.mark.parametrize("rid", [0, 1, 255, 2**32, 2**63 - 1])
def test_peek_req_id_good(rid: int) -> None:
    assert P.peek_req_id(P.encode_request(P.Ping(req_id=rid))) == rid
    assert P.peek_req_id(P.encode_reply(P.PingReply(req_id=rid, boot_id=BOOT, leases=0))) == rid


def test_peek_req_id_does_not_decode_the_rest() -> None:
    """Only the first key/value is read: a valid prefix followed by junk still yields the id."""
    assert P.peek_req_id([b"\x06", b"\x82\xa6req_id\x05\xc1\xc1\xc1"]) == 5


def test_peek_req_id_on_big_frame() -> None:
    msg = P.Reserve(req_id=42, namespace=NS, hashes=hashes(5000))
    assert P.peek_req_id(P.encode_request(msg)) == 42


# -- property tests: nothing but ProtocolError escapes decoding ---------------------------------

_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_protocol_error(fr: list[bytes]) -> None:
    try:
        msg = P.decode_request(fr)
    except ProtocolError as e:
        assert isinstance(e.code, ErrorCode) and e.message
    else:
        assert type(msg) in P.REQUEST_TYPES.values()
        assert P.decode_request(P.encode_request(msg)) == msg  # what decodes re-encodes
    rid = P.peek_req_id(fr)
    assert type(rid) is int and 0 <= rid < 2**63
    for op in Op:
        try:
            P.decode_reply(op, fr)
        except ProtocolError:
            pass


@_SETTINGS
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
def test_random_frames_only_raise_protocol_error(fr: list[bytes]) -> None:
    _decode_or_protocol_error(fr)


@_SETTINGS
@given(st.sampled_from(list(Op)), st.binary(max_size=64))
def test_random_payload_behind_valid_op_only_raises_protocol_error(op: Op, payload: bytes) -> None:
    _decode_or_protocol_error([bytes((op,)), payload])


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64) + 1, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_field_names = st.sampled_from(sorted({f.name for t in (*P.REQUEST_TYPES.values(), P.NamespaceInfo)
                                       for f in dataclasses.fields(t)})) | st.text(max_size=8)


_valid_bodies = st.sampled_from([(m.OP, body_of(m)) for m in REQUESTS.values()])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_bodies, st.dictionaries(_field_names, _msgpack_values | st.none(), max_size=3),
       st.sampled_from(list(Op)))
def test_valid_maps_with_fields_replaced_only_raise_protocol_error(
        base: tuple[Op, dict[str, Any]], changes: dict[str, Any], op: Op) -> None:
    """Real field names with values of any type (None = field removed), under any op."""
    body = dict(base[1])
    for name, value in changes.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    try:
        payload = msgpack.packb(body, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    _decode_or_protocol_error([bytes((op,)), payload])


_valid_frames = st.sampled_from([P.encode_request(m) for m in REQUESTS.values()])


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    fr = list(draw(_valid_frames))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(fr) - 1))
        data = bytearray(fr[i])
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "frames"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == "frames":
            if draw(st.booleans()) and len(fr) < 3:
                fr.append(draw(st.binary(max_size=8)))
            elif len(fr) > 1:
                fr.pop(draw(st.integers(0, len(fr) - 1)))
                continue
        fr[i] = bytes(data)
    return fr


@_SETTINGS
@given(mutated())
def test_mutated_valid_frames_only_raise_protocol_error(fr: list[bytes]) -> None:
    _decode_or_protocol_error(fr)


# -- packed arrays ----------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[], [0], [1, 2, 3], [2**64 - 1, 2**63, 4096], list(range(1000))])
def test_pack_u64_round_trip(values: list[int]) -> None:
    packed = P.pack_u64(values)
    assert isinstance(packed, bytes) and len(packed) == 8 * len(values)
    out = P.unpack_u64(packed)
    assert out.dtype == np.dtype("<u8")
    assert [int(v) for v in out] == values


def test_pack_u64_is_little_endian_and_accepts_arrays() -> None:
    assert P.pack_u64([1]) == b"\x01" + b"\0" * 7
    assert P.pack_u64(np.array([1, 2], dtype=np.int32)) == P.pack_u64([1, 2])


@pytest.mark.parametrize("length", [1, 7, 9, 15])
def test_unpack_u64_rejects_ragged(length: int) -> None:
    with pytest.raises(ProtocolError) as info:
        P.unpack_u64(b"\0" * length)
    assert info.value.code == ErrorCode.BAD_FRAME


def test_u64_array_fields_travel_as_packed_little_endian_bytes() -> None:
    """The codec packs U64Array fields: the same bytes pack_u64 writes, one uint64 each."""
    reply = P.ReserveReply(req_id=1, boot_id=BOOT, lease_id=2, status=b"\0\0", offsets=U64Array([4096, 2**64 - 1]))
    body = msgpack.unpackb(P.encode_reply(reply)[1], raw=False)
    assert body["offsets"] == P.pack_u64([4096, 2**64 - 1]) == (4096).to_bytes(8, "little") + b"\xff" * 8
    assert body["gpu_offsets"] == b""
    out = P.decode_reply(Op.RESERVE, P.encode_reply(reply))
    assert type(out.offsets) is U64Array and list(out.offsets) == [4096, 2**64 - 1]


def test_u64_array_fields_accept_int_lists_and_packed_bytes() -> None:
    """A sender may hand the codec plain ints, or bytes it packed itself: same frame."""
    want = P.encode_reply(P.LookupReply(req_id=1, boot_id=BOOT, hits=2, offsets=[U64Array([1, 2])]))
    assert P.encode_reply(P.LookupReply(req_id=1, boot_id=BOOT, hits=2, offsets=[[1, 2]])) == want  # type: ignore[list-item]
    assert P.encode_reply(P.LookupReply(req_id=1, boot_id=BOOT, hits=2,
                                        offsets=[P.pack_u64([1, 2])])) == want  # type: ignore[list-item]


@pytest.mark.parametrize("length", [1, 7, 9])
def test_ragged_u64_array_field_rejected(length: int) -> None:
    body = body_of(REQUESTS["commit-subset"])
    body["checksums"] = b"\0" * length
    assert_rejected(frames(Op.COMMIT, body), ErrorCode.BAD_REQUEST, "checksums")
    with pytest.raises(ProtocolError) as info:
        P.decode_reply(Op.RESERVE, [b"\0", msgpack.packb({"req_id": 1, "boot_id": BOOT, "lease_id": 1, "status": b"",
                                                           "offsets": b"\0" * length})])
    assert info.value.code == ErrorCode.BAD_REQUEST and "offsets" in info.value.message


def test_role_decodes_to_the_shared_enum() -> None:
    out = P.decode_request(P.encode_request(P.Hello(req_id=1, version=1, role="worker")))
    assert out.role is P.Role.WORKER and out.role == "worker"
    assert P.encode_request(P.Hello(req_id=1, version=1, role=P.Role.WORKER)) == \
        P.encode_request(P.Hello(req_id=1, version=1, role="worker"))


# -- property tests over every op: valid messages round-trip, every decoder survives mutation ---

_u63 = st.integers(0, 2**63 - 1)
_i64 = st.integers(-(2**63 - 1), 2**63 - 1)
_ns = st.binary(min_size=16, max_size=16)
_hash_lists = st.lists(st.binary(min_size=16, max_size=16), max_size=24).map(b"".join)
_floats = st.floats(allow_nan=False)
_u64s = st.lists(st.integers(0, 2**64 - 1), max_size=8).map(U64Array)


@st.composite
def _hashes_with_sums(draw: st.DrawFn, min_size: int = 0, sums_optional: bool = True) -> tuple[bytes, U64Array]:
    n = draw(st.integers(min_size, 24))
    packed = b"".join(draw(st.lists(st.binary(min_size=16, max_size=16), min_size=n, max_size=n)))
    sums = U64Array(draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n)))
    return packed, (U64Array() if sums_optional and draw(st.booleans()) else sums)


def _commit(req_id: int, lease_id: int, hs: tuple[bytes, U64Array]) -> P.Commit:
    return P.Commit(req_id, lease_id, *hs)


def _corrupt(req_id: int, ns: bytes, hs: tuple[bytes, U64Array]) -> P.Corrupt:
    return P.Corrupt(req_id, ns, *hs)


REQUEST_STRATEGIES: dict[Op, st.SearchStrategy[Any]] = {
    Op.HELLO: st.builds(P.Hello, req_id=_u63, version=_i64, role=st.sampled_from(["scheduler", "worker", "admin",
                                                                                 "client"]),
                        pid=_i64, name=st.text(max_size=30),
                        namespaces=st.lists(st.builds(P.NamespaceInfo, id=_ns, chunk_bytes=st.integers(1, 1 << 40),
                                                      name=st.text(max_size=20)), max_size=5),
                        token=st.none() | st.binary(max_size=64)),
    Op.LOOKUP: st.builds(P.Lookup, req_id=_u63, namespaces=st.lists(_ns, min_size=1, max_size=8), hashes=_hash_lists,
                         pin=st.booleans()),
    Op.RESERVE: st.builds(P.Reserve, req_id=_u63, namespace=_ns, hashes=_hash_lists),
    Op.COMMIT: st.builds(_commit, _u63, _i64, _hashes_with_sums()),
    Op.RELEASE: st.builds(P.Release, req_id=_u63, lease_id=_i64),
    Op.PING: st.builds(P.Ping, req_id=_u63, leases=st.lists(_u63, max_size=8)),
    Op.STATS: st.builds(P.Stats, req_id=_u63),
    Op.CLEAR: st.builds(P.Clear, req_id=_u63, token=st.none() | st.binary(max_size=64), namespace=st.none() | _ns),
    Op.CORRUPT: st.builds(_corrupt, _u63, _ns, _hashes_with_sums(min_size=1, sums_optional=False)),
}

_boot = st.binary(min_size=16, max_size=16)
_snapshot_values = st.recursive(st.none() | st.booleans() | _i64 | _floats | st.text(max_size=10),
                                lambda inner: st.lists(inner, max_size=3)
                                | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
REPLY_STRATEGIES: dict[Op, st.SearchStrategy[Any]] = {
    Op.HELLO: st.builds(P.HelloReply, req_id=_u63, boot_id=_boot, client_id=_i64, chunk_tokens=_i64,
                        hash_key=st.binary(max_size=64), lease_timeout=_floats, heartbeat_interval=_floats,
                        regions=st.lists(st.builds(P.RegionInfo, region_id=_i64, kind=st.text(max_size=5),
                                                   name=st.text(max_size=20), size=_i64, uuid=st.binary(max_size=16),
                                                   device=_i64, handle=st.binary(max_size=64),
                                                   device_uuid=st.binary(max_size=16)), max_size=3),
                        verify=st.booleans(), version=_i64),
    Op.LOOKUP: st.builds(P.LookupReply, req_id=_u63, boot_id=_boot, hits=_i64, lease_id=_i64,
                         offsets=st.lists(_u64s, max_size=3),
                         checksums=st.lists(_u64s, max_size=3), pending=_i64,
                         gpu_regions=st.lists(st.binary(max_size=8), max_size=3),
                         gpu_offsets=st.lists(_u64s, max_size=3)),
    Op.RESERVE: st.builds(P.ReserveReply, req_id=_u63, boot_id=_boot, lease_id=_i64, status=st.binary(max_size=8),
                          offsets=_u64s, gpu_regions=st.binary(max_size=8),
                          gpu_offsets=_u64s),
    Op.COMMIT: st.builds(P.CommitReply, req_id=_u63, boot_id=_boot, committed=_i64),
    Op.RELEASE: st.builds(P.ReleaseReply, req_id=_u63, boot_id=_boot, released=_i64),
    Op.PING: st.builds(P.PingReply, req_id=_u63, boot_id=_boot, leases=_i64, alive=st.binary(max_size=8)),
    Op.STATS: st.builds(P.StatsReply, req_id=_u63, boot_id=_boot,
                        snapshot=st.dictionaries(st.text(max_size=10), _snapshot_values, max_size=5)),
    Op.CLEAR: st.builds(P.ClearReply, req_id=_u63, boot_id=_boot, dropped=_i64),
    Op.CORRUPT: st.builds(P.CorruptReply, req_id=_u63, boot_id=_boot, dropped=_i64),
}
_error_replies = st.builds(P.ErrorReply, req_id=_u63, boot_id=_boot, code=_i64, message=st.text(max_size=40))


def test_every_op_has_a_request_and_a_reply_strategy() -> None:
    assert set(REQUEST_STRATEGIES) == set(REPLY_STRATEGIES) == set(Op)


@_SETTINGS
@given(st.sampled_from(list(Op)).flatmap(lambda op: REQUEST_STRATEGIES[op]))
def test_any_valid_request_round_trips(msg: P.Request) -> None:
    fr = P.encode_request(msg)
    assert P.decode_request(fr) == msg
    assert P.peek_req_id(fr) == msg.req_id


@_SETTINGS
@given(st.sampled_from(list(Op)).flatmap(lambda op: st.tuples(st.just(op), REPLY_STRATEGIES[op] | _error_replies)))
def test_any_reply_round_trips(op_msg: tuple[Op, P.Reply]) -> None:
    op, msg = op_msg
    fr = P.encode_reply(msg)
    assert P.decode_reply(op, fr) == msg
    assert P.peek_req_id(fr) == msg.req_id


def _mutate(draw: st.DrawFn, fr: list[bytes]) -> list[bytes]:
    fr = list(fr)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(fr) - 1))
        data = bytearray(fr[i])
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 8))]
        fr[i] = bytes(data)
    return fr


@st.composite
def _mutated_requests(draw: st.DrawFn) -> list[bytes]:
    msg = draw(st.sampled_from(list(Op)).flatmap(lambda op: REQUEST_STRATEGIES[op]))
    return _mutate(draw, P.encode_request(msg))


@st.composite
def _mutated_replies(draw: st.DrawFn) -> tuple[Op, list[bytes]]:
    op = draw(st.sampled_from(list(Op)))
    msg = draw(REPLY_STRATEGIES[op] | _error_replies)
    return op, _mutate(draw, P.encode_reply(msg))


@_SETTINGS
@given(_mutated_requests())
def test_mutated_requests_of_every_op_only_raise_protocol_error(fr: list[bytes]) -> None:
    _decode_or_protocol_error(fr)


@_SETTINGS
@given(_mutated_replies())
def test_mutated_replies_of_every_op_only_raise_protocol_error(op_fr: tuple[Op, list[bytes]]) -> None:
    """What a client's decoder does with a damaged reply: a ProtocolError or a reply of the
    kind asked for (or an error reply), never another exception."""
    op, fr = op_fr
    try:
        out = P.decode_reply(op, fr)
    except ProtocolError as e:
        assert isinstance(e.code, ErrorCode) and e.message
    else:
        assert type(out) in (P.REPLY_TYPES[op], P.ErrorReply)
    rid = P.peek_req_id(fr)
    assert type(rid) is int and 0 <= rid < 2**63


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(Op)).flatmap(lambda op: st.tuples(st.just(op), REPLY_STRATEGIES[op])),
       st.dictionaries(st.sampled_from(sorted({f.name for t in (*P.REPLY_TYPES.values(), P.ErrorReply, P.RegionInfo)
                                               for f in dataclasses.fields(t)})),
                       _msgpack_values | st.none(), max_size=3))
def test_reply_maps_with_fields_replaced_only_raise_protocol_error(op_msg: tuple[Op, P.Reply],
                                                                   changes: dict[str, Any]) -> None:
    op, msg = op_msg
    body = msgpack.unpackb(P.encode_reply(msg)[1], raw=False)
    for name, value in changes.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    try:
        payload = msgpack.packb(body, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    for status in (b"\0", b"\1"):
        try:
            P.decode_reply(op, [status, payload])
        except ProtocolError:
            pass


@_SETTINGS
@given(st.binary(max_size=80))
def test_unpack_u64_only_raises_protocol_error(packed: bytes) -> None:
    try:
        out = P.unpack_u64(packed)
    except ProtocolError as e:
        assert e.code == ErrorCode.BAD_FRAME and len(packed) % 8
    else:
        assert len(out) * 8 == len(packed) and P.pack_u64(out) == packed
