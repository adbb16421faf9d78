"""The scheduler half of the vLLM connector: lookups, leases and the per-step plan.

Contract with vLLM's scheduler (0.32 semantics, see ``vllm.py``):

* ``get_num_new_matched_tokens`` claims only whole chunks that a pinned LOOKUP found in
  every rank's namespace, never the prompt's last token, and answers from a per-request
  cache on the repeated calls vLLM makes while a request waits. A sidecar that is down
  answers "0 tokens" within the client deadline.
* When the LOOKUP says more chunks are on their way from a lower tier (``pending``), the
  answer is None ("ask again later": vLLM skips the request this step) until they arrive
  or ``prefetch_timeout`` passes; then the hits present are claimed and the rest computed.
* The read lease taken by that LOOKUP is held until every rank reported the load done
  (``finished_recving``), or the request ends without a load. Nothing else releases it,
  so a chunk cannot be evicted and rewritten while a rank copies from it.
* Stores: once a step's forward has computed a full prompt chunk, the next plan tells
  every rank to store it. ``request_finished`` asks vLLM to keep the blocks of a request
  with planned stores until the ranks report those stores done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from lmkv_mp.engine.client import LookupResult, SidecarClient
from lmkv_mp.config import DEFAULT_PREFETCH_TIMEOUT
from lmkv_mp.integration.plan import LoadJob, StepPlan, StoreJob
from lmkv_mp.integration.request_keys import AdapterDigests, RequestKey, new_epoch, request_key
from lmkv_mp.wire.hashes import HashList
from lmkv_mp.wire.keys import Namespace, chain_hashes

log = logging.getLogger("lmkv.vllm")

# While chunks are pending, vLLM calls again every scheduler step (a tight loop when idle);
# asking the sidecar at most this often keeps that from flooding it.
PREFETCH_POLL = 0.002


@dataclass(slots=True)
class _Req:
    request: Any
    hashes: HashList                    # chain hashes of the full chunks known so far
    lookup: LookupResult | None = None
    local_tokens: int = 0               # engine-local prefix hit at the last lookup
    block_ids: list[int] = field(default_factory=list)
    stored_chunks: int = 0              # chunks already planned for store (or known present)
    saving: bool = False                # any store planned: blocks must outlive it
    load_planned: bool = False
    prefetch_deadline: float = 0.0      # set at the first LOOKUP that reported pending chunks
    last_ask: float = 0.0
    load: bool = True                   # False: never loaded (declined, or vLLM's skip_reading_prefix_cache)
    key: RequestKey | None = None       # its seed and extras (None: declined), to extend the chain over its answer
    device_tokens: int = 0              # of the planned load, tokens every rank reads from a GPU tier copy


class SchedulerSide:
    def __init__(self, client: SidecarClient, namespaces: list[Namespace], chunk_tokens: int, block_size: int,
                 prefetch_timeout: float = DEFAULT_PREFETCH_TIMEOUT, rank_layouts: list[str] | None = None, *,
                 loads: bool = True, stores: bool = True, store_output: bool = True) -> None:
        """``loads``/``stores``: what this engine's ``kv_role`` allows (a producer never
        loads, a consumer never stores); ``store_output``: store each request's answer too."""
        self.client = client
        self.loads, self.stores, self.store_output = loads, stores, store_output
        self.rank_layouts = list(rank_layouts or [])
        self.prefetch_timeout = prefetch_timeout
        self.namespaces = namespaces
        self.ns_ids = [ns.id for ns in namespaces]
        self.chunk_tokens = chunk_tokens
        self.block_size = block_size
        self._reqs: dict[str, _Req] = {}
        self._loads: list[LoadJob] = []
        self._stores: list[StoreJob] = []
        self._awaiting_load: dict[str, int] = {}      # req id -> lease to release on finished_recving
        self.epoch = b""                              # reset(): a fresh one, so no older key is hit again
        self.adapters = AdapterDigests()
        self._declines_logged: set[str] = set()
        self.stats = {"lookups": 0, "lookup_tokens": 0, "hit_tokens": 0, "claimed_tokens": 0, "load_jobs": 0,
                      "store_chunks": 0}
        self._stats_taken: dict[str, int] = {}

    # -- lookups --------------------------------------------------------------------------

    def _state(self, request: Any) -> _Req:
        """The request's bookkeeping; needs a HELLO (the chain hash key is the sidecar's)."""
        st = self._reqs.get(request.request_id)
        if st is None:
            assert self.client.hello is not None
            key = request_key(request, self.chunk_tokens, self.epoch, self.adapters)
            if key.declined:
                self._log_decline(key.declined)
                st = _Req(request, HashList(), load=False)
            else:
                st = _Req(request, HashList(chain_hashes(request.prompt_token_ids, self.chunk_tokens,
                                                         self.client.hello.hash_key, key.salt, extras=key.extras)),
                          load=self.loads and not getattr(request, "skip_reading_prefix_cache", False), key=key)
            self._reqs[request.request_id] = st
        return st

    def _log_decline(self, reason: str) -> None:
        """One line per reason per engine (a bounded set: reasons name adapters at most)."""
        if reason not in self._declines_logged and len(self._declines_logged) < 64:
            self._declines_logged.add(reason)
            log.info("lmkv: not caching requests with %s (they run as without lmkv)", reason)

    def reset(self) -> bool:
        """vLLM's ``reset_cache``: weights may have changed. From now on this engine's keys
        come from a new epoch in the chain seed, so nothing stored before is ever hit again
        here. Other engines keep their keys: their weights did not change with this one's."""
        self.epoch = new_epoch()
        for st in self._reqs.values():
            st.load = False  # hashed under the old epoch: their stores are never looked up again
        log.info("lmkv: cache reset: keys of a new epoch from now on")
        return True

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.client.hello is None and not self.client.connect():
            return 0, False
        st = self._state(request)
        if not st.load:
            return 0, False
        # Never the last prompt token: the engine must compute at least one.
        max_chunks = (len(request.prompt_token_ids) - 1) // self.chunk_tokens
        # Answer repeated calls from the cached lookup, but never claim tokens without a
        # lease: after a load consumed the lease (then a preemption) or after it was dropped,
        # a claim needs a fresh pinned lookup.
        known = st.lookup.hits * self.chunk_tokens if st.lookup else 0
        stale = st.lookup is not None and not st.lookup.lease_id and known > num_computed_tokens
        if (st.lookup is None or stale) and max_chunks > 0:
            now = time.monotonic()
            if st.prefetch_deadline and now - st.last_ask < PREFETCH_POLL:
                return None, False
            st.last_ask = now
            self.stats["lookups"] += 1
            st.lookup = self.client.lookup(self.ns_ids, st.hashes[:max_chunks].bytes, pin=True)
            if st.lookup.pending:
                if not st.prefetch_deadline:
                    st.prefetch_deadline = now + self.prefetch_timeout
                if now < st.prefetch_deadline:
                    self._drop_lease(st)
                    st.lookup = None  # ask again next step: more chunks are on their way
                    return None, False
            self.stats["hit_tokens"] += st.lookup.hits * self.chunk_tokens
            self.stats["lookup_tokens"] += max_chunks * self.chunk_tokens
            st.stored_chunks = max(st.stored_chunks, st.lookup.hits)  # present: no need to store again
        hits = st.lookup.hits if st.lookup else 0
        ext = hits * self.chunk_tokens - num_computed_tokens
        st.local_tokens = num_computed_tokens
        if ext <= 0:
            self._drop_lease(st)
            return 0, False
        return ext, True

    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None or num_external_tokens <= 0 or st.lookup is None or not st.lookup.lease_id:
            return
        local = st.local_tokens
        c0 = local // self.chunk_tokens
        c1 = (local + num_external_tokens) // self.chunk_tokens
        first_block = local // self.block_size
        last_block = (local + num_external_tokens) // self.block_size
        job = LoadJob(request.request_id, st.lookup.boot_id,
                      [o[c0:c1].tolist() for o in st.lookup.offsets],
                      [c[c0:c1].tolist() for c in st.lookup.checksums],
                      list(block_ids[first_block:last_block]), (local % self.chunk_tokens) // self.block_size,
                      st.hashes[c0:c1].bytes, st.lookup.lease_id,
                      [g[c0:c1].tolist() for g in st.lookup.gpu_regions],
                      [o[c0:c1].tolist() for o in st.lookup.gpu_offsets])
        self._loads.append(job)
        gpu = st.lookup.gpu_regions
        st.device_tokens = sum(min(local + num_external_tokens, (c + 1) * self.chunk_tokens) - max(local, c * self.chunk_tokens)
                               for c in range(c0, c1) if gpu and all(g[c] for g in gpu))
        self._awaiting_load[request.request_id] = st.lookup.lease_id
        st.lookup = LookupResult(st.lookup.hits, 0, (), (), st.lookup.boot_id)  # lease now owned by the load
        st.load_planned = True
        self.stats["claimed_tokens"] += num_external_tokens
        self.stats["load_jobs"] += 1

    def device_tokens(self, request: Any) -> int:
        """Of the load planned for ``request``, the tokens read from GPU tier copies."""
        st = self._reqs.get(request.request_id)
        return st.device_tokens if st is not None else 0

    def _drop_lease(self, st: _Req) -> None:
        if st.lookup is not None and st.lookup.lease_id:
            self.client.release(st.lookup.lease_id)
            st.lookup = LookupResult(st.lookup.hits, 0, (), (), st.lookup.boot_id)

    def take_stats(self) -> dict[str, int]:
        """Lookups since the last call, as vllm_stats.LMKVConnectorStats ``data`` (zeros left
        out; ``loaded_tokens`` are the tokens vLLM took from lmkv, i.e. did not compute)."""
        names = {"lookups": "lookups", "lookup_tokens": "lookup_tokens", "hit_tokens": "hit_tokens",
                 "claimed_tokens": "loaded_tokens"}
        data = {name: self.stats[key] - self._stats_taken.get(key, 0) for key, name in names.items()}
        self._stats_taken = dict(self.stats)
        return {k: v for k, v in data.items() if v}

    # -- the plan -------------------------------------------------------------------------

    def build_plan(self, so: Any) -> StepPlan:
        preempted = sorted(getattr(so, "preempted_req_ids", None) or ())
        for rid in preempted:
            st = self._reqs.get(rid)
            if st is not None:
                st.block_ids = []
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is not None:
                st.block_ids = list(new.block_ids[0])
                self._plan_store(st, new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0))
        cached = so.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, rid in enumerate(cached.req_ids):
            st = self._reqs.get(rid)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in resumed:
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._plan_store(st, cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(rid, 0))
        plan = StepPlan(self.chunk_tokens, self.block_size, self.ns_ids, [ns.display_name for ns in self.namespaces],
                        self._loads, self._stores, preempted, self.rank_layouts)
        self._loads, self._stores = [], []
        return plan

    def _plan_store(self, st: _Req, computed_tokens: int) -> None:
        if not self.stores:
            return
        n_full = len(st.hashes)
        if computed_tokens // self.chunk_tokens > n_full and self.store_output:
            n_full = self._hash_answer(st, computed_tokens // self.chunk_tokens)
        done = min(computed_tokens // self.chunk_tokens, n_full)
        bpc = self.chunk_tokens // self.block_size
        if done <= st.stored_chunks or len(st.block_ids) < done * bpc:
            return
        c0 = st.stored_chunks
        self._stores.append(StoreJob(st.request.request_id, st.hashes[c0:done].bytes,
                                     st.block_ids[c0 * bpc:done * bpc]))
        self.stats["store_chunks"] += done - c0
        st.stored_chunks = done
        st.saving = True

    def _hash_answer(self, st: _Req, chunks: int) -> int:
        """Extend the request's chain over the output tokens of its first ``chunks`` chunks
        (the chain covers the token sequence, whoever produced it), so that each chunk of
        the answer is stored once, in the step that computes its last token; the next turn
        of the conversation then finds it, on any instance. Returns the chunks hashed."""
        tokens = getattr(st.request, "all_token_ids", None)
        if st.key is None or tokens is None or self.client.hello is None or len(tokens) < chunks * self.chunk_tokens:
            return len(st.hashes)
        st.hashes = HashList(chain_hashes(list(tokens[:chunks * self.chunk_tokens]), self.chunk_tokens,
                                          self.client.hello.hash_key, st.key.salt, extras=st.key.extras))
        return chunks

    # -- completion -----------------------------------------------------------------------

    def on_worker_output(self, finished_recving: set[str] | None) -> None:
        for rid in finished_recving or ():
            lease = self._awaiting_load.pop(rid, 0)
            if lease:
                self.client.release(lease)

    def request_finished(self, request: Any) -> bool:
        """Forget the request; True if its blocks must wait for planned stores."""
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False
        if request.request_id not in self._awaiting_load:
            self._drop_lease(st)
        return st.saving
