"""Observability as an operator meets it: ``/metrics`` over HTTP, the stats socket and its
PUB stream, ``lmkv-stats --json`` and the ``--watch`` view in a terminal.

The multi-process tests drive real traffic (worker ranks as processes, tests/helpers/kvproc.py;
a scheduler and a raw socket in this process), then check that the scraped counters EQUAL
that traffic and that every other view of the same sidecar tells the same numbers. The
in-process tests check the parts with no I/O: buckets, bounded labels, tiers iterated.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

import msgpack
import pytest
import zmq
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from lmkv_mp.wire import protocol as P
from lmkv_mp.sidecar.metrics import (LATENCY_BUCKETS, STATS_TOPIC, LatencyHistogram, NamespaceLabels, prometheus_families,
                             quantile)

from tests.conftest import READY_TIMEOUT, Procs, SidecarHandle, clean_env, stats, unlink_shm, wait_for
from tests.helpers import kvproc as K
from tests.test_cli import exe
from tests.sidecar.test_server import NS_A, Harness, hashes

N = 4          # chunks per prompt
TP = 2
PROMPT = 7
SEED = 21
CLIENT = {"timeout": 5.0, "heartbeat_interval": 1.0, "retry_interval": 0.2}  # no timeouts, so no retries
# Nobody is reaped during the test: every HELLO below is the only one of its client.
QUIET = ("--lease-timeout", "120s", "--heartbeat-interval", "1s")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers --------------------------------------------------------------------------------


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not in /metrics: {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sidecar_with_metrics(sidecar: Callable[..., SidecarHandle], *flags: str) -> tuple[SidecarHandle, int]:
    """A sidecar serving /metrics on a free port (another process may take the port between
    our probe and the sidecar's bind: then try another)."""
    for _ in range(3):
        port = free_port()
        h = sidecar(*flags, "--metrics-port", str(port), ready=False)
        try:
            h.wait_ready()
            return h, port
        except AssertionError:
            if "cannot serve metrics" not in h.log():
                raise
    raise AssertionError("no free port for the metrics endpoint in 3 tries")


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return parse(r.read().decode())


def ns_info(rank: int) -> P.NamespaceInfo:
    return K.namespace_for(K.PagedKV(K.make_cache(None)), "tiny", "bfloat16", TP, rank)


def lmkv_stats_json(h: SidecarHandle) -> dict[str, Any]:
    r = subprocess.run([exe("lmkv-stats"), "--json"], env=clean_env(LMKV_RUN_DIR=str(h.run_dir)),
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    return json.loads(line)


# -- in-process -----------------------------------------------------------------------------


def test_latency_buckets_are_prometheus_le_buckets() -> None:
    h = LatencyHistogram()
    for t in (LATENCY_BUCKETS[0], LATENCY_BUCKETS[0] * 1.01, LATENCY_BUCKETS[-1] * 2, 0.0):
        h.observe(t)
    assert h.counts[0] == 2, "a time equal to a bound counts in that bound's bucket (le), as does 0"
    assert h.counts[1] == 1 and h.counts[-1] == 1 and sum(h.counts) == 4
    assert LATENCY_BUCKETS[0] <= 10e-6 and LATENCY_BUCKETS[-1] >= 1.0, "tens of µs to seconds"
    hist = {"counts": h.counts, "sum": h.total}
    assert quantile(hist, list(LATENCY_BUCKETS), 0.5) == LATENCY_BUCKETS[0]
    assert quantile(hist, list(LATENCY_BUCKETS), 1.0) == float("inf")
    assert quantile({"counts": [0] * len(h.counts), "sum": 0.0}, list(LATENCY_BUCKETS), 0.5) is None


def test_namespace_labels_are_bounded_and_stable() -> None:
    labels = NamespaceLabels(2)
    a, b, c, d = ({"id": f"{i:02x}" * 16, "name": name} for i, name in enumerate(["m[bf16]", "m[bf16]", "x", "y"]))
    assert labels.label(a) == "m[bf16]"
    assert labels.label(b) == "m[bf16]#" + b["id"][:8], "two namespaces never share a label value"
    assert labels.label(c) == labels.label(d) == "other"
    assert [labels.label(n) for n in (a, b, c)] == ["m[bf16]", "m[bf16]#" + b["id"][:8], "other"]
    assert NamespaceLabels(0).label(a) == "other"


def snapshot_of_a_real_sidecar() -> dict[str, Any]:
    """One real snapshot with traffic in it (an in-process sidecar, as in test_server)."""
    run_dir = Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp"))
    h = Harness(run_dir)
    try:
        h.ok(b"w", P.Hello(1, P.PROTOCOL_VERSION, "worker", namespaces=[P.NamespaceInfo(NS_A, 64 << 10, "m[bf16]")]))
        lease = h.ok(b"w", P.Reserve(2, NS_A, hashes(1, 2, 3))).lease_id  # type: ignore[union-attr]
        h.ok(b"w", P.Commit(3, lease))
        h.ok(b"w", P.Lookup(4, [NS_A], hashes(1, 2, 9)))
        return h.server.snapshot()
    finally:
        h.server.close()
        unlink_shm(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_every_tier_of_the_snapshot_becomes_series() -> None:
    """Lower tiers (disk, remote) appear by adding their map to snapshot["tiers"]; keys they
    lack read as 0."""
    snap = snapshot_of_a_real_sidecar()
    snap["tiers"]["disk"] = {"used_bytes": 5, "capacity_bytes": 10, "entries": 1, "hit_chunks": 7, "evictions": 2,
                             "prefetches": 3, "errors": 4, "its_own_key": "ignored"}

    class Fixed:
        def collect(self) -> Iterable[Metric]:
            return prometheus_families(snap, NamespaceLabels(4))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    s = parse(generate_latest(registry).decode())
    assert value(s, "lmkv_hit_chunks_total", tier="host") == 2 and value(s, "lmkv_hit_chunks_total", tier="disk") == 7
    assert value(s, "lmkv_stored_chunks_total", tier="host") == 3
    assert value(s, "lmkv_stored_bytes_total", tier="host") == 3 * (64 << 10)
    assert value(s, "lmkv_tier_used_bytes", tier="disk") == 5 and value(s, "lmkv_tier_capacity_bytes", tier="disk") == 10
    assert value(s, "lmkv_prefetches_total", tier="disk") == 3 and value(s, "lmkv_stored_bytes_total", tier="disk") == 0
    assert value(s, "lmkv_tier_errors_total", tier="disk") == 4 and value(s, "lmkv_tier_errors_total", tier="host") == 0
    assert value(s, "lmkv_entries", tier="host", state="committed") == 3
    assert value(s, "lmkv_entries", tier="disk", state="committed") == 1
    assert value(s, "lmkv_lookup_chunks_total") == 3
    assert value(s, "lmkv_namespace_hit_chunks_total", model="m[bf16]") == 2
    assert value(s, "lmkv_namespace_hit_chunks_total", model="other") == 0
    assert value(s, "lmkv_request_seconds_count", op="LOOKUP") == 0, "handle() alone is not timed: the loop times it"
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in fam.samples:
            for label, v in sample.labels.items():
                assert len(v) < 64, f"{fam.name}{{{label}}} has a long (unbounded?) value {v!r}"


def test_grafana_dashboard_charts_only_series_that_exist() -> None:
    """launch/grafana-dashboard.json: every series it queries is served, by the sidecar
    (lmkv_*, process_*) or by the connector through vLLM (vllm:lmkv_*)."""
    from lmkv_mp.integration.vllm_stats import COUNTERS, JOB_SECONDS

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "launch" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = {name for e in exprs for name in re.findall(r"\b(?:vllm:)?(?:lmkv|process)_[a-z_]+", e)}

    class Fixed:
        def collect(self) -> Iterable[Metric]:
            return prometheus_families(snapshot_of_a_real_sidecar(), NamespaceLabels(4))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    served = {name for name, _ in parse(generate_latest(registry).decode())}
    served |= {f"vllm:lmkv_{k}_total" for k in COUNTERS}
    served |= {f"vllm:lmkv_{k}_{suffix}" for k in JOB_SECONDS for suffix in ("bucket", "count", "sum")}
    assert used <= served, f"the dashboard queries series nobody serves: {sorted(used - served)}"
    for topic in ("lmkv_hit_chunks_total", "vllm:lmkv_loaded_tokens_total", "lmkv_stored_bytes_total",
                  "lmkv_loaded_bytes_total", "lmkv_tier_used_bytes", "lmkv_evictions_total", "lmkv_leases",
                  "lmkv_request_seconds_bucket", "lmkv_errors_total"):
        assert topic in used, f"the dashboard has no panel on {topic}"


# -- real processes -------------------------------------------------------------------------


@pytest.mark.slow
def test_metrics_equal_the_traffic(sidecar: Callable[..., SidecarHandle], procs: Procs) -> None:
    h, port = sidecar_with_metrics(sidecar, *QUIET, "--metrics-namespaces", "1", "--stats-interval", "100ms")
    chunk = ns_info(0).chunk_bytes
    base: dict[str, Any] = {"run_dir": str(h.run_dir), "tp": TP, "prompt_seed": PROMPT, "chunks": N, "client": CLIENT}
    block_ids = list(range(N * K.BLOCKS_PER_CHUNK))

    # Instance A's two ranks store the prompt (HELLO, RESERVE, COMMIT each) ...
    stores = [procs.kvproc("store", {**base, "rank": r, "seed": SEED, "block_ids": block_ids}) for r in range(TP)]
    assert all(procs.result(p)["committed"] == N for p in stores)
    # ... B's two ranks load it, each with its own pinned LOOKUP (HELLO, LOOKUP, RELEASE) ...
    loads = [procs.kvproc("load", {**base, "rank": r, "seed": SEED + 1, "block_ids": block_ids,
                                   "out": str(procs.log_dir / f"loaded-{r}.pt")}) for r in range(TP)]
    assert all(procs.result(p)["loaded"] == N for p in loads)
    # ... a scheduler asks about a longer prompt across both ranks (HELLO, LOOKUP) ...
    sched = h.client(role="scheduler", heartbeat=False, **CLIENT)
    assert sched.connect()
    longer = K.prompt_hashes(PROMPT, N + 2, sched.hello.hash_key)  # type: ignore[union-attr]
    assert sched.lookup([ns_info(0).id, ns_info(1).id], longer).hits == N
    # ... and two requests fail: a RESERVE for an undeclared namespace, and an unknown op.
    assert sched.reserve(b"U" * 16, longer) is None
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(h.endpoint)
    raw.send_multipart([b"\x63", msgpack.packb({"req_id": 9})])
    assert raw.poll(10_000), "an unknown op gets an error reply"
    assert raw.recv_multipart()[0] == bytes((P.Status.ERROR,))
    raw.close()

    m = scrape(port)
    requests = {("HELLO", "ok"): 2 * TP + 1, ("RESERVE", "ok"): TP, ("RESERVE", "error"): 1, ("COMMIT", "ok"): TP,
                ("LOOKUP", "ok"): TP + 1, ("RELEASE", "ok"): TP, ("INVALID", "error"): 1, ("CLEAR", "ok"): 0}
    for (op, status), n in requests.items():
        assert value(m, "lmkv_requests_total", op=op, status=status) == n, (op, status)
    for op in [o.name for o in P.Op] + ["INVALID"]:
        served = value(m, "lmkv_requests_total", op=op, status="ok") + value(m, "lmkv_requests_total", op=op,
                                                                              status="error")
        assert value(m, "lmkv_request_seconds_count", op=op) == served, f"every {op} request is timed once"
        assert value(m, "lmkv_request_seconds_bucket", op=op, le="+Inf") == served
    buckets = series(m, "lmkv_request_seconds_bucket")
    lookups = sorted((float(dict(k)["le"]), v) for k, v in buckets.items() if dict(k)["op"] == "LOOKUP")
    assert [v for _, v in lookups] == sorted(v for _, v in lookups), "cumulative buckets"
    assert lookups[0][0] <= 1e-5 and value(m, "lmkv_request_seconds_sum", op="LOOKUP") > 0

    assert value(m, "lmkv_errors_total", code="UNKNOWN_NAMESPACE") == 1
    assert value(m, "lmkv_errors_total", code="UNKNOWN_OP") == 1
    assert sum(series(m, "lmkv_errors_total").values()) == 2
    assert value(m, "lmkv_lookup_chunks_total") == TP * N + (N + 2)
    assert value(m, "lmkv_hit_chunks_total", tier="host") == TP * N + N
    assert value(m, "lmkv_stored_chunks_total", tier="host") == TP * N
    assert value(m, "lmkv_stored_bytes_total", tier="host") == TP * N * chunk
    assert value(m, "lmkv_loaded_chunks_total", tier="host") == TP * N
    assert value(m, "lmkv_loaded_bytes_total", tier="host") == TP * N * chunk
    assert value(m, "lmkv_entries", tier="host", state="committed") == TP * N
    assert value(m, "lmkv_entries", tier="host", state="writing") == 0
    assert value(m, "lmkv_tier_used_bytes", tier="host") == TP * N * chunk
    assert value(m, "lmkv_evictions_total", tier="host") == 0 and value(m, "lmkv_aborted_writes_total") == 0
    assert series(m, "lmkv_leases") == {frozenset({("kind", "read")}): 0, frozenset({("kind", "write")}): 0}
    assert {dict(k)["role"]: v for k, v in series(m, "lmkv_clients").items()} == {
        "scheduler": 1, "worker": 2 * TP, "admin": 0, "client": 0, "other": 0}
    # --metrics-namespaces 1: the first namespace declared gets its name, the other is "other".
    # Each rank's namespace: N hits from its load's lookup, N from the scheduler's.
    hits = {dict(k)["model"]: v for k, v in series(m, "lmkv_namespace_hit_chunks_total").items()}
    assert len(hits) == 2 and hits.keys() - {"other"} <= {ns_info(0).name, ns_info(1).name}
    assert set(hits.values()) == {2 * N}
    assert set(series(m, "lmkv_namespace_bytes").values()) == {N * chunk}
    (boot,) = series(m, "lmkv_boot_timestamp_seconds").items()
    assert dict(boot[0])["boot_id"] == sched.boot_id.hex() and abs(boot[1] - time.time()) < 600
    assert value(m, "lmkv_snapshot_age_seconds") < 5
    assert value(m, "process_resident_memory_bytes") > 0

    # The stats socket, lmkv-stats --json and the PUB stream give the same numbers.
    def same_as_metrics(snap: dict[str, Any], what: str) -> None:
        host = snap["tiers"]["host"]
        got = (snap["lookup_chunks"], snap["hit_chunks"], host["hit_chunks"], snap["stores"], host["stored_bytes"],
               snap["loads"], host["loaded_bytes"], host["entries"], host["used_bytes"], snap["errors"],
               snap["requests"]["LOOKUP:ok"], snap["requests"]["HELLO:ok"], snap["errors_by_code"], snap["leases"],
               snap["clients"], snap["boot_id"])
        want = (value(m, "lmkv_lookup_chunks_total"), TP * N + N, value(m, "lmkv_hit_chunks_total", tier="host"),
                value(m, "lmkv_stored_chunks_total", tier="host"), value(m, "lmkv_stored_bytes_total", tier="host"),
                value(m, "lmkv_loaded_chunks_total", tier="host"), value(m, "lmkv_loaded_bytes_total", tier="host"),
                TP * N, value(m, "lmkv_tier_used_bytes", tier="host"), 2, TP + 1, 2 * TP + 1,
                {"UNKNOWN_NAMESPACE": 1, "UNKNOWN_OP": 1}, {"read": 0, "write": 0},
                {"scheduler": 1, "worker": 2 * TP}, sched.boot_id.hex())
        assert got == want, what
        assert {ns["name"]: ns["hit_chunks"] for ns in snap["namespaces"]} == {ns_info(0).name: 2 * N,
                                                                                 ns_info(1).name: 2 * N}
        assert snap["metrics_url"] == f"http://127.0.0.1:{port}/metrics"

    same_as_metrics(stats(h), "the stats socket")
    snap = lmkv_stats_json(h)
    same_as_metrics(snap, "lmkv-stats --json")
    lookup_ops = snap["request_seconds"]["ops"]["LOOKUP"]
    assert sum(lookup_ops["counts"]) == TP + 1 and lookup_ops["sum"] == pytest.approx(
        value(m, "lmkv_request_seconds_sum", op="LOOKUP"))

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, STATS_TOPIC)
    sub.connect(snap["publish_endpoint"])
    try:
        published: list[dict[str, Any]] = []

        def next_published() -> bool:
            if sub.poll(1000):
                frames = sub.recv_multipart()
                assert frames[0] == STATS_TOPIC
                reply = P.decode_reply(P.Op.STATS, frames[1:])
                assert isinstance(reply, P.StatsReply) and reply.boot_id == sched.boot_id
                published.append(reply.snapshot)
            return len(published) >= 2

        wait_for(next_published, 30, "two published snapshots")
        assert published[1]["time"] > published[0]["time"]
        same_as_metrics(published[-1], "the PUB stream")
    finally:
        sub.close()


@pytest.mark.slow
def test_metrics_port_in_use_fails_the_start_naming_the_flag(sidecar: Callable[..., SidecarHandle]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        h = sidecar("--metrics-port", str(port), ready=False)
        assert h.proc is not None
        assert h.proc.wait(READY_TIMEOUT) == 1, h.log()
    log = h.log()
    assert "start failed" in log and "--metrics-port" in log and str(port) in log, log
    assert not (h.run_dir / "control.sock").exists(), "a failed start leaves no socket behind"


def _read(fd: int, out: bytearray, until: Callable[[str], bool], timeout: float) -> str:
    """Read a pty master until ``until(text)`` holds (or the child closed its end)."""
    deadline = time.monotonic() + timeout
    while not until(out.decode(errors="replace")):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; the terminal shows:\n{out.decode(errors='replace')[-3000:]}")
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError as e:  # EIO: the child closed the terminal
                if e.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


@pytest.mark.slow
def test_watch_shows_a_live_view_in_a_terminal_and_exits_on_ctrl_c(sidecar: Callable[..., SidecarHandle]) -> None:
    h = sidecar(*QUIET)
    ns = ns_info(0)
    writer = h.client(role="worker", namespaces=[ns], heartbeat=False, **CLIENT)
    hashes = b"".join(i.to_bytes(16, "little") for i in range(1, 4))
    res = writer.reserve(ns.id, hashes)
    assert res is not None and writer.commit(res.lease_id) == 3
    assert writer.lookup([ns.id], hashes + bytes(16)).hits == 3

    master, slave = pty.openpty()
    proc = subprocess.Popen([exe("lmkv-stats"), "--watch", "0.2"], stdin=slave, stdout=slave, stderr=slave,
                            env=clean_env(LMKV_RUN_DIR=str(h.run_dir)))
    os.close(slave)
    out = bytearray()
    try:
        clear = "\x1b[H\x1b[2J"
        # Two frames drawn in place, the second with rates over the interval.
        text = _read(master, out, lambda t: t.count(clear) >= 2 and t.rsplit(clear, 1)[1].count("Ctrl-C"), 60)
        frame = text.rsplit(clear, 1)[1]
        for needle in ("hit rate   75.0% of chunks asked", "last ", "in         3 chunks stored",
                       "out        0 chunks loaded", "now 0.0 chunks/s, 0.000 GB/s", "tier host", "3 entries",
                       "leases     read 0, write 0", "clients    1 (worker 1)", "errors     0",
                       "latency    LOOKUP", ns.name):
            assert needle in frame, f"{needle!r} not in the view:\n{frame}"
        # The sidecar goes away: the view says so and keeps trying.
        assert h.proc is not None
        h.proc.send_signal(signal.SIGTERM)
        assert h.proc.wait(15) == 0
        _read(master, out, lambda t: "no sidecar is running at" in t.rsplit(clear, 1)[1], 30)
        assert proc.poll() is None, "--watch outlives the sidecar"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0, "Ctrl-C is a clean exit"
        text = _read(master, out, lambda t: False, 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert "Traceback" not in text, text[-3000:]


def test_watch_without_a_sidecar_says_so_and_fails(tmp_path: Any) -> None:
    r = subprocess.run([exe("lmkv-stats"), "--watch", "1"], env=clean_env(LMKV_RUN_DIR=str(tmp_path / "none")),
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stdout == ""
    assert "no sidecar is running at" in r.stderr and str(tmp_path / "none") in r.stderr
