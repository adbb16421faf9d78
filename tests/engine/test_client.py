"""SidecarClient against no sidecar, and against a scripted fake sidecar (a ZeroMQ ROUTER in
a thread) that can answer late, change its boot id, or forget the client.

The engine contract under test: data-path calls never raise and never wait past the
deadline; a dead sidecar is a miss; a late reply is dropped by request id; a new boot id
counts a restart and the client re-HELLOs by itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import zmq

from lmkv_mp.wire import protocol as P
from lmkv_mp.engine.client import MISS, SidecarClient, SidecarUnavailable

from tests.conftest import client_config, wait_for

NS = bytes(range(16))
TIMEOUT = 0.3
MARGIN = 0.5


def hashes(n: int) -> bytes:
    return b"".join(i.to_bytes(16, "little") for i in range(1, n + 1))


Handler = Callable[[bytes, P.Request], "P.Reply | None"]


class FakeSidecar:
    """A ROUTER on ``endpoint`` served by its own thread (which alone touches the socket).

    ``handler(ident, request)`` returns the reply, or None to hold it back; :meth:`send_late`
    sends a held reply later. HELLOs are answered by default with :attr:`boot_id`."""

    def __init__(self, endpoint: str, handler: Handler) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self.boot_id = b"\x01" * 16
        self.received: list[P.Request] = []
        self.held: list[tuple[bytes, P.Reply]] = []
        self._outbox: list[tuple[bytes, P.Reply]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._bound.wait(5), "fake sidecar did not bind"

    def hello_reply(self, req: P.Hello) -> P.HelloReply:
        return P.HelloReply(req.req_id, self.boot_id, 1, 256, b"k" * 16, 1.0, 0.2,
                            [P.RegionInfo(0, "shm", "/nonexistent", 4096, b"u" * 16)])

    def count(self, kind: type) -> int:
        with self._lock:
            return sum(isinstance(m, kind) for m in self.received)

    def send_late(self) -> None:
        """Queue every held reply for sending (the server thread sends it)."""
        with self._lock:
            self._outbox.extend(self.held)
            self.held.clear()

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self._bound.set()
        try:
            while not self._stop.is_set():
                with self._lock:
                    outbox, self._outbox = self._outbox, []
                for ident, reply in outbox:
                    sock.send_multipart([ident, *P.encode_reply(reply)])
                if not sock.poll(10):
                    continue
                ident, *frames = sock.recv_multipart()
                req = P.decode_request(frames)
                with self._lock:
                    self.received.append(req)
                reply = self.hello_reply(req) if isinstance(req, P.Hello) else self.handler(ident, req)
                if reply is None:
                    with self._lock:
                        self.held.append((ident, self._answer(req)))
                else:
                    sock.send_multipart([ident, *P.encode_reply(reply)])
        finally:
            sock.close(0)

    def _answer(self, req: P.Request) -> P.Reply:
        """The reply a held request gets when it is finally sent."""
        assert isinstance(req, P.Lookup)
        return P.LookupReply(req.req_id, self.boot_id, 99)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(run_dir: Path) -> Iterator[Callable[[Handler], FakeSidecar]]:
    made: list[FakeSidecar] = []

    def make(handler: Handler) -> FakeSidecar:
        f = FakeSidecar(f"ipc://{run_dir / 'control.sock'}", handler)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def hits_by_size(srv: "Callable[[], FakeSidecar]") -> Handler:
    """Answers every LOOKUP with hits = number of hashes asked, so each reply tells which
    request it answers; ``srv()`` gives the fake whose boot id to use."""
    def handler(ident: bytes, req: P.Request) -> P.Reply:
        assert isinstance(req, P.Lookup)
        return P.LookupReply(req.req_id, srv().boot_id, len(req.hashes) // 16)
    return handler


def test_no_sidecar_is_a_quick_miss_then_instant_during_backoff(run_dir: Path) -> None:
    with SidecarClient(client_config(run_dir, timeout=TIMEOUT, retry_interval=30), heartbeat=False) as c:
        t = time.monotonic()
        assert c.lookup([NS], hashes(2)) == MISS
        first = time.monotonic() - t
        assert first < TIMEOUT + MARGIN
        assert not c.available
        for _ in range(20):
            t = time.monotonic()
            assert c.lookup([NS], hashes(2)) == MISS
            assert c.reserve(NS, hashes(2)) is None
            assert c.commit(7) == 0
            assert c.release(7) is False
            assert c.ping() is False
            assert time.monotonic() - t < 0.05, "calls during back-off must not wait"
        with pytest.raises(SidecarUnavailable):
            c.stats()
        assert c.host_tensor() is None
        assert c.restarts == 0


def test_no_sidecar_heartbeat_client_closes_promptly(run_dir: Path) -> None:
    c = SidecarClient(client_config(run_dir, timeout=TIMEOUT, heartbeat_interval=0.05))
    assert c.lookup([NS], hashes(1)) == MISS
    t = time.monotonic()
    c.close()
    assert time.monotonic() - t < TIMEOUT + MARGIN


def test_successful_connect_ends_the_back_off(run_dir: Path, fake: Callable[[Handler], FakeSidecar]) -> None:
    with SidecarClient(client_config(run_dir, timeout=TIMEOUT, retry_interval=30), heartbeat=False) as c:
        assert c.lookup([NS], hashes(2)) == MISS  # nobody there: back off for 30 s
        srv = fake(hits_by_size(lambda: srv))
        assert c.connect(timeout=5)
        assert c.available
        assert c.lookup([NS], hashes(2)).hits == 2


def test_answers_match_requests(run_dir: Path, fake: Callable[[Handler], FakeSidecar]) -> None:
    srv = fake(hits_by_size(lambda: srv))
    with SidecarClient(client_config(run_dir, timeout=2), heartbeat=False) as c:
        for n in (1, 5, 3):
            r = c.lookup([NS], hashes(n))
            assert r.hits == n and r.boot_id == srv.boot_id
        assert srv.count(P.Hello) == 1 and c.available


def test_late_reply_is_dropped_and_next_call_gets_its_own(run_dir: Path,
                                                          fake: Callable[[Handler], FakeSidecar]) -> None:
    delay_next = threading.Event()
    delay_next.set()

    def handler(ident: bytes, req: P.Request) -> P.Reply | None:
        if delay_next.is_set():
            delay_next.clear()
            return None  # held back past the client's deadline
        return hits_by_size(lambda: srv)(ident, req)

    srv = fake(handler)
    with SidecarClient(client_config(run_dir, timeout=TIMEOUT, retry_interval=0.05), heartbeat=False) as c:
        t = time.monotonic()
        assert c.lookup([NS], hashes(4)) == MISS
        assert TIMEOUT - 0.05 <= time.monotonic() - t < TIMEOUT + MARGIN
        srv.send_late()  # a reply with hits=99 now travels towards the client
        # The next lookup (once the short back-off is over) sends a fresh request id and
        # must get its own answer (2), not the stale 99 that arrives first.
        hits = wait_for(lambda: c.lookup([NS], hashes(2)).hits, 5, "the client to leave back-off")
        assert hits == 2
        assert c.lookup([NS], hashes(3)).hits == 3
        assert srv.count(P.Lookup) >= 3


def test_new_boot_id_counts_a_restart_and_re_hellos(run_dir: Path,
                                                    fake: Callable[[Handler], FakeSidecar]) -> None:
    srv = fake(lambda ident, req: (P.LookupReply(req.req_id, srv.boot_id, 1) if isinstance(req, P.Lookup)
                                   else P.PingReply(req.req_id, srv.boot_id, 0)))
    with SidecarClient(client_config(run_dir, timeout=2), heartbeat=False) as c:
        assert c.lookup([NS], hashes(1)).hits == 1
        assert c.restarts == 0 and srv.count(P.Hello) == 1
        srv.boot_id = b"\x02" * 16
        assert c.lookup([NS], hashes(1)).hits == 1  # the reply itself is still good
        assert c.restarts == 1 and c.boot_id == b"\x02" * 16
        assert c.ping()
        assert srv.count(P.Hello) == 2, "the client re-HELLOs before its next request"
        assert isinstance(srv.received[-2], P.Hello) and isinstance(srv.received[-1], P.Ping)
        assert c.lookup([NS], hashes(1)).hits == 1
        assert c.restarts == 1 and srv.count(P.Hello) == 2


def test_not_registered_reply_re_hellos_and_retries_once(run_dir: Path,
                                                         fake: Callable[[Handler], FakeSidecar]) -> None:
    forget = threading.Event()

    def handler(ident: bytes, req: P.Request) -> P.Reply:
        if forget.is_set():
            forget.clear()
            srv.boot_id = b"\x03" * 16  # a restarted sidecar that does not know the client
            return P.ErrorReply(req.req_id, srv.boot_id, int(P.ErrorCode.NOT_REGISTERED), "send HELLO")
        return hits_by_size(lambda: srv)(ident, req)

    srv = fake(handler)
    with SidecarClient(client_config(run_dir, timeout=2), heartbeat=False) as c:
        assert c.lookup([NS], hashes(2)).hits == 2
        forget.set()
        assert c.lookup([NS], hashes(3)).hits == 3, "re-HELLO, then the same request again"
        assert c.restarts == 1 and srv.count(P.Hello) == 2
        kinds = [type(m).__name__ for m in srv.received]
        assert kinds == ["Hello", "Lookup", "Lookup", "Hello", "Lookup"]
        forget.set()
        assert c.commit(5) == 0, "commit is not retried: its lease died with the old sidecar"


def test_error_reply_is_a_miss_not_an_exception(run_dir: Path, fake: Callable[[Handler], FakeSidecar]) -> None:
    srv = fake(lambda ident, req: P.ErrorReply(req.req_id, b"\x01" * 16, int(P.ErrorCode.INTERNAL), "boom"))
    with SidecarClient(client_config(run_dir, timeout=2), heartbeat=False) as c:
        assert c.lookup([NS], hashes(1)) == MISS
        assert c.reserve(NS, hashes(1)) is None
        assert c.available, "an error reply is an answer: no back-off"
        assert srv.count(P.Lookup) == 1


def test_heartbeat_pings_an_idle_client(run_dir: Path, fake: Callable[[Handler], FakeSidecar]) -> None:
    srv = fake(lambda ident, req: P.PingReply(req.req_id, srv.boot_id, 0))
    with SidecarClient(client_config(run_dir, timeout=2, heartbeat_interval=0.1)) as c:
        assert c.connect()
        wait_for(lambda: srv.count(P.Ping) >= 3, 5, "heartbeat pings")


def test_heartbeat_follows_the_sidecars_interval(run_dir: Path, fake: Callable[[Handler], FakeSidecar]) -> None:
    """A client configured to beat every 30 s still beats as often as the sidecar asks
    (HELLO announces 0.2 s), or it would lose its leases between beats."""
    srv = fake(lambda ident, req: P.PingReply(req.req_id, srv.boot_id, 0))
    with SidecarClient(client_config(run_dir, timeout=2, heartbeat_interval=30)) as c:
        assert c.connect()
        wait_for(lambda: srv.count(P.Ping) >= 2, 5, "heartbeat pings at the sidecar's interval")


def test_hello_carries_role_and_pid(run_dir: Path, fake: Callable[[Handler], FakeSidecar]) -> None:
    srv = fake(hits_by_size(lambda: srv))
    with SidecarClient(client_config(run_dir, timeout=2), heartbeat=False, role="worker") as c:
        assert c.connect()
    hello = next(m for m in srv.received if isinstance(m, P.Hello))
    assert hello.pid == os.getpid() and hello.role == "worker"


def test_set_device_re_hellos_a_connected_client_and_waits_for_the_first_hello_otherwise(
        run_dir: Path, fake: Callable[[Handler], FakeSidecar]) -> None:
    """The sidecar gives GPU tier slots only on the device a HELLO names: a worker that learns
    its device (or gives up its GPU slots) after connecting must say HELLO again."""
    srv = fake(hits_by_size(lambda: srv))
    with SidecarClient(client_config(run_dir, timeout=2), heartbeat=False, role="worker") as c:
        assert c.set_device(b"d" * 16) and srv.count(P.Hello) == 0, "not connected: nothing sent yet"
        assert c.connect()
        assert c.set_device(b"")
        hellos = [m for m in srv.received if isinstance(m, P.Hello)]
        assert [h.device for h in hellos] == [b"d" * 16, b""] and c.device == b""
