"""Every setting of lmkv_mp, parsed and validated in one place.

The sidecar reads its command-line flags and their ``LMKV_*`` twins with
:func:`load_sidecar_config`; schedulers, workers and the vLLM connector read theirs with
:func:`load_client_config`. Nothing else in the package reads ``os.environ``.

Loading has no side effects: nothing is created, bound or written. The only files read are
the secret files named by settings and, when no host pool size is given, the meminfo file.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from lmkv_mp.units import (GiB, KiB, MAX_SIZE, MiB, TiB, _fmt_seconds, _show, format_size,  # noqa: F401 (re-exported)
                           parse_duration, parse_size)

_T = TypeVar("_T")

DEFAULT_HASH_KEY: bytes = b"lmkv_mp/default-chain-key/v1"

# sun_path is 108 bytes on Linux including the terminating NUL; ZeroMQ's own error for a
# longer path ("Invalid argument" at bind time) does not say what to fix.
IPC_PATH_MAX = 107

DEFAULT_SLAB_SIZE = 64 * MiB
# Room the host pool needs besides its slabs: header, slab and slot tables, alignment of
# the slab area (see lmkv_mp.memory.pool.Geometry); a pool below slab + this cannot start.
POOL_TABLES_ALLOWANCE = 4 * MiB
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_DISK_SIZE = 64 * GiB
DEFAULT_REMOTE_TIMEOUT = 0.5
DEFAULT_LEASE_TIMEOUT = 5.0
DEFAULT_HEARTBEAT_INTERVAL = 1.0
DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_METRICS_PORT = 9187
DEFAULT_METRICS_NAMESPACES = 10
DEFAULT_STATS_INTERVAL = 1.0
WRITE_POLICIES = ("write-through", "write-back")
DEFAULT_WRITE_POLICY = "write-back"
LOG_LEVELS = ("debug", "info", "warning", "error")
REMOTE_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://")
# Valkey speaks the same protocol: its URL schemes are spelled as the Redis ones.
VALKEY_SCHEMES = {"valkey://": "redis://", "valkeys://": "rediss://", "valkey+cluster://": "redis+cluster://"}
HASH_KEY_MIN, HASH_KEY_MAX = 16, 64
# A token file larger than this is a wrong path (a log, a device), not a token.
TOKEN_FILE_MAX = 4096

HOST_POOL_DIVISOR = 5  # 20% of MemAvailable
HOST_POOL_CAP = 8 * GiB
HOST_POOL_FLOOR = 256 * MiB
HOST_POOL_ROUND = 64 * MiB

DEFAULT_CLIENT_TIMEOUT = 1.0
DEFAULT_CLIENT_HEARTBEAT = 1.0
DEFAULT_CLIENT_RETRY = 1.0
# How long the vLLM scheduler holds a request back while the sidecar promotes its chunks
# from disk or the remote tier; then it computes what has not arrived.
DEFAULT_PREFETCH_TIMEOUT = 1.0
# Per-client limits: the share of the host pool one client may hold in write leases (so
# one writer cannot take every slot), and the requests it may have queued in the sidecar.
DEFAULT_CLIENT_POOL_SHARE = 0.5
DEFAULT_CLIENT_MAX_INFLIGHT = 128


class ConfigError(ValueError):
    """A bad setting.

    ``str()`` is one line that names the flag and its env twin, the bad value and what is
    accepted, e.g. ``--host-pool-size (LMKV_HOST_POOL_SIZE): '12XB' is not a size; use e.g.
    512MiB, 8GiB or a byte count``. ``flag`` is the flag (sidecar) or the override key
    (client) at fault; ``env`` is its environment twin, or None where it has none.
    """

    flag: str
    env: str | None
    problem: str

    def __init__(self, flag: str, env: str | None, problem: str) -> None:
        self.flag = flag
        self.env = env
        self.problem = problem.replace("\r", " ").replace("\n", " ")
        where = f"{flag} ({env})" if env else flag
        super().__init__(f"{where}: {self.problem}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str | None, str]]:
        # The default rebuilds from args (the whole message), which __init__ does not take;
        # this keeps the error copyable and able to cross a process boundary.
        return (type(self), (self.flag, self.env, self.problem))


def default_run_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_RUNTIME_DIR/lmkv`` if XDG_RUNTIME_DIR is set to an absolute path, else
    ``/tmp/lmkv-<uid>``. Creates nothing (the sidecar creates the directory, mode 0700).

    A relative XDG_RUNTIME_DIR is ignored, as the XDG base directory spec requires.
    """
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "lmkv"
    return Path(f"/tmp/lmkv-{os.getuid()}")


