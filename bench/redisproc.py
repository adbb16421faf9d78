"""Private ``redis-server`` processes for the tests and the benchmarks (standard library only).

:class:`RedisServer` runs one server on a free loopback port (and a unix socket) in its own
temp dir, without persistence (``--save '' --appendonly no``), waits until it answers PING
(never a fixed sleep), and can be killed and restarted on the same port (a Redis that dies
and comes back). :func:`redis_cluster` starts a 3-node Redis Cluster the same way.

redis-server cannot pick its own port (``--port 0`` disables TCP), so a free port is found
by binding port 0 and closing; if another process takes it before redis-server binds it,
the start is retried on a new port.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator

START_TIMEOUT = 20.0
START_ATTEMPTS = 5


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def free_port(bus_offset: int = 0) -> int:
    """A loopback TCP port nobody listens on now (and ``port + bus_offset`` too, if given:
    a cluster node also listens on its bus port, port + 10000)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus_offset:
            return port
        if port + bus_offset > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + bus_offset))
            except OSError:
                continue
        return port


def call(port: int, *args: str | bytes, timeout: float = 2.0, host: str = "127.0.0.1") -> bytes:
    """One RESP command; the reply's first line, or a bulk reply's body. Raises OSError."""
    out = b"*%d\r\n" % len(args)
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(out)
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("redis-server closed the connection")
            buf += chunk
        line, rest = buf.split(b"\r\n", 1)
        if not line.startswith(b"$") or line == b"$-1":
            return line
        n = int(line[1:])
        while len(rest) < n:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("redis-server closed the connection")
            rest += chunk
        return rest[:n]


class RedisServer:
    """One private redis-server. ``start()`` (again after ``kill()``) keeps the port.

    ``extra`` are more redis-server flags (e.g. ``("--cluster-enabled", "yes")``).
    """

    def __init__(self, *extra: str, cluster: bool = False) -> None:
        exe = redis_server_path()
        if exe is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.exe = exe
        self.extra = extra
        self.cluster = cluster
        self.dir = Path(tempfile.mkdtemp(prefix="lmkv-redis-", dir="/tmp"))
        self.unix_path = self.dir / "redis.sock"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_path}"

    def _argv(self) -> list[str]:
        argv = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
                "--unixsocket", str(self.unix_path), "--unixsocketperm", "700"]
        if self.cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / "nodes.conf"),
                     "--cluster-node-timeout", "2000"]
        return argv + list(self.extra)

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Start (or restart, on the same port) and wait until it answers PING."""
        fixed = self.port != 0
        for _ in range(START_ATTEMPTS):
            if not fixed:
                self.port = free_port(10000 if self.cluster else 0)
            if self._try_start(timeout):
                return self
            if fixed:
                break
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log()}")

    def _try_start(self, timeout: float) -> bool:
        self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False    # most likely the port was taken meanwhile: the caller picks another
            if self.ping():
                return True
            time.sleep(0.01)
        self.kill()
        return False

    def ping(self) -> bool:
        try:
            return call(self.port, "PING", timeout=0.5) == b"+PONG"
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap: a Redis that dies without a word."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def redis_server(*extra: str) -> Iterator[RedisServer]:
    with RedisServer(*extra) as server:
        yield server


@contextlib.contextmanager
def redis_cluster(nodes: int = 3, timeout: float = START_TIMEOUT) -> Iterator[list[RedisServer]]:
    """``nodes`` cluster-enabled servers joined into one cluster of primaries (no replicas)
    by ``redis-cli --cluster create``; yields once every node reports ``cluster_state:ok``."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise FileNotFoundError("redis-cli is not installed (it ships with the redis-server package)")
    servers: list[RedisServer] = []
    try:
        for _ in range(nodes):
            servers.append(RedisServer(cluster=True).start(timeout))
        addrs = [f"127.0.0.1:{s.port}" for s in servers]
        subprocess.run([cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=timeout)
        deadline = time.monotonic() + timeout
        while not all(b"cluster_state:ok" in call(s.port, "CLUSTER", "INFO") for s in servers):
            if time.monotonic() > deadline:
                raise RuntimeError("the redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        yield servers
    finally:
        for s in servers:
            s.close()
