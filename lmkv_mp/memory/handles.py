"""The GPU tier's shareable handles (file descriptors) passed to workers over a unix socket.

A VMM allocation (``cuMemCreate``) is exported as a POSIX file descriptor, and an fd means
something only in the process that holds it: it travels as SCM_RIGHTS ancillary data on a
unix socket, which ZeroMQ cannot carry. So the sidecar also listens on
``<run_dir>/gpu-handles.sock`` (mode as the control socket: owner only, or the
``--allow-group``), and answers every connection with one SOCK_SEQPACKET message, the
msgpack list of its region uuids with one fd per uuid attached, then closes it. A worker
connects once per new region uuid (so once per sidecar boot), imports the fd it needs and
closes them all. The loop never waits on a worker: the answer is one small non-blocking
send into a fresh socket's buffer.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import msgpack

from lmkv_mp.memory.region import RegionError

log = logging.getLogger("lmkv.memory")

MAX_REGIONS = 64


class HandleServer:
    """Serves ``fds`` (region uuid -> exported fd, which the caller keeps open and closes)
    on a unix socket at ``path``, created under ``umask`` and given to ``gid`` if set."""

    def __init__(self, path: Path, fds: dict[bytes, int], umask: int, gid: int | None = None) -> None:
        if not 0 < len(fds) <= MAX_REGIONS:
            raise ValueError(f"1..{MAX_REGIONS} regions, got {len(fds)}")
        self.path = path
        self._uuids = list(fds)
        self._fds = [fds[u] for u in self._uuids]
        self._payload = msgpack.packb(self._uuids, use_bin_type=True)
        path.unlink(missing_ok=True)  # a stale socket of a crashed sidecar: we hold the run dir's lock
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(umask)
        try:
            self._sock.bind(str(path))
            if gid is not None:
                os.chown(path, -1, gid)
            self._sock.listen(64)
        except OSError:
            self._sock.close()
            raise
        finally:
            os.umask(old)
        self._sock.setblocking(False)
        self.served = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def serve(self) -> int:
        """Answer every pending connection (loop thread, when :meth:`fileno` is readable)."""
        n = 0
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return n
            except OSError as e:  # e.g. out of fds: this connection fails, the next may not
                log.warning("memory: GPU handle socket: accept failed: %s", e)
                return n
            with conn:
                conn.setblocking(False)
                try:
                    socket.send_fds(conn, [self._payload], self._fds)
                    n += 1
                    self.served += 1
                except OSError as e:  # the peer went away already: its loss
                    log.debug("memory: GPU handle socket: send failed: %s", e)

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)


def fetch_handles(path: str, timeout: float) -> dict[bytes, int]:
    """The sidecar's exported fds by region uuid (the caller owns and must close them all).
    Raises RegionError when the socket cannot be reached or its answer is malformed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    fds: list[int] = []
    try:
        sock.connect(path)
        data, fds, flags, _ = socket.recv_fds(sock, 1 << 16, MAX_REGIONS)
        uuids = msgpack.unpackb(data, raw=False, max_bin_len=64, max_array_len=MAX_REGIONS)
        if (flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or not isinstance(uuids, list)
                or len(uuids) != len(fds) or not all(isinstance(u, bytes) and len(u) == 16 for u in uuids)):
            raise RegionError(f"the GPU handle socket {path} sent a malformed answer")
        out = dict(zip(uuids, fds))
        fds = []
        return out
    except (OSError, ValueError, msgpack.UnpackException) as e:
        raise RegionError(f"cannot fetch the GPU tier's handles from {path}: {e}") from None
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()
