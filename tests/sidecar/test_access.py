"""Who may reach the sidecar (lmkv_mp/sidecar/access.py and its use in the server): file modes of
the run dir, sockets, shm segment and disk tier; ``--allow-group``; the client token
HELLO must present; ``tcp://`` beyond loopback only when asked for, with a token.

Modes are checked on real files of in-process sidecars (tests/sidecar/test_server.py's Harness)
and, for the TCP path, of a sidecar process.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from lmkv_mp.wire import protocol as P
from lmkv_mp.sidecar.access import AccessError, access_for
from lmkv_mp.engine.client import SidecarClient
from lmkv_mp.config import load_client_config
from lmkv_mp.memory import shm_name_for
from lmkv_mp.sidecar.startup import StartupError

from tests.conftest import SidecarHandle, wait_for
from tests.helpers.redisproc import free_port
from tests.sidecar.test_server import CHUNK, NS_A, Harness, hashes

SOCKETS = ("control.sock", "stats.sock", "stats-pub.sock")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def shm_path(run_dir: Path) -> Path:
    return Path("/dev/shm") / shm_name_for(run_dir).lstrip("/")


def service_group() -> grp.struct_group:
    """A group this user may share with that differs from the files' default group where
    possible (root may use any group), so that the chown is visible."""
    if os.getuid() == 0:
        return next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    return grp.getgrgid(next((g for g in os.getgroups() if g != os.getgid()), os.getgid()))


@pytest.fixture
def run_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def harness(run_dir: Path, *flags: str) -> Harness:
    return Harness(run_dir, "--stats-interval", "1s", *flags)


def test_owner_only_by_default(run_dir: Path) -> None:
    run_dir.chmod(0o755)            # an existing, too open run dir is closed (mkdtemp's 0700 proves nothing)
    h = harness(run_dir)
    try:
        assert mode(run_dir) == 0o700
        for name in SOCKETS:
            assert stat.S_ISSOCK((run_dir / name).stat().st_mode) and mode(run_dir / name) == 0o600, name
        assert mode(run_dir / "lock") == 0o600
        assert mode(shm_path(run_dir)) == 0o600
    finally:
        h.close()


def test_allow_group_shares_everything_but_the_lock_with_that_group(run_dir: Path) -> None:
    group = service_group()
    h = harness(run_dir, "--allow-group", group.gr_name)
    try:
        assert (mode(run_dir), run_dir.stat().st_gid) == (0o750, group.gr_gid)
        for name in SOCKETS:
            assert (mode(run_dir / name), (run_dir / name).stat().st_gid) == (0o660, group.gr_gid), name
        shm = shm_path(run_dir)
        assert (mode(shm), shm.stat().st_gid) == (0o660, group.gr_gid)
        assert mode(run_dir / "lock") == 0o600
        h.hello(b"w1", NS_A)
        h.store(b"w1", NS_A, hashes(1))
        # Restarted without the flag: the same (warm) segment and the run dir are the owner's again.
        h.server.close()
        h.flags = h.flags[:-2]
        h.server = h._new()
        assert mode(run_dir) == 0o700 and mode(shm) == 0o600
        assert all(mode(run_dir / name) == 0o600 for name in SOCKETS)
        h.hello(b"w1", NS_A)
        assert h.lookup(b"w1", [NS_A], hashes(1)).hits == 1, "still warm"
    finally:
        h.close()


def test_allow_group_warns_when_a_parent_keeps_the_group_out(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The default run dir under $XDG_RUNTIME_DIR sits in a 0700 directory: sharing it with a
    group would silently not work. The sidecar says so (and still starts)."""
    group = service_group()
    inner = run_dir / "inner"                    # run_dir itself is 0700
    h = harness(inner, "--allow-group", group.gr_name)
    try:
        assert f"keeps the group out of the run dir {inner}" in caplog.text and str(run_dir) in caplog.text
    finally:
        h.close()
    caplog.clear()
    h = harness(run_dir, "--allow-group", group.gr_name)   # under /tmp: reachable
    try:
        assert "keeps the group out" not in caplog.text
    finally:
        h.close()


def test_allow_group_takes_a_numeric_gid(run_dir: Path) -> None:
    gid = service_group().gr_gid
    h = harness(run_dir, "--allow-group", str(gid))
    try:
        assert run_dir.stat().st_gid == gid and shm_path(run_dir).stat().st_gid == gid
    finally:
        h.close()


