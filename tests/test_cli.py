"""The command line: ``lmkv-sidecar`` and ``lmkv-stats`` as a user runs them."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lmkv_mp.wire import protocol as P
from lmkv_mp.engine.client import SidecarClient
from lmkv_mp.config import load_client_config
from lmkv_mp.memory import shm_name_for

from tests.conftest import BIN, READY_TIMEOUT, Procs, SidecarHandle, clean_env, log_text, stats, unlink_shm, wait_for


def exe(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or pytest.fail(f"{name} is not installed"))


def run(argv: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def xdg() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lmkv-xdg-", dir="/tmp"))
    yield d
    unlink_shm(d / "lmkv")
    shutil.rmtree(d, ignore_errors=True)


def test_help() -> None:
    r = run([exe("lmkv-sidecar"), "--help"], clean_env())
    assert r.returncode == 0, r.stderr
    for flag in ("--run-dir", "--host-pool-size", "--lease-timeout", "LMKV_HOST_POOL_SIZE"):
        assert flag in r.stdout
    r = run([exe("lmkv-stats"), "--help"], clean_env())
    assert r.returncode == 0
    for flag in ("--json", "--run-dir", "LMKV_RUN_DIR", "--stats-endpoint", "LMKV_STATS_ENDPOINT", "--endpoint"):
        assert flag in r.stdout


@pytest.mark.parametrize("flag,value", [("--host-pool-size", "12XB"), ("--lease-timeout", "0"),
                                        ("--slab-size", "1000"), ("--endpoint", "http://x")])
def test_bad_value_is_one_line_naming_the_flag(flag: str, value: str, xdg: Path) -> None:
    r = run([exe("lmkv-sidecar"), flag, value], clean_env(XDG_RUNTIME_DIR=str(xdg)))
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert flag in lines[0] and value in lines[0]
    assert not (xdg / "lmkv").exists(), "a bad flag creates nothing"


def test_bad_env_value_names_the_variable(xdg: Path) -> None:
    r = run([exe("lmkv-sidecar")], clean_env(XDG_RUNTIME_DIR=str(xdg), LMKV_LEASE_TIMEOUT="soon"))
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "LMKV_LEASE_TIMEOUT" in r.stderr


@pytest.mark.slow
def test_unusable_pool_fails_to_start_and_leaves_no_segment(xdg: Path) -> None:
    """A pool exactly one slab large has no room for the slot table beside the slab."""
    env = clean_env(XDG_RUNTIME_DIR=str(xdg), LMKV_HOST_POOL_SIZE="4MiB", LMKV_SLAB_SIZE="4MiB",
                    LMKV_METRICS_PORT="0")
    r = run([exe("lmkv-sidecar")], env, timeout=READY_TIMEOUT + 30)
    assert r.returncode != 0
    assert "--slab-size" in r.stderr and "--host-pool-size" in r.stderr, r.stderr
    assert not (Path("/dev/shm") / shm_name_for(xdg / "lmkv").lstrip("/")).exists()


@pytest.mark.slow
def test_no_flags_lifecycle(xdg: Path, procs: Procs) -> None:
    """Start with no flags; permissions; a second sidecar is refused; lmkv-stats; SIGTERM."""
    # LMKV_SLAB_SIZE: a 64MiB pool cannot hold one default (64MiB) slab plus its tables.
    env = clean_env(XDG_RUNTIME_DIR=str(xdg), LMKV_HOST_POOL_SIZE="64MiB", LMKV_SLAB_SIZE="4MiB",
                    LMKV_METRICS_PORT="0", LMKV_UNLINK_ON_EXIT="1")
    proc = procs.start([exe("lmkv-sidecar")], "sidecar-noflags", env=env)
    run_dir = xdg / "lmkv"
    cfg = load_client_config(env={"XDG_RUNTIME_DIR": str(xdg)}, overrides={"timeout": 0.5})
    assert cfg.endpoint == f"ipc://{run_dir}/control.sock"
    with SidecarClient(cfg, role="scheduler", heartbeat=False) as client:
        def ready() -> bool:
            assert proc.poll() is None, log_text(proc)
            return client.connect(timeout=0.5)
        wait_for(ready, READY_TIMEOUT, "the no-flags sidecar to answer", interval=0.05)
        assert client.lookup([bytes(16)], bytes(16)).hits == 0

    assert mode(run_dir) == 0o700
    for name in ("control.sock", "stats.sock"):
        assert stat.S_ISSOCK((run_dir / name).stat().st_mode)
        assert mode(run_dir / name) == 0o600, name
    shm = Path("/dev/shm") / shm_name_for(run_dir).lstrip("/")
    assert shm.exists() and mode(shm) == 0o600
    assert shm.stat().st_size == 64 << 20

    second = run([exe("lmkv-sidecar")], env, timeout=READY_TIMEOUT + 30)
    assert second.returncode != 0
    assert "lock" in second.stderr and str(run_dir) in second.stderr, second.stderr
    assert proc.poll() is None, "the first sidecar survives the second"

    stats_env = clean_env(XDG_RUNTIME_DIR=str(xdg))
    r = run([exe("lmkv-stats"), "--json"], stats_env)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    snap = json.loads(line)
    assert snap["lookups"] == 1 and snap["lookup_chunks"] == 1 and snap["hit_chunks"] == 0
    r = run([exe("lmkv-stats")], stats_env)
    assert r.returncode == 0 and snap["boot_id"][:12] in r.stdout and "lookups 1," in r.stdout

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, log_text(proc)
    assert not (run_dir / "control.sock").exists() and not (run_dir / "stats.sock").exists()
    assert not shm.exists(), "--unlink-on-exit removes the segment"


STATS_KEYS = {"boot_id", "uptime_s", "clients", "tiers", "lookups", "lookup_chunks", "hit_chunks", "stores",
              "loads", "evictions", "errors"}


def lmkv_stats(h: SidecarHandle, *args: str) -> subprocess.CompletedProcess[str]:
    return run([exe("lmkv-stats"), *args], clean_env(LMKV_RUN_DIR=str(h.run_dir)))


@pytest.mark.slow
def test_stats_counts_match_traffic(sidecar: Callable[..., SidecarHandle]) -> None:
    h = sidecar("--client-pool-share", "100%")  # one writer reserves 2/3 of the pool at once
    mib = 1 << 20
    ns = P.NamespaceInfo(b"N" * 16, mib, "stats-test")
    writer = h.client(role="worker", namespaces=[ns])
    sched = h.client(role="scheduler")

    def store(first: int, n: int) -> int:
        packed = b"".join(i.to_bytes(16, "little") for i in range(first, first + n))
        res = writer.reserve(ns.id, packed)
        assert res is not None and len(res.writable()) == n
        return writer.commit(res.lease_id)

    cap = stats(h)["tiers"]["host"]["capacity_bytes"]
    per_round = cap // mib * 2 // 3
    stored = store(0, per_round) + store(per_round, per_round)  # the second round must evict
    prompt = b"".join(i.to_bytes(16, "little") for i in range(per_round, per_round + 5))
    assert sched.lookup([ns.id], prompt).hits == 5
    pinned = sched.lookup([ns.id], prompt + bytes(16), pin=True)
    assert pinned.hits == 5
    assert sched.release(pinned.lease_id)
    assert writer.reserve(b"U" * 16, prompt) is None  # an undeclared namespace: one error

    r = lmkv_stats(h, "--json")
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    snap: dict[str, Any] = json.loads(line)
    assert STATS_KEYS <= set(snap)
    host = snap["tiers"]["host"]
    assert {"used_bytes", "capacity_bytes", "entries"} <= set(host)
    assert snap["boot_id"] == writer.boot_id.hex() and snap["uptime_s"] >= 0
    assert snap["clients"] == {"worker": 1, "scheduler": 1}
    assert (snap["lookups"], snap["lookup_chunks"], snap["hit_chunks"]) == (2, 11, 10)
    assert snap["stores"] == stored == 2 * per_round
    assert snap["loads"] == 5 and snap["errors"] == 1
    assert snap["evictions"] > 0 and snap["evictions"] == stored - host["entries"]
    assert host["capacity_bytes"] == cap and 0 < host["used_bytes"] <= cap
    assert host["used_bytes"] == host["entries"] * mib
    assert snap["leases"] == {"read": 0, "write": 0}

    r = lmkv_stats(h)
    assert r.returncode == 0, r.stderr
    assert "lookups 2," in r.stdout and "hit 10" in r.stdout and "errors     1 (UNKNOWN_NAMESPACE 1)" in r.stdout
    assert "tier host" in r.stdout and "clients    2 (scheduler 1, worker 1)" in r.stdout
    assert f"stats-test: {host['entries']} chunks" in r.stdout and "10 hits" in r.stdout
    assert "latency    LOOKUP   n=2" in r.stdout


@pytest.mark.slow
def test_stats_names_a_sidecar_as_lmkv_sidecar_does(sidecar: Callable[..., SidecarHandle], xdg: Path) -> None:
    """The fixture starts ``lmkv-sidecar --run-dir DIR``; ``lmkv-stats`` takes the same flag, the
    sidecar's endpoint flags and the run dir's env twin (a flag wins over it)."""
    h = sidecar()
    boot_id = stats(h)["boot_id"]
    elsewhere = str(xdg / "nothing-here")
    for args, env in ((["--run-dir", str(h.run_dir)], clean_env()),
                      (["--run-dir", str(h.run_dir)], clean_env(LMKV_RUN_DIR=elsewhere)),
                      (["--stats-endpoint", h.stats_endpoint], clean_env(LMKV_RUN_DIR=elsewhere)),
                      (["--endpoint", h.endpoint], clean_env(LMKV_RUN_DIR=elsewhere)),
                      ([], clean_env(LMKV_RUN_DIR=str(h.run_dir)))):
        r = run([exe("lmkv-stats"), "--json", *args], env)
        assert r.returncode == 0, (args, r.stderr)
        assert json.loads(r.stdout)["boot_id"] == boot_id, args
    r = run([exe("lmkv-stats"), "--run-dir", elsewhere], clean_env(LMKV_RUN_DIR=str(h.run_dir)))
    assert r.returncode == 1 and "nothing-here" in r.stderr


def test_stats_without_a_sidecar_fails_fast(xdg: Path) -> None:
    t = time.monotonic()
    r = run([exe("lmkv-stats"), "--json"], clean_env(LMKV_RUN_DIR=str(xdg / "nothing-here")))
    elapsed = time.monotonic() - t
    assert r.returncode == 1
    assert r.stdout == ""
    assert "no sidecar" in r.stderr and "nothing-here" in r.stderr
    assert elapsed < 5


def test_stats_bad_flag_exits_2() -> None:
    r = run([exe("lmkv-stats"), "--timeout", "soon"], clean_env())
    assert r.returncode == 2 and "soon" in r.stderr
