"""``lmkv-stats``'s settings: which sidecar to ask, named the way ``lmkv-sidecar`` names it
(the same flags and ``LMKV_*`` twins find the same stats socket), and how to ask."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lmkv_mp.config.client import ClientConfig, load_client_config
from lmkv_mp.config.common import ConfigError, default_run_dir, default_stats_endpoint, endpoint_problem, parse_path
from lmkv_mp.config.flags import FLAGS_BY_NAME, Sources
from lmkv_mp.config.units import _show, parse_duration

DEFAULT_STATS_TIMEOUT = "2s"


@dataclass(frozen=True, slots=True)
class StatsConfig:
    """What ``lmkv-stats`` runs with: ``client`` reaches the socket it asks
    (``client.endpoint``), waiting ``client.timeout`` for each answer; ``watch`` is the time
    between refreshes (None: print once); ``json``: one JSON object per snapshot."""

    client: ClientConfig
    watch: float | None
    json: bool


def build_stats_parser() -> argparse.ArgumentParser:
    """The ``lmkv-stats`` parser. ``--run-dir`` and ``--stats-endpoint`` are the sidecar's own
    flags (same env twins, same defaults), so one command line names one sidecar for both."""
    p = argparse.ArgumentParser(
        prog="lmkv-stats",
        description="Print a running lmkv-sidecar's statistics: hit rate, chunks and bytes in and out, "
                    "tier usage, leases, clients, errors, request latency, per-model usage.",
        epilog="Name the sidecar as it was started: with the same --run-dir or --stats-endpoint (or their "
               "LMKV_* twins), or --endpoint. Exit status: 0 printed, 1 no sidecar answered, 2 bad flags.",
        allow_abbrev=False)
    for flag, help_text in (("--run-dir", "the sidecar's --run-dir: ask the stats socket in it"),
                            ("--stats-endpoint", "the sidecar's --stats-endpoint")):
        f = FLAGS_BY_NAME[flag]
        p.add_argument(f.flag, dest=f.dest, metavar=f.metavar, default=None,
                       help=f"{help_text} [env {f.env}; default: {f.default}]".replace("%", "%%"))
    p.add_argument("--endpoint", metavar="URL", help="the sidecar's --endpoint: ask its control socket, which "
                   "answers too unless the sidecar requires client tokens (a --stats-endpoint given wins)")
    p.add_argument("--json", action="store_true", help="print the snapshot as one JSON object (per refresh)")
    p.add_argument("--watch", metavar="SECONDS", help="refresh every SECONDS (e.g. 2 or 500ms) until "
                   "interrupted, with rates over the last interval; keeps trying if the sidecar goes away")
    p.add_argument("--timeout", default=DEFAULT_STATS_TIMEOUT,
                   help=f"how long to wait for the sidecar (default {DEFAULT_STATS_TIMEOUT})")
    return p


def load_stats_config(argv: Sequence[str], env: Mapping[str, str]) -> StatsConfig:
    """Parse ``lmkv-stats``'s ``argv`` (without the program name) and ``env``.

    The socket asked is ``--stats-endpoint``, else ``--endpoint``, else ``LMKV_STATS_ENDPOINT``,
    else ``ipc://<run dir>/stats.sock`` with the run dir from ``--run-dir``, else
    ``LMKV_RUN_DIR``, else the default: where ``lmkv-sidecar`` with the same flags and
    environment binds its stats socket. The clients' settings in ``env`` are checked too
    (a bad one is an error here as in vLLM's connector). Raises ConfigError (one line);
    unknown flags exit through argparse (SystemExit(2)).
    """
    args = build_stats_parser().parse_args(list(argv))
    src = Sources(args, env)
    run_dir = src.parse("--run-dir", parse_path, default_run_dir(env))
    if args.endpoint is not None and args.stats_endpoint is None:
        problem = endpoint_problem(args.endpoint, bind=False)
        if problem is not None:
            raise ConfigError("--endpoint", None, f"{_show(args.endpoint)} {problem}")
        endpoint = args.endpoint
    else:
        endpoint = src.endpoint("--stats-endpoint", default_stats_endpoint(run_dir), bind=False)
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as e:
        raise ConfigError("--timeout", None, str(e)) from None
    try:
        watch = parse_duration(args.watch) if args.watch else None
    except ValueError as e:
        raise ConfigError("--watch", None, str(e)) from None
    base = load_client_config(env)
    return StatsConfig(ClientConfig(endpoint, timeout, base.heartbeat_interval, 0.0, None), watch, args.json)


def stats_main_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> StatsConfig:
    """:func:`load_stats_config` for the ``lmkv-stats`` entry point: ``argv`` defaults to
    ``sys.argv[1:]``, ``env`` to ``os.environ``; a bad value prints ``lmkv-stats: error:
    <message>`` as one line and raises SystemExit(2)."""
    try:
        return load_stats_config(sys.argv[1:] if argv is None else argv, os.environ if env is None else env)
    except ConfigError as e:
        print(f"lmkv-stats: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
