"""Fixtures that start real processes: sidecars and the worker helpers in ``tests/procs``.

Every sidecar gets a fresh run dir under /tmp (ipc socket paths must stay under 107
bytes, which pytest's ``tmp_path`` does not promise). Nothing here sleeps to synchronise:
readiness is polled with a deadline (:func:`wait_for`). Teardown SIGTERMs, then
SIGKILLs, every process a test started, reaps it, and unlinks the sidecar's shm segment
even when the sidecar died by SIGKILL and could not do it itself.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import posix_ipc
import pytest

from lmkv_mp.engine.client import SidecarClient, SidecarError
from lmkv_mp.config import ClientConfig, default_stats_endpoint, load_client_config
from lmkv_mp.memory import shm_name_for

TESTS = Path(__file__).resolve().parent
KVPROC = TESTS / "helpers" / "kvproc.py"
BIN = Path(sys.executable).parent

# Under load a cold `import torch` (the sidecar imports it through lmkv_mp.memory) has
# taken over 10 s on a 2-core CI box: deadlines for process start-up are generous, and
# tests that measure latency measure calls, never start-up.
READY_TIMEOUT = 45.0
PROC_TIMEOUT = 90.0

# Fast liveness for tests: the fixture's sidecar expires leases after 1 s.
LEASE_TIMEOUT = 1.0
SIDECAR_ARGS = ("--host-pool-size", "64MiB", "--slab-size", "4MiB", "--lease-timeout", f"{LEASE_TIMEOUT:g}s",
                "--heartbeat-interval", "200ms", "--metrics-port", "0", "--unlink-on-exit", "--chunk-tokens", "64")
CLIENT_DEFAULTS = {"timeout": 0.5, "heartbeat_interval": 0.2, "retry_interval": 0.2}

_T = TypeVar("_T")


def wait_for(pred: Callable[[], _T], timeout: float, what: str, interval: float = 0.02) -> _T:
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def client_config(run_dir: Path, **overrides: Any) -> ClientConfig:
    """A client config for the sidecar in ``run_dir`` with test-short deadlines."""
    return load_client_config(env={"LMKV_RUN_DIR": str(run_dir)}, overrides={**CLIENT_DEFAULTS, **overrides})


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process, without any LMKV_* setting of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMKV_")}
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps. Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


def unlink_shm(run_dir: Path) -> None:
    try:
        posix_ipc.unlink_shared_memory(shm_name_for(run_dir))
    except posix_ipc.ExistentialError:
        pass


class Procs:
    """Child processes of one test; all reaped at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []
        self._n = 0

    def log_path(self, name: str) -> Path:
        self._n += 1
        return self.log_dir / f"{self._n:02d}-{name}.log"

    def start(self, argv: list[str], name: str, **kw: Any) -> subprocess.Popen:
        """Start ``argv`` with stderr to a log file (a pipe nobody reads could fill and block)."""
        log = self.log_path(name)
        with open(log, "wb") as err:
            proc = subprocess.Popen(argv, stderr=err, stdin=subprocess.DEVNULL, **kw)
        proc.log = log  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def kvproc(self, mode: str, spec: dict[str, Any]) -> subprocess.Popen:
        """One worker rank (tests/helpers/kvproc.py); its stdout is a pipe of JSON lines."""
        argv = [sys.executable, str(KVPROC), "--mode", mode, "--spec", json.dumps(spec)]
        return self.start(argv, f"kvproc-{mode}-r{spec.get('rank', 0)}", stdout=subprocess.PIPE,
                          env=clean_env(), text=True)

    def result(self, proc: subprocess.Popen, timeout: float = PROC_TIMEOUT) -> dict[str, Any]:
        """Wait for a kvproc to finish; its last stdout line as JSON. Fails with its log."""
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{proc.args[:4]} did not finish in {timeout:g}s:\n{log_text(proc)}") from None
        assert proc.returncode == 0, f"{proc.args[:4]} exited {proc.returncode}:\n{log_text(proc)}"
        lines = [ln for ln in out.splitlines() if ln.strip()]
        assert lines, f"no output:\n{log_text(proc)}"
        return json.loads(lines[-1])

    def read_line(self, proc: subprocess.Popen, timeout: float = PROC_TIMEOUT) -> str:
        """The next stdout line, within ``timeout``; fails if the process exits first."""
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                raise AssertionError(f"no output from {proc.args[:4]} in {timeout:g}s:\n{log_text(proc)}")
        finally:
            sel.close()
        line = proc.stdout.readline()
        assert line, f"{proc.args[:4]} exited ({proc.wait()}) without output:\n{log_text(proc)}"
        return line.rstrip("\n")

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            stop_process(proc)


