"""The peer and scale benchmarks still run and print what bench/compare.py reads.

Tiny sizes: these check that the programs work (a private redis-server, a real sidecar
with worker processes), not their numbers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _lines(*cmd: str, timeout: float = 240) -> list[dict]:
    out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_peer_reports_store_load_and_lookup() -> None:
    recs = _lines(str(BENCH / "peers" / "redis_peer.py"), "--transports", "unix", "--chunks", "2", "--iters", "1",
                  "--chunk-bytes", str(1 << 20), "--lookup-chunks", "16", "--lookup-iters", "20")
    by = {(r["op"], r["api"]): r for r in recs}
    assert set(by) == {("store", "set"), ("store", "mset"), ("load", "get"), ("load", "mget"),
                       ("lookup", "exists_pipelined"), ("lookup", "exists_multi")}
    assert all(r["peer"] == "redis" and "machine" in r for r in recs)
    assert all(by[k]["gbps"] > 0 for k in by if k[0] != "lookup")
    assert by[("lookup", "exists_pipelined")]["p50_us"] > 0 and by[("lookup", "exists_pipelined")]["chunks"] == 16


@pytest.mark.slow
def test_scale_reports_every_worker_count() -> None:
    recs = _lines(str(BENCH / "scale.py"), "--workers", "1,2", "--chunks", "1", "--prompts", "1", "--rounds", "1",
                  "--lookup-iters", "20", "--lookup-tokens", "2048")
    assert [(r["workers"], r["op"]) for r in recs] == [(n, op) for n in (1, 2) for op in ("store", "load", "lookup")]
    for r in recs:
        if r["op"] == "lookup":
            assert r["p50_us"] > 0 and r["chunks"] == 8 and r["sidecar_rss"]["rss"] > 0
        else:
            assert r["gbps"] > 0 and r["sidecar_cpu_s_per_gb"] >= 0
