"""Lower-tier throughput: DiskTier and RedisTier against raw file and raw redis-py I/O.

Chunks are bench/datapath.py's: 256 tokens of the Llama-3-8B-like shard (32 layers, 8 KV
heads, head size 128, bf16), 32 MiB each. Sources and destinations are slots of a shared
anonymous mapping (what the sidecar's movers copy from and into). Per op, one iteration
moves ``--chunks`` chunks; ours and the raw limit of the same bytes alternate within each
iteration, in alternating order (a loaded machine slows both alike), and the medians are
compared:

* ``host_to_disk``: ``DiskTier.put`` (checksum, temp file, rename) vs ``open/write/close``
  of a new file in the same directory (both write files whose old copies were unlinked,
  untimed, before the iteration);
* ``disk_to_host``: ``DiskTier.get_into`` (header, ``readinto`` the slot, checksum) vs
  ``open/readinto/close`` of the raw files. Both read files written moments before, so
  both read the page cache unless ``--cold``, which fsyncs and drops every file's cached
  pages (``posix_fadvise DONTNEED``) before each read iteration, for both alike;
* ``host_to_redis``: ``RedisTier.put`` vs redis-py ``SET`` of the slot; the line also
  carries the two value layouts the tier did not pick (one fresh buffer holding header +
  payload; ``MULTI`` SET header + APPEND payload), see ``_set_scattered`` in the tier;
* ``redis_to_host``: ``RedisTier.get_into`` (GET, verify, copy into the slot) vs redis-py
  ``GET`` alone (no copy anywhere).

The redis-server is private to the run (bench/redisproc.py: loopback TCP and a unix
socket, no persistence) unless ``--redis-url`` names one. One JSON line per op:

    {"bench":"tiers","op":"host_to_disk",…,"gbps":…,"raw_gbps":…,"ratio":…}
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402
from datapath import CHUNK_TOKENS, HEAD_SIZE, KV_HEADS, LAYERS  # noqa: E402
from redisproc import RedisServer  # noqa: E402

from lmkv_mp.sidecar.tiers.base import HEADER_BYTES, pack_header  # noqa: E402
from lmkv_mp.wire.checksum import checksum  # noqa: E402
from lmkv_mp.sidecar.tiers.disk import DiskTier  # noqa: E402
from lmkv_mp.sidecar.tiers.redis import RedisTier  # noqa: E402

CHUNK_BYTES = CHUNK_TOKENS * LAYERS * KV_HEADS * 2 * HEAD_SIZE * 2


def fs_type(path: Path) -> str:
    """The file system ``path`` lives on (the longest matching mount point)."""
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, typ = line.split()[:3]
        if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
            best, kind = mnt, typ
    return kind


def drop_cached(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(path: Path, data: memoryview) -> None:
    with open(path, "wb", buffering=0) as f:
        f.write(data)


def raw_read(path: Path, dest: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < dest.nbytes:
            got += f.readinto(dest[got:])


def must(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"tiers bench: {what} failed")


def same(a: memoryview, b: memoryview) -> bool:
    return bool(np.array_equal(np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def line(op: str, t: dict[str, list[float]], moved: int, extra: dict[str, object]) -> None:
    ours, raw = statistics.median(t["ours"]), statistics.median(t["raw"])
    rec: dict[str, object] = {"bench": "tiers", "op": op, "gbps": round(moved / ours / 1e9, 3),
                              "raw_gbps": round(moved / raw / 1e9, 3), "ratio": round(raw / ours, 3),
                              "ms": round(ours * 1e3, 1), "raw_ms": round(raw * 1e3, 1),
                              "spread_ms": [round(min(t["ours"]) * 1e3, 1), round(max(t["ours"]) * 1e3, 1)]}
    for k, v in t.items():
        if k not in ("ours", "raw"):
            rec[f"{k}_gbps"] = round(moved / statistics.median(v) / 1e9, 3)
    emit({**rec, **extra})


def bench_disk(src: list[memoryview], dst: list[memoryview], keys: list[bytes], iters: int, cold: bool,
               base: Path, common: dict[str, object]) -> None:
    tier_dir, raw_dir = base / "tier", base / "raw"
    raw_dir.mkdir()
    tier = DiskTier(tier_dir, len(keys) * (CHUNK_BYTES + HEADER_BYTES) * 2)
    raw_paths = [raw_dir / k.hex() for k in keys]
    put: dict[str, list[float]] = defaultdict(list)
    get: dict[str, list[float]] = defaultdict(list)
    for it in range(iters + 1):     # the first iteration is an untimed warm-up
        for k, p in zip(keys, raw_paths):
            tier.delete(k)
            p.unlink(missing_ok=True)
        # Who goes first alternates: the second writer meets the first one's dirty pages.
        order = ("ours", "raw") if it % 2 else ("raw", "ours")
        puts = {"ours": lambda: must(all(tier.put(k, s) for k, s in zip(keys, src)), "put"),
                "raw": lambda: [raw_write(p, s) for p, s in zip(raw_paths, src)]}
        gets = {"ours": lambda: must(all(tier.get_into(k, d) for k, d in zip(keys, dst)), "get_into"),
                "raw": lambda: [raw_read(p, d) for p, d in zip(raw_paths, dst)]}
        put_t = {who: timed(puts[who]) for who in order}
        if cold:
            drop_cached([tier._path(k) for k in keys] + raw_paths)
        get_t = {who: timed(gets[who]) for who in order}
        if it == 0:
            continue
        for who in order:
            put[who].append(put_t[who])
            get[who].append(get_t[who])
    must(all(same(s, d) for s, d in zip(src, dst)), "disk tier: byte-identical read")
    extra = {**common, "fs": fs_type(tier_dir), "dir": str(tier_dir.parent), "cold": cold}
    moved = len(keys) * CHUNK_BYTES
    line("host_to_disk", put, moved, extra)
    line("disk_to_host", get, moved, extra)


def bench_redis(url: str, transport: str, src: list[memoryview], dst: list[memoryview], keys: list[bytes],
                iters: int, common: dict[str, object]) -> None:
    tier = RedisTier(url, timeout_s=10.0, key_prefix="bench:tier:")
    r = redis.Redis.from_url(url, socket_timeout=10.0)
    raw_keys = [b"bench:raw:" + k.hex().encode() for k in keys]

    def prealloc(i: int) -> None:       # the layouts the tier did not pick, for the record
        head = pack_header(keys[i], CHUNK_BYTES, checksum(src[i]))
        value = bytearray(HEADER_BYTES + CHUNK_BYTES)
        value[:HEADER_BYTES] = head
        memoryview(value)[HEADER_BYTES:] = src[i]
        r.set(b"bench:alt1:" + keys[i].hex().encode(), value)

    def multi_append(i: int) -> None:
        head = pack_header(keys[i], CHUNK_BYTES, checksum(src[i]))
        pipe = r.pipeline(transaction=True)
        pipe.set(b"bench:alt2:" + keys[i].hex().encode(), head)
        pipe.append(b"bench:alt2:" + keys[i].hex().encode(), src[i])
        pipe.execute()

    put: dict[str, list[float]] = defaultdict(list)
    get: dict[str, list[float]] = defaultdict(list)
    n = len(keys)
    for it in range(iters + 1):
        times = {
            "ours": timed(lambda: must(all(tier.put(k, s) for k, s in zip(keys, src)), "put")),
            "raw": timed(lambda: [r.set(k, s) for k, s in zip(raw_keys, src)]),
            "alt_prealloc": timed(lambda: [prealloc(i) for i in range(n)]),
            "alt_multi_append": timed(lambda: [multi_append(i) for i in range(n)]),
        }
        ours_get = timed(lambda: must(all(tier.get_into(k, d) for k, d in zip(keys, dst)), "get_into"))
        raw_get = timed(lambda: [r.get(k) for k in raw_keys])
        if it == 0:
            continue
        for name, t in times.items():
            put[name].append(t)
        get["ours"].append(ours_get)
        get["raw"].append(raw_get)
    must(all(same(s, d) for s, d in zip(src, dst)), "redis tier: byte-identical read")
    r.delete(*raw_keys, *[b"bench:alt1:" + k.hex().encode() for k in keys],
             *[b"bench:alt2:" + k.hex().encode() for k in keys])
    for k in keys:
        tier.delete(k)
    tier.close()
    r.close()
    moved = n * CHUNK_BYTES
    line("host_to_redis", put, moved, {**common, "transport": transport})
    line("redis_to_host", get, moved, {**common, "transport": transport})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=None, help="chunks per iteration [8; quick 2]")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per op [7; quick 3]")
    ap.add_argument("--disk-dir", type=Path, default=None, help="where the disk runs write (default: a temp dir)")
    ap.add_argument("--cold", action="store_true", help="drop the files' cached pages before each read iteration")
    ap.add_argument("--redis-url", default=None, help="an existing Redis instead of a private redis-server")
    ap.add_argument("--transports", default=None, help="private redis-server transports [tcp,unix; quick tcp]")
    ap.add_argument("--skip", default="", help="comma list of 'disk', 'redis' to leave out")
    ap.add_argument("--quick", action="store_true", help="CI-sized run (under 30 s)")
    args = ap.parse_args()
    chunks = args.chunks or (2 if args.quick else 8)
    iters = args.iters or (3 if args.quick else 7)
    transports = (args.transports or ("tcp" if args.quick else "tcp,unix")).split(",")
    skip = set(filter(None, args.skip.split(",")))

    region = mmap.mmap(-1, 2 * chunks * CHUNK_BYTES)      # shared anonymous: like the host pool
    np.frombuffer(region, dtype=np.uint8)[:] = np.random.default_rng(0).integers(
        0, 256, 2 * chunks * CHUNK_BYTES, dtype=np.uint8)
    view = memoryview(region)
    src = [view[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES] for i in range(chunks)]
    dst = [view[(chunks + i) * CHUNK_BYTES:(chunks + i + 1) * CHUNK_BYTES] for i in range(chunks)]
    rng = np.random.default_rng(1)
    keys = [b"\x42" * 16 + rng.bytes(16) for _ in range(chunks)]
    common: dict[str, object] = {"chunk_bytes": CHUNK_BYTES, "chunks": chunks, "iters": iters, "machine": machine()}

    if "disk" not in skip:
        base = Path(tempfile.mkdtemp(prefix="lmkv-bench-tiers-", dir=args.disk_dir))
        try:
            bench_disk(src, dst, keys, iters, args.cold, base, common)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    if "redis" not in skip:
        if args.redis_url:
            bench_redis(args.redis_url, "given", src, dst, keys, iters, common)
        else:
            with RedisServer() as server:
                version = subprocess.run([server.exe, "--version"], capture_output=True, text=True).stdout.split()[2]
                for transport in transports:
                    url = server.url if transport == "tcp" else server.unix_url
                    bench_redis(url, transport, src, dst, keys, iters, {**common, "redis": version})
    for m in (src + dst):
        m.release()
    view.release()
    region.close()


if __name__ == "__main__":
    main()
