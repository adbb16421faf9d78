"""What every lmkv_mp setting shares: the one-line ConfigError, the defaults, endpoints and
the value parsers that both the sidecar's and the clients' settings use."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from lmkv_mp.config.units import GiB, MiB, _show

DEFAULT_HASH_KEY: bytes = b"lmkv_mp/default-chain-key/v1"

# sun_path is 108 bytes on Linux including the terminating NUL; ZeroMQ's own error for a
# longer path ("Invalid argument" at bind time) does not say what to fix.
IPC_PATH_MAX = 107
GPU_HANDLES_SOCKET = "gpu-handles.sock"
"""In the run dir: where the GPU tier hands out its VMM regions' fds (memory/handles.py)."""

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

IPC_PREFIX, TCP_PREFIX = "ipc://", "tcp://"
_HOST_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+", re.ASCII)
ENDPOINT_HINT = "use ipc://PATH or tcp://HOST:PORT"


def endpoint_problem(endpoint: str, *, bind: bool) -> str | None:
    """Why ``endpoint`` is unusable, or None. ``bind``: the sidecar binds it, so ``*``
    (all interfaces) is a valid host."""
    if endpoint.startswith(IPC_PREFIX):
        path = endpoint[len(IPC_PREFIX):]
        if not path:
            return f"has no socket path; {ENDPOINT_HINT}"
        n = len(path.encode())
        if n > IPC_PATH_MAX:
            return f"has a {n}-byte socket path; Unix sockets allow {IPC_PATH_MAX}, use a shorter path"
        return None
    if endpoint.startswith(TCP_PREFIX):
        host, colon, port = endpoint[len(TCP_PREFIX):].rpartition(":")
        if not colon:
            return f"has no port; {ENDPOINT_HINT}"
        if not (_HOST_RE.fullmatch(host) or (bind and host == "*")):
            return f"has no valid host; {ENDPOINT_HINT}" + ("" if bind else " (not *)")
        if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
            return f"has no valid port (1..65535); {ENDPOINT_HINT}"
        return None
    return f"is not a ZeroMQ endpoint; {ENDPOINT_HINT}"

def read_secret(path: str, limit: int) -> bytes:
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


def parse_bool(text: str) -> bool:
    try:
        return _BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"{_show(text)} is not on or off; use on|off, true|false, yes|no or 1|0") from None


def parse_int(text: str, lo: int, hi: int | None = None) -> int:
    """An integer in lo..hi (no upper bound when hi is None); ValueError otherwise."""
    accepted = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
    if not re.fullmatch(r"[0-9]+(?:_[0-9]+)*", text.strip(), re.ASCII):
        raise ValueError(f"{_show(text)} is not {accepted}")
    n = int(text.strip().replace("_", ""))
    if n < lo or (hi is not None and n > hi):
        raise ValueError(f"{_show(text)} is out of range; use {accepted}")
    return n

def parse_path(text: str) -> Path:
    """An absolute path (relative ones are taken from the current directory)."""
    if not text or "\0" in text:
        raise ValueError(f"{_show(text)} is not a path")
    return Path(text).absolute()


def read_token(path: str) -> bytes:
    token = read_secret(path, TOKEN_FILE_MAX)
    if len(token) > TOKEN_FILE_MAX:
        raise ValueError(f"{_show(path)} is over {TOKEN_FILE_MAX} bytes; a token file holds one token")
    token = token.strip()
    if not token:
        raise ValueError(f"{_show(path)} is empty; put the token in it")
    return token

def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether only this host can reach ``endpoint``: ipc://, or tcp:// on 127.0.0.0/8,
    ::1 or localhost. ``*``, 0.0.0.0, other addresses and names count as reachable from
    other hosts (names are not resolved: loading the config has no side effects)."""
    if not endpoint.startswith(TCP_PREFIX):
        return True
    host = endpoint[len(TCP_PREFIX):].rpartition(":")[0].strip("[]").lower()
    if host in ("localhost", "::1"):
        return True
    parts = host.split(".")
    return len(parts) == 4 and parts[0] == "127" and all(p.isdigit() and int(p) < 256 for p in parts)
