"""Every ``lmkv-sidecar`` flag in one table, its ``LMKV_*`` twin, the argparse parser, and
how a setting's raw text is found (flag first, then environment). sidecar.py turns the
raw text into a validated :class:`~lmkv_mp.config.sidecar.SidecarConfig`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from lmkv_mp.config.common import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_CLIENT_MAX_INFLIGHT,
    DEFAULT_CLIENT_POOL_SHARE,
    DEFAULT_DISK_SIZE,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_LEASE_TIMEOUT,
    DEFAULT_METRICS_HOST,
    DEFAULT_METRICS_NAMESPACES,
    DEFAULT_METRICS_PORT,
    DEFAULT_REMOTE_TIMEOUT,
    DEFAULT_SLAB_SIZE,
    DEFAULT_STATS_INTERVAL,
    DEFAULT_WRITE_POLICY,
    LOG_LEVELS,
    WRITE_POLICIES,
    ConfigError,
    endpoint_problem,
    parse_bool,
)
from lmkv_mp.config.units import _fmt_seconds, _show, format_size

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Flag:
    flag: str
    metavar: str
    default: str
    help: str

    @property
    def env(self) -> str:
        return env_name(self.flag)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def env_name(flag: str) -> str:
    """``--host-pool-size`` -> ``LMKV_HOST_POOL_SIZE``."""
    return "LMKV_" + flag.lstrip("-").upper().replace("-", "_")


SIDECAR_FLAGS: tuple[Flag, ...] = (
    Flag("--run-dir", "DIR", "$XDG_RUNTIME_DIR/lmkv, else /tmp/lmkv-<uid>",
          "directory for sockets, lock file and pid file (created mode 0700)"),
    Flag("--endpoint", "URL", "ipc://<run-dir>/control.sock",
          "control endpoint, ipc://PATH or tcp://HOST:PORT"),
    Flag("--stats-endpoint", "URL", "ipc://<run-dir>/stats.sock",
          "stats endpoint: answers snapshot requests (lmkv-stats)"),
    Flag("--stats-publish-endpoint", "URL", "ipc://<run-dir>/stats-pub.sock",
          "ZeroMQ (X)PUB endpoint where the snapshot is published every --stats-interval while anyone subscribes"),
    Flag("--stats-interval", "DURATION", _fmt_seconds(DEFAULT_STATS_INTERVAL),
          "how often the snapshot is published; 0 turns publishing off"),
    Flag("--host-pool-size", "SIZE", "20% of MemAvailable, 256MiB..8GiB",
          "host tier size, e.g. 512MiB or 64GiB"),
    Flag("--host-pool-path", "FILE", "POSIX shared memory",
          "back the host tier with this file (DAX, tmpfs) instead of POSIX shared memory"),
    Flag("--slab-size", "SIZE", format_size(DEFAULT_SLAB_SIZE),
          "allocator slab size; a multiple of 4KiB, at least 1MiB"),
    Flag("--chunk-tokens", "N", str(DEFAULT_CHUNK_TOKENS),
          "tokens per cached chunk; a multiple of the engine's block size"),
    Flag("--gpu-pool-size", "SIZE", "0 (no GPU tier)", "GPU tier size per device: copies of recently stored "
         "chunks in device memory, which CUDA workers on that device copy device to device; not with --verify on"),
    Flag("--gpu-devices", "LIST", "every visible device", "CUDA devices of the GPU tier, e.g. 0,1 (as "
         "CUDA_VISIBLE_DEVICES numbers them for the sidecar)"),
    Flag("--disk-dir", "DIR", "no disk tier", "disk tier directory, SSD or DAX (one sidecar per directory; survives restarts)"),
    Flag("--disk-size", "SIZE", f"{format_size(DEFAULT_DISK_SIZE)} when --disk-dir is set",
          "disk tier size"),
    Flag("--remote-url", "URL", "no remote tier",
          "remote tier shared between nodes: redis:// rediss:// unix:// redis+cluster:// (valkey:// valkeys:// valkey+cluster:// too)"),
    Flag("--remote-timeout", "DURATION", _fmt_seconds(DEFAULT_REMOTE_TIMEOUT),
          "deadline of every remote tier call; a slower or dead remote store means misses"),
    Flag("--write-policy", "|".join(WRITE_POLICIES), DEFAULT_WRITE_POLICY,
          "write-through: new entries are copied to the lower tiers at once; write-back: the coldest are copied when the host tier is 85% full (no effect without --disk-dir or --remote-url)"),
    Flag("--lease-timeout", "DURATION", _fmt_seconds(DEFAULT_LEASE_TIMEOUT),
          "a client's leases expire after this long without a heartbeat"),
    Flag("--heartbeat-interval", "DURATION", _fmt_seconds(DEFAULT_HEARTBEAT_INTERVAL),
          "expected client heartbeat period; below --lease-timeout"),
    Flag("--verify", "on|off", "off",
          "on: workers send an xxh3-64 checksum of each chunk at COMMIT, loaders check it after copying and "
          "report mismatches, which drops the chunk (a miss, counted as error CORRUPT)"),
    Flag("--hash-key-file", "FILE", "a fixed built-in key",
          "file holding the 16..64-byte chain hash key"),
    Flag("--admin-token-file", "FILE", "none (admin ops are refused)",
          "file holding the token that admin ops (CLEAR) must present"),
    Flag("--client-token-file", "FILE", "none (any local process of the owner may HELLO)",
          "file holding the token every client's HELLO must present (clients: LMKV_TOKEN_FILE); "
          "required with --allow-remote-clients"),
    Flag("--allow-remote-clients", "", "off (tcp:// endpoints must bind a loopback address)",
          "allow tcp:// endpoints on non-loopback addresses (other hosts can connect; needs --client-token-file)"),
    Flag("--client-pool-share", "FRACTION", f"{DEFAULT_CLIENT_POOL_SHARE:.0%}",
          "largest share of the host pool one client may hold in write leases (uncommitted slots), e.g. 50% "
          "or 0.5, and again in read pins (distinct chunks); chunks past it get NO_SPACE, or are not reported "
          "as hits"),
    Flag("--client-max-inflight", "N", str(DEFAULT_CLIENT_MAX_INFLIGHT),
          "requests one client may have queued in the sidecar; a client sending faster waits (backpressure), "
          "and one with more outstanding that does not read its replies may lose some"),
    Flag("--metrics-host", "HOST", DEFAULT_METRICS_HOST,
          "Prometheus endpoint address (http://HOST:PORT/metrics)"),
    Flag("--metrics-port", "PORT", str(DEFAULT_METRICS_PORT), "Prometheus endpoint port; 0 disables it"),
    Flag("--metrics-namespaces", "N", str(DEFAULT_METRICS_NAMESPACES),
          "per-namespace Prometheus series for the first N namespaces seen; the rest are summed "
          "as namespace=\"other\" (labels stay bounded); 0: none"),
    Flag("--log-level", "|".join(LOG_LEVELS), "info", "log level"),
    Flag("--unlink-on-exit", "", "off (the host pool persists for a warm restart)",
          "remove the host pool segment on exit"),
    Flag("--allow-group", "GROUP", "none (owner only)",
          "share with this group: run dir 0750, sockets and host pool 0660, group-owned (the sidecar's user "
          "must be a member unless root)"),
)
FLAGS_BY_NAME: dict[str, Flag] = {f.flag: f for f in SIDECAR_FLAGS}
SWITCHES = ("--unlink-on-exit", "--allow-remote-clients")


def build_arg_parser() -> argparse.ArgumentParser:
    """The ``lmkv-sidecar`` parser. Every option defaults to None so that
    :func:`load_sidecar_config` can tell "not given" from a value and fall back to the
    option's ``LMKV_*`` twin; the real defaults are shown in each help text."""
    parser = argparse.ArgumentParser(
        prog="lmkv-sidecar",
        description=(
            "Node-local KV-cache sidecar for vLLM: owns GPU, host, disk and remote cache tiers\n"
            "and serves every local vLLM process chunk lookups and slots over ZeroMQ."
        ),
        epilog="Every flag has an LMKV_* environment twin; flags win over the environment.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    for f in SIDECAR_FLAGS:
        text = f"{f.help} [env {f.env}; default: {f.default}]".replace("%", "%%")
        if f.flag in SWITCHES:
            parser.add_argument(f.flag, dest=f.dest, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        else:
            parser.add_argument(f.flag, dest=f.dest, metavar=f.metavar, default=None, help=text)
    return parser

def flag_error(flag: str, problem: str) -> ConfigError:
    return ConfigError(flag, env_name(flag), problem)


class Sources:
    """A sidecar setting's raw text: its flag if given, else its env twin if non-empty.

    An empty environment variable counts as unset (``Environment=LMKV_X=`` in a unit file).
    An empty flag value is kept: ``--remote-url ''`` clears an optional setting that the
    environment sets, and is an error for a setting that needs a value.
    """

    def __init__(self, parsed: argparse.Namespace, env: Mapping[str, str]) -> None:
        self._parsed: dict[str, object] = vars(parsed)
        self._env = env

    def raw(self, flag: str) -> str | None:
        value = self._parsed[FLAGS_BY_NAME[flag].dest]
        if value is not None:
            return str(value)
        return self._env.get(env_name(flag)) or None

    def shown(self, flag: str, value: str) -> str:
        """The bad value as the user wrote it, or ``the default VALUE``."""
        raw = self.raw(flag)
        return _show(raw) if raw is not None else f"the default {value}"

    def parse(self, flag: str, parse: Callable[[str], _T], default: _T) -> _T:
        raw = self.raw(flag)
        if raw is None:
            return default
        try:
            return parse(raw)
        except ValueError as e:
            raise flag_error(flag, str(e)) from None

    def optional(self, flag: str, parse: Callable[[str], _T]) -> _T | None:
        """None when unset or set to the empty string, else ``parse(raw)``."""
        raw = self.raw(flag)
        return None if not raw else self.parse(flag, parse, None)

    def endpoint(self, flag: str, default: str, *, bind: bool) -> str:
        """A ZeroMQ endpoint setting, checked (``bind``: the sidecar binds it, so ``*`` is a
        host). A default is only bad when the run dir is too long for a socket path, so the
        error then names ``--run-dir``."""
        value = self.parse(flag, str, default)
        problem = endpoint_problem(value, bind=bind)
        if problem is None:
            return value
        if self.raw(flag) is None:
            raise flag_error("--run-dir", f"gives {flag} {_show(value)}, which {problem}")
        raise flag_error(flag, f"{_show(value)} {problem}")

    def switch(self, flag: str, default: bool) -> bool:
        """A ``--flag/--no-flag`` switch; its env twin takes on|off, true|false, 1|0."""
        value = self._parsed[FLAGS_BY_NAME[flag].dest]
        if isinstance(value, bool):
            return value
        return self.parse(flag, parse_bool, default)
