"""Cache keys: chunking, prefix-chain hashing and namespaces (ARCHITECTURE §3).

A key is (namespace id, chain hash). The chain hash of chunk i identifies the whole
prefix up to and including chunk i, so the longest cached prefix of a prompt is the
number of leading chunks that hit. Only full chunks get a hash.

The hash is keyed BLAKE2b-128: without the key an attacker who controls prompt text
cannot construct a prompt whose chain collides with another prompt's and so read or
poison its KV. The key is the sidecar's (``--hash-key-file``); clients receive it in
the HELLO reply.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import struct
from dataclasses import asdict, dataclass
from typing import Mapping, NewType, Sequence

import msgpack
import numpy as np

try:  # built by pip install (setup.py); optional, so a box without a C compiler still installs
    from lmkv_mp.wire import _chain
except ImportError:
    _chain = None

log = logging.getLogger("lmkv.keys")
_warned_python = False

HASH_BYTES = 16
ChunkHash = NewType("ChunkHash", bytes)
NamespaceId = NewType("NamespaceId", bytes)

# v2: each chunk's tokens are first digested on their own (BLAKE2b-256), so the C
# extension digests several chunks at once; v1 hashed the tokens inside the chain step.
_CHAIN_SEED = b"lmkv_mp/chain/v2"


def num_full_chunks(num_tokens: int, chunk_tokens: int) -> int:
    """How many whole chunks ``num_tokens`` tokens make (a partial tail is never cached)."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return max(num_tokens, 0) // chunk_tokens


def chain_hashes(
    tokens: Sequence[int] | np.ndarray,
    chunk_tokens: int,
    key: bytes,
    salt: bytes = b"",
    max_chunks: int | None = None,
    extras: Mapping[int, bytes] | None = None,
) -> bytes:
    """The chain hashes of the full chunks of ``tokens``, concatenated (16 bytes each).

    ``h_{-1} = H(seed || salt)``, ``h_i = H(h_{i-1} || D(tokens_i as little-endian int32))``
    where ``H`` is keyed BLAKE2b-128 and ``D`` unkeyed BLAKE2b-256.
    ``salt`` is a per-request seed (vLLM's ``cache_salt``, a LoRA adapter's identity, ...):
    prompts with different salts never share a key. ``max_chunks`` stops early (the caller
    only needs a prefix). ``extras[i]`` is what else chunk i's KV depends on besides its tokens
    (the hashes of the images its placeholder tokens stand for): that chunk's digest becomes
    ``D(D(tokens_i) || extras[i])``, so it and every later chunk differ; chunks without
    extras hash as they would without any.
    """
    if isinstance(tokens, (list, tuple)):
        # vLLM's prompt_token_ids. Every id is checked, as the numpy path does, not just the
        # hashed ones. A list packs fastest in C, then with struct.pack; numpy is slowest.
        n = _chunks_wanted(len(tokens), chunk_tokens, max_chunks)
        try:
            raw = _chain.pack_tokens(tokens) if _chain else struct.pack(f"<{len(tokens)}i", *tokens)
        except (struct.error, OverflowError, TypeError):
            raise ValueError("tokens must be a 1-D sequence of integer token ids that fit in int32") from None
    else:
        try:
            arr = np.asarray(tokens, dtype=np.int64)
        except OverflowError:  # a Python int beyond int64: same answer as any other bad id
            raise ValueError("token ids must fit in int32") from None
        if arr.ndim != 1:
            raise ValueError("tokens must be a 1-D sequence of token ids")
        if arr.size and (arr.min() < -(2**31) or arr.max() >= 2**31):
            raise ValueError("token ids must fit in int32")
        n = _chunks_wanted(int(arr.size), chunk_tokens, max_chunks)
        raw = arr[: n * chunk_tokens].astype("<i4").tobytes()
    step = chunk_tokens * 4
    first = hashlib.blake2b(_CHAIN_SEED + salt, digest_size=HASH_BYTES, key=key).digest()
    extras = {i: e for i, e in (extras or {}).items() if i < n}
    if _chain and not extras:
        return _chain.chain(raw, step, n, key, first, HASH_BYTES)
    if not extras:
        _warn_python_once()
    prev = first
    out = bytearray(n * HASH_BYTES)
    view = memoryview(raw)
    for i in range(n):
        digest = hashlib.blake2b(view[i * step : (i + 1) * step], digest_size=32).digest()
        if i in extras:
            digest = hashlib.blake2b(digest + extras[i], digest_size=32).digest()
        prev = hashlib.blake2b(prev + digest, digest_size=HASH_BYTES, key=key).digest()
        out[i * HASH_BYTES : (i + 1) * HASH_BYTES] = prev
    return bytes(out)


def _warn_python_once() -> None:
    global _warned_python
    if not _warned_python:
        _warned_python = True
        log.warning("lmkv_mp.wire._chain (C) is not built: prompt hashing runs in Python, about 3x slower "
                    "per lookup; reinstall lmkv_mp where a C compiler and the Python headers exist")


def _chunks_wanted(num_tokens: int, chunk_tokens: int, max_chunks: int | None) -> int:
    n = num_full_chunks(num_tokens, chunk_tokens)
    return n if max_chunks is None else min(n, max_chunks)


@functools.lru_cache(maxsize=64)
def _splitter(n: int) -> struct.Struct:
    return struct.Struct(f"{HASH_BYTES}s" * n)


def split_hashes(packed: bytes) -> tuple[ChunkHash, ...]:
    """Split a concatenation of 16-byte hashes (in C: this is on every request's hot path).
    Raises ValueError on a ragged length."""
    if len(packed) % HASH_BYTES:
        raise ValueError(f"hash list length {len(packed)} is not a multiple of {HASH_BYTES}")
    n = len(packed) // HASH_BYTES
    if n <= 4096:
        return _splitter(n).unpack(packed)  # type: ignore[return-value]
    return tuple(ChunkHash(packed[i:i + HASH_BYTES]) for i in range(0, len(packed), HASH_BYTES))


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that makes KV bytes incompatible. Equal namespaces share keys.

    ``tp_rank`` is the shard index of a tensor-parallel rank; ``None`` where ranks hold
    identical bytes (MLA), so all ranks share one copy. ``layout`` is the transfer
    layer's fingerprint of the registered tensors (shapes, strides order, dtypes), so two
    engines whose paged caches differ in layout never exchange bytes.
    """

    model: str
    revision: str
    dtype: str
    num_layers: int
    kv_heads: int
    head_size: int
    block_size: int
    layout: str
    chunk_tokens: int
    tp_size: int
    tp_rank: int | None
    tenant: str = ""

    @property
    def id(self) -> NamespaceId:
        """16-byte fingerprint over every field (canonical msgpack, BLAKE2b-128)."""
        canon = msgpack.packb(sorted(asdict(self).items()), use_bin_type=True)
        return NamespaceId(hashlib.blake2b(canon, digest_size=HASH_BYTES, person=b"lmkv-ns-v1").digest())

    @property
    def display_name(self) -> str:
        """Readable label for stats: model, dtype and shard."""
        shard = "all" if self.tp_rank is None else f"{self.tp_rank}/{self.tp_size}"
        return f"{self.model}[{self.dtype},tp{shard}]"
