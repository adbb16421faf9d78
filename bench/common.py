"""Shared pieces of the benchmarks: a real sidecar process, machine facts, JSON lines."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import posix_ipc
import torch

from lmkv_mp.engine.client import SidecarClient
from lmkv_mp.config import ClientConfig, load_client_config
from lmkv_mp.memory import shm_name_for


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


class SidecarProcess:
    """A real ``lmkv-sidecar`` in a fresh run dir, stopped and cleaned up on exit."""

    def __init__(self, pool_size: str = "1GiB", slab_size: str = "64MiB", *extra: str) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="lmkv-bench-"))
        cmd = [sys.executable, "-m", "lmkv_mp.cli", "--run-dir", str(self.run_dir), "--host-pool-size", pool_size,
               "--slab-size", slab_size, "--metrics-port", "0", "--unlink-on-exit", "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd)
        self.config = load_client_config(env={"LMKV_RUN_DIR": str(self.run_dir)}, overrides={"timeout": 5.0})
        deadline = time.monotonic() + 60
        probe = SidecarClient(self.config, heartbeat=False)
        try:
            while not probe.connect(timeout=0.5):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the sidecar did not start")
        finally:
            probe.close()

    def client_config(self, **overrides: Any) -> ClientConfig:
        return load_client_config(env={"LMKV_RUN_DIR": str(self.run_dir)}, overrides={"timeout": 5.0, **overrides})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(shm_name_for(self.run_dir))
        shutil.rmtree(self.run_dir, ignore_errors=True)


@contextlib.contextmanager
def sidecar(*args: str, **kw: str) -> Iterator[SidecarProcess]:
    s = SidecarProcess(*args, **kw)
    try:
        yield s
    finally:
        s.close()


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory(pid: int) -> dict[str, int]:
    """A process's resident memory in bytes: ``rss`` (all), ``rss_anon`` (private heap),
    ``rss_shmem`` (mapped shared memory it has touched, e.g. the host pool) and ``hwm`` (peak)."""
    keys = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssShmem": "rss_shmem", "VmHWM": "hwm"}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in keys:
            out[keys[name]] = int(value.split()[0]) * 1024
    return out


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]
