"""Command-line entry points: ``lmkv-sidecar`` and ``lmkv-stats``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Sequence

from lmkv_mp.config import (ClientConfig, ConfigError, format_size, load_client_config, parse_duration,
                            sidecar_main_config, stats_endpoint_from_env)


def sidecar_main(argv: Sequence[str] | None = None) -> int:
    """``lmkv-sidecar``: run the node's KV-cache sidecar in the foreground."""
    cfg = sidecar_main_config(argv)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s lmkv %(message)s")
    from lmkv_mp.server import serve  # imported late: `--help` stays fast

    return serve(cfg)


def _stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmkv-stats",
        description="Print a running lmkv-sidecar's statistics snapshot.")
    p.add_argument("--endpoint", help="stats endpoint (default: LMKV_STATS_ENDPOINT, else "
                   "ipc://<run dir>/stats.sock with the run dir from LMKV_RUN_DIR or the default)")
    p.add_argument("--json", action="store_true", help="print the snapshot as one JSON object")
    p.add_argument("--watch", metavar="SECONDS", help="refresh every SECONDS until interrupted")
    p.add_argument("--timeout", default="2s", help="how long to wait for the sidecar (default 2s)")
    return p


def render(snap: dict[str, Any]) -> str:
    """A readable summary of a snapshot."""
    lines = [f"lmkv-sidecar boot {snap['boot_id'][:12]}  up {snap['uptime_s']:.0f}s  "
             f"clients {sum(snap['clients'].values())} {snap['clients']}"]
    rate = snap["hit_chunks"] / snap["lookup_chunks"] if snap["lookup_chunks"] else 0.0
    lines.append(f"lookups {snap['lookups']}  chunks asked {snap['lookup_chunks']}  hit {snap['hit_chunks']} "
                 f"({rate:.1%})")
    lines.append(f"stored {snap['stores']} chunks ({format_size(snap['stored_bytes'])})  "
                 f"loaded {snap['loads']} chunks ({format_size(snap['loaded_bytes'])})  "
                 f"evictions {snap['evictions']}  errors {snap['errors']}")
    for name, t in snap["tiers"].items():
        cap = t["capacity_bytes"] or 1
        lines.append(f"tier {name}: {format_size(t['used_bytes'])} / {format_size(t['capacity_bytes'])} "
                     f"({t['used_bytes'] / cap:.1%}), {t['entries']} entries")
    lines.append(f"leases read {snap['leases']['read']} write {snap['leases']['write']}")
    for ns in snap.get("namespaces", []):
        lines.append(f"  {ns['name']}: {ns['entries']} chunks, {format_size(ns['bytes'])}, {ns['hit_chunks']} hits")
    return "\n".join(lines)


def stats_main(argv: Sequence[str] | None = None) -> int:
    """``lmkv-stats``: exit 0 after printing, 1 when no sidecar answers, 2 on bad flags."""
    args = _stats_parser().parse_args(argv)
    from lmkv_mp.client import SidecarClient, SidecarError

    try:
        timeout = parse_duration(args.timeout)
        watch = parse_duration(args.watch) if args.watch else None
        base = load_client_config()
    except (ValueError, ConfigError) as e:
        print(f"lmkv-stats: error: {e}", file=sys.stderr)
        return 2
    endpoint = args.endpoint or stats_endpoint_from_env()
    cfg = ClientConfig(endpoint, timeout, base.heartbeat_interval, 0.0, None)
    client = SidecarClient(cfg, role="admin", heartbeat=False)
    try:
        while True:
            try:
                snap = client.stats()
            except SidecarError as e:
                print(f"lmkv-stats: no sidecar answered at {endpoint}: {e}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(snap, sort_keys=True), flush=True)
            else:
                if watch is not None and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")
                print(render(snap), flush=True)
            if watch is None:
                return 0
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(sidecar_main())
