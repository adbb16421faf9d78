"""The sidecar's settings: ``lmkv-sidecar``'s flags, their ``LMKV_*`` twins, defaults and
validation (ARCHITECTURE.md §8)."""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmkv_mp.config.common import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_CLIENT_MAX_INFLIGHT,
    DEFAULT_CLIENT_POOL_SHARE,
    DEFAULT_DISK_SIZE,
    DEFAULT_HASH_KEY,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_LEASE_TIMEOUT,
    DEFAULT_METRICS_HOST,
    DEFAULT_METRICS_NAMESPACES,
    DEFAULT_METRICS_PORT,
    DEFAULT_REMOTE_TIMEOUT,
    DEFAULT_SLAB_SIZE,
    DEFAULT_STATS_INTERVAL,
    DEFAULT_WRITE_POLICY,
    GPU_HANDLES_SOCKET,
    HASH_KEY_MAX,
    HASH_KEY_MIN,
    IPC_PATH_MAX,
    LOG_LEVELS,
    POOL_TABLES_ALLOWANCE,
    REMOTE_SCHEMES,
    VALKEY_SCHEMES,
    WRITE_POLICIES,
    ConfigError,
    default_endpoint,
    default_run_dir,
    default_stats_endpoint,
    default_stats_publish_endpoint,
    is_loopback_endpoint,
    parse_bool,
    parse_int,
    parse_path,
    read_secret,
    read_token,
    redact_url,
)
from lmkv_mp.config.flags import Sources, build_arg_parser, flag_error
from lmkv_mp.config.units import (
    GiB,
    KiB,
    MiB,
    _fmt_seconds,
    _show,
    format_size,
    parse_duration,
    parse_size,
)

HOST_POOL_DIVISOR = 5  # 20% of MemAvailable
HOST_POOL_CAP = 8 * GiB
HOST_POOL_FLOOR = 256 * MiB
HOST_POOL_ROUND = 64 * MiB


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


MAX_GPU_DEVICES = 64
"""GPU tier regions one sidecar may own (region ids are one byte on the wire)."""


