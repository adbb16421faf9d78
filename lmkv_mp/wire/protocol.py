"""The control-plane wire protocol (ARCHITECTURE §5): every message is a typed object here.

A request is two ZeroMQ frames, ``[op: 1 byte][msgpack map]``; a reply is
``[status: 1 byte][msgpack map]``. Maps are keyed by field name, so either side may add
optional fields without breaking the other. Lists of hashes travel as one concatenated
``bytes`` (``HASH_BYTES`` × n, a :class:`~lmkv_mp.wire.hashes.HashList`'s bytes) and
offsets and checksums as :class:`U64Array` fields, which the codec packs into
little-endian ``uint64`` arrays. No pickle.

``decode_request`` / ``decode_reply`` validate everything at the boundary: the schema
checks each field's type, then each request's own :meth:`validate` its sizes and ranges.
A frame that does not decode to a well-formed message raises :class:`ProtocolError` with a
stable :class:`ErrorCode`, which the server turns into an error reply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import msgpack
import numpy as np

from lmkv_mp.wire import schema
from lmkv_mp.wire.hashes import HashList
from lmkv_mp.wire.keys import HASH_BYTES
from lmkv_mp.wire.schema import U64Array, pack_u64  # noqa: F401  (pack_u64: for frames built by hand)

PROTOCOL_VERSION = 2
"""2: GPU tier (HELLO ``device``, ``RegionInfo.device_uuid``, ``gpu_regions``/``gpu_offsets``)."""
MAX_FRAME_BYTES = 4 << 20
"""Largest payload the sidecar decodes (a 1M-token prompt's hashes are ~64 KiB)."""
MAX_CHUNKS_PER_REQUEST = 65536
MAX_NAMESPACES_PER_REQUEST = 256
MAX_LEASES_PER_PING = 256
MAX_KEYS_PER_LOOKUP = 1 << 18
"""Namespaces × chunks one LOOKUP may ask about: the loop walks the index key by key, so
this bounds one request's loop time (a 1M-token prompt at TP 8 is 32k keys)."""
DEVICE_UUID_BYTES = 16


class Op(enum.IntEnum):
    HELLO = 1
    LOOKUP = 2
    RESERVE = 3
    COMMIT = 4
    RELEASE = 5
    PING = 6
    STATS = 7
    CLEAR = 8
    CORRUPT = 9


OPS_BEFORE_HELLO = frozenset({Op.HELLO, Op.STATS})
"""What a client may send before its HELLO: HELLO itself, and STATS (``lmkv-stats`` never
registers). The sidecar narrows it where every client needs a token (the server's
``may_precede_hello``)."""


class Role(enum.StrEnum):
    """What a client says it is in HELLO; the sidecar counts clients by role."""

    SCHEDULER = "scheduler"
    WORKER = "worker"
    ADMIN = "admin"
    CLIENT = "client"


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1


class ErrorCode(enum.IntEnum):
    """Stable error codes; numbers never change meaning."""

    BAD_FRAME = 1          # frame count, op byte or msgpack body malformed
    UNKNOWN_OP = 2
    BAD_REQUEST = 3        # fields missing, wrong type or out of range
    VERSION = 4            # protocol version mismatch
    NOT_REGISTERED = 5     # no HELLO from this connection (or its lease expired): HELLO again
    UNKNOWN_NAMESPACE = 6  # RESERVE for a namespace this client did not declare in HELLO
    UNKNOWN_LEASE = 7      # lease id not held by this client (expired or released)
    NO_SPACE = 8
    UNAUTHORIZED = 9       # admin op without the admin token
    TOO_LARGE = 10         # frame or list beyond the protocol limits
    QUOTA = 11             # per-client limit reached
    CONFLICT = 12          # namespace declared with a different chunk size
    INTERNAL = 13
    CORRUPT = 14           # not a reply: counts chunks a loader found corrupt (CORRUPT op)


class SlotStatus(enum.IntEnum):
    """Per-chunk answer to RESERVE."""

    WRITE = 0      # reserved for this writer: copy, then COMMIT
    PRESENT = 1    # already committed: skip
    BUSY = 2       # another writer holds it: skip
    NO_SPACE = 3   # pool full of pinned or in-flight entries: skip (and all later chunks)


class ProtocolError(Exception):
    """A message that cannot be accepted; becomes an :class:`ErrorReply`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refuse(code: ErrorCode, message: str) -> None:
    raise ProtocolError(code, message)


def _hash_count(packed: bytes, what: str) -> int:
    """How many hashes ``packed`` holds; refused if ragged or beyond the per-request limit."""
    try:
        n = len(HashList(packed))
    except ValueError as e:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} {e}") from None
    if n > MAX_CHUNKS_PER_REQUEST:
        _refuse(ErrorCode.TOO_LARGE, f"{what}: {n} chunks exceeds {MAX_CHUNKS_PER_REQUEST}")
    return n


def _check_ns_id(ns: bytes, what: str) -> None:
    if len(ns) != HASH_BYTES:
        _refuse(ErrorCode.BAD_REQUEST, f"{what} must be {HASH_BYTES} bytes, got {len(ns)}")


# --- values carried inside messages --------------------------------------------------


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    """A namespace a client will write: its id and the bytes one chunk occupies."""

    id: bytes
    chunk_bytes: int
    name: str = ""


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """Memory a client maps once: the host pool (``region_id`` 0, ``kind='shm'`` or
    ``'file'``) or a GPU tier region (ids from 1): ``kind='cuda-vmm'`` is a VMM allocation
    whose fd the unix socket at ``name`` hands out (memory/handles.py), ``kind='cuda'`` one
    whose CUDA IPC handle is ``handle``. ``device_uuid`` is the 16-byte uuid of its device
    (``device``: the sidecar's ordinal, for logs only). ``uuid`` names this allocation: a
    client maps a region once per uuid."""

    region_id: int
    kind: str
    name: str
    size: int
    uuid: bytes
    device: int = -1
    handle: bytes = b""
    device_uuid: bytes = b""


# --- requests (each validate()s what its field types cannot say) -----------------------


@dataclass(frozen=True, slots=True)
class Hello:
    OP: ClassVar[Op] = Op.HELLO
    req_id: int
    version: int
    role: Role
    pid: int = 0
    name: str = ""
    namespaces: list[NamespaceInfo] = field(default_factory=list)
    token: bytes | None = None
    device: bytes = b""      # a CUDA worker: the 16-byte uuid of its KV cache's device

    def validate(self) -> None:
        if len(self.namespaces) > MAX_NAMESPACES_PER_REQUEST:
            _refuse(ErrorCode.TOO_LARGE, "too many namespaces")
        if self.device and len(self.device) != DEVICE_UUID_BYTES:
            _refuse(ErrorCode.BAD_REQUEST, f"device must be a {DEVICE_UUID_BYTES}-byte CUDA device uuid, "
                    f"got {len(self.device)} bytes")
        for ns in self.namespaces:
            _check_ns_id(ns.id, "namespace id")
            if not 0 < ns.chunk_bytes <= 1 << 40:
                _refuse(ErrorCode.BAD_REQUEST, f"chunk_bytes {ns.chunk_bytes} out of range")


@dataclass(frozen=True, slots=True)
class Lookup:
    """Count leading chunks committed in *every* namespace; ``pin`` also takes a read lease."""

    OP: ClassVar[Op] = Op.LOOKUP
    req_id: int
    namespaces: list[bytes]
    hashes: bytes            # a HashList's bytes
    pin: bool = False

    def validate(self) -> None:
        if not self.namespaces or len(self.namespaces) > MAX_NAMESPACES_PER_REQUEST:
            _refuse(ErrorCode.BAD_REQUEST, f"LOOKUP needs 1..{MAX_NAMESPACES_PER_REQUEST} namespaces")
        for ns in self.namespaces:
            _check_ns_id(ns, "namespace")
        n = _hash_count(self.hashes, "hashes")
        if n * len(self.namespaces) > MAX_KEYS_PER_LOOKUP:
            _refuse(ErrorCode.TOO_LARGE, f"LOOKUP of {n} chunks in {len(self.namespaces)} namespaces "
                    f"exceeds {MAX_KEYS_PER_LOOKUP} keys: split it")


@dataclass(frozen=True, slots=True)
class Reserve:
    OP: ClassVar[Op] = Op.RESERVE
    req_id: int
    namespace: bytes
    hashes: bytes            # a HashList's bytes

    def validate(self) -> None:
        _check_ns_id(self.namespace, "namespace")
        _hash_count(self.hashes, "hashes")


@dataclass(frozen=True, slots=True)
class Commit:
    """Make written chunks of a write lease visible; the lease ends, unlisted chunks are freed.

    ``hashes`` empty means every chunk the lease reserved. ``checksums`` is empty or one
    per committed chunk.
    """

    OP: ClassVar[Op] = Op.COMMIT
    req_id: int
    lease_id: int
    hashes: bytes = b""      # a HashList's bytes
    checksums: U64Array = field(default_factory=U64Array)

    def validate(self) -> None:
        n = _hash_count(self.hashes, "hashes")
        if self.checksums and len(self.checksums) != n:
            _refuse(ErrorCode.BAD_REQUEST, "checksums must be one uint64 per listed hash")


@dataclass(frozen=True, slots=True)
class Release:
    OP: ClassVar[Op] = Op.RELEASE
    req_id: int
    lease_id: int

    def validate(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Ping:
    """Heartbeat. ``leases`` (at most 256) asks which of these lease ids are alive now: lease
    ids are never reused, so a lease alive after a copy was alive all through it."""

    OP: ClassVar[Op] = Op.PING
    req_id: int
    leases: list[int] = field(default_factory=list)

    def validate(self) -> None:
        if len(self.leases) > MAX_LEASES_PER_PING:
            _refuse(ErrorCode.TOO_LARGE, f"PING asks about {len(self.leases)} leases; at most {MAX_LEASES_PER_PING}")


@dataclass(frozen=True, slots=True)
class Stats:
    OP: ClassVar[Op] = Op.STATS
    req_id: int

    def validate(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Clear:
    OP: ClassVar[Op] = Op.CLEAR
    req_id: int
    token: bytes | None = None
    namespace: bytes | None = None

    def validate(self) -> None:
        if self.namespace is not None:
            _check_ns_id(self.namespace, "namespace")


@dataclass(frozen=True, slots=True)
class Corrupt:
    """A loader's report: these chunks failed their checksum after it copied them
    (``--verify on``). ``checksums`` holds the checksum the loader was given for each, one
    per hash; the sidecar drops an entry only while it still carries that checksum, so a
    late report never drops a chunk written since."""

    OP: ClassVar[Op] = Op.CORRUPT
    req_id: int
    namespace: bytes
    hashes: bytes            # a HashList's bytes
    checksums: U64Array

    def validate(self) -> None:
        _check_ns_id(self.namespace, "namespace")
        n = _hash_count(self.hashes, "hashes")
        if not n or len(self.checksums) != n:
            _refuse(ErrorCode.BAD_REQUEST, "CORRUPT needs hashes and one uint64 checksum per hash")


Request = Union[Hello, Lookup, Reserve, Commit, Release, Ping, Stats, Clear, Corrupt]
REQUEST_TYPES: dict[Op, type] = {t.OP: t for t in (Hello, Lookup, Reserve, Commit, Release, Ping, Stats, Clear,
                                                    Corrupt)}

# --- replies --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReply:
    OP: ClassVar[Op] = Op.HELLO
    req_id: int
    boot_id: bytes
    client_id: int
    chunk_tokens: int
    hash_key: bytes
    lease_timeout: float
    heartbeat_interval: float
    regions: list[RegionInfo]
    verify: bool = False
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class LookupReply:
    """``offsets[i]``/``checksums[i]`` belong to ``namespaces[i]`` of the request and hold
    ``hits`` entries each when pinned (empty otherwise): host-region offsets and checksums
    (``--verify on`` only). ``gpu_regions[i]`` (one byte per hit, 0 for none) and
    ``gpu_offsets[i]`` name each hit's GPU tier copy; both are empty when the sidecar has
    no GPU tier."""

    OP: ClassVar[Op] = Op.LOOKUP
    req_id: int
    boot_id: bytes
    hits: int
    lease_id: int = 0
    offsets: list[U64Array] = field(default_factory=list)
    checksums: list[U64Array] = field(default_factory=list)
    pending: int = 0
    gpu_regions: list[bytes] = field(default_factory=list)
    gpu_offsets: list[U64Array] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ReserveReply:
    """One :class:`SlotStatus` byte and one host offset per requested chunk; when some
    WRITE chunk also got a GPU tier slot, ``gpu_regions`` (one byte per chunk, 0 for none)
    and ``gpu_offsets`` (one per chunk) say where: the writer fills both before COMMIT."""

    OP: ClassVar[Op] = Op.RESERVE
    req_id: int
    boot_id: bytes
    lease_id: int
    status: bytes
    offsets: U64Array
    gpu_regions: bytes = b""
    gpu_offsets: U64Array = field(default_factory=U64Array)


@dataclass(frozen=True, slots=True)
class CommitReply:
    OP: ClassVar[Op] = Op.COMMIT
    req_id: int
    boot_id: bytes
    committed: int


@dataclass(frozen=True, slots=True)
class ReleaseReply:
    OP: ClassVar[Op] = Op.RELEASE
    req_id: int
    boot_id: bytes
    released: int


@dataclass(frozen=True, slots=True)
class PingReply:
    """``leases``: how many leases the caller holds; ``alive[i]`` is 1 if the request's
    ``leases[i]`` is alive (whoever holds it), else 0."""

    OP: ClassVar[Op] = Op.PING
    req_id: int
    boot_id: bytes
    leases: int
    alive: bytes = b""


@dataclass(frozen=True, slots=True)
class StatsReply:
    OP: ClassVar[Op] = Op.STATS
    req_id: int
    boot_id: bytes
    snapshot: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ClearReply:
    OP: ClassVar[Op] = Op.CLEAR
    req_id: int
    boot_id: bytes
    dropped: int


@dataclass(frozen=True, slots=True)
class CorruptReply:
    OP: ClassVar[Op] = Op.CORRUPT
    req_id: int
    boot_id: bytes
    dropped: int


@dataclass(frozen=True, slots=True)
class ErrorReply:
    req_id: int
    boot_id: bytes
    code: int
    message: str


Reply = Union[HelloReply, LookupReply, ReserveReply, CommitReply, ReleaseReply, PingReply,
              StatsReply, ClearReply, CorruptReply, ErrorReply]
REPLY_TYPES: dict[Op, type] = {t.OP: t for t in (HelloReply, LookupReply, ReserveReply, CommitReply,
                                                  ReleaseReply, PingReply, StatsReply, ClearReply, CorruptReply)}

# --- codec ----------------------------------------------------------------------------

def _from_map(cls: type, body: dict[str, Any], where: str) -> Any:
    try:
        return schema.from_map(cls, body, where)
    except schema.SchemaError as e:
        raise ProtocolError(ErrorCode.BAD_REQUEST, str(e)) from None


def _unpack(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"payload of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        body = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME_BYTES,
            max_str_len=1 << 16, max_array_len=MAX_CHUNKS_PER_REQUEST, max_map_len=1024,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"payload is not valid msgpack: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "payload must be a msgpack map")
    return body


def encode_request(msg: Request, req_id: int | None = None) -> list[bytes]:
    """Frames for a request; ``req_id`` overrides the message's own (clients number calls)."""
    body = schema.to_map(msg)
    if req_id is not None:
        body["req_id"] = req_id
    return [_OP_FRAMES[msg.OP], msgpack.packb(body, use_bin_type=True)]


_OP_FRAMES = {op: bytes((op,)) for op in Op}


def encode_reply(msg: Reply) -> list[bytes]:
    status = Status.ERROR if isinstance(msg, ErrorReply) else Status.OK
    return [bytes((status,)), msgpack.packb(schema.to_map(msg), use_bin_type=True)]


def peek_req_id(frames: list[bytes]) -> int:
    """The request id of a frame without decoding the rest (0 if there is none).

    Encoders write ``req_id`` as the first key of every map, so this reads one key and
    one value: cheap enough for the client to match replies, and safe on garbage."""
    if len(frames) != 2:
        return 0
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(frames[1]) + 1, max_str_len=64,
                                    max_bin_len=64, max_array_len=16, max_map_len=1024)
        unpacker.feed(frames[1])
        if unpacker.read_map_header() < 1 or unpacker.unpack() != "req_id":
            return 0
        rid = unpacker.unpack()
    except (ValueError, msgpack.UnpackException, TypeError, msgpack.OutOfData):
        return 0
    return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= schema.I64_MAX else 0


def decode_request(frames: list[bytes]) -> Request:
    """Frames from a client (routing id already stripped) → validated request."""
    if len(frames) != 2:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"expected 2 frames [op, payload], got {len(frames)}")
    op_frame, payload = frames
    if len(op_frame) != 1:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"op frame must be 1 byte, got {len(op_frame)}")
    try:
        op = Op(op_frame[0])
    except ValueError:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op_frame[0]}") from None
    msg = _from_map(REQUEST_TYPES[op], _unpack(payload), op.name)
    if msg.req_id < 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "req_id must be >= 0")
    msg.validate()
    return msg


def decode_reply(op: Op, frames: list[bytes]) -> Reply:
    """Frames from the sidecar for a request of kind ``op`` → validated reply."""
    if len(frames) != 2 or len(frames[0]) != 1:
        raise ProtocolError(ErrorCode.BAD_FRAME, "reply must be 2 frames [status, payload]")
    body = _unpack(frames[1])
    if frames[0][0] == Status.ERROR:
        return _from_map(ErrorReply, body, "ERROR")
    if frames[0][0] != Status.OK:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown status {frames[0][0]}")
    return _from_map(REPLY_TYPES[op], body, f"{op.name} reply")


def unpack_u64(packed: bytes) -> np.ndarray:
    """The little-endian uint64s of ``packed`` bytes, for frames read by hand (messages'
    :class:`U64Array` fields arrive decoded); :func:`pack_u64` is its inverse."""
    if len(packed) % 8:
        raise ProtocolError(ErrorCode.BAD_FRAME, "packed uint64 array has a ragged length")
    return np.frombuffer(packed, dtype="<u8")
