"""Soak: N client processes store, load and look up chunks through one sidecar for a while;
afterwards nothing may be wrong, failed or leaked, and the sidecar must not have grown.

    python bench/soak.py --duration 60 --clients 4 [--verify] [--pool-size 64MiB]
    python bench/soak.py --quick        # CI: 10 s, 4 clients

Each client (this script with ``--worker``, its own process) loops over a mix of ops on a
small pool, so eviction runs all the time: stores of fresh prompts and of prompts every
client shares (WRITE / PRESENT / BUSY races), pinned LOOKUPs that read every chunk back
and compare it byte for byte, plain LOOKUPs. A chunk's bytes are its chain hash repeated,
so a chunk read from the wrong slot, or torn, cannot pass. ``--verify`` runs the sidecar
with ``--verify on``: stores send checksums, loads check them.

An *error* is anything a healthy cache must never do: a call that fails, a COMMIT that
publishes fewer chunks than were written, a RELEASE refused, a wrong byte, a checksum
mismatch. Misses (evicted chunks) are not errors. Once every client has stopped, the
snapshot must show no lease and no WRITING slot, and every used slot byte must belong to
a committed entry (``leaked_slots``). One JSON line; exit status 1 on any client error (a
failed or timed-out call counts, though the data path answers it as a miss), leak, sidecar
INTERNAL error, or RSS growth over 16 MiB (or 5%).

RSS growth is the sidecar's private resident memory (RssAnon) at the end minus after a
warm-up (the first fifth of the run): a leak grows it with the op count.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lmkv_mp.wire import protocol as P  # noqa: E402
from lmkv_mp.engine.client import SidecarClient  # noqa: E402
from lmkv_mp.config import load_client_config  # noqa: E402
from lmkv_mp.wire.keys import HASH_BYTES  # noqa: E402
from lmkv_mp.memory import HostRegion, pool_uuid  # noqa: E402
from lmkv_mp.wire.checksum import checksum  # noqa: E402

CHUNK_BYTES = 64 << 10
NS = P.NamespaceInfo(b"soak-namespace-1", CHUNK_BYTES, "soak")
CHUNKS = 4                  # per prompt
SHARED_PROMPTS = 8          # prompts every client knows (stored by whoever gets there first)
MAX_DURATION = 24 * 3600.0
MAX_CLIENTS = 64


def payload(h: bytes) -> bytes:
    return h * (CHUNK_BYTES // HASH_BYTES)


def prompt(rng: np.random.Generator) -> list[bytes]:
    return [rng.bytes(HASH_BYTES) for _ in range(CHUNKS)]


class Worker:
    """One client's loop (runs in its own process)."""

    def __init__(self, run_dir: str, seed: int) -> None:
        cfg = load_client_config(env={"LMKV_RUN_DIR": run_dir}, overrides={"timeout": 5.0})
        self.client = SidecarClient(cfg, role="worker", name=f"soak-{seed}", namespaces=[NS])
        if not self.client.connect(timeout=30) or self.client.hello is None:
            raise SystemExit("soak: no sidecar")
        info = self.client.hello.regions[0]
        self.region = HostRegion.attach(info.kind, info.name, info.size)
        if pool_uuid(self.region.view) != info.uuid:
            raise SystemExit("soak: the mapped region is not the sidecar's pool")
        self.view = self.region.view
        self.verify = self.client.verify
        self.rng = np.random.default_rng(seed)
        shared = np.random.default_rng(12345)
        self.shared = [prompt(shared) for _ in range(SHARED_PROMPTS)]
        self.recent: collections.deque[list[bytes]] = collections.deque(maxlen=32)
        self.ops: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()

    def store(self, hashes: list[bytes]) -> None:
        r = self.client.reserve(NS.id, b"".join(hashes))
        if r is None:
            self.errors["reserve_failed"] += 1
            return
        written = r.writable().tolist()
        sums = []
        for i in written:
            off = int(r.offsets[i])
            self.view[off:off + CHUNK_BYTES] = payload(hashes[i])
            if self.verify:
                sums.append(checksum(self.view[off:off + CHUNK_BYTES]))
        if written:
            n = self.client.commit(r.lease_id, b"".join(hashes[i] for i in written), sums or None)
            if n != len(written):
                self.errors["commit_short"] += 1
        self.ops["store"] += 1
        self.ops["chunks_written"] += len(written)
        self.recent.append(hashes)

    def load(self, hashes: list[bytes]) -> None:
        found = self.client.lookup([NS.id], b"".join(hashes), pin=True)
        if found.hits:
            sums = found.checksums[0].tolist() if found.checksums else []
            for i, off in enumerate(found.offsets[0].tolist()):
                got = self.view[off:off + CHUNK_BYTES]
                if self.verify and checksum(got) != sums[i]:
                    self.errors["checksum_mismatch"] += 1
                if got != payload(hashes[i]):
                    self.errors["wrong_bytes"] += 1
            if not self.client.release(found.lease_id):
                self.errors["release_failed"] += 1
        self.ops["load"] += 1
        self.ops["chunks_read"] += found.hits

    def run(self, duration: float) -> dict[str, Any]:
        deadline = time.monotonic() + duration
        stop = [False]
        signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
        while time.monotonic() < deadline and not stop[0]:
            x = self.rng.random()
            if x < 0.3:
                self.store(prompt(self.rng))
            elif x < 0.45:
                self.store(self.shared[int(self.rng.integers(SHARED_PROMPTS))])
            elif x < 0.85:
                pool = self.recent if self.recent and x < 0.7 else self.shared
                self.load(pool[int(self.rng.integers(len(pool)))])
            else:
                self.client.lookup([NS.id], b"".join(self.shared[int(self.rng.integers(SHARED_PROMPTS))]))
                self.ops["lookup"] += 1
            if not self.client.available:   # a call failed or timed out: it came back as a miss
                self.errors["sidecar_unavailable"] += 1
        self.client.close()
        self.region.close()
        return {"ops": dict(self.ops), "errors": dict(self.errors)}