def _parse_devices(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    try:
        devices = tuple(parse_int(part, 0) for part in text.split(","))
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
    key = read_secret(path, HASH_KEY_MAX + 2)
    # Only one line ending goes: a random binary key may itself end in 0x0a.
    key = key[:-2] if key.endswith(b"\r\n") else key[:-1] if key.endswith(b"\n") else key
    if not HASH_KEY_MIN <= len(key) <= HASH_KEY_MAX:
        size = f"{len(key)}" if len(key) <= HASH_KEY_MAX else f"over {HASH_KEY_MAX}"
        raise ValueError(
            f"{_show(path)} holds {size} bytes; a hash key is {HASH_KEY_MIN}..{HASH_KEY_MAX} bytes"
            " (one trailing newline is ignored)"
        )
    return key

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
    working default. Raises ConfigError (one line) on the first bad value: each setting is
    parsed and checked on its own in field order, then the settings are checked against
    each other. Unknown flags exit through argparse (SystemExit(2)). ``meminfo_path`` is
    read only when no host pool size is given.
    """
    src = Sources(build_arg_parser().parse_args(list(argv)), env)
    cfg = _parse_settings(src, env, meminfo_path)
    _check_endpoints(cfg)
    _check_sizes(src, cfg)
    _check_gpu_tier(cfg)
    _check_remote_clients(cfg)
    return cfg


def _parse_settings(src: Sources, env: Mapping[str, str], meminfo_path: str) -> SidecarConfig:
    """Every setting from its flag, env twin or default, each checked on its own."""
    run_dir = src.parse("--run-dir", parse_path, default_run_dir(env))
    endpoint = src.endpoint("--endpoint", default_endpoint(run_dir), bind=True)
    stats_endpoint = src.endpoint("--stats-endpoint", default_stats_endpoint(run_dir), bind=True)
    stats_publish_endpoint = src.endpoint("--stats-publish-endpoint", default_stats_publish_endpoint(run_dir),
                                          bind=True)
    stats_interval = src.parse("--stats-interval", lambda t: parse_duration(t, allow_zero=True),
                               DEFAULT_STATS_INTERVAL)
    host_pool_size = (default_host_pool_size(meminfo_path) if src.raw("--host-pool-size") is None
                      else src.parse("--host-pool-size", parse_size, 0))
    host_pool_path = src.optional("--host-pool-path", parse_path)
    slab_size = src.parse("--slab-size", parse_size, DEFAULT_SLAB_SIZE)
    if slab_size % 4096 or slab_size < MiB:
        raise flag_error("--slab-size", f"{src.shown('--slab-size', format_size(slab_size))} must be a "
                         "multiple of 4KiB and at least 1MiB; use e.g. 64MiB")
    chunk_tokens = src.parse("--chunk-tokens", lambda t: parse_int(t, 1), DEFAULT_CHUNK_TOKENS)
    gpu_pool_size = src.parse("--gpu-pool-size", parse_size, 0)
    gpu_devices = src.parse("--gpu-devices", _parse_devices, ())
    if len(gpu_devices) > MAX_GPU_DEVICES:
        raise flag_error("--gpu-devices", f"names {len(gpu_devices)} devices; at most {MAX_GPU_DEVICES}")
    disk_dir = src.optional("--disk-dir", parse_path)
    # Without a disk dir the size is not parsed: _check_sizes refuses one that is set.
    disk_size = src.parse("--disk-size", parse_size, DEFAULT_DISK_SIZE) if disk_dir is not None else 0
    remote_url = src.optional("--remote-url", _remote_url)
    remote_timeout = src.parse("--remote-timeout", parse_duration, DEFAULT_REMOTE_TIMEOUT)
    if remote_timeout <= 0:
        raise flag_error("--remote-timeout", f"{_fmt_seconds(remote_timeout)} must be above 0, e.g. 500ms")
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
        write_policy=src.parse("--write-policy", _choice(WRITE_POLICIES), DEFAULT_WRITE_POLICY),
        lease_timeout=src.parse("--lease-timeout", parse_duration, DEFAULT_LEASE_TIMEOUT),
        heartbeat_interval=src.parse("--heartbeat-interval", parse_duration, DEFAULT_HEARTBEAT_INTERVAL),
        verify=src.parse("--verify", parse_bool, False),
        hash_key=src.optional("--hash-key-file", _hash_key) or DEFAULT_HASH_KEY,
        admin_token=src.optional("--admin-token-file", read_token),
        metrics_host=src.parse("--metrics-host", _host, DEFAULT_METRICS_HOST),
        metrics_port=src.parse("--metrics-port", lambda t: parse_int(t, 0, 65535), DEFAULT_METRICS_PORT),
        metrics_namespaces=src.parse("--metrics-namespaces", lambda t: parse_int(t, 0, 1000),
                                     DEFAULT_METRICS_NAMESPACES),
        log_level=src.parse("--log-level", _choice(LOG_LEVELS), "info"),
        unlink_on_exit=src.switch("--unlink-on-exit", False),
        allow_group=src.optional("--allow-group", str.strip) or None,
        client_token=src.optional("--client-token-file", read_token),
        allow_remote_clients=src.switch("--allow-remote-clients", False),
        client_pool_share=src.parse("--client-pool-share", _fraction, DEFAULT_CLIENT_POOL_SHARE),
        client_max_inflight=src.parse("--client-max-inflight", lambda t: parse_int(t, 1, 1_000_000),
                                      DEFAULT_CLIENT_MAX_INFLIGHT),
    )


def _check_endpoints(cfg: SidecarConfig) -> None:
    """The three endpoints are distinct."""
    if cfg.stats_endpoint == cfg.endpoint:
        raise flag_error("--stats-endpoint", f"{_show(cfg.stats_endpoint)} is also the --endpoint; use another")
    if cfg.stats_publish_endpoint in (cfg.endpoint, cfg.stats_endpoint):
        other = "--endpoint" if cfg.stats_publish_endpoint == cfg.endpoint else "--stats-endpoint"
        raise flag_error("--stats-publish-endpoint", f"{_show(cfg.stats_publish_endpoint)} is also the "
                         f"{other}; use another")


def _check_sizes(src: Sources, cfg: SidecarConfig) -> None:
    """The pools hold a slab each, a disk size goes with a disk dir, heartbeats come more
    often than the lease timeout."""
    if cfg.host_pool_size < cfg.slab_size + POOL_TABLES_ALLOWANCE:
        raise flag_error("--host-pool-size", f"{src.shown('--host-pool-size', format_size(cfg.host_pool_size))}"
                         f" cannot hold one slab ({format_size(cfg.slab_size)}, --slab-size) and its tables "
                         f"({format_size(POOL_TABLES_ALLOWANCE)}); use a larger size or a smaller --slab-size")
    if 0 < cfg.gpu_pool_size < cfg.slab_size:
        raise flag_error("--gpu-pool-size", f"{_show(src.raw('--gpu-pool-size'))} is smaller than one slab "
                         f"({format_size(cfg.slab_size)}, --slab-size); use 0 (no GPU tier) or a larger size")
    if cfg.disk_dir is None and src.raw("--disk-size") is not None:
        raise flag_error("--disk-size", f"{_show(src.raw('--disk-size'))} is set but --disk-dir "
                         "(LMKV_DISK_DIR) is not; set both or neither")
    if cfg.disk_dir is not None and cfg.disk_size == 0:
        raise flag_error("--disk-size", f"{_show(src.raw('--disk-size'))} must be above 0 when "
                         "--disk-dir is set; use e.g. 64GiB")
    if cfg.heartbeat_interval >= cfg.lease_timeout:
        raise flag_error("--heartbeat-interval", f"{_fmt_seconds(cfg.heartbeat_interval)} is not below "
                         f"--lease-timeout (LMKV_LEASE_TIMEOUT) {_fmt_seconds(cfg.lease_timeout)}; "
                         "clients would lose their leases between heartbeats")


def _check_gpu_tier(cfg: SidecarConfig) -> None:
    """A GPU tier has a size, no --verify, and a run dir short enough for its handle socket."""
    if cfg.gpu_devices and not cfg.gpu_pool_size:
        raise flag_error("--gpu-pool-size", f"is 0 but --gpu-devices names {len(cfg.gpu_devices)} device(s); "
                         "give the GPU tier's size per device, e.g. 8GiB")
    if cfg.gpu_pool_size and cfg.verify:
        raise flag_error("--gpu-pool-size", "cannot be used with --verify on: a load is checked by hashing the "
                         "host slot it read, and GPU tier copies are read on the device; choose one")
    handles = cfg.run_dir / GPU_HANDLES_SOCKET
    if cfg.gpu_pool_size and len(str(handles).encode()) > IPC_PATH_MAX:
        raise flag_error("--run-dir", f"leaves the GPU tier's handle socket {handles} {len(str(handles).encode())} "
                         f"bytes; Unix sockets allow {IPC_PATH_MAX}: use a shorter run dir")


def _check_remote_clients(cfg: SidecarConfig) -> None:
    """Endpoints other hosts can reach only with --allow-remote-clients, and then with a
    client token."""
    for flag, ep in (("--endpoint", cfg.endpoint), ("--stats-endpoint", cfg.stats_endpoint),
                     ("--stats-publish-endpoint", cfg.stats_publish_endpoint)):
        if not cfg.allow_remote_clients and not is_loopback_endpoint(ep):
            raise flag_error(flag, f"{_show(ep)} binds an address other hosts can reach; bind 127.0.0.1 or ipc://, "
                             "or mean it: --allow-remote-clients (LMKV_ALLOW_REMOTE_CLIENTS) with --client-token-file")
    if cfg.allow_remote_clients and cfg.client_token is None and not is_loopback_endpoint(cfg.endpoint):
        raise flag_error("--client-token-file", f"is required: --endpoint {_show(cfg.endpoint)} accepts other hosts "
                         "(--allow-remote-clients), so every HELLO must present a token")


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
