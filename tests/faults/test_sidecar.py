"""The sidecar dies, restarts, or loses its shared-memory segment under its clients.

The promises (ARCHITECTURE §7): a dead sidecar is a miss within the client's deadline,
never a hang or an exception; after a restart the same clients recover on their own
within 2 s, with no wrong byte served on the way, and the host tier comes back warm;
a segment removed from outside does not stop the sidecar or the workers that mapped it,
and a worker that cannot attach it gets a clear error and misses, never a crash.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import posix_ipc
import pytest

from lmkv_mp.wire import protocol as P
from lmkv_mp.memory import shm_name_for

from tests.conftest import BIN, CLIENT_DEFAULTS, Procs, SidecarHandle, clean_env, log_text, stats, wait_for
from tests.faults.common import N, assert_no_leaks, lmkv_stats, load_and_check, ns_info, spec
from tests.helpers import kvproc as K

pytestmark = pytest.mark.slow
TIMEOUT = CLIENT_DEFAULTS["timeout"]


def test_sidecar_killed_and_restarted(sidecar: Callable[..., SidecarHandle], procs: Procs) -> None:
    h = sidecar()
    ns = ns_info()
    client = h.client(role="worker", namespaces=[ns])
    assert client.connect()
    key = client.hello.hash_key  # type: ignore[union-attr]
    kept, lost = K.prompt_hashes(1, N, key), K.prompt_hashes(2, N, key)

    assert procs.result(procs.kvproc("store", spec(h, 1)))["committed"] == N
    assert client.lookup([ns.id], kept).hits == N
    writer = procs.kvproc("reserve-and-hang", spec(h, 2))
    assert procs.read_line(writer).startswith("RESERVED")
    writer.kill()
    writer.wait()
    # The crash must come while the dead writer's records still say WRITING.
    assert stats(h)["tiers"]["host"]["entries_by_state"] == {"writing": N, "committed": N}
    pending = client.reserve(ns.id, K.prompt_hashes(3, 1, key))
    assert pending is not None and pending.lease_id
    h.kill(signal.SIGKILL)

    t = time.monotonic()
    assert client.lookup([ns.id], kept).hits == 0
    assert time.monotonic() - t < TIMEOUT + 0.5, "a dead sidecar is a miss within the deadline"
    t = time.monotonic()
    assert client.reserve(ns.id, kept) is None
    assert client.commit(pending.lease_id) == 0
    assert client.release(pending.lease_id) is False
    assert client.ping() is False
    assert time.monotonic() - t < TIMEOUT + 0.5
    assert client.restarts == 0

    h.restart()
    wait_for(lambda: client.lookup([ns.id], kept).hits == N, 10, "the same client to recover on its own")
    assert client.restarts == 1
    load_and_check(client, ns, kept)
    assert client.lookup([ns.id], lost).hits == 0, "a dead writer's chunks never appear"
    s = stats(h)
    assert s["tiers"]["host"]["entries_by_state"] == {"writing": 0, "committed": N}
    assert s["tiers"]["host"]["used_bytes"] == N * ns.chunk_bytes  # 64 KiB chunks fill 64 KiB slots
    redo = client.reserve(ns.id, lost)
    assert redo is not None and set(redo.status) == {P.SlotStatus.WRITE}, "their slots were freed"
    assert client.commit(redo.lease_id) == N
    assert_no_leaks(h, ns.chunk_bytes)


def events(procs: Procs, proc: subprocess.Popen, until: Callable[[list[dict[str, Any]]], bool],
           seen: list[dict[str, Any]], timeout: float = 60.0) -> None:
    """Read a loop's event lines into ``seen`` until ``until(seen)``."""
    deadline = time.monotonic() + timeout
    while not until(seen):
        assert time.monotonic() < deadline, f"no such events from the client in {timeout:g}s: {seen}"
        seen.append(json.loads(procs.read_line(proc, timeout=deadline - time.monotonic())))