RSS_GROWTH_MAX = 16 << 20   # sidecar private memory growth that fails the soak (or 5% of its start)

def rss_anon(pid: int) -> int:
    from common import proc_memory

    return proc_memory(pid)["rss_anon"]


def leaked(snap: dict[str, Any]) -> tuple[int, int]:
    """(leaked slots, leaked leases) in a snapshot taken after every client stopped."""
    host = snap["tiers"]["host"]
    orphaned = (host["used_bytes"] - host["entries"] * CHUNK_BYTES) // CHUNK_BYTES
    return host["entries_by_state"].get("writing", 0) + orphaned, sum(snap["leases"].values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=None, help="seconds of load [60; quick 10]")
    ap.add_argument("--clients", type=int, default=4, help="client processes [4]")
    ap.add_argument("--pool-size", default="64MiB", help="host pool (small, so eviction runs) [64MiB]")
    ap.add_argument("--verify", action="store_true", help="sidecar with --verify on: checksums stored and checked")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 10 s")
    ap.add_argument("--worker", help=argparse.SUPPRESS)     # internal: RUN_DIR of the sidecar to load
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    duration = args.duration or (10.0 if args.quick else 60.0)
    if not 0 < duration <= MAX_DURATION or not 1 <= args.clients <= MAX_CLIENTS:
        ap.error(f"--duration must be in (0, {MAX_DURATION:g}] and --clients in 1..{MAX_CLIENTS}")
    if args.worker:
        print(json.dumps(Worker(args.worker, args.seed).run(duration)), flush=True)
        return 0

    from common import emit, machine, sidecar

    with sidecar(args.pool_size, "4MiB", "--verify", "on" if args.verify else "off", "--lease-timeout", "2s",
                 "--heartbeat-interval", "500ms") as sc:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(sc.run_dir), "--seed", str(i),
                                   "--duration", str(duration)], stdout=subprocess.PIPE, text=True)
                 for i in range(args.clients)]
        t0 = time.monotonic()
        warm = min(duration / 5, 10.0)
        while time.monotonic() - t0 < warm and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        rss_start = rss_anon(sc.proc.pid)
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=duration + 120)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            outs.append(json.loads(lines[-1]) if p.returncode == 0 and lines else {"errors": {"client_died": 1}})
        elapsed = time.monotonic() - t0
        rss_end = rss_anon(sc.proc.pid)
        with SidecarClient(sc.client_config(), role="admin", heartbeat=False) as c:
            snap = c.stats()
            deadline = time.monotonic() + 10
            while any(leaked(snap)) and time.monotonic() < deadline:   # a dead client's leases expire
                time.sleep(0.2)
                snap = c.stats()
    ops: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for o in outs:
        ops.update(o.get("ops", {}))
        errors.update(o.get("errors", {}))
    slots, leases = leaked(snap)
    total_ops = ops["store"] + ops["load"] + ops["lookup"]
    emit({"bench": "soak", "duration_s": round(elapsed, 1), "clients": args.clients, "verify": args.verify,
          "ops": total_ops, "ops_per_s": round(total_ops / elapsed), "ops_by_kind": dict(ops),
          "errors": sum(errors.values()), "errors_by_kind": dict(errors), "leaked_slots": slots,
          "leaked_leases": leases, "sidecar_errors_by_code": snap["errors_by_code"],
          "evictions": snap["evictions"], "rss_start_bytes": rss_start, "rss_end_bytes": rss_end,
          "rss_growth_bytes": rss_end - rss_start, "host_pool": args.pool_size, "machine": machine()})
    # The sidecar's own failures count too: an INTERNAL error is a bug, and private memory
    # that keeps growing over a bounded workload is a leak.
    internal = snap["errors_by_code"].get("INTERNAL", 0)
    rss_bad = rss_end - rss_start > max(RSS_GROWTH_MAX, rss_start // 20)
    return 1 if errors or slots or leases or internal or rss_bad else 0


if __name__ == "__main__":
    sys.exit(main())
