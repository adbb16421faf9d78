"""What every fault test shares: the rank geometry of tests/helpers/kvproc.py, specs for
its processes, a load that checks every byte, and the closing check that nothing leaked.

"Nothing lost, nothing wrong": whatever a test breaks, every chunk a reader gets back is
byte-identical to what its writer stored (or it is a miss), chunks committed before the
fault are still there where the fault cannot have touched them, and once the dust settles
``lmkv-stats`` shows no lease held, no slot WRITING and no slot used by nothing.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import torch

from lmkv_mp.wire import protocol as P
from lmkv_mp.engine.client import SidecarClient

from tests.conftest import BIN, CLIENT_DEFAULTS, LEASE_TIMEOUT, SidecarHandle, clean_env, wait_for
from tests.helpers import kvproc as K

SEED = 11
A_IDS = list(range(40, 56))      # the writer's blocks for 4 chunks
B_IDS = list(range(3, 35, 2))    # where a reader scatters them
N = 4


def ns_info(tp: int = 1, rank: int = 0) -> P.NamespaceInfo:
    return K.namespace_for(K.PagedKV(K.make_cache(None)), "tiny", "bfloat16", tp, rank)


def spec(h: SidecarHandle, prompt_seed: int, client: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """A kvproc spec for the sidecar ``h`` (test-short client deadlines unless ``client``)."""
    return {"run_dir": str(h.run_dir), "rank": 0, "tp": 1, "seed": SEED, "prompt_seed": prompt_seed,
            "chunks": N, "block_ids": A_IDS, "client": CLIENT_DEFAULTS if client is None else client, **kw}


def load_and_check(client: SidecarClient, ns: P.NamespaceInfo, hashes: bytes, seed: int = SEED) -> int:
    """Pinned LOOKUP, scatter into a zeroed cache at B_IDS in this process, compare with the
    writer's blocks regenerated from its seed, RELEASE. Returns the chunks checked."""
    found = client.lookup([ns.id], hashes, pin=True)
    region = client.host_tensor()
    assert region is not None
    cache = K.make_cache(None)
    kv = K.PagedKV(cache)
    for i, off in enumerate(found.offsets[0].tolist() if found.hits else []):
        kv.scatter(region[off:off + ns.chunk_bytes], K.chunk_blocks(B_IDS, i))
    got = K.block_bytes(cache, B_IDS[:found.hits * K.BLOCKS_PER_CHUNK])
    want = K.block_bytes(K.make_cache(K.rank_seed(seed, 0)), A_IDS[:found.hits * K.BLOCKS_PER_CHUNK])
    for name in want:
        assert torch.equal(got[name], want[name]), name
    if found.lease_id:
        assert client.release(found.lease_id)
    return found.hits


def lmkv_stats(h: SidecarHandle) -> dict[str, Any]:
    """The snapshot as an operator sees it: ``lmkv-stats --json``."""
    r = subprocess.run([str(BIN / "lmkv-stats"), "--json"], env=clean_env(LMKV_RUN_DIR=str(h.run_dir)),
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def leaks(snap: dict[str, Any], slot_bytes: int | None) -> list[str]:
    """What in a snapshot says a lease, a slot or a tier copy was left behind."""
    host = snap["tiers"]["host"]
    out = []
    if snap["leases"] != {"read": 0, "write": 0}:
        out.append(f"leases {snap['leases']}")
    if host["entries_by_state"].get("writing", 0):
        out.append(f"{host['entries_by_state']['writing']} slots WRITING")
    if snap.get("parked_slots"):
        out.append(f"{snap['parked_slots']} slots parked for a stopped writer")
    if host["used_bytes"] != host["entry_slot_bytes"]:
        out.append(f"{host['used_bytes'] - host['entry_slot_bytes']} used slot bytes belong to no entry")
    if slot_bytes is not None and host["used_bytes"] != host["entries"] * slot_bytes:
        out.append(f"{host['used_bytes']} bytes used by {host['entries']} entries of {slot_bytes}")
    if snap.get("tier_movers", {}).get("in_flight", 0):
        out.append(f"{snap['tier_movers']['in_flight']} tier copies in flight")
    return out


def assert_no_leaks(h: SidecarHandle, slot_bytes: int | None = None,
                    timeout: float = LEASE_TIMEOUT + 5.0) -> dict[str, Any]:
    """Wait (dead clients' leases end within the lease timeout) until ``lmkv-stats`` shows
    no leaked lease, WRITING slot, orphaned slot byte or tier copy; the final snapshot."""
    last: list[dict[str, Any]] = []

    def clean() -> bool:
        last[:] = [lmkv_stats(h)]
        return not leaks(last[0], slot_bytes)

    try:
        wait_for(clean, timeout, "no leaked leases or slots", interval=0.1)
    except AssertionError:
        raise AssertionError(f"leaked: {leaks(last[0], slot_bytes)}") from None
    return last[0]