def test_sidecar_killed_under_load_from_four_clients(sidecar: Callable[..., SidecarHandle], procs: Procs) -> None:
    """Four worker processes store and load fresh prompts in a loop, checking every byte;
    the sidecar is SIGKILLed under them and restarted. They run with the connector's
    default deadlines (1 s), and each is serving again within 2 s of the new sidecar
    answering. Not one wrong byte, and the chunks stored (and pinned) before the crash
    are all back."""
    h = sidecar()
    ns = ns_info()
    me = h.client(role="worker", namespaces=[ns])
    assert me.connect()
    warm = K.prompt_hashes(1, N, me.hello.hash_key)  # type: ignore[union-attr]
    assert procs.result(procs.kvproc("store", spec(h, 1)))["committed"] == N
    pinned = me.lookup([ns.id], warm, pin=True)   # so the loops cannot evict them before the crash
    assert pinned.hits == N

    loops = [procs.kvproc("loop", spec(h, 0, client={}, block_ids=list(range(16)), load_block_ids=list(range(32, 48)),
                                       loop_seed=i)) for i in range(4)]
    seen: list[list[dict[str, Any]]] = [[] for _ in loops]
    for proc, ev in zip(loops, seen):
        events(procs, proc, lambda e: any(x["event"] == "started" for x in e), ev)
    wait_for(lambda: stats(h)["stores"] >= N + 4 * 3 * N, 60, "every client to have stored a few prompts")

    h.kill(signal.SIGKILL)
    killed = time.monotonic()
    for proc, ev in zip(loops, seen):
        events(procs, proc, lambda e: any(x["event"] == "down" and x["t"] >= killed for x in e), ev)
    h.restart()
    ready = time.monotonic()
    # Pinned again at once: after the restart nothing protects them from the loops' new stores.
    survived = wait_for(lambda: (r := me.lookup([ns.id], warm, pin=True)).hits and r, 10, "the warm chunks")
    assert survived.hits == N, "the warm chunks survived the crash"
    recovered = []
    for proc, ev in zip(loops, seen):
        events(procs, proc, lambda e: e[-1]["event"] == "up" and e[-1]["t"] > killed, ev)
        recovered.append(ev[-1]["t"] - ready)
        assert recovered[-1] <= 2.0, f"a client took {recovered[-1]:.2f}s to recover:\n{log_text(proc)}"
    print("recovered after the restart in", ", ".join(f"{t:.2f}s" for t in recovered))
    wait_for(lambda: stats(h)["stores"] >= 4 * 3 * N, 60, "every client to store again after the restart")

    results = []
    for proc in loops:
        proc.send_signal(signal.SIGTERM)
        results.append(procs.result(proc))
    for r in results:
        assert r["wrong"] == 0 and r["corrupt"] == 0, r
        assert r["loaded"] > 0 and r["stored"] > 0, r
    assert load_and_check(me, ns, warm) == N, "the warm chunks are intact, byte for byte"
    assert me.release(survived.lease_id)
    assert_no_leaks(h, ns.chunk_bytes)


def test_shm_segment_removed_from_outside(sidecar: Callable[..., SidecarHandle], procs: Procs,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Someone unlinks the host pool's segment (a cleanup script, `rm /dev/shm/*`). The
    sidecar notices and says so once, and keeps serving from its mapping; a worker that
    had mapped it goes on storing and loading; a worker that starts now cannot attach it:
    its loads and stores are misses with a clear warning, never a crash. The next start of
    the sidecar recreates the segment (cold)."""
    h = sidecar()
    ns = ns_info()
    old = h.client(role="worker", namespaces=[ns])
    assert old.connect() and old.host_tensor() is not None
    key = old.hello.hash_key  # type: ignore[union-attr]
    assert procs.result(procs.kvproc("store", spec(h, 1)))["committed"] == N

    posix_ipc.unlink_shared_memory(shm_name_for(h.run_dir))
    wait_for(lambda: "was removed from outside" in h.log(), 10, "the sidecar to notice the removal")
    assert lmkv_stats(h)["host_pool_linked"] is False
    shown = subprocess.run([str(BIN / "lmkv-stats")], env=clean_env(LMKV_RUN_DIR=str(h.run_dir)), text=True,
                           capture_output=True, timeout=60, stdin=subprocess.DEVNULL).stdout
    assert "WARNING    the host pool segment was removed from outside" in shown
    assert load_and_check(old, ns, K.prompt_hashes(1, N, key)) == N, "the mapped worker still loads"

    late = procs.kvproc("store", spec(h, 2))
    assert late.wait(60) == 1
    late_log = late.log.read_text()  # type: ignore[attr-defined]
    assert "host region unavailable" in late_log and "cannot map the sidecar's host region" in late_log
    assert "Traceback" not in late_log
    assert old.lookup([ns.id], K.prompt_hashes(2, N, key)).hits == 0
    assert h.alive() and stats(h)["tiers"]["host"]["entries"] == N
    assert_no_leaks(h, ns.chunk_bytes)

    # Someone recreates a segment under the pool's name: a worker that maps it now sees
    # another pool's uuid and never uses it (its writes would reach no sidecar's slots).
    name = shm_name_for(h.run_dir)
    impostor = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600,
                                      size=old.hello.regions[0].size)  # type: ignore[union-attr]
    impostor.close_fd()
    try:
        stranger = h.client(role="worker", namespaces=[ns])
        assert stranger.connect() and stranger.host_tensor() is None
        assert "is not the sidecar's pool" in caplog.text
    finally:
        posix_ipc.unlink_shared_memory(name)

    h.restart()
    assert Path("/dev/shm", shm_name_for(h.run_dir).lstrip("/")).exists(), "a new segment"
    assert procs.result(procs.kvproc("store", spec(h, 3)))["committed"] == N
    assert old.lookup([ns.id], K.prompt_hashes(1, N, key)).hits == 0, "cold: the old pool is gone"
    assert load_and_check(old, ns, K.prompt_hashes(3, N, key)) == N, "the old worker maps the new pool"
