"""What the scheduler-side connector tells its workers each step (engine-agnostic values).

The scheduler decides everything that must agree across ranks (chunk size, namespaces,
which chunks of which request go where); each rank only executes its share. The plan is
shipped by vLLM to every rank, so it holds plain ints, lists and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmkv_mp.wire.keys import Namespace


@dataclass(frozen=True, slots=True)
class LoadJob:
    """Copy pinned chunks into a request's blocks.

    ``offsets[r][i]`` is the host-region offset of chunk i for rank r. ``block_ids`` are the
    destination blocks of the loaded tokens, in order; the first chunk contributes its blocks
    from ``skip_blocks`` on (the engine already holds the ones before). ``checksums[r][i]``
    (``--verify on``, else empty) is what chunk i's bytes must hash to, and ``hashes`` holds
    the chunks' chain hashes, so that a rank can name a chunk that failed to the sidecar.
    ``lease_id`` is the scheduler's read lease that pins the chunks: a rank keeps what it
    copied only if that lease is still alive after the copy (reaped while the scheduler was
    frozen, its slots may have been evicted and rewritten during the copy).
    """

    req_id: str
    boot_id: bytes
    offsets: list[list[int]]
    checksums: list[list[int]]
    block_ids: list[int]
    skip_blocks: int
    hashes: bytes = b""
    lease_id: int = 0
    gpu_regions: list[list[int]] = field(default_factory=list)
    gpu_offsets: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StoreJob:
    """Copy whole chunks of a request out of its blocks: chunk i is
    ``hashes[16*i:16*(i+1)]`` and occupies ``block_ids[i*bpc:(i+1)*bpc]``."""

    req_id: str
    hashes: bytes
    block_ids: list[int]


@dataclass(frozen=True, slots=True)
class StepPlan:
    chunk_tokens: int
    block_size: int
    namespaces: list[bytes]              # per TP rank
    namespace_names: list[str]
    loads: list[LoadJob] = field(default_factory=list)
    stores: list[StoreJob] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    rank_layouts: list[str] = field(default_factory=list)  # per TP rank: the slot layout its namespace is for

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.block_size


def rank_namespaces(*, model: str, revision: str, dtype: str, num_layers: int, kv_heads: int, head_size: int,
                    block_size: int, layout: str, chunk_tokens: int, tp_size: int, mla: bool,
                    tenant: str) -> list[Namespace]:
    """One namespace per tensor-parallel rank; with MLA every rank holds the same bytes, so
    all ranks share one namespace (``tp_rank=None``)."""
    return [Namespace(model, revision, dtype, num_layers, kv_heads, head_size, block_size, layout, chunk_tokens,
                      tp_size, None if mla else r, tenant) for r in range(tp_size)]
