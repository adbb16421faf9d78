"""LMKVConnector: vLLM's KV connector (v1 API) backed by the node's lmkv-sidecar.

Load it with::

    --kv-transfer-config '{"kv_connector":"LMKVConnector",
                           "kv_connector_module_path":"lmkv_mp.integration.vllm",
                           "kv_role":"kv_both"}'

Settings come from ``kv_connector_extra_config`` (``lmkv.endpoint``, ``lmkv.timeout``,
``lmkv.heartbeat_interval``, ``lmkv.retry_interval``, ``lmkv.prefetch_timeout``, ``lmkv.copy_threads``,
``lmkv.chunk_tokens``, ``lmkv.tenant``) or the ``LMKV_*`` environment; with neither, the sidecar's default
endpoint for this user is used.

It is a best-effort cache: a failed or impossible load is reported to vLLM as a load
error and recomputed, so the connector switches ``kv_load_failure_policy`` to
``recompute`` (vLLM's default ``fail`` would turn a cache miss into a user-visible error).

Supported: vLLM 0.32 and 0.33 (the ``(vllm_config, role, kv_cache_config)`` constructor;
0.33's sleep-mode hooks and cache hit sources), models with one KV cache group (full
attention, MLA, and sliding-window layers where vLLM allocates them in full, as it does on
CPU and whenever its hybrid KV manager is off). Per request, what changes KV bytes besides
the tokens is in the key or the request is declined (``request_keys.py``). Declined per
engine, with one log line (the connector then does nothing and the engine runs as if it
were absent): several KV cache groups (vLLM's hybrid manager; ``SupportsHMA`` is not
implemented), sliding-window or chunked-local specs that free blocks, Mamba/linear
attention state, pipeline parallelism and decode or prefill context parallelism,
speculative decoding with draft layers (EAGLE, MTP, a draft model; n-gram and suffix
decoding have none). Per rank: a KV cache layout it
cannot read; that rank fails every load planned for it (recomputed) and answers its stores
at once, so no request waits. Kernel blocks smaller than vLLM's blocks are read as runs of
kernel blocks (their layout is in the namespace).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorHandshakeMetadata,
                                                               KVConnectorMetadata, KVConnectorRole)

from lmkv_mp.engine.client import SidecarClient
from lmkv_mp.config import CLIENT_SETTINGS, load_client_config
from lmkv_mp.config.common import DEFAULT_CHUNK_TOKENS
from lmkv_mp.integration.plan import StepPlan, rank_namespaces
from lmkv_mp.integration.vllm_scheduler import SchedulerSide
from lmkv_mp.integration.vllm_stats import LMKVConnectorStats, LMKVPromMetrics, make_stats
from lmkv_mp.integration.vllm_worker import DeclinedRank, WorkerSide
from lmkv_mp.wire.keys import Namespace
from lmkv_mp.wire.protocol import NamespaceInfo
from lmkv_mp.engine.paged import PagedKV, slot_checksum

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lmkv.vllm")


def _log_through_vllm() -> None:
    """In a vLLM process, lmkv's loggers (this connector's lines, the client's "restart
    detected") write where vLLM's do, at vLLM's level (VLLM_LOGGING_LEVEL), unless the
    "lmkv" logger was configured already. Without this only warnings would show."""
    ours, theirs = logging.getLogger("lmkv"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


_log_through_vllm()

if "kv_cache_config" not in inspect.signature(KVConnectorBase_V1.__init__).parameters:
    raise ImportError(f"lmkv_mp's connector needs vLLM's v1 connector API with a kv_cache_config constructor "
                      f"argument (vLLM 0.32 or 0.33); this vLLM is {vllm.__version__}")


def _split_blocks(t: "torch.Tensor", num_blocks: int) -> "torch.Tensor | str":
    """``t`` with its dimension of ``num_blocks x R`` kernel blocks viewed as ``(num_blocks, R)``,
    or why it cannot be."""
    dims = [d for d, n in enumerate(t.shape) if n > num_blocks and n % num_blocks == 0]
    if len(dims) != 1:
        return f"cannot find the block dimension of a KV cache of shape {tuple(t.shape)} for {num_blocks} blocks"
    d = dims[0]
    return t.unflatten(d, (num_blocks, t.shape[d] // num_blocks))


@dataclass
class LMKVConnectorMetadata(KVConnectorMetadata):
    plan: StepPlan | None


@dataclass
class LMKVRankLayout(KVConnectorHandshakeMetadata):
    """What a rank tells the scheduler once its KV cache is registered: the layout of the
    bytes its slots hold (``PagedKV.layout_fingerprint``), or "" where it declined."""

    layout: str


class LMKVConnector(KVConnectorBase_V1):
    """See the module docstring. Scheduler role: :class:`SchedulerSide`; worker role:
    :class:`WorkerSide`; the connector itself only adapts vLLM's types."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = self._kv_transfer_config
        if ktc.kv_load_failure_policy != "recompute":
            log.info("lmkv: setting kv_load_failure_policy=recompute (a cache miss must never fail a request)")
            ktc.kv_load_failure_policy = "recompute"
        extra = dict(ktc.kv_connector_extra_config or {})
        overrides = {k: extra.get(f"lmkv.{k}") for k in CLIENT_SETTINGS}
        self._client_config = load_client_config(overrides=overrides)
        self._sched: SchedulerSide | None = None
        self._worker: WorkerSide | DeclinedRank | None = None
        self._warned_no_handshake = False
        self._declined = self._check_supported(vllm_config, kv_cache_config)
        if self._declined:
            log.warning("lmkv: connector disabled: %s", self._declined)
            return
        group = kv_cache_config.kv_cache_groups[0]
        self._spec = group.kv_cache_spec
        self._layer_names = list(group.layer_names)
        self._block_size = self._spec.block_size
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        chunk_tokens = int(extra.get("lmkv.chunk_tokens") or 0)
        self._client = SidecarClient(self._client_config, role="scheduler" if role == KVConnectorRole.SCHEDULER
                                     else "worker", name=f"vllm-{role.name.lower()}")
        if role == KVConnectorRole.SCHEDULER:
            if not chunk_tokens:
                chunk_tokens = self._client.hello.chunk_tokens if self._client.connect() else DEFAULT_CHUNK_TOKENS
            self._chunk_tokens = max(1, -(-chunk_tokens // self._block_size)) * self._block_size
            self._tenant = str(extra.get("lmkv.tenant", ""))
            self._tp_size = tp_size
            # The scheduler side starts once every rank has said what its slots hold
            # (set_xfer_handshake_metadata, before the engine takes requests).

    def _start_scheduler(self, rank_layouts: list[str]) -> None:
        """Namespaces from the engine config and the ranks' layouts, declared with their
        chunk size now, so that the sidecar can promote this model's chunks from its disk
        or remote tier before any rank here has stored one."""
        vllm_config, chunk_tokens = self._vllm_config, self._chunk_tokens
        namespaces = self._namespaces(vllm_config, self._kv_cache_config, chunk_tokens, self._tp_size, self._tenant,
                                      rank_layouts)
        chunk_bytes = self._spec.page_size_bytes * len(self._layer_names) * (chunk_tokens // self._block_size)
        self._client.declare([NamespaceInfo(ns.id, chunk_bytes, ns.display_name) for ns in namespaces])
        role = self._kv_transfer_config.kv_role
        self._sched = SchedulerSide(self._client, namespaces, chunk_tokens, self._block_size,
                                    self._client_config.prefetch_timeout, rank_layouts,
                                    loads=role != "kv_producer", stores=role != "kv_consumer",
                                    store_output=self._client_config.store_output)
        log.info("lmkv: scheduler connected=%s endpoint=%s kv_role=%s chunk_tokens=%d namespaces=%s",
                 self._client.available, self._client_config.endpoint, role, chunk_tokens,
                 [ns.display_name for ns in namespaces])

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        """Every rank's :class:`LMKVRankLayout`, by TP rank (vLLM collects them from the
        workers after they registered their caches). Two engines whose ranks hold other
        slot bytes (another attention backend, another layout) get other namespaces."""
        if self._declined or self._role != KVConnectorRole.SCHEDULER or self._sched is not None:
            return
        layouts = [getattr(metadata.get(r), "layout", "") for r in range(self._tp_size)]
        missing = [r for r, lay in enumerate(layouts) if not lay]
        if missing:
            self._declined = f"TP rank(s) {missing} cannot read their KV cache"
            log.warning("lmkv: connector disabled: %s", self._declined)
            return
        self._start_scheduler(layouts)

    # -- setup ----------------------------------------------------------------------------

    @staticmethod
    def _check_supported(vllm_config: Any, kv_cache_config: Any) -> str:
        """Why this engine cannot be served byte-exactly, or "" (ARCHITECTURE §3)."""
        pc = vllm_config.parallel_config
        for name in ("pipeline_parallel_size", "decode_context_parallel_size", "prefill_context_parallel_size"):
            if getattr(pc, name, 1) > 1:
                # PP stages hold different layers under one TP rank's namespace; context
                # parallelism shards a block's tokens over ranks.
                return f"{name}={getattr(pc, name)} is not supported"
        spec_decode = getattr(vllm_config, "speculative_config", None)
        if spec_decode is not None and spec_decode.method not in ("ngram", "suffix"):
            # EAGLE/MTP draft layers share the target's group, and the draft KV of a chunk's
            # last position depends on the token after it (vLLM drops that block from its
            # own hits); a draft model's layers are untested here.
            return f"speculative decoding with {spec_decode.method} (draft layers in the KV cache) is not supported"
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            return (f"{len(groups)} KV cache groups (vLLM's hybrid KV cache manager) are not supported: "
                    "lmkv caches one group (run vLLM with --disable-hybrid-kv-cache-manager to serve this model)")
        if not getattr(groups[0], "enable_kv_transfer", True):
            return "the KV cache group is marked not for transfer"
        spec = groups[0].kv_cache_spec
        kind = type(spec).__name__
        if not hasattr(spec, "num_kv_heads") or not hasattr(spec, "head_size"):
            return f"KV cache spec {kind} is not an attention spec (state, not per-token KV)"
        # A FullAttentionSpec keeps every block of every layer, also for layers with a
        # sliding window (vLLM promotes them so when its hybrid manager is off); a spec of
        # its own (SlidingWindowSpec, ChunkedLocalAttentionSpec) frees blocks out of the window.
        if kind not in ("FullAttentionSpec", "MLAAttentionSpec"):
            return f"KV cache spec {kind} is not supported (only FullAttentionSpec and MLAAttentionSpec)"
        if getattr(spec, "attention_chunk_size", None):
            return f"{kind} with chunked local attention is not supported"
        return ""

    def _namespaces(self, vllm_config: Any, kv_cache_config: Any, chunk_tokens: int, tp_size: int,
                    tenant: str, rank_layouts: list[str]) -> list[Namespace]:
        mc = vllm_config.model_config
        spec = self._spec
        mla = type(spec).__name__.startswith("MLA")
        layout = (f"vllm-{vllm.__version__}|{getattr(kv_cache_config, 'kv_cache_layout', None)}|"
                  f"{type(spec).__name__}|hv{getattr(spec, 'head_size_v', spec.head_size)}|"
                  f"q{getattr(getattr(spec, 'kv_quant_mode', None), 'name', '')}|page{spec.page_size_bytes}")
        if getattr(spec, "sliding_window", None):
            layout += f"|sw{spec.sliding_window}"
        # What the ranks' slots hold: the config alone does not name the attention backend,
        # whose KV cache shape decides the slot bytes.
        layout += "|ranks:" + hashlib.blake2b("\n".join(rank_layouts).encode(), digest_size=8).hexdigest()
        model = str(mc.model)
        return rank_namespaces(model=model, revision=str(mc.revision or ""), dtype=str(spec.dtype),
                               num_layers=len(self._layer_names), kv_heads=spec.num_kv_heads,
                               head_size=spec.head_size, block_size=self._block_size, layout=layout,
                               chunk_tokens=chunk_tokens, tp_size=tp_size, mla=mla, tenant=tenant)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped store is only a future miss

    # -- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        if self._declined:
            return
        from vllm.distributed import get_tensor_model_parallel_rank

        paged = self._read_layout(kv_caches)
        if isinstance(paged, str):
            reason = paged
            # The scheduler may still plan loads of chunks other engines stored: this rank
            # answers each as failed (recomputed), so no request waits for it.
            log.warning("lmkv: connector disabled on this rank: %s", reason)
            self._worker = DeclinedRank(reason)
            self._client.close()
            return
        expected = self._spec.page_size_bytes * len(self._layer_names)
        # The checksum is used while the sidecar runs --verify on (its HELLO says so).
        self._tp_rank = get_tensor_model_parallel_rank()
        self._worker = WorkerSide(self._client, paged, self._tp_rank, expected, checksum=slot_checksum)
        self._layout = paged.layout_fingerprint() if not self._worker.disabled else ""
        self._client.connect()

    def get_handshake_metadata(self) -> LMKVRankLayout | None:
        if self._declined or self._role != KVConnectorRole.WORKER:
            return None
        return LMKVRankLayout(getattr(self, "_layout", ""))

    def _read_layout(self, kv_caches: dict[str, "torch.Tensor"]) -> PagedKV | str:
        """The registered caches as a PagedKV, or why this rank cannot read them."""
        tensors = [kv_caches[name] for name in self._layer_names if name in kv_caches]
        if len(tensors) != len(self._layer_names):
            return "registered KV caches do not match the KV cache group's layers"
        num_blocks = self._kv_cache_config.num_blocks
        if any(num_blocks not in t.shape for t in tensors):
            # The attention backend's kernel blocks are smaller than vLLM's blocks: the cache
            # holds num_blocks x R of them. Each block is then R kernel blocks in a row; the
            # layout fingerprint (in the namespace) shows the split, so a split cache never
            # shares slots with an unsplit one.
            split = [_split_blocks(t, num_blocks) for t in tensors]
            if any(isinstance(t, str) for t in split):
                return next(t for t in split if isinstance(t, str))
            tensors = split
        # vLLM puts the block dimension first in most layouts; when a cache's other sizes
        # happen to equal num_blocks, that is the one to pick rather than a guess.
        block_dim = 0 if all(t.shape[0] == num_blocks for t in tensors) else None
        try:
            return PagedKV(tensors, num_blocks=num_blocks, block_dim=block_dim)
        except (ValueError, TypeError) as e:
            return f"cannot read the KV cache layout: {e}"

    # -- sleep mode (vLLM 0.33) -----------------------------------------------------------

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        return True

    def unregister_kv_caches(self) -> None:
        """Before vLLM releases the KV cache memory: no copy of this rank may touch it until
        :meth:`restore_kv_caches`. Jobs in flight finish first; jobs planned meanwhile fail
        (loads are recomputed) or store nothing."""
        if self._worker is not None:
            self._worker.pause("the KV cache is released (sleep mode)")

    def restore_kv_caches(self) -> None:
        if self._worker is not None:
            self._worker.resume()

    def _plan(self) -> StepPlan | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        plan = meta.plan if isinstance(meta, LMKVConnectorMetadata) else None
        if (plan is not None and isinstance(self._worker, WorkerSide)
                and plan.rank_layouts[self._tp_rank:self._tp_rank + 1] != [self._layout]):
            # Keys the scheduler made for other slot bytes than this rank's: never copy.
            reason = "the scheduler's namespaces were made for another KV cache layout than this rank's"
            log.warning("lmkv: connector disabled on this rank: %s", reason)
            self._worker.close()
            self._worker = DeclinedRank(reason)
        return plan

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        if self._worker is not None:
            self._worker.wait_for_inflight()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        plan = self._plan()
        if self._worker is not None and plan is not None and plan.loads:
            self._worker.submit_loads(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        plan = self._plan()
        if self._worker is not None and plan is not None and plan.stores:
            self._worker.submit_stores(plan)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return self._worker.finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.load_errors() if self._worker is not None else set()

    # -- stats (vllm_stats.py) ------------------------------------------------------------

    def get_kv_connector_stats(self) -> LMKVConnectorStats | None:
        """This role's activity since the last call (vLLM calls it every step, on the
        scheduler and on every worker, and sums the results)."""
        if self._sched is not None:
            return make_stats(self._sched.take_stats())
        if self._worker is not None:
            return make_stats(self._worker.take_stats())
        return None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> LMKVConnectorStats:
        return LMKVConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> LMKVPromMetrics:
        return LMKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        elif hasattr(self, "_client"):  # not built when the engine was declined at start
            self._client.close()

    # -- scheduler side -------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._sched is None:
            if not self._declined and not self._warned_no_handshake:
                self._warned_no_handshake = True
                log.warning("lmkv: connector idle: the ranks never said what their KV caches hold "
                            "(no handshake from vLLM's workers), so no namespace is safe to use")
            return 0, False
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if self._sched is not None and num_external_tokens > 0:
            self._sched.update_state_after_alloc(request, list(blocks.get_block_ids()[0]), num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        if self._sched is None:
            return LMKVConnectorMetadata(None)
        return LMKVConnectorMetadata(self._sched.build_plan(scheduler_output))

    def update_connector_output(self, connector_output: Any) -> None:
        if self._sched is not None:
            self._sched.on_worker_output(connector_output.finished_recving)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._sched is None:
            return False, None
        return self._sched.request_finished(request), None

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[Any, int]:
        """vLLM 0.33: the tokens loaded for ``request`` by the tier that supplied them: the GPU
        tier's copies on every rank's device (``device``), else the host pool (``host``; a
        chunk promoted from disk or Redis is loaded from the host pool too)."""
        if self._sched is None or num_external_tokens <= 0:
            return {}
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        device = min(self._sched.device_tokens(request), num_external_tokens)
        sources = {CacheHitSource.DEVICE: device, CacheHitSource.HOST: num_external_tokens - device}
        return {k: v for k, v in sources.items() if v}

    def reset_cache(self) -> bool | None:
        """vLLM's ``reset_prefix_cache(reset_connector=True)`` (after a weight update): see
        :meth:`SchedulerSide.reset`. The workers need nothing: keys come from the scheduler."""
        if self._sched is None:
            return None if self._declined else True
        return self._sched.reset()