def default_endpoint(run_dir: Path) -> str:
    """The control socket in ``run_dir``: ``ipc://<run_dir>/control.sock``."""
    return f"ipc://{run_dir / 'control.sock'}"


def default_stats_endpoint(run_dir: Path) -> str:
    """The stats socket in ``run_dir``: ``ipc://<run_dir>/stats.sock``."""
    return f"ipc://{run_dir / 'stats.sock'}"


def default_stats_publish_endpoint(run_dir: Path) -> str:
    """Where the sidecar publishes its snapshot: ``ipc://<run_dir>/stats-pub.sock``."""
    return f"ipc://{run_dir / 'stats-pub.sock'}"


def default_host_pool_size(meminfo_path: str = "/proc/meminfo") -> int:
    """20% of MemAvailable, capped at 8GiB, rounded down to a multiple of 64MiB, at least
    256MiB.

    Where the file cannot be read or has no MemAvailable line (not Linux, kernels before
    3.14), returns the 256MiB floor so that the sidecar still starts with no flags.
    """
    try:
        with open(meminfo_path, encoding="ascii", errors="replace") as f:
            meminfo = f.read()
    except OSError:
        return HOST_POOL_FLOOR
    m = re.search(r"^MemAvailable:\s*([0-9]+)\s*kB", meminfo, re.MULTILINE)
    if m is None:
        return HOST_POOL_FLOOR
    size = min(int(m.group(1)) * KiB // HOST_POOL_DIVISOR, HOST_POOL_CAP)
    return max(size // HOST_POOL_ROUND * HOST_POOL_ROUND, HOST_POOL_FLOOR)


_IPC_PREFIX, _TCP_PREFIX = "ipc://", "tcp://"
_HOST_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+", re.ASCII)
_ENDPOINT_HINT = "use ipc://PATH or tcp://HOST:PORT"


def _endpoint_problem(endpoint: str, *, bind: bool) -> str | None:
    """Why ``endpoint`` is unusable, or None. ``bind``: the sidecar binds it, so ``*``
    (all interfaces) is a valid host."""
    if endpoint.startswith(_IPC_PREFIX):
        path = endpoint[len(_IPC_PREFIX):]
        if not path:
            return f"has no socket path; {_ENDPOINT_HINT}"
        n = len(path.encode())
        if n > IPC_PATH_MAX:
            return f"has a {n}-byte socket path; Unix sockets allow {IPC_PATH_MAX}, use a shorter path"
        return None
    if endpoint.startswith(_TCP_PREFIX):
        host, colon, port = endpoint[len(_TCP_PREFIX):].rpartition(":")
        if not colon:
            return f"has no port; {_ENDPOINT_HINT}"
        if not (_HOST_RE.fullmatch(host) or (bind and host == "*")):
            return f"has no valid host; {_ENDPOINT_HINT}" + ("" if bind else " (not *)")
        if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
            return f"has no valid port (1..65535); {_ENDPOINT_HINT}"
        return None
    return f"is not a ZeroMQ endpoint; {_ENDPOINT_HINT}"


def _read_secret(path: str, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``path`` (so a caller can tell "too long");
    raises ValueError (one line) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise ValueError(f"cannot read {_show(path)}: {e.strerror or e}") from None


def redact_url(url: str) -> str:
    """The URL with any user:password part masked, for error messages."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)


_BOOLS: dict[str, bool] = {
    "1": True, "true": True, "yes": True, "on": True,
    "0": False, "false": False, "no": False, "off": False,
}


def _parse_bool(text: str) -> bool:
    try:
        return _BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"{_show(text)} is not on or off; use on|off, true|false, yes|no or 1|0") from None


def _parse_int(text: str, lo: int, hi: int | None = None) -> int:
    """An integer in lo..hi (no upper bound when hi is None); ValueError otherwise."""
    accepted = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
    if not re.fullmatch(r"[0-9]+(?:_[0-9]+)*", text.strip(), re.ASCII):
        raise ValueError(f"{_show(text)} is not {accepted}")
    n = int(text.strip().replace("_", ""))
    if n < lo or (hi is not None and n > hi):
        raise ValueError(f"{_show(text)} is out of range; use {accepted}")
    return n


def _parse_devices(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    try:
        devices = tuple(_parse_int(part, 0) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{_show(text)} is not a list of device indices; use e.g. 0,1") from None
    if len(set(devices)) != len(devices):
        raise ValueError(f"{_show(text)} names a device twice; use e.g. 0,1")
    return devices


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """Everything the sidecar runs with, validated; see ARCHITECTURE.md §8.

    Invariants (checked by :func:`load_sidecar_config`): paths are absolute; endpoints are
    valid and distinct; ``stats_interval`` is 0 (no publishing) or > 0; ``slab_size`` is a
    multiple of 4096 and >= 1MiB; ``host_pool_size`` and a non-zero ``gpu_pool_size`` are >=
    ``slab_size``; ``disk_size > 0`` iff ``disk_dir`` is set; ``0 < heartbeat_interval <
    lease_timeout``; ``16 <= len(hash_key) <= 64``. Secrets are left out of repr().
    """

    run_dir: Path
    endpoint: str
    stats_endpoint: str
    stats_publish_endpoint: str
    stats_interval: float
    host_pool_size: int
    host_pool_path: Path | None
    slab_size: int
    chunk_tokens: int
    gpu_pool_size: int
    gpu_devices: tuple[int, ...]
    disk_dir: Path | None
    disk_size: int
    remote_url: str | None
    remote_timeout: float
    write_policy: str
    lease_timeout: float
    heartbeat_interval: float
    verify: bool
    hash_key: bytes = field(repr=False)
    admin_token: bytes | None = field(repr=False)
    metrics_host: str
    metrics_port: int
    metrics_namespaces: int
    log_level: str
    unlink_on_exit: bool
    allow_group: str | None
    allow_remote_clients: bool = False
    client_token: bytes | None = field(default=None, repr=False)
    client_pool_share: float = DEFAULT_CLIENT_POOL_SHARE
    client_max_inflight: int = DEFAULT_CLIENT_MAX_INFLIGHT


@dataclass(frozen=True, slots=True)
class _Flag:
    flag: str
    metavar: str
    default: str
    help: str

    @property
    def env(self) -> str:
        return _env_name(self.flag)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _env_name(flag: str) -> str:
    """``--host-pool-size`` -> ``LMKV_HOST_POOL_SIZE``."""
    return "LMKV_" + flag.lstrip("-").upper().replace("-", "_")


_SIDECAR_FLAGS: tuple[_Flag, ...] = (
    _Flag("--run-dir", "DIR", "$XDG_RUNTIME_DIR/lmkv, else /tmp/lmkv-<uid>",
          "directory for sockets, lock file and pid file (created mode 0700)"),
    _Flag("--endpoint", "URL", "ipc://<run-dir>/control.sock",
          "control endpoint, ipc://PATH or tcp://HOST:PORT"),
    _Flag("--stats-endpoint", "URL", "ipc://<run-dir>/stats.sock",
          "stats endpoint: answers snapshot requests (lmkv-stats)"),
    _Flag("--stats-publish-endpoint", "URL", "ipc://<run-dir>/stats-pub.sock",
          "ZeroMQ (X)PUB endpoint where the snapshot is published every --stats-interval while anyone subscribes"),
    _Flag("--stats-interval", "DURATION", _fmt_seconds(DEFAULT_STATS_INTERVAL),
          "how often the snapshot is published; 0 turns publishing off"),
    _Flag("--host-pool-size", "SIZE", "20% of MemAvailable, 256MiB..8GiB",
          "host tier size, e.g. 512MiB or 64GiB"),
    _Flag("--host-pool-path", "FILE", "POSIX shared memory",
          "back the host tier with this file (DAX, tmpfs) instead of POSIX shared memory"),
    _Flag("--slab-size", "SIZE", format_size(DEFAULT_SLAB_SIZE),
          "allocator slab size; a multiple of 4KiB, at least 1MiB"),
    _Flag("--chunk-tokens", "N", str(DEFAULT_CHUNK_TOKENS),
          "tokens per cached chunk; a multiple of the engine's block size"),
    _Flag("--gpu-pool-size", "SIZE", "0 (no GPU tier)", "GPU tier size per device (not implemented yet: refused at start)"),
    _Flag("--gpu-devices", "LIST", "none", "GPU tier devices, e.g. 0,1 (not implemented yet: refused at start)"),
    _Flag("--disk-dir", "DIR", "no disk tier", "disk tier directory, SSD or DAX (one sidecar per directory; survives restarts)"),
    _Flag("--disk-size", "SIZE", f"{format_size(DEFAULT_DISK_SIZE)} when --disk-dir is set",
          "disk tier size"),
    _Flag("--remote-url", "URL", "no remote tier",
          "remote tier shared between nodes: redis:// rediss:// unix:// redis+cluster:// (valkey:// valkeys:// valkey+cluster:// too)"),
    _Flag("--remote-timeout", "DURATION", _fmt_seconds(DEFAULT_REMOTE_TIMEOUT),
          "deadline of every remote tier call; a slower or dead remote store means misses"),
    _Flag("--write-policy", "|".join(WRITE_POLICIES), DEFAULT_WRITE_POLICY,
          "write-through: new entries are copied to the lower tiers at once; write-back: the coldest are copied when the host tier is 85% full (no effect without --disk-dir or --remote-url)"),
    _Flag("--lease-timeout", "DURATION", _fmt_seconds(DEFAULT_LEASE_TIMEOUT),
          "a client's leases expire after this long without a heartbeat"),
    _Flag("--heartbeat-interval", "DURATION", _fmt_seconds(DEFAULT_HEARTBEAT_INTERVAL),
          "expected client heartbeat period; below --lease-timeout"),
    _Flag("--verify", "on|off", "off",
          "on: workers send an xxh3-64 checksum of each chunk at COMMIT, loaders check it after copying and "
          "report mismatches, which drops the chunk (a miss, counted as error CORRUPT)"),
    _Flag("--hash-key-file", "FILE", "a fixed built-in key",
          "file holding the 16..64-byte chain hash key"),
    _Flag("--admin-token-file", "FILE", "none (admin ops are refused)",
          "file holding the token that admin ops (CLEAR) must present"),
    _Flag("--client-token-file", "FILE", "none (any local process of the owner may HELLO)",
          "file holding the token every client's HELLO must present (clients: LMKV_TOKEN_FILE); "
          "required with --allow-remote-clients"),
    _Flag("--allow-remote-clients", "", "off (tcp:// endpoints must bind a loopback address)",
          "allow tcp:// endpoints on non-loopback addresses (other hosts can connect; needs --client-token-file)"),
    _Flag("--client-pool-share", "FRACTION", f"{DEFAULT_CLIENT_POOL_SHARE:.0%}",
          "largest share of the host pool one client may hold in write leases (uncommitted slots), e.g. 50% "
          "or 0.5; chunks past it get NO_SPACE"),
    _Flag("--client-max-inflight", "N", str(DEFAULT_CLIENT_MAX_INFLIGHT),
          "requests one client may have queued in the sidecar; a client sending faster waits (backpressure)"),
    _Flag("--metrics-host", "HOST", DEFAULT_METRICS_HOST,
          "Prometheus endpoint address (http://HOST:PORT/metrics)"),
    _Flag("--metrics-port", "PORT", str(DEFAULT_METRICS_PORT), "Prometheus endpoint port; 0 disables it"),
    _Flag("--metrics-namespaces", "N", str(DEFAULT_METRICS_NAMESPACES),
          "per-namespace Prometheus series for the first N namespaces seen; the rest are summed "
          "as namespace=\"other\" (labels stay bounded); 0: none"),
    _Flag("--log-level", "|".join(LOG_LEVELS), "info", "log level"),
    _Flag("--unlink-on-exit", "", "off (the host pool persists for a warm restart)",
          "remove the host pool segment on exit"),
    _Flag("--allow-group", "GROUP", "none (owner only)",
          "share with this group: run dir 0750, sockets and host pool 0660, group-owned (the sidecar's user "
          "must be a member unless root)"),
)
_FLAGS_BY_NAME: dict[str, _Flag] = {f.flag: f for f in _SIDECAR_FLAGS}
_SWITCHES = ("--unlink-on-exit", "--allow-remote-clients")


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
    for f in _SIDECAR_FLAGS:
        text = f"{f.help} [env {f.env}; default: {f.default}]".replace("%", "%%")
        if f.flag in _SWITCHES:
            parser.add_argument(f.flag, dest=f.dest, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        else:
            parser.add_argument(f.flag, dest=f.dest, metavar=f.metavar, default=None, help=text)
    return parser




def _error(flag: str, problem: str) -> ConfigError:
    return ConfigError(flag, _env_name(flag), problem)


def _parse_path(text: str) -> Path:
    """An absolute path (relative ones are taken from the current directory)."""
    if not text or "\0" in text:
        raise ValueError(f"{_show(text)} is not a path")
    return Path(text).absolute()


class _Sources:
    """A sidecar setting's raw text: its flag if given, else its env twin if non-empty.

    An empty environment variable counts as unset (``Environment=LMKV_X=`` in a unit file).
    An empty flag value is kept: ``--remote-url ''`` clears an optional setting that the
    environment sets, and is an error for a setting that needs a value.
    """

    def __init__(self, parsed: argparse.Namespace, env: Mapping[str, str]) -> None:
        self._parsed: dict[str, object] = vars(parsed)
        self._env = env

    def raw(self, flag: str) -> str | None:
        value = self._parsed[_FLAGS_BY_NAME[flag].dest]
        if value is not None:
            return str(value)
        return self._env.get(_env_name(flag)) or None

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
            raise _error(flag, str(e)) from None

    def optional(self, flag: str, parse: Callable[[str], _T]) -> _T | None:
        """None when unset or set to the empty string, else ``parse(raw)``."""
        raw = self.raw(flag)
        return None if not raw else self.parse(flag, parse, None)

    def switch(self, flag: str, default: bool) -> bool:
        """A ``--flag/--no-flag`` switch; its env twin takes on|off, true|false, 1|0."""
        value = self._parsed[_FLAGS_BY_NAME[flag].dest]
        if isinstance(value, bool):
            return value
        return self.parse(flag, _parse_bool, default)


def _endpoint_setting(src: _Sources, flag: str, default: str) -> str:
    value = src.parse(flag, str, default)
    problem = _endpoint_problem(value, bind=True)
    if problem is None:
        return value
    if src.raw(flag) is None:
        # A default endpoint is only bad when the run dir is too long for a socket path.
        raise _error("--run-dir", f"gives {flag} {_show(value)}, which {problem}")
    raise _error(flag, f"{_show(value)} {problem}")


def _remote_url(text: str) -> str:
    for valkey, redis in VALKEY_SCHEMES.items():
        if text.startswith(valkey):
            text = redis + text[len(valkey):]
    scheme = next((s for s in REMOTE_SCHEMES if text.startswith(s)), None)
    if scheme is None or len(text) == len(scheme) or any(c.isspace() for c in text):
        raise ValueError(
            f"{_show(redact_url(text))} is not a remote URL; use {', '.join(REMOTE_SCHEMES[:-1])}"
            f" or {REMOTE_SCHEMES[-1]}, e.g. redis://host:6379/0"
        )
    return text


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"{_show(text)} is not one of {'|'.join(choices)}")
        return value
    return parse


def _hash_key(path: str) -> bytes:
    key = _read_secret(path, HASH_KEY_MAX + 2)
    # Only one line ending goes: a random binary key may itself end in 0x0a.
    key = key[:-2] if key.endswith(b"\r\n") else key[:-1] if key.endswith(b"\n") else key
    if not HASH_KEY_MIN <= len(key) <= HASH_KEY_MAX:
        size = f"{len(key)}" if len(key) <= HASH_KEY_MAX else f"over {HASH_KEY_MAX}"
        raise ValueError(
            f"{_show(path)} holds {size} bytes; a hash key is {HASH_KEY_MIN}..{HASH_KEY_MAX} bytes"
            " (one trailing newline is ignored)"
        )
    return key


def _token(path: str) -> bytes:
    token = _read_secret(path, TOKEN_FILE_MAX)
    if len(token) > TOKEN_FILE_MAX:
        raise ValueError(f"{_show(path)} is over {TOKEN_FILE_MAX} bytes; a token file holds one token")
    token = token.strip()
    if not token:
        raise ValueError(f"{_show(path)} is empty; put the token in it")
    return token


def _fraction(text: str) -> float:
    """``50%`` or ``0.5``: a share in (0, 1]."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise ValueError(f"{_show(text)} is not a share above 0 and at most 1; use e.g. 50% or 0.5")
    return value


def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether only this host can reach ``endpoint``: ipc://, or tcp:// on 127.0.0.0/8,
    ::1 or localhost. ``*``, 0.0.0.0, other addresses and names count as reachable from
    other hosts (names are not resolved: loading the config has no side effects)."""
    if not endpoint.startswith(_TCP_PREFIX):
        return True
    host = endpoint[len(_TCP_PREFIX):].rpartition(":")[0].strip("[]").lower()
    if host in ("localhost", "::1"):
        return True
    parts = host.split(".")
    return len(parts) == 4 and parts[0] == "127" and all(p.isdigit() and int(p) < 256 for p in parts)


def _host(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text.strip()):
        raise ValueError(f"{_show(text)} is not a host; use e.g. 127.0.0.1, 0.0.0.0 or ::1")
    return text.strip()


def load_sidecar_config(
    argv: Sequence[str], env: Mapping[str, str], *, meminfo_path: str = "/proc/meminfo"
) -> SidecarConfig:
    """Parse ``argv`` (flags, without the program name) and ``env`` into a validated
    :class:`SidecarConfig`.

    Each setting comes from its flag, else its ``LMKV_*`` twin (``--host-pool-size`` ->
    ``LMKV_HOST_POOL_SIZE``), else its default; with no flags and no env everything has a
    working default. Raises ConfigError (one line) on the first bad value, checked in field
    order; unknown flags exit through argparse (SystemExit(2)). ``meminfo_path`` is read
    only when no host pool size is given.
    """
    src = _Sources(build_arg_parser().parse_args(list(argv)), env)

    run_dir = src.parse("--run-dir", _parse_path, default_run_dir(env))
    endpoint = _endpoint_setting(src, "--endpoint", default_endpoint(run_dir))
    stats_endpoint = _endpoint_setting(src, "--stats-endpoint", default_stats_endpoint(run_dir))
    if stats_endpoint == endpoint:
        raise _error("--stats-endpoint", f"{_show(stats_endpoint)} is also the --endpoint; use another")
    stats_publish_endpoint = _endpoint_setting(src, "--stats-publish-endpoint", default_stats_publish_endpoint(run_dir))
    if stats_publish_endpoint in (endpoint, stats_endpoint):
        raise _error("--stats-publish-endpoint", f"{_show(stats_publish_endpoint)} is also the "
                     f"{'--endpoint' if stats_publish_endpoint == endpoint else '--stats-endpoint'}; use another")
    stats_interval = src.parse("--stats-interval", lambda t: parse_duration(t, allow_zero=True),
                               DEFAULT_STATS_INTERVAL)

    if src.raw("--host-pool-size") is None:
        host_pool_size = default_host_pool_size(meminfo_path)
    else:
        host_pool_size = src.parse("--host-pool-size", parse_size, 0)
    host_pool_path = src.optional("--host-pool-path", _parse_path)

    slab_size = src.parse("--slab-size", parse_size, DEFAULT_SLAB_SIZE)
    if slab_size % 4096 or slab_size < MiB:
        raise _error("--slab-size", f"{src.shown('--slab-size', format_size(slab_size))} must be a "
                     "multiple of 4KiB and at least 1MiB; use e.g. 64MiB")
    if host_pool_size < slab_size + POOL_TABLES_ALLOWANCE:
        raise _error("--host-pool-size", f"{src.shown('--host-pool-size', format_size(host_pool_size))}"
                     f" cannot hold one slab ({format_size(slab_size)}, --slab-size) and its tables "
                     f"({format_size(POOL_TABLES_ALLOWANCE)}); use a larger size or a smaller --slab-size")

    chunk_tokens = src.parse("--chunk-tokens", lambda t: _parse_int(t, 1), DEFAULT_CHUNK_TOKENS)

    gpu_pool_size = src.parse("--gpu-pool-size", parse_size, 0)
    if 0 < gpu_pool_size < slab_size:
        raise _error("--gpu-pool-size", f"{_show(src.raw('--gpu-pool-size'))} is smaller than one slab "
                     f"({format_size(slab_size)}, --slab-size); use 0 (no GPU tier) or a larger size")
    gpu_devices = src.parse("--gpu-devices", _parse_devices, ())

    disk_dir = src.optional("--disk-dir", _parse_path)
    if disk_dir is None:
        if src.raw("--disk-size") is not None:
            raise _error("--disk-size", f"{_show(src.raw('--disk-size'))} is set but --disk-dir "
                         "(LMKV_DISK_DIR) is not; set both or neither")
        disk_size = 0
    else:
        disk_size = src.parse("--disk-size", parse_size, DEFAULT_DISK_SIZE)
        if disk_size == 0:
            raise _error("--disk-size", f"{_show(src.raw('--disk-size'))} must be above 0 when "
                         "--disk-dir is set; use e.g. 64GiB")

    remote_url = src.optional("--remote-url", _remote_url)
    remote_timeout = src.parse("--remote-timeout", parse_duration, DEFAULT_REMOTE_TIMEOUT)
    if remote_timeout <= 0:
        raise _error("--remote-timeout", f"{_fmt_seconds(remote_timeout)} must be above 0, e.g. 500ms")
    write_policy = src.parse("--write-policy", _choice(WRITE_POLICIES), DEFAULT_WRITE_POLICY)

    lease_timeout = src.parse("--lease-timeout", parse_duration, DEFAULT_LEASE_TIMEOUT)
    heartbeat_interval = src.parse("--heartbeat-interval", parse_duration, DEFAULT_HEARTBEAT_INTERVAL)
    if heartbeat_interval >= lease_timeout:
        raise _error("--heartbeat-interval", f"{_fmt_seconds(heartbeat_interval)} is not below "
                     f"--lease-timeout (LMKV_LEASE_TIMEOUT) {_fmt_seconds(lease_timeout)}; "
                     "clients would lose their leases between heartbeats")

    verify = src.parse("--verify", _parse_bool, False)
    hash_key = src.optional("--hash-key-file", _hash_key) or DEFAULT_HASH_KEY
    admin_token = src.optional("--admin-token-file", _token)
    metrics_host = src.parse("--metrics-host", _host, DEFAULT_METRICS_HOST)
    metrics_port = src.parse("--metrics-port", lambda t: _parse_int(t, 0, 65535), DEFAULT_METRICS_PORT)
    metrics_namespaces = src.parse("--metrics-namespaces", lambda t: _parse_int(t, 0, 1000),
                                   DEFAULT_METRICS_NAMESPACES)
    log_level = src.parse("--log-level", _choice(LOG_LEVELS), "info")
    unlink_on_exit = src.switch("--unlink-on-exit", False)
    allow_group = src.optional("--allow-group", str.strip) or None
    client_token = src.optional("--client-token-file", _token)
    allow_remote_clients = src.switch("--allow-remote-clients", False)
    for flag, ep in (("--endpoint", endpoint), ("--stats-endpoint", stats_endpoint),
                     ("--stats-publish-endpoint", stats_publish_endpoint)):
        if not allow_remote_clients and not is_loopback_endpoint(ep):
            raise _error(flag, f"{_show(ep)} binds an address other hosts can reach; bind 127.0.0.1 or ipc://, "
                         "or mean it: --allow-remote-clients (LMKV_ALLOW_REMOTE_CLIENTS) with --client-token-file")
    if allow_remote_clients and client_token is None and not is_loopback_endpoint(endpoint):
        raise _error("--client-token-file", f"is required: --endpoint {_show(endpoint)} accepts other hosts "
                     "(--allow-remote-clients), so every HELLO must present a token")
    client_pool_share = src.parse("--client-pool-share", _fraction, DEFAULT_CLIENT_POOL_SHARE)
    client_max_inflight = src.parse("--client-max-inflight", lambda t: _parse_int(t, 1, 1_000_000),
                                    DEFAULT_CLIENT_MAX_INFLIGHT)

    return SidecarConfig(
        run_dir=run_dir,
        endpoint=endpoint,
        stats_endpoint=stats_endpoint,
        stats_publish_endpoint=stats_publish_endpoint,
        stats_interval=stats_interval,
        host_pool_size=host_pool_size,
        host_pool_path=host_pool_path,
        slab_size=slab_size,
        chunk_tokens=chunk_tokens,
        gpu_pool_size=gpu_pool_size,
        gpu_devices=gpu_devices,
        disk_dir=disk_dir,
        disk_size=disk_size,
        remote_url=remote_url,
        remote_timeout=remote_timeout,
        write_policy=write_policy,
        lease_timeout=lease_timeout,
        heartbeat_interval=heartbeat_interval,
        verify=verify,
        hash_key=hash_key,
        admin_token=admin_token,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        metrics_namespaces=metrics_namespaces,
        log_level=log_level,
        unlink_on_exit=unlink_on_exit,
        allow_group=allow_group,
        allow_remote_clients=allow_remote_clients,
        client_token=client_token,
        client_pool_share=client_pool_share,
        client_max_inflight=client_max_inflight,
    )


def sidecar_main_config(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> SidecarConfig:
    """:func:`load_sidecar_config` for the ``lmkv-sidecar`` entry point.

    ``argv`` defaults to ``sys.argv[1:]``, ``env`` to ``os.environ``. On a bad value prints
    ``lmkv-sidecar: error: <message>`` to stderr as one line and raises SystemExit(2), as
    argparse does for a bad flag.
    """
    try:
        return load_sidecar_config(
            sys.argv[1:] if argv is None else argv, os.environ if env is None else env
        )
    except ConfigError as e:
        print(f"lmkv-sidecar: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How a scheduler or worker reaches the sidecar.

    ``timeout`` bounds every call; while the sidecar is unreachable, calls return a miss at
    once and the client probes it every ``retry_interval``. All durations are > 0. The
    auth token is left out of repr().
    """

    endpoint: str
    timeout: float
    heartbeat_interval: float
    retry_interval: float
    auth_token: bytes | None = field(repr=False)
    prefetch_timeout: float = DEFAULT_PREFETCH_TIMEOUT


# Override key (e.g. from vLLM's kv_connector_extra_config) -> its environment twin.
CLIENT_SETTINGS: Mapping[str, str] = {
    "endpoint": "LMKV_ENDPOINT",
    "timeout": "LMKV_CLIENT_TIMEOUT",
    "heartbeat_interval": "LMKV_CLIENT_HEARTBEAT",
    "retry_interval": "LMKV_CLIENT_RETRY",
    "prefetch_timeout": "LMKV_PREFETCH_TIMEOUT",
}
_CLIENT_DURATION_DEFAULTS: Mapping[str, float] = {
    "timeout": DEFAULT_CLIENT_TIMEOUT,
    "heartbeat_interval": DEFAULT_CLIENT_HEARTBEAT,
    "retry_interval": DEFAULT_CLIENT_RETRY,
    "prefetch_timeout": DEFAULT_PREFETCH_TIMEOUT,
}


def load_client_config(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None
) -> ClientConfig:
    """Build a validated :class:`ClientConfig`.

    Each setting comes from ``overrides`` (keys in :data:`CLIENT_SETTINGS`; a None value
    counts as absent), else its env twin (empty counts as unset), else its default. The
    endpoint defaults to the control socket in ``LMKV_RUN_DIR`` if set, else in
    :func:`default_run_dir`, so a sidecar and clients started with the same environment
    meet with no configuration. Durations are strings (``250ms``) or numbers of seconds.
    ``auth_token`` is the stripped contents of ``LMKV_TOKEN_FILE``. ``env`` defaults to
    ``os.environ``. Raises ConfigError (one line) on an unknown override key or a bad value.
    """
    env = os.environ if env is None else env
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in given:
        if key not in CLIENT_SETTINGS:
            raise ConfigError(str(key), None, f"{_show(key)} is not a client setting; "
                              f"use one of {', '.join(CLIENT_SETTINGS)}")

    def raw(key: str) -> object | None:
        return given[key] if key in given else (env.get(CLIENT_SETTINGS[key]) or None)

    def duration(key: str) -> float:
        value = raw(key)
        if value is None:
            return _CLIENT_DURATION_DEFAULTS[key]
        problem = f"{_show(value)} is not a duration; use e.g. 1s, 250ms or a number of seconds above 0"
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError as e:
                problem = str(e)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value) and value > 0:
                return float(value)
        raise ConfigError(key, CLIENT_SETTINGS[key], problem)

    endpoint = raw("endpoint")
    if endpoint is None:
        run_dir_text = env.get("LMKV_RUN_DIR") or ""
        try:
            run_dir = _parse_path(run_dir_text) if run_dir_text else default_run_dir(env)
        except ValueError as e:
            raise ConfigError("LMKV_RUN_DIR", None, str(e)) from None
        endpoint = default_endpoint(run_dir)
    if not isinstance(endpoint, str):
        raise ConfigError("endpoint", CLIENT_SETTINGS["endpoint"],
                          f"{_show(endpoint)} is not a string; {_ENDPOINT_HINT}")
    problem = _endpoint_problem(endpoint, bind=False)
    if problem is not None:
        raise ConfigError("endpoint", CLIENT_SETTINGS["endpoint"], f"{_show(endpoint)} {problem}")

    token_file = env.get("LMKV_TOKEN_FILE") or None
    try:
        auth_token = _token(token_file) if token_file else None
    except ValueError as e:
        raise ConfigError("LMKV_TOKEN_FILE", None, str(e)) from None

    return ClientConfig(
        endpoint=endpoint,
        timeout=duration("timeout"),
        heartbeat_interval=duration("heartbeat_interval"),
        retry_interval=duration("retry_interval"),
        auth_token=auth_token,
        prefetch_timeout=duration("prefetch_timeout"),
    )


def stats_endpoint_from_env(env: Mapping[str, str] | None = None) -> str:
    """Where ``lmkv-stats`` finds the stats socket: ``LMKV_STATS_ENDPOINT``, else the
    default stats socket in ``LMKV_RUN_DIR`` or the default run dir."""
    env = os.environ if env is None else env
    if env.get("LMKV_STATS_ENDPOINT"):
        return env["LMKV_STATS_ENDPOINT"]
    run_dir_text = env.get("LMKV_RUN_DIR") or ""
    try:
        run_dir = _parse_path(run_dir_text) if run_dir_text else default_run_dir(env)
    except ValueError as e:
        raise ConfigError("LMKV_RUN_DIR", None, str(e)) from None
    return default_stats_endpoint(run_dir)
