"""Tests for lmkv_mp.memory.handles: the GPU tier's fds passed over a unix socket.

The fds here are memfds standing in for cuMemExportToShareableHandle's (the passing does not
care what an fd refers to): a worker must receive the very allocation the sidecar exported,
by region uuid, and a misbehaving peer must neither block the sidecar nor leak fds.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path
from typing import Iterator

import pytest

from lmkv_mp.memory import RegionError
from lmkv_mp.memory.handles import HandleServer, fetch_handles

U1, U2 = b"\x01" * 16, b"\x02" * 16


def memfd(content: bytes) -> int:
    fd = os.memfd_create("lmkv-test")
    os.write(fd, content)
    return fd


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HandleServer]:
    fds = {U1: memfd(b"region one"), U2: memfd(b"region two")}
    srv = HandleServer(tmp_path / "gpu-handles.sock", fds, umask=0o177)
    yield srv
    srv.close()
    for fd in fds.values():
        os.close(fd)


def fetch_while_serving(srv: HandleServer) -> dict[bytes, int]:
    """A worker's fetch, answered by the loop's serve() (here: this thread, after connect)."""
    out: dict[bytes, int] = {}
    t = threading.Thread(target=lambda: out.update(fetch_handles(str(srv.path), 5.0)))
    t.start()
    while t.is_alive():
        srv.serve()
        t.join(0.01)
    return out


def test_a_worker_receives_each_regions_own_allocation_by_uuid(server: HandleServer) -> None:
    got = fetch_while_serving(server)
    assert set(got) == {U1, U2}
    for uuid, content in ((U1, b"region one"), (U2, b"region two")):
        assert os.pread(got[uuid], 64, 0) == content, "the fd refers to the exported allocation"
        os.pwrite(got[uuid], b"R", 0)
        os.close(got[uuid])
    assert fetch_while_serving(server) and server.served == 2


def test_the_socket_is_owner_only(server: HandleServer) -> None:
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600


def test_a_peer_that_never_reads_does_not_block_the_sidecar(server: HandleServer) -> None:
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(40)]
    try:
        for s in idle:
            s.connect(str(server.path))
        assert server.serve() == 40, "every connection answered at once, none read"
        assert server.serve() == 0
    finally:
        for s in idle:
            s.close()
    got = fetch_while_serving(server)
    for fd in got.values():
        os.close(fd)


def test_no_sidecar_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RegionError, match="cannot fetch the GPU tier's handles"):
        fetch_handles(str(tmp_path / "nothing.sock"), 0.5)


@pytest.mark.parametrize("payload", [b"\xc1", b"\x91\xc4\x02ab", b"\x90"])
def test_a_malformed_answer_is_refused_and_leaks_no_fd(tmp_path: Path, payload: bytes) -> None:
    """Garbage, a uuid of the wrong size, or fewer uuids than fds: an error, every fd closed."""
    path = tmp_path / "bad.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)
    fd = memfd(b"x")

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            socket.send_fds(conn, [payload], [fd])

    t = threading.Thread(target=answer)
    t.start()
    before = open_fds()
    with pytest.raises(RegionError, match="malformed|cannot fetch"):
        fetch_handles(str(path), 5.0)
    t.join()
    assert open_fds() == before, "the received fds were closed"
    os.close(fd)
    listener.close()


def test_close_removes_the_socket(tmp_path: Path) -> None:
    fd = memfd(b"x")
    srv = HandleServer(tmp_path / "h.sock", {U1: fd}, umask=0o177)
    srv.close()
    os.close(fd)
    assert not (tmp_path / "h.sock").exists()