def log_text(proc: subprocess.Popen) -> str:
    log: Path | None = getattr(proc, "log", None)
    return log.read_text(errors="replace")[-6000:] if log is not None and log.exists() else ""


class SidecarHandle:
    """A sidecar process on its own run dir; :meth:`restart` keeps the run dir (warm restart)."""

    def __init__(self, procs: Procs, run_dir: Path, extra: tuple[str, ...]) -> None:
        self.procs = procs
        self.run_dir = run_dir
        self.argv = [sys.executable, "-m", "lmkv_mp.cli", "--run-dir", str(run_dir), *SIDECAR_ARGS, *extra]
        self.endpoint = f"ipc://{run_dir / 'control.sock'}"
        self.stats_endpoint = default_stats_endpoint(run_dir)
        self.proc: subprocess.Popen | None = None
        self._clients: list[SidecarClient] = []

    def start(self, ready: bool = True) -> "SidecarHandle":
        self.proc = self.procs.start(self.argv, "sidecar", env=clean_env())
        if ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the sidecar answers on its stats socket (which registers no client, so the
        probe leaves no trace in ``clients``); fails at once if the process exits."""
        probe = SidecarClient(ClientConfig(self.stats_endpoint, 0.5, 1.0, 0.01, None), role="admin",
                              heartbeat=False)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
            if not (self.run_dir / "stats.sock").exists():
                return False
            try:
                return bool(probe.stats())
            except SidecarError:
                return False

        try:
            wait_for(ready, timeout, f"the sidecar on {self.run_dir} to answer", interval=0.05)
        finally:
            probe.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait for the process to exit; its exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def restart(self, ready: bool = True) -> "SidecarHandle":
        """Start a new sidecar on the same run dir (stopping the old one if it still runs)."""
        if self.alive():
            assert self.proc is not None
            stop_process(self.proc)
        return self.start(ready)

    def client(self, role: str = "client", namespaces: Any = (), heartbeat: bool = True,
               **overrides: Any) -> SidecarClient:
        """A client of this sidecar (closed at teardown)."""
        c = SidecarClient(client_config(self.run_dir, **overrides), role=role, namespaces=namespaces,
                          heartbeat=heartbeat)
        self._clients.append(c)
        return c

    def log(self) -> str:
        return log_text(self.proc) if self.proc is not None else ""

    def close(self) -> None:
        for c in self._clients:
            c.close()
        if self.proc is not None:
            stop_process(self.proc)
        unlink_shm(self.run_dir)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def stats(handle: SidecarHandle, timeout: float = 5.0) -> dict[str, Any]:
    """A stats snapshot from the sidecar's stats socket (a fresh client each time, so an
    earlier failure's back-off never hides the current state)."""
    cfg = ClientConfig(handle.stats_endpoint, timeout, 1.0, 0.01, None)
    with SidecarClient(cfg, role="admin", heartbeat=False) as c:
        return c.stats()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def need_c_extension(name: str, built: bool) -> None:
    """For a test of a C extension's path (``lmkv_mp/wire/_chain.c``, ``lmkv_mp/engine/_rows.c``;
    ``name`` is the module's dotted path under lmkv_mp): skip where it was not built
    (no C compiler at install), except in CI (``CI=true`` or ``LMKV_REQUIRE_C_EXT=1``, which
    .ci/run sets), where it must have been."""
    if built:
        return
    if os.environ.get("CI") == "true" or os.environ.get("LMKV_REQUIRE_C_EXT") == "1":
        pytest.fail(f"lmkv_mp.{name} is not built: pip install -e . must compile lmkv_mp/{name.replace('.', '/')}.c in CI")
    pytest.skip(f"lmkv_mp.{name} is not built here (no C compiler at install)")


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    group = Procs(tmp_path)
    yield group
    group.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for proc in group.started:
            print(f"--- {proc.args[:6]} (exit {proc.returncode}) ---\n{log_text(proc)}")


@pytest.fixture
def sidecar(procs: Procs) -> Iterator[Callable[..., SidecarHandle]]:
    """Factory: ``sidecar(*extra_flags, ready=True)`` starts a sidecar on a fresh run dir."""
    handles: list[SidecarHandle] = []

    def start(*extra: str, ready: bool = True) -> SidecarHandle:
        run_dir = Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp"))
        handle = SidecarHandle(procs, run_dir, extra)
        handles.append(handle)
        return handle.start(ready)

    yield start
    for handle in handles:
        handle.close()


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A private redis-server (tests/helpers/redisproc.py) on a free port; ``.url``, ``.kill()``,
    ``.start()`` (again on the same port). Skips without redis-server, except in CI."""
    from tests.helpers.redisproc import RedisServer, require_redis_server

    require_redis_server()
    with RedisServer() as server:
        yield server
