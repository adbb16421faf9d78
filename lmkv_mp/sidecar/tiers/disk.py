"""DiskTier: one file per record in a local directory (an SSD, or a DAX/tmpfs mount).

Layout: ``<dir>/<xx>/<key hex>`` where ``xx`` is the first byte of the key's chain hash
(the namespace half is the same for every chunk of a model, so it would put them all in
one directory). Each file is a :data:`~lmkv_mp.sidecar.tiers.base.RECORD_HEADER` and the payload.
Files other than ``<xx>/<64 hex>`` records and ``<xx>/*.tmp`` are never touched (the
sidecar keeps its ``lock`` file in the top directory).

Contracts:

* **Atomic records.** A put writes ``<key hex>.<n>.tmp`` next to the final name and renames
  it into place, so a crash never leaves a partial record under a final name, and a reader
  that opened a file reads one whole record even while a put replaces it. Temp files left by
  a crash are removed when the directory is opened (one sidecar per directory: the sidecar
  holds ``<dir>/lock``).
* **No fsync by default.** The tier is a cache: after a power loss a torn or stale record
  fails its header or checksum check on read (a miss, deleted, counted as ``corrupt``), and
  a lost record is a miss. ``fsync=True`` fsyncs each file before its rename and the
  directory after it, for mounts where records should outlive a power loss.
* **Index.** ``key -> file size`` in LRU order, rebuilt at open by reading every record's
  header (magic, version, key against the file name, length against the file size; bad
  files are deleted and counted as ``corrupt``), ordered by mtime: puts and reads stamp
  the file's mtime with a strictly increasing clock, so the LRU order survives restarts.
  Payload checksums are verified on every read, not at open.
* **Capacity** counts file bytes (header included). A put evicts the least recently used
  records until it fits; a record larger than the capacity is refused.
* **Threads.** Any number of threads may call every method. ``_lock`` guards the index and
  the directory's names (rename and unlink happen under it, so index and directory always
  agree); payload reads, writes and checksums happen outside it.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

from lmkv_mp.sidecar.tiers.base import (HEADER_BYTES, KEY_BYTES, CorruptRecord, TierCounters, TierUsage, pack_header,
                                        parse_header)
from lmkv_mp.wire.checksum import checksum, checksum_stream

_RECORD_NAME = re.compile(r"[0-9a-f]{64}")
_SUBDIR_NAME = re.compile(r"[0-9a-f]{2}")
_TMP_SUFFIX = ".tmp"
_READ_PIECE = 256 << 10     # about an L2 cache


def _byte_view(data: memoryview | bytes | bytearray) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class DiskTier:
    """The ``disk`` tier: see the module docstring for the on-disk contracts."""

    name = "disk"
    local_index = True

    def __init__(self, directory: Path, capacity_bytes: int, fsync: bool = False) -> None:
        if capacity_bytes <= HEADER_BYTES:
            raise ValueError(f"disk tier capacity {capacity_bytes} bytes is too small: give --disk-size, e.g. 64GiB")
        self.directory = Path(directory)
        self.capacity = capacity_bytes
        self.fsync = fsync
        self.counters = TierCounters()
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()   # key -> file bytes, least recent first
        self._used = 0          # file bytes in the index
        self._reserved = 0      # file bytes of puts still writing their temp file
        self._last_stamp = 0
        self._tmp_seq = itertools.count()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for i in range(256):
            (self.directory / f"{i:02x}").mkdir(mode=0o700, exist_ok=True)
        self._scan()

    def _path(self, key: bytes) -> Path:
        return self.directory / f"{key[16]:02x}" / key.hex()

    def _stamp(self) -> int:
        """A strictly increasing wall-clock stamp in ns (caller holds ``_lock``): file mtimes
        are coarse (one kernel tick), so order must not depend on them being distinct."""
        self._last_stamp = max(self._last_stamp + 1, time.time_ns())
        return self._last_stamp

    def _scan(self) -> None:
        """Rebuild the index from the records' headers; drop temp files and bad records."""
        found: list[tuple[int, str, bytes, int]] = []
        corrupt = errors = 0
        for sub in sorted(self.directory.iterdir()):
            if not (_SUBDIR_NAME.fullmatch(sub.name) and sub.is_dir()):
                continue
            with os.scandir(sub) as it:
                entries = [e for e in it if e.is_file(follow_symlinks=False)]
            for e in entries:
                if e.name.endswith(_TMP_SUFFIX):
                    _unlink(e.path)     # a writer that crashed before its rename
                    continue
                if not _RECORD_NAME.fullmatch(e.name):
                    continue
                key = bytes.fromhex(e.name)
                try:
                    st = e.stat(follow_symlinks=False)
                    with open(e.path, "rb", buffering=0) as f:
                        _, length, _ = parse_header(f.read(HEADER_BYTES), key)
                    if f"{key[16]:02x}" != sub.name or st.st_size != HEADER_BYTES + length:
                        raise CorruptRecord("record in the wrong directory or of the wrong size")
                except CorruptRecord:
                    _unlink(e.path)
                    corrupt += 1
                    continue
                except OSError:
                    errors += 1     # unreadable: left alone, and not indexed
                    continue
                found.append((st.st_mtime_ns, e.name, key, st.st_size))
        found.sort()
        with self._lock:
            for mtime, _, key, size in found:
                self._index[key] = size
                self._used += size
                self._last_stamp = max(self._last_stamp, mtime)
            victims = self._evict_for(0)   # the capacity may have shrunk since the last run
        self.counters.add(corrupt=corrupt, errors=errors, evictions=victims)

    def _evict_for(self, size: int) -> int:
        """Unlink least recently used records until ``size`` more bytes fit (caller holds
        ``_lock``); how many were evicted."""
        n = 0
        while self._index and self._used + self._reserved + size > self.capacity:
            key, old = self._index.popitem(last=False)
            self._used -= old
            _unlink(self._path(key))
            n += 1
        return n

    def put(self, key: bytes, data: memoryview | bytes | bytearray) -> bool:
        """Store ``data`` under ``key`` (replacing any record). False when the record is
        larger than the capacity or the write failed (counted in ``errors``)."""
        _check_key(key)
        view = _byte_view(data)
        size = HEADER_BYTES + view.nbytes
        if size > self.capacity:
            return False
        header = pack_header(key, view.nbytes, checksum(view))
        final = self._path(key)
        tmp = final.with_name(f"{final.name}.{next(self._tmp_seq)}{_TMP_SUFFIX}")
        with self._lock:
            evicted = self._evict_for(size)    # make room before writing: the disk never holds more
            self._reserved += size
            stamp = self._stamp()
        try:
            self._write(tmp, header, view, stamp)
        except OSError:
            with self._lock:
                self._reserved -= size
            _unlink(tmp)
            self.counters.add(errors=1, evictions=evicted)
            return False
        with self._lock:
            self._reserved -= size
            old = self._index.pop(key, None)
            if old is not None:
                self._used -= old          # the rename replaces its file
            evicted += self._evict_for(size)
            try:
                os.rename(tmp, final)
            except OSError:
                _unlink(final)             # the old record is out of the index: not left behind
                ok = False
            else:
                self._index[key] = size
                self._used += size
                ok = True
        if not ok:
            _unlink(tmp)
            self.counters.add(errors=1, evictions=evicted)
            return False
        if self.fsync:
            _fsync_dir(final.parent)
        self.counters.add(puts=1, put_bytes=view.nbytes, evictions=evicted)
        return True

    def _write(self, tmp: Path, header: bytes, view: memoryview, stamp: int) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            bufs = [memoryview(header), view]
            while bufs:
                n = os.writev(fd, bufs)
                while bufs and n >= bufs[0].nbytes:
                    n -= bufs[0].nbytes
                    bufs.pop(0)
                if bufs:
                    bufs[0] = bufs[0][n:]
            if self.fsync:
                os.fsync(fd)
            os.utime(fd, ns=(stamp, stamp))
        finally:
            os.close(fd)

    def get_into(self, key: bytes, dest: memoryview) -> bool:
        """Read the record of ``key`` straight into ``dest``. True only when it exists, names
        ``key`` and ``len(dest)`` bytes and its checksum matches; a bad record is deleted and
        counted as ``corrupt``. ``dest`` holds garbage after a False."""
        _check_key(key)
        dest = _byte_view(dest)
        path = self._path(key)
        with self._lock:
            if key not in self._index:
                self.counters.add(misses=1)
                return False
            stamp = self._stamp()
        try:
            with open(path, "rb", buffering=0) as f:
                _, _, digest = parse_header(f.read(HEADER_BYTES), key, dest.nbytes)
                if os.fstat(f.fileno()).st_size != HEADER_BYTES + dest.nbytes:
                    raise CorruptRecord("record file of the wrong size (truncated?)")
                if _read_and_hash(f, dest) != digest:
                    raise CorruptRecord("payload checksum mismatch")
                os.utime(f.fileno(), ns=(stamp, stamp))  # the LRU order survives a restart
        except FileNotFoundError:
            with self._lock:    # deleted or evicted since the index said yes, or behind our back
                if key in self._index and not path.exists():
                    self._used -= self._index.pop(key)
            self.counters.add(misses=1)
            return False
        except CorruptRecord:
            self.delete(key)
            self.counters.add(corrupt=1)
            return False
        except OSError:
            self.counters.add(errors=1)
            return False
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        self.counters.add(gets=1, get_bytes=dest.nbytes)
        return True

    def contains(self, key: bytes) -> bool:
        """Whether the index holds ``key`` (in memory: cheap, safe on the control loop)."""
        with self._lock:
            return key in self._index

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        with self._lock:
            return [k in self._index for k in keys]

    def keys(self, namespace: bytes | None = None) -> list[bytes]:
        """The keys the index holds (of one 16-byte namespace id, or all), least recently
        used first. In memory: cheap enough for the control loop (CLEAR uses it)."""
        with self._lock:
            if namespace is None:
                return list(self._index)
            return [k for k in self._index if k[:16] == namespace]

    def delete(self, key: bytes) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size
            _unlink(self._path(key))

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._used, self.capacity, len(self._index))

    def close(self) -> None:
        """Nothing to release: no file stays open between calls."""


def _read_and_hash(f: io.RawIOBase, dest: memoryview) -> int:
    """Fill ``dest`` from ``f`` and return its checksum, hashing each piece right after
    reading it, while it is still in the CPU cache: one pass over memory instead of two."""
    h = checksum_stream()
    got = 0
    while got < dest.nbytes:
        piece = dest[got:got + _READ_PIECE]
        n = f.readinto(piece)
        if not n:
            raise CorruptRecord("record file ends early")
        h.update(piece[:n])
        got += n
    return h.intdigest()


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"tier keys are {KEY_BYTES} bytes (namespace id + chain hash), got {len(key)}")


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