def test_allow_group_of_a_missing_group_is_a_clear_start_error(run_dir: Path) -> None:
    with pytest.raises(StartupError, match="no such group"):
        harness(run_dir, "--allow-group", "no-such-group-lmkv")
    assert not shm_path(run_dir).exists(), "nothing was created"


def test_a_non_member_cannot_share_with_a_group() -> None:
    gid = os.getgid()
    name = grp.getgrgid(gid).gr_name
    with pytest.raises(AccessError, match="not a member"):
        access_for(name, uid=12345, groups=[gid + 1])
    assert access_for(name, uid=12345, groups=[gid]).gid == gid
    assert access_for(name, uid=0, groups=[]).gid == gid, "root may share with any group"
    assert access_for(None).file_mode == 0o600


def test_disk_tier_files_are_the_owners_alone(run_dir: Path) -> None:
    disk = Path(tempfile.mkdtemp(prefix="lmkv-disk-", dir="/tmp"))
    h = harness(run_dir, "--disk-dir", str(disk), "--disk-size", "16MiB", "--write-policy", "write-through")
    try:
        h.hello(b"w1", NS_A)
        h.store(b"w1", NS_A, hashes(1, 2))
        records = wait_for(lambda: [p for p in disk.rglob("*") if p.is_file() and p.name != "lock"
                                    and p.stat().st_size > CHUNK], 20, "the chunks to reach the disk tier")
        assert all(mode(p) == 0o600 for p in records)
        assert all(mode(p) == 0o700 for p in disk.rglob("*") if p.is_dir())
        assert mode(disk / "lock") == 0o600
    finally:
        h.close()
        for p in sorted(disk.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        disk.rmdir()


def test_hello_must_present_the_client_token(run_dir: Path, tmp_path: Path) -> None:
    token = tmp_path / "client-token"
    token.write_text("cl1ent-t0ken\n")
    h = harness(run_dir, "--client-token-file", str(token))
    try:
        for presented in (None, b"", b"cl1ent", b"cl1ent-t0ken-and-more"):
            err = h.error(b"w", P.Hello(1, P.PROTOCOL_VERSION, "worker", token=presented), P.ErrorCode.UNAUTHORIZED)
            assert "LMKV_TOKEN_FILE" in err.message
        h.error(b"w", P.Lookup(2, [NS_A], hashes(1)), P.ErrorCode.NOT_REGISTERED)
        # The snapshot names the node's models: on the control socket it needs a HELLO too.
        h.error(b"w", P.Stats(4), P.ErrorCode.NOT_REGISTERED)
        h.ok(b"w", P.Hello(3, P.PROTOCOL_VERSION, "worker", token=b"cl1ent-t0ken"))
        assert isinstance(h.ok(b"w", P.Stats(5)), P.StatsReply)
        assert h.stats()["errors_by_code"] == {"UNAUTHORIZED": 4, "NOT_REGISTERED": 2}
    finally:
        h.close()


@pytest.mark.slow
def test_remote_clients_over_tcp_need_the_token(sidecar: Callable[..., SidecarHandle], tmp_path: Path) -> None:
    token = tmp_path / "client-token"
    token.write_text("t0ken-for-remote-clients\n")
    port = free_port()
    sidecar("--endpoint", f"tcp://0.0.0.0:{port}", "--allow-remote-clients", "--client-token-file", str(token))
    endpoint = f"tcp://127.0.0.1:{port}"
    good = load_client_config(env={"LMKV_ENDPOINT": endpoint, "LMKV_TOKEN_FILE": str(token)},
                              overrides={"timeout": 2.0})
    bad = load_client_config(env={"LMKV_ENDPOINT": endpoint}, overrides={"timeout": 2.0})
    with SidecarClient(bad, role="worker", heartbeat=False) as stranger:
        assert not stranger.connect()
        assert stranger.lookup([NS_A], hashes(1)).hits == 0
    with SidecarClient(good, role="worker", namespaces=[P.NamespaceInfo(NS_A, CHUNK)], heartbeat=False) as c:
        assert c.connect()
        r = c.reserve(NS_A, hashes(1))
        assert r is not None and c.commit(r.lease_id) == 1
        assert c.lookup([NS_A], hashes(1)).hits == 1
        assert c.stats()["clients"], "a registered client (it presented the token) reads the snapshot"
