"""Host memory regions: a POSIX shared-memory segment or a file, mapped and pre-faulted.

The sidecar creates (or re-attaches, for a warm restart) the region; workers attach the
same region by name and copy KV straight into and out of it. A region owns its mmap:
tensors made by :meth:`HostRegion.tensor` view that mmap, so the region must outlive them
(``mmap.close`` refuses while views exist, which turns a use-after-unmap into an error).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING

import posix_ipc

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lmkv.memory")

_MADV_POPULATE_WRITE = 23  # Linux 5.14+; populates page tables without touching contents
_PAGE = mmap.PAGESIZE


def shm_name_for(run_dir: Path) -> str:
    """The POSIX shm name of the host pool that belongs to ``run_dir`` (stable across restarts)."""
    digest = hashlib.blake2b(str(run_dir.resolve()).encode(), digest_size=8).hexdigest()
    return f"/lmkv-{os.getuid()}-{digest}"


class RegionError(RuntimeError):
    """The region cannot be created or mapped; the message says which setting to change."""


class HostRegion:
    """A mapped host region. ``kind`` is ``'shm'`` (name is a POSIX shm name) or ``'file'``."""

    def __init__(self, kind: str, name: str, fd: int, size: int, created: bool) -> None:
        self.kind = kind
        self.name = name
        self.size = size
        self.created = created
        try:
            st = os.fstat(fd)
            self._identity = (st.st_dev, st.st_ino)
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._view: memoryview | None = memoryview(self.mm)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def create_or_attach(cls, name: str, size: int, path: Path | None = None, mode: int = 0o600,
                         group: int | None = None) -> "HostRegion":
        """Attach the existing region of exactly ``size`` bytes, or create a fresh one.

        An existing region of another size is replaced (its contents cannot match the
        configured geometry). A fresh region is fully allocated (``posix_fallocate``) so
        that running out of memory shows up here, not as SIGBUS in a worker's copy later.
        Created or attached, the region ends up with exactly ``mode`` and, when ``group`` is
        given, that group (a restart with other sharing settings re-applies them).
        """
        if path is not None:
            return cls._file(path, size, mode, group)
        try:
            shm = posix_ipc.SharedMemory(name)
            if shm.size == size:
                log.info("memory: re-attached host pool %s (%d bytes)", name, size)
                try:
                    _set_access(shm.fd, mode, group)
                except OSError as e:
                    os.close(shm.fd)
                    raise RegionError(f"cannot set the mode or group of {name}: {e.strerror or e}") from e
                return cls("shm", name, shm.fd, size, created=False)
            log.warning("memory: host pool %s has %d bytes, want %d: recreating it", name, shm.size, size)
            os.close(shm.fd)
            shm.unlink()
        except posix_ipc.ExistentialError:
            pass
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=0)
        except posix_ipc.Error as e:
            raise RegionError(f"cannot create shm segment {name}: {e}") from e
        try:
            _set_access(shm.fd, mode, group)  # the umask may have cleared bits; set exactly
        except OSError as e:
            os.close(shm.fd)
            shm.unlink()
            raise RegionError(f"cannot set the mode or group of {name}: {e.strerror or e}") from e
        try:
            os.ftruncate(shm.fd, size)
            os.posix_fallocate(shm.fd, 0, size)
        except OSError as e:
            os.close(shm.fd)
            shm.unlink()
            hint = " (raise /dev/shm's size or lower --host-pool-size)" if e.errno in (errno.ENOSPC, errno.ENOMEM) else ""
            raise RegionError(f"cannot allocate {size} bytes of shared memory for {name}: {e.strerror}{hint}") from e
        region = cls("shm", name, shm.fd, size, created=True)
        region.prefault()
        return region

    @classmethod
    def _file(cls, path: Path, size: int, mode: int, group: int | None = None) -> "HostRegion":
        created = not path.exists() or path.stat().st_size != size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
        try:
            _set_access(fd, mode, group)
        except OSError as e:
            os.close(fd)
            raise RegionError(f"cannot set the mode or group of {path}: {e.strerror or e}") from e
        try:
            if created:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                os.posix_fallocate(fd, 0, size)
        except OSError as e:
            os.close(fd)
            raise RegionError(f"cannot size host pool file {path} to {size} bytes: {e.strerror}") from e
        region = cls("file", str(path), fd, size, created=created)
        if created:
            region.prefault()
        return region

    @classmethod
    def attach(cls, kind: str, name: str, size: int) -> "HostRegion":
        """A worker's mapping of the sidecar's region (never creates)."""
        try:
            if kind == "shm":
                shm = posix_ipc.SharedMemory(name)
                fd, actual = shm.fd, shm.size
            elif kind == "file":
                fd = os.open(name, os.O_RDWR)
                actual = os.fstat(fd).st_size
            else:
                raise RegionError(f"unknown region kind {kind!r}")
        except (posix_ipc.Error, OSError) as e:
            raise RegionError(f"cannot attach host pool {name}: {e}") from e
        if actual < size:
            os.close(fd)
            raise RegionError(f"host pool {name} has {actual} bytes, the sidecar announced {size}")
        region = cls(kind, name, fd, size, created=False)
        # The pool's pages exist already (the sidecar allocated them); map them all now, once,
        # rather than taking a fault per 4 KiB page on each slot's first copy.
        region.prefault(touch=False)
        return region

    # -- use ---------------------------------------------------------------------------

    def linked(self) -> bool:
        """Whether the region's name still refers to this mapping. False once someone
        removed the segment (or file) from outside, or replaced it with another: this
        process's mapping stays valid, but no new process can attach it."""
        try:
            if self.kind == "shm":
                shm = posix_ipc.SharedMemory(self.name, read_only=True)
                try:
                    st = os.fstat(shm.fd)
                finally:
                    os.close(shm.fd)
            else:
                st = os.stat(self.name)
        except (posix_ipc.ExistentialError, FileNotFoundError):
            return False
        except (posix_ipc.Error, OSError):
            return True  # cannot tell (e.g. permissions changed): do not cry wolf
        return (st.st_dev, st.st_ino) == self._identity

    def prefault(self, touch: bool = True) -> None:
        """Populate page tables now so the first copy into a slot does not fault per page.

        ``touch``: on kernels without MADV_POPULATE_WRITE, fall back to rewriting one byte
        per page. Only the creator may do that (before anyone else maps the region): on a
        live pool that read-modify-write would race with other processes' copies."""
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        buf = (ctypes.c_char * self.size).from_buffer(self.mm)
        try:
            rc = libc.madvise(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(self.size),
                              _MADV_POPULATE_WRITE)
        finally:
            del buf  # drop the exported pointer so the mmap can be closed later
        if rc != 0 and touch:
            # Older kernels: touch one byte per page with a read-modify-write that keeps data.
            view = self.view
            for off in range(0, self.size, _PAGE):
                view[off] = view[off]

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise RegionError(f"region {self.name} is closed")
        return self._view

    def tensor(self) -> "torch.Tensor":
        """The whole region as a 1-D uint8 tensor (shares memory; keep the region alive)."""
        # torch.frombuffer keeps a reference to the object but not a buffer export, so on the
        # bare mmap close() would unmap under a live tensor (a segfault on its next use). The
        # tensor owns this memoryview, whose export makes close() refuse while the tensor lives.
        import torch  # only workers map tensors; the sidecar never pays torch's import

        return torch.frombuffer(memoryview(self.mm), dtype=torch.uint8, count=self.size)

    def close(self) -> None:
        """Unmap. Raises BufferError while tensors or views of the region still exist; the
        region's own view is released anyway and a later close() finishes the unmap."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if not self.mm.closed:
            self.mm.close()

    def unlink(self) -> None:
        """Remove the segment or file so its memory is returned once every mapping is gone."""
        try:
            if self.kind == "shm":
                posix_ipc.unlink_shared_memory(self.name)
            else:
                os.unlink(self.name)
        except (posix_ipc.ExistentialError, FileNotFoundError):
            pass


def _set_access(fd: int, mode: int, group: int | None) -> None:
    os.fchmod(fd, mode)
    if group is not None:
        os.fchown(fd, -1, group)
