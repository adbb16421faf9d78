"""What the sidecar acquires before it serves: run dir, locks, host pool, GPU tier regions,
lower tiers, sockets.

Each step either hands back what it opened or raises :class:`StartupError` (or the
``RegionError``/``OSError``/``ValueError`` of what it opened) with a message that says which
setting to change. The sidecar holds all of it for its life and gives it back in
``Sidecar.close``; nothing here serves a request.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from lmkv_mp.wire import protocol as P
from lmkv_mp.sidecar.access import Access, AccessError, access_for, closed_ancestor, prepare_run_dir, share_socket
from lmkv_mp.config import SidecarConfig, redact_url
from lmkv_mp.memory import HostPool, HostRegion, Record, shm_name_for
from lmkv_mp.sidecar.metrics import MetricsServer, SnapshotBroker
from lmkv_mp.sidecar.tiers.base import Tier

if TYPE_CHECKING:
    from lmkv_mp.memory.gpu import GpuRegion

# The sidecar's log: these lines are the first part of its story, read with the rest.
log = logging.getLogger("lmkv.server")


class StartupError(RuntimeError):
    """The sidecar cannot start; the message says what to change."""


class Locks:
    """The flocks a sidecar holds for its life; :meth:`release` lets them all go."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def take_run_dir(self, run_dir: Path) -> None:
        """The run dir's lock (one sidecar per run dir), with this process's pid in it."""
        fd = os.open(run_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"another lmkv-sidecar is running on {run_dir} (lock held): "
                               "stop it or use another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fds.append(fd)

    def take_exclusive(self, path: Path, what: str, flag: str) -> None:
        """Hold an flock on ``path`` for the sidecar's life: two sidecars on one pool file or
        one disk dir would overwrite each other's slots or files behind their indexes (the
        run-dir lock does not cover them: those can be shared by sidecars with other run dirs)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"another lmkv-sidecar uses {what} (lock held): give each sidecar its own {flag}") from None
        self._fds.append(fd)

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def open_run_dir(cfg: SidecarConfig, locks: Locks) -> Access:
    """Create the run dir with the modes ``--allow-group`` asks for and take its lock; the
    :class:`Access` everything else the sidecar creates is made with."""
    try:
        access = access_for(cfg.allow_group)
        prepare_run_dir(cfg.run_dir, access)
    except AccessError as e:
        raise StartupError(str(e)) from None
    closed = closed_ancestor(cfg.run_dir, access)
    if closed is not None:
        log.warning("warning: --allow-group %s, but %s (mode %o) keeps the group out of the run dir %s: "
                    "choose a --run-dir the group can reach, e.g. under /run or /tmp", cfg.allow_group, closed,
                    closed.stat().st_mode & 0o777, cfg.run_dir)
    locks.take_run_dir(cfg.run_dir)
    return access


def open_host_pool(cfg: SidecarConfig, access: Access, locks: Locks) -> tuple[HostRegion, HostPool, list[Record]]:
    """The host pool's segment (created, or re-attached as a warm restart left it), the pool
    in it, and the COMMITTED records the index adopts."""
    if cfg.host_pool_path is not None:
        locks.take_exclusive(cfg.host_pool_path, f"the host pool file {cfg.host_pool_path}", "--host-pool-path")
    region = HostRegion.create_or_attach(shm_name_for(cfg.run_dir), cfg.host_pool_size, cfg.host_pool_path,
                                         access.file_mode, access.gid)
    try:
        pool, records = HostPool.open(region, cfg.slab_size)
    except ValueError:
        region.close()
        if region.created:  # an unusable segment we just made would outlive us in /dev/shm
            region.unlink()
        raise
    return region, pool, records


def open_gpu_regions(cfg: SidecarConfig) -> list[GpuRegion]:
    """One exported device allocation of ``--gpu-pool-size`` per ``--gpu-devices`` entry (every
    visible device when that is empty; none without a pool size). All or nothing: a device
    that fails frees the ones made before."""
    if not cfg.gpu_pool_size:
        return []
    from lmkv_mp.memory.gpu import GpuRegion, visible_devices  # cuda-python only when a GPU tier is asked for

    regions: list[GpuRegion] = []
    try:
        for ordinal in cfg.gpu_devices or range(visible_devices()):
            regions.append(GpuRegion(ordinal, cfg.gpu_pool_size))
    except BaseException:
        for r in regions:
            r.close()
        raise
    if len({r.device_uuid for r in regions}) != len(regions):
        for r in regions:
            r.close()
        raise StartupError("--gpu-devices names one GPU twice (two ordinals with the same device uuid)")
    return regions


def open_lower_tiers(cfg: SidecarConfig, locks: Locks) -> list[Tier]:
    """The disk and remote tiers the config names (imported only when used)."""
    tiers: list[Tier] = []
    if cfg.disk_dir is not None:
        from lmkv_mp.sidecar.tiers.disk import DiskTier

        cfg.disk_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        locks.take_exclusive(cfg.disk_dir / "lock", f"the disk tier {cfg.disk_dir}", "--disk-dir")
        tiers.append(DiskTier(cfg.disk_dir, cfg.disk_size))
        u = tiers[-1].usage()
        log.info("tier disk: %s, %d of %d bytes used, %d entries", cfg.disk_dir, u.used_bytes,
                 u.capacity_bytes, u.entries)
    if cfg.remote_url is not None:
        from lmkv_mp.sidecar.tiers.redis import RedisTier

        tiers.append(RedisTier(cfg.remote_url, timeout_s=cfg.remote_timeout))
        log.info("tier remote: %s (timeout %.3fs)", redact_url(cfg.remote_url), cfg.remote_timeout)
    return tiers


def bind(ctx: zmq.Context, kind: int, endpoint: str, max_inflight: int, access: Access) -> zmq.Socket:
    """A ROUTER (``max_inflight`` requests queued per client, every reply delivered to a
    client with at most that many outstanding) or XPUB socket bound to ``endpoint``, its
    socket file (ipc://) made with ``access``'s mode and group."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * P.MAX_FRAME_BYTES)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # High-water marks are per client: a client with this many requests queued waits;
        # others are served in turn (ROUTER fair-queues).
        sock.setsockopt(zmq.RCVHWM, max_inflight)
        # A ROUTER drops a reply whose client's pipe looks full. The loop learns what the
        # I/O thread has sent on only in credits, one per half a mark of messages, so a
        # pipe looks up to half a mark fuller than it is; while the I/O thread waits for a
        # core it is as full as the loop wrote. Twice the requests a client may have queued
        # is the smallest mark that never drops a reply to a client within that limit (at
        # the mark itself, the fuzz test lost one on a busy 2-vCPU box). A client that never
        # reads loses replies past it, and the sidecar's memory stays bounded.
        sock.setsockopt(zmq.SNDHWM, 2 * max_inflight)
    else:  # PUB: a subscriber that falls behind misses snapshots instead of queueing them
        sock.setsockopt(zmq.SNDHWM, 4)
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://"):])
        if path.exists():
            path.unlink()  # a stale socket of a crashed sidecar: we hold the lock now
    old = os.umask(access.umask)
    try:
        sock.bind(endpoint)
        share_socket(endpoint, access)
    except (zmq.ZMQError, OSError) as e:
        sock.close()
        raise StartupError(f"cannot bind {endpoint}: {e}") from e
    finally:
        os.umask(old)
    return sock


def start_metrics(cfg: SidecarConfig, broker: SnapshotBroker) -> MetricsServer | None:
    """The Prometheus server (None with ``--metrics-port 0``); its threads read snapshots
    from ``broker`` only."""
    if not cfg.metrics_port:
        log.info("metrics: off (--metrics-port 0)")
        return None
    try:
        metrics = MetricsServer(cfg.metrics_host, cfg.metrics_port, broker, cfg.metrics_namespaces)
    except OSError as e:
        raise StartupError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {e.strerror or e}; "
                           "choose another --metrics-port or --metrics-host (--metrics-port 0: no metrics)") from None
    log.info("metrics: serving %s", metrics.url)
    return metrics
