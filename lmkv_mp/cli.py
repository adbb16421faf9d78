"""Command-line entry points: ``lmkv-sidecar`` and ``lmkv-stats``."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from lmkv_mp.config import sidecar_main_config, stats_main_config


def sidecar_main(argv: Sequence[str] | None = None) -> int:
    """``lmkv-sidecar``: run the node's KV-cache sidecar in the foreground."""
    cfg = sidecar_main_config(argv)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s lmkv %(message)s")
    from lmkv_mp.sidecar.server import serve  # imported late: `--help` stays fast

    return serve(cfg)


def _size(n: float) -> str:
    """A byte count for people: ``1.5GiB``, ``640KiB``, ``12B``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}B"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s == float("inf"):
        return ">5s"
    return f"{s * 1e6:.0f}µs" if s < 1e-3 else f"{s * 1e3:.4g}ms" if s < 1 else f"{s:.4g}s"


def _uptime(s: float) -> str:
    s = int(s)
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    return (f"{d}d" if d else "") + (f"{h}h" if d or h else "") + (f"{m}m" if d or h or m else "") + f"{s % 60}s"


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items()) if v) or "none"


def rates(prev: dict[str, Any] | None, snap: dict[str, Any]) -> dict[str, float] | None:
    """Per-second rates between two snapshots of the same boot (None: no such pair)."""
    if prev is None or prev.get("boot_id") != snap["boot_id"]:
        return None
    dt = snap["time"] - prev["time"]
    if dt <= 0:
        return None

    def d(key: str) -> float:
        return snap[key] - prev[key]
    asked = d("lookup_chunks")
    return {"dt": dt, "in_chunks": d("stores") / dt, "in_bytes": d("stored_bytes") / dt,
            "out_chunks": d("loads") / dt, "out_bytes": d("loaded_bytes") / dt,
            "lookups": d("lookups") / dt, "hit_rate": d("hit_chunks") / asked if asked else -1.0}


def render(snap: dict[str, Any], prev: dict[str, Any] | None = None) -> str:
    """A readable summary of a snapshot; with ``prev`` (the one before, for ``--watch``),
    rates over the interval between them too."""
    from lmkv_mp.sidecar.metrics import quantile

    r = rates(prev, snap)
    clients = snap["clients"]
    lines = [f"lmkv-sidecar {snap.get('version', '?')}  boot {snap['boot_id'][:12]}  up {_uptime(snap['uptime_s'])}"
             f"  metrics {snap.get('metrics_url') or 'off'}"]
    asked = snap["lookup_chunks"]
    rate = f"{snap['hit_chunks'] / asked:.1%}" if asked else "-"
    line = f"hit rate   {rate} of chunks asked  (lookups {snap['lookups']}, chunks asked {asked}, hit {snap['hit_chunks']})"
    if r is not None:
        line += f"  last {r['dt']:.1f}s: " + (f"{r['hit_rate']:.1%}" if r["hit_rate"] >= 0 else "no lookups")
    lines.append(line)
    for label, chunks, nbytes, rc, rb, what in (("in", "stores", "stored_bytes", "in_chunks", "in_bytes", "stored"),
                                                ("out", "loads", "loaded_bytes", "out_chunks", "out_bytes", "loaded")):
        line = f"{label:<10} {snap[chunks]} chunks {what} ({_size(snap[nbytes])})"
        if r is not None:
            line += f"  now {r[rc]:.1f} chunks/s, {r[rb] / 1e9:.3f} GB/s"
        lines.append(line)
    for name, t in snap["tiers"].items():
        cap = t.get("capacity_bytes") or 0
        used = t.get("used_bytes") or 0
        pct = f" ({used / cap:.1%})" if cap else ""
        lines.append(f"tier {name:<5} {_size(used)} / {_size(cap)}{pct}, {t.get('entries', 0)} entries, "
                     f"{t.get('hit_chunks', 0)} hits, {t.get('evictions', 0)} evictions, "
                     f"{t.get('prefetches', 0)} prefetches"
                     + (f", {t.get('errors', 0)} errors, {t.get('corrupt', 0)} corrupt"
                        if t.get("errors") or t.get("corrupt") else ""))
    lines.append(f"leases     read {snap['leases'].get('read', 0)}, write {snap['leases'].get('write', 0)}")
    lines.append(f"clients    {sum(clients.values())} ({_counts(clients)})")
    lines.append(f"errors     {snap['errors']} ({_counts(snap['errors_by_code'])})")
    if snap.get("host_pool_linked") is False:
        lines.append("WARNING    the host pool segment was removed from outside: new workers cannot map it "
                     "(misses) until the sidecar restarts")
    rs = snap.get("request_seconds", {"ops": {}, "buckets": []})
    for op, h in sorted(rs["ops"].items()):
        n = sum(h["counts"])
        lines.append(f"latency    {op:<8} n={n}  mean {_seconds(h['sum'] / n if n else None)}  "
                     f"p50 <={_seconds(quantile(h, rs['buckets'], 0.5))}  p99 <={_seconds(quantile(h, rs['buckets'], 0.99))}")
    if snap.get("namespaces"):
        lines.append("namespaces (model[dtype,tp shard]):")
        for ns in snap["namespaces"]:
            lines.append(f"  {ns['name']}: {ns['entries']} chunks, {_size(ns['bytes'])}, {ns['hit_chunks']} hits")
    return "\n".join(lines)


def _no_sidecar(endpoint: str, why: str) -> str:
    if endpoint.startswith("ipc://") and not Path(endpoint[len("ipc://"):]).exists():
        return (f"no sidecar is running at {endpoint} (no such socket): start lmkv-sidecar, or name a running "
                "one as it was started (--run-dir, --stats-endpoint, --endpoint; LMKV_RUN_DIR, LMKV_STATS_ENDPOINT)")
    return f"no sidecar answered at {endpoint}: {why}"


def stats_main(argv: Sequence[str] | None = None) -> int:
    """``lmkv-stats``: exit 0 after printing, 1 when no sidecar answers, 2 on bad flags.
    With ``--watch`` it runs until interrupted (SIGINT/SIGTERM: exit 0)."""
    cfg = stats_main_config(argv)  # a bad flag or value: shown, SystemExit(2)
    from lmkv_mp.engine.client import SidecarClient, SidecarError

    endpoint, watch = cfg.client.endpoint, cfg.watch
    client = SidecarClient(cfg.client, role="admin", heartbeat=False)
    tty = sys.stdout.isatty()
    prev: dict[str, Any] | None = None
    try:
        while True:
            try:
                snap: dict[str, Any] | None = client.stats()
                why = ""
            except SidecarError as e:
                snap, why = None, str(e)
            if snap is None and (watch is None or prev is None):
                print(f"lmkv-stats: {_no_sidecar(endpoint, why)}", file=sys.stderr)
                return 1
            if cfg.json:
                if snap is None:
                    print(f"lmkv-stats: {_no_sidecar(endpoint, why)}; retrying", file=sys.stderr, flush=True)
                else:
                    print(json.dumps(snap, sort_keys=True), flush=True)
            else:
                if watch is not None and tty:
                    print("\x1b[H\x1b[2J", end="")  # cursor home, clear screen: redraw in place
                if snap is None:
                    text = (f"{_no_sidecar(endpoint, why)}\nlast seen: boot {prev['boot_id'][:12]} at "  # type: ignore[index]
                            f"{time.strftime('%H:%M:%S', time.localtime(prev['time']))}; retrying")  # type: ignore[index]
                else:
                    text = render(snap, prev)
                if watch is not None:
                    text += f"\n\n{time.strftime('%H:%M:%S')}  every {_seconds(watch)}  Ctrl-C quits"
                print(text, flush=True)
            if watch is None:
                return 0
            prev = snap or prev
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `lmkv-stats --watch 1 | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(sidecar_main())
