"""lmkv_mp against its peers in one run: the #8 targets checked from one command.

Runs, one after the other on this machine, ``--repeat`` times: bench/datapath.py (store /
load of the Llama-3-8B-like shard, with its memcpy limit), bench/lookup.py (one client,
a 128-chunk prompt), the Redis peer (bench/peers/redis_peer.py) and, when available, the
LMCache peer (bench/peers/lmcache_peer.py). Every result line of every run is printed as
it comes, then one line per target:

    {"bench":"compare","metric":"store_gbps","peer":"redis","ours":…,"theirs":…,"ratio":…,
     "target":3,"met":true,…}

``ratio`` is always "how many times better ours is" (throughput ours/theirs, latency
theirs/ours). Against each peer its best configuration counts (Redis: the faster of TCP and
the unix socket, of SET/GET and MSET/MGET; LMCache: the faster of its engine-driven and
LMCache-driven transfer, at one and at two client threads), and ours is the faster of the
connector's ``lmkv.copy_threads`` 1 (its default) and 2 (on a machine with two cores or
more; LMCache's two-thread runs only then too); the memcpy target is judged at 1. For lookup, LMCache's time includes hashing the
prompt's tokens (its server hashes them); ours is given with and without the client-side
chain hashing, and the target is judged on the one with hashing. With ``--repeat`` > 1
a final line per target gives the spread of the ratio (min / median / max over repeats)
and whether every repeat met it.

LMCache's peer installs a 1 GB venv the first time (a few minutes); ``--lmcache auto`` runs
it only if that venv is already installed, ``run`` installs it if needed, ``skip`` leaves
it out, and a file name reads its JSON lines from an earlier ``lmcache_peer.py`` run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
from common import emit, machine, percentile  # noqa: E402
from peer_env import venv_ready  # noqa: E402

from lmkv_mp.wire import keys  # noqa: E402

TARGETS = {  # metric -> (peer, target ratio)
    ("store_gbps", "lmcache"): 5.0, ("load_gbps", "lmcache"): 5.0,
    ("store_gbps", "redis"): 3.0, ("load_gbps", "redis"): 3.0,
    ("store_gbps", "memcpy"): 0.7, ("load_gbps", "memcpy"): 0.7,
    ("lookup_p50_us", "lmcache"): 10.0,
    ("lookup_p50_us", "redis"): None,  # no target: for the record
}


def run_lines(cmd: list[str]) -> list[dict]:
    """Run a bench program, echo and return its JSON lines."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    for rec in lines:
        emit(rec)
    return lines


def hashing_us(tokens: int, chunk_tokens: int, n: int = 50, python: bool = False) -> float:
    """p50 of the client-side chain hashing of a ``tokens``-token prompt (what a scheduler
    pays before its LOOKUP; LMCache's server pays the equivalent inside its lookup).
    ``python`` times keys.py's pure-Python fallback instead of the C extension (the
    before/after of moving it to C, in the same run)."""
    key = bytes(32)
    toks = list(range(tokens))
    xs = []
    saved = keys._chain
    if python:  # and without keys.py's "not built" warning, which would not be true here
        keys._chain, keys._warned_python = None, True
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            keys.chain_hashes(toks, chunk_tokens, key)
            xs.append(time.perf_counter() - t0)
    finally:
        keys._chain = saved
    return percentile(xs, 50) * 1e6


