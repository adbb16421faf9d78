"""From request records to bench/serve.py's JSON lines: one per (scenario, system), one
per target (a ratio), and the answers of each system against ``none``'s."""

from __future__ import annotations

from typing import Any

from serving.client import Record

TARGETS: dict[str, list[tuple[str, str, float | None]]] = {
    # scenario -> (metric, against, target ratio); a ratio is how many times better lmkv is:
    # latency theirs/ours, throughput ours/theirs, CPU per request theirs/ours.
    "1": [("ttft_p50_ms", "none", 4.0), ("ttft_p50_ms", "lmcache", 1.3), ("ttft_p99_ms", "none", 1.0),
          ("ttft_p99_ms", "lmcache", 1.0), ("req_per_s", "none", 1.0), ("req_per_s", "lmcache", 1.0),
          ("server_cpu_s_per_req", "lmcache", 5.0)],
    "2": [("ttft_p50_ms", "none", 2.0)],
    # "costs <= 3%": throughput ours/none >= 0.97, TTFT ours <= 1.03 x none's
    "3": [("req_per_s", "none", 0.97), ("ttft_p50_ms", "none", round(1 / 1.03, 4))],
    "bench": [("ttft_p50_ms", "none", None), ("req_per_s", "none", None)],
}
STRICT = {("ttft_p99_ms", "none"), ("ttft_p99_ms", "lmcache")}  # "lower than": a tie does not meet it
LOWER_IS_BETTER = ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "itl_p50_ms", "e2e_p50_ms", "server_cpu_s_per_req")


def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile, linear between closest ranks (None for no data)."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 1)


def ok(records: list[Record]) -> list[Record]:
    return [r for r in records if r.error is None and r.ttft_s is not None and r.e2e_s is not None]


def summarize(records: list[Record], planned: int) -> dict[str, Any]:
    """The per-(scenario, system) figures of the issue, from the client's records."""
    good = ok(records)
    ttft = [r.ttft_s for r in good if r.ttft_s is not None]
    itl = [x for r in good for x in r.itl_s]
    e2e = [r.e2e_s for r in good if r.e2e_s is not None]
    if good:
        start = min(r.send_s for r in good)
        window = max(r.send_s + (r.e2e_s or 0.0) for r in good) - start
    else:
        window = 0.0
    prompt = sum(r.prompt_tokens for r in good)
    errors = sorted({r.error for r in records if r.error})[:3]
    return {"requests": len(good), "planned": planned, "failed": len(records) - len(good),
            "not_sent": planned - len(records),
            "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p90_ms": ms(pct(ttft, 90)), "ttft_p99_ms": ms(pct(ttft, 99)),
            "itl_p50_ms": ms(pct(itl, 50)), "e2e_p50_ms": ms(pct(e2e, 50)),
            "req_per_s": round(len(good) / window, 4) if window > 0 else None,
            "out_tok_per_s": round(sum(r.completion_tokens for r in good) / window, 2) if window > 0 else None,
            "cached_frac": round(sum(r.cached_tokens for r in good) / prompt, 4) if prompt else None,
            "prompt_tokens": prompt, "window_s": round(window, 2), **({"errors": errors} if errors else {})}


def answers_against(records: list[Record], baseline: list[Record]) -> dict[str, int]:
    """This system's answers against ``none``'s for the same (user, round): how many pairs,
    and in how many the tokens differ. Greedy on the same model, but vLLM's CPU kernels are
    not bit-invariant across cached prefix lengths, and a chat whose earlier answer differed
    has a different prompt later: a report, not a failure. Closer to an oracle are the pairs
    that did the same computation (the same prompt, the same number of cached tokens): a
    difference there (``answers_differ_same_computation``) is where to look first for wrong
    cached bytes, though under load their batches still differ (bench/ttft.py is the
    bit-exact check, one request at a time)."""
    base = {(r.user, r.round): r for r in ok(baseline)}
    pairs = [(r, base[(r.user, r.round)]) for r in ok(records) if (r.user, r.round) in base]
    same = [(a, b) for a, b in pairs if a.messages == b.messages and a.cached_tokens == b.cached_tokens]
    return {"answers_compared": len(pairs), "answers_differ": sum(a.token_ids != b.token_ids for a, b in pairs),
            "answers_same_computation": len(same),
            "answers_differ_same_computation": sum(a.token_ids != b.token_ids for a, b in same)}


def ttft_by_round(records: list[Record]) -> dict[str, float | None]:
    rounds = sorted({r.round for r in ok(records)})
    return {str(k): ms(pct([r.ttft_s for r in ok(records) if r.round == k and r.ttft_s is not None], 50))
            for k in rounds}


def ratio(metric: str, ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or ours <= 0 or theirs <= 0:
        return None
    return round(theirs / ours if metric in LOWER_IS_BETTER else ours / theirs, 3)


def ratio_lines(scenario: str, lines: dict[str, dict[str, Any]], system: str = "lmkv") -> list[dict[str, Any]]:
    """One line per target of ``scenario`` whose both sides ran; ``lines`` by system."""
    out = []
    for metric, against, target in TARGETS.get(scenario, []):
        if system not in lines or against not in lines:
            continue
        x = ratio(metric, lines[system].get(metric), lines[against].get(metric))
        met = None if target is None or x is None else (x > target if (metric, against) in STRICT else x >= target)
        out.append({"bench": "serve", "scenario": scenario, "metric": metric, "system": system, "against": against,
                    "ratio": x, "target": target, "met": met, "ours": lines[system].get(metric),
                    "theirs": lines[against].get(metric)})
    return out


def cost_lines(scenario: str, lines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """LMCache's cost against ``none`` in the do-no-harm scenario, reported beside lmkv's (no target)."""
    out = []
    if "lmcache" in lines and "none" in lines:
        for metric, against, _ in TARGETS.get(scenario, []):
            x = ratio(metric, lines["lmcache"].get(metric), lines[against].get(metric))
            out.append({"bench": "serve", "scenario": scenario, "metric": metric, "system": "lmcache",
                        "against": against, "ratio": x, "target": None, "met": None,
                        "ours": lines["lmcache"].get(metric), "theirs": lines[against].get(metric)})
    return out


def connector_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What vLLM's /metrics counted during one run (connector and prefix-cache series)."""
    keep = ("vllm:lmkv_lookup_tokens_total", "vllm:lmkv_hit_tokens_total", "vllm:lmkv_loaded_tokens_total",
            "vllm:lmkv_load_jobs_total", "vllm:lmkv_load_failures_total", "vllm:lmkv_store_jobs_total",
            "vllm:lmkv_store_chunks_total", "vllm:lmkv_store_skipped_total", "vllm:lmkv_store_failures_total",
            "vllm:lmkv_load_seconds_sum", "vllm:lmkv_store_seconds_sum", "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total", "vllm:external_prefix_cache_queries_total",
            "vllm:external_prefix_cache_hits_total", "vllm:num_preemptions_total", "vllm:prompt_tokens_total")
    return {k.removeprefix("vllm:"): round(after.get(k, 0.0) - before.get(k, 0.0), 4) for k in keep
            if k in after}
