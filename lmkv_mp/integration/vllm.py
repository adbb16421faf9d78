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

Supported: vLLM 0.32 (the ``(vllm_config, role, kv_cache_config)`` constructor), models
with one KV cache group (full attention or MLA). Hybrid models are declined with one log
line: the connector then does nothing and the engine runs as if it were absent.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole)

from lmkv_mp.engine.client import SidecarClient
from lmkv_mp.config import CLIENT_SETTINGS, load_client_config
from lmkv_mp.config.common import DEFAULT_CHUNK_TOKENS
from lmkv_mp.integration.plan import StepPlan, rank_namespaces
from lmkv_mp.integration.vllm_scheduler import SchedulerSide
from lmkv_mp.integration.vllm_stats import LMKVConnectorStats, LMKVPromMetrics, make_stats
from lmkv_mp.integration.vllm_worker import WorkerSide
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
                      f"argument (vLLM 0.32); this vLLM is {vllm.__version__}")


@dataclass
class LMKVConnectorMetadata(KVConnectorMetadata):
    plan: StepPlan | None


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
        self._worker: WorkerSide | None = None
        self._declined = self._check_supported(kv_cache_config)
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
            chunk_tokens = max(1, -(-chunk_tokens // self._block_size)) * self._block_size
            namespaces = self._namespaces(vllm_config, kv_cache_config, chunk_tokens, tp_size, str(extra.get("lmkv.tenant", "")))
            # Declared with their chunk size now, so that the sidecar can promote this model's
            # chunks from its disk or remote tier before any rank here has stored one (the
            # ranks check their caches hold exactly this many bytes per block).
            chunk_bytes = self._spec.page_size_bytes * len(self._layer_names) * (chunk_tokens // self._block_size)
            self._client.declare([NamespaceInfo(ns.id, chunk_bytes, ns.display_name) for ns in namespaces])
            self._sched = SchedulerSide(self._client, namespaces, chunk_tokens, self._block_size,
                                        self._client_config.prefetch_timeout)
            log.info("lmkv: scheduler connected=%s endpoint=%s chunk_tokens=%d namespaces=%s",
                     self._client.available, self._client_config.endpoint, chunk_tokens,
                     [ns.display_name for ns in namespaces])

    # -- setup ----------------------------------------------------------------------------

    @staticmethod
    def _check_supported(kv_cache_config: Any) -> str:
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            return f"hybrid model with {len(groups)} KV cache groups is not supported"
        spec = groups[0].kv_cache_spec
        if getattr(spec, "sliding_window", None) or getattr(spec, "attention_chunk_size", None):
            return f"{type(spec).__name__} with a window is not supported"
        if not hasattr(spec, "num_kv_heads") or not hasattr(spec, "head_size"):
            return f"KV cache spec {type(spec).__name__} is not an attention spec"
        return ""

    def _namespaces(self, vllm_config: Any, kv_cache_config: Any, chunk_tokens: int, tp_size: int,
                    tenant: str) -> list[Namespace]:
        mc = vllm_config.model_config
        spec = self._spec
        mla = type(spec).__name__.startswith("MLA")
        layout = (f"vllm-{vllm.__version__}|{getattr(kv_cache_config, 'kv_cache_layout', None)}|"
                  f"{type(spec).__name__}|hv{getattr(spec, 'head_size_v', spec.head_size)}|"
                  f"q{getattr(getattr(spec, 'kv_quant_mode', None), 'name', '')}|page{spec.page_size_bytes}")
        return rank_namespaces(model=str(mc.model), revision=str(mc.revision or ""), dtype=str(spec.dtype),
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

        tensors = [kv_caches[name] for name in self._layer_names if name in kv_caches]
        if len(tensors) != len(self._layer_names):
            self._declined = "registered KV caches do not match the KV cache group's layers"
            log.warning("lmkv: connector disabled on this rank: %s", self._declined)
            return
        num_blocks = self._kv_cache_config.num_blocks
        # vLLM puts the block dimension first in most layouts; when a cache's other sizes
        # happen to equal num_blocks, that is the one to pick rather than a guess.
        block_dim = 0 if all(t.shape[0] == num_blocks for t in tensors) else None
        try:
            paged = PagedKV(tensors, num_blocks=num_blocks, block_dim=block_dim)
        except (ValueError, TypeError) as e:
            self._declined = f"cannot read the KV cache layout: {e}"
            log.warning("lmkv: connector disabled on this rank: %s", self._declined)
            return
        expected = self._spec.page_size_bytes * len(tensors)
        # The checksum is used while the sidecar runs --verify on (its HELLO says so).
        self._worker = WorkerSide(self._client, paged, get_tensor_model_parallel_rank(), expected,
                                  checksum=slot_checksum)
        self._client.connect()

    def _plan(self) -> StepPlan | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta.plan if isinstance(meta, LMKVConnectorMetadata) else None

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
        elif not self._declined:
            self._client.close()

    # -- scheduler side -------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._sched is None:
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