def one_run(args: argparse.Namespace, lmcache_lines: list[dict] | None) -> list[dict]:
    """One pass over ours and the peers; the compare lines of that pass."""
    import lmcache_peer
    import redis_peer

    py, quick = sys.executable, ["--quick"] if args.quick else []
    dp = {r["op"]: r for r in run_lines([py, str(HERE / "datapath.py"), *quick])}
    # The connector's lmkv.copy_threads = 2 as well, where there are two cores: its best
    # config is compared with each peer's best; the memcpy target stays with the default (1).
    dp2 = ({r["op"]: r for r in run_lines([py, str(HERE / "datapath.py"), "--copy-threads", "2", *quick])}
           if (os.cpu_count() or 1) >= 2 else {})
    lk = run_lines([py, str(HERE / "lookup.py"), "--clients", "1", *quick])[0]
    # Our hashing is timed here, beside our LOOKUP, before any peer starts (a peer's server
    # may still be exiting after its run and would slow it).
    hash_us = hashing_us(32768, 256)
    hash_python_us = hashing_us(32768, 256, python=True)
    rd = redis_peer.run(quick=args.quick)
    for rec in rd:
        emit(rec)
    lm = lmcache_lines
    if lm is None and args.lmcache in ("auto", "run") and (args.lmcache == "run" or venv_ready("lmcache")):
        # LMCache's client copies too (engine-driven): it gets two threads where ours does.
        lm = [{**r, "client_threads": n} for n in ([1, 2] if dp2 else [1])
              for r in lmcache_peer.run(quick=args.quick, client_threads=n)]
        for rec in lm:
            emit(rec)
    ours_lookup = lk["p50_us"] + hash_us

    out = []

    def add(metric: str, peer: str, ours: float, theirs: float, detail: dict) -> None:
        ratio = ours / theirs if metric.endswith("gbps") else theirs / ours
        target = TARGETS[(metric, peer)]
        out.append({"bench": "compare", "metric": metric, "peer": peer, "ours": round(ours, 3),
                    "theirs": round(theirs, 3), "ratio": round(ratio, 2), "target": target,
                    "met": None if target is None else ratio >= target, **detail})

    for op in ("store", "load"):
        two = {"copy_threads_2_gbps": dp2[op]["gbps"], "copy_threads_2_memcpy_gbps": dp2[op]["memcpy_gbps"],
               "copy_threads_2_ratio": dp2[op]["ratio"]} if dp2 else {}
        add(f"{op}_gbps", "memcpy", dp[op]["gbps"], dp[op]["memcpy_gbps"], {"note": "memcpy of the same bytes, "
                                                                              "one thread, same run", **two})
        ours = max([dp[op], *([dp2[op]] if dp2 else [])], key=lambda r: r["gbps"])
        mine = {"ours_config": f"copy_threads={ours.get('copy_threads', 1)}"}
        best = max((r for r in rd if r["op"] == op), key=lambda r: r["gbps"])
        add(f"{op}_gbps", "redis", ours["gbps"], best["gbps"],
            {"theirs_config": f"{best['transport']} {best['api']}", **mine})
        if lm:
            theirs = max((r for r in lm if r["op"] == op), key=lambda r: r["gbps"])
            add(f"{op}_gbps", "lmcache", ours["gbps"], theirs["gbps"],
                {"theirs_config": f"{theirs['transfer']}, client_threads={theirs.get('client_threads', 1)}", **mine})
    best = min((r for r in rd if r["op"] == "lookup" and r["api"] == "exists_pipelined"), key=lambda r: r["p50_us"])
    floor = min((r for r in rd if r["op"] == "lookup" and r["api"] == "exists_multi"), key=lambda r: r["p50_us"])
    add("lookup_p50_us", "redis", lk["p50_us"], best["p50_us"],
        {"theirs_config": f"{best['transport']} pipelined EXISTS per key (a prefix count)",
         "theirs_count_only_p50_us": floor["p50_us"], "chunks": lk["chunks"]})
    if lm:
        theirs = min((r for r in lm if r["op"] == "lookup"), key=lambda r: r["p50_us"])
        add("lookup_p50_us", "lmcache", ours_lookup, theirs["p50_us"],
            {"ours_without_hashing": lk["p50_us"], "ours_hashing_us": round(hash_us, 1),
             "ours_hashing_c": keys._chain is not None, "ours_hashing_python_us": round(hash_python_us, 1),
             "chunks": lk["chunks"],
             "theirs_includes": theirs["includes"]})
    elif args.lmcache != "skip":
        out.append({"bench": "compare", "peer": "lmcache", "skipped": "its venv is not installed: run with "
                    "--lmcache run (installs bench/peers/.venv-lmcache once, a few minutes)"})
    for rec in out:
        emit({**rec, "quick": args.quick, "machine": machine()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized runs of every bench")
    ap.add_argument("--repeat", type=int, default=1, help="run everything this many times; report the spread")
    ap.add_argument("--lmcache", default="auto", help="auto | run | skip | FILE with lmcache_peer.py's JSON lines")
    args = ap.parse_args()
    lm_file = None
    if args.lmcache not in ("auto", "run", "skip"):
        lm_file = [json.loads(x) for x in Path(args.lmcache).read_text().splitlines()
                   if x.startswith("{") and json.loads(x).get("peer") == "lmcache"]
        if not lm_file:
            raise SystemExit(f"no lmcache_peer.py lines in {args.lmcache}")
    runs = [one_run(args, lm_file) for _ in range(args.repeat)]
    if args.repeat > 1:
        for i, rec in enumerate(runs[0]):
            if "ratio" not in rec:
                continue
            ratios = [r[i]["ratio"] for r in runs]
            emit({"bench": "compare", "summary": True, "metric": rec["metric"], "peer": rec["peer"],
                  "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
                  "target": rec["target"], "met_every_repeat": None if rec["target"] is None
                  else all(r[i]["met"] for r in runs), "repeats": args.repeat, "quick": args.quick,
                  "machine": machine()})


if __name__ == "__main__":
    main()
