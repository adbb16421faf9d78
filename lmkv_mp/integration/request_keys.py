"""What of a vLLM request, besides its prompt tokens, changes the KV bytes of its prompt, and
how each such input enters the request's chunk keys, or declines the request.

A declined request is neither looked up nor stored: the engine computes it as it would
without lmkv. Every input vLLM's own prefix cache keys on is covered here:

* ``cache_salt``: the chain seed, as the user's string (keys of salted prompts stored before
  this module existed stay the same).
* LoRA (``lora_request``): the chain seed gets the adapter's name and a digest of its files
  (every file under ``lora_path``: names, sizes and bytes), so the same prompt under two
  adapters, or under one adapter whose weights changed, never shares keys. vLLM's own cache
  keys on name and path; the digest also catches new weights at an old path. An adapter
  whose files cannot be read in this process is declined (every doubt is a miss).
* multimodal inputs (``mm_features``): each feature's ``identifier`` (vLLM's hash of the
  item's content and processing) with its placeholder's offset and length enters the digest
  of every chunk the placeholder overlaps (:func:`lmkv_mp.wire.keys.chain_hashes` extras);
  every later chunk follows through the chain. A feature without an identifier is declined.
* prompt embeddings (``prompt_embeds``, no ``prompt_token_ids``): declined; the embeddings,
  not token ids, are the input.
* the engine's reset epoch (:meth:`SchedulerSide.reset`, vLLM's ``reset_cache``): the seed.

Checked and left out of the key, because they do not change prompt KV: sampling parameters
(temperature, penalties, logits processors, structured output, stop conditions),
``pooling_params``, ``kv_transfer_params`` and ``ec_transfer_params`` (how KV or encoder
outputs travel, not what they are), priority, ``session_id``, trace headers. A request
with ``skip_reading_prefix_cache`` is stored but never loaded, as vLLM's own cache does.
Engine-wide inputs (model, dtype, layout, parallelism, a speculative decoding draft model)
are in the namespace instead (``vllm.py``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

# A structured seed starts with a byte no UTF-8 string has, so no cache_salt string can
# spell another request's adapter or epoch.
_STRUCTURED = b"\xff"


@dataclass(frozen=True, slots=True)
class RequestKey:
    """A request's chain seed and per-chunk extras (``chain_hashes``' ``salt`` and ``extras``),
    or ``declined``: why the request is not cached (then the rest is empty)."""

    salt: bytes = b""
    extras: dict[int, bytes] = field(default_factory=dict)
    declined: str = ""


class AdapterDigests:
    """Digests of LoRA adapters' files, computed once per adapter version: a file's
    change of size or modification time means new bytes to hash."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple[str, tuple[tuple[str, int, int], ...]], bytes] = {}

    def digest(self, path: str) -> bytes | None:
        """BLAKE2b-128 over the adapter's files (relative names, sizes, bytes), None where
        ``path`` is not a readable file or directory in this process."""
        try:
            root = Path(path)
            files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
            stats = tuple((str(p.relative_to(root)) if root.is_dir() else p.name, *self._stat(p)) for p in files)
        except OSError:
            return None
        if not stats:
            return None
        key = (str(root.resolve()), stats)
        with self._lock:
            known = self._known.get(key)
        if known is not None:
            return known
        h = hashlib.blake2b(digest_size=16, person=b"lmkv-lora-v1")
        try:
            for (name, size, _), p in zip(stats, files):
                h.update(msgpack.packb([name, size]))
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
        except OSError:
            return None
        with self._lock:
            self._known[key] = h.digest()
        return h.digest()

    @staticmethod
    def _stat(p: Path) -> tuple[int, int]:
        st = p.stat()
        return st.st_size, st.st_mtime_ns


def request_key(request: Any, chunk_tokens: int, epoch: bytes, adapters: AdapterDigests) -> RequestKey:
    """The key inputs of a vLLM ``Request`` (see the module docstring)."""
    if getattr(request, "prompt_token_ids", None) is None or getattr(request, "prompt_embeds", None) is not None:
        return RequestKey(declined="prompt embeddings")
    adapter = b""
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        digest = adapters.digest(str(getattr(lora, "lora_path", "") or ""))
        if digest is None:
            return RequestKey(declined=f"LoRA adapter {lora.lora_name!r}: its files cannot be read here "
                                       f"({getattr(lora, 'lora_path', '')!r})")
        adapter = msgpack.packb([str(lora.lora_name), digest])
    extras, reason = _mm_extras(getattr(request, "mm_features", None) or (), chunk_tokens)
    if reason:
        return RequestKey(declined=reason)
    salt = (getattr(request, "cache_salt", None) or "").encode()
    if adapter or epoch:
        salt = _STRUCTURED + msgpack.packb([salt, adapter, epoch])
    return RequestKey(salt, extras)


def _mm_extras(features: Any, chunk_tokens: int) -> tuple[dict[int, bytes], str]:
    """Per chunk index, the digest of the multimodal items whose placeholders overlap it:
    (identifier, offset of the placeholder from the chunk's start, its length) each."""
    per_chunk: dict[int, list[list[Any]]] = {}
    for feature in features:
        ident, pos = getattr(feature, "identifier", None), getattr(feature, "mm_position", None)
        if not ident or pos is None:
            return {}, "a multimodal input without a content hash"
        offset, length = int(pos.offset), int(pos.length)
        for c in range(offset // chunk_tokens, (offset + max(length, 1) - 1) // chunk_tokens + 1):
            per_chunk.setdefault(c, []).append([str(ident), offset - c * chunk_tokens, length])
    return {c: hashlib.blake2b(msgpack.packb(items), digest_size=32).digest()
            for c, items in per_chunk.items()}, ""


def new_epoch() -> bytes:
    """A seed part no other engine and no earlier epoch of this one uses."""
    return os.urandom(16)
