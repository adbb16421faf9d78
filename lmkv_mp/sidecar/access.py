"""Who may reach the sidecar: file modes of the run dir, sockets and host pool, the
``--allow-group`` grant, and the tokens HELLO and admin ops must present.

By default everything the sidecar creates is the owner's alone: the run dir 0700, its
sockets and the shm segment 0600 (ARCHITECTURE §7). ``--allow-group GROUP`` shares them
with one service group, explicitly: the run dir 0750, sockets and segment 0660, all owned
by that group. The lock file and the disk tier's files stay 0600 (only the sidecar reads
them). Tokens are compared in constant time.
"""

from __future__ import annotations

import grp
import hmac
import os
import stat
from dataclasses import dataclass
from pathlib import Path


class AccessError(RuntimeError):
    """A sharing setting that cannot be applied; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Access:
    """Modes and group for what the sidecar creates."""

    dir_mode: int = 0o700
    file_mode: int = 0o600
    gid: int | None = None   # None: leave the group as created (owner-only modes make it moot)

    @property
    def umask(self) -> int:
        """The umask under which a bind creates a socket file of exactly ``file_mode``."""
        return 0o777 & ~self.file_mode


OWNER_ONLY = Access()


def access_for(group: str | None, *, uid: int | None = None, groups: list[int] | None = None) -> Access:
    """The :class:`Access` for ``--allow-group`` (None: owner only). Raises AccessError when
    the group does not exist, or the user (``uid``, default ours) is not root and not in it:
    a non-root process cannot give its files to a group it is not a member of."""
    if group is None:
        return OWNER_ONLY
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        name = grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        raise AccessError(f"--allow-group {group!r}: no such group; name an existing group "
                          "(getent group) or leave the flag out (owner only)") from None
    uid = os.getuid() if uid is None else uid
    groups = [*os.getgroups(), os.getgid()] if groups is None else groups
    if uid != 0 and gid not in groups:
        raise AccessError(f"--allow-group {name}: this user (uid {uid}) is not a member of group {name} "
                          f"(gid {gid}), so it cannot share files with it; add the user to the group "
                          "(usermod -aG) and log in again, or choose one of its groups")
    return Access(0o750, 0o660, gid)


def prepare_run_dir(run_dir: Path, access: Access = OWNER_ONLY) -> None:
    """Create the run dir with ``access.dir_mode``, or fix the mode (and group) of an
    existing one we own; a run dir owned by someone else is refused."""
    run_dir.mkdir(mode=access.dir_mode, parents=True, exist_ok=True)
    st = run_dir.stat()
    if st.st_uid != os.getuid():
        raise AccessError(f"run dir {run_dir} belongs to uid {st.st_uid}, not us: choose another --run-dir")
    if access.gid is not None and st.st_gid != access.gid:
        os.chown(run_dir, -1, access.gid)
    if stat.S_IMODE(st.st_mode) != access.dir_mode:
        os.chmod(run_dir, access.dir_mode)


def closed_ancestor(run_dir: Path, access: Access) -> Path | None:
    """With a group grant, the first directory above ``run_dir`` that the group cannot pass
    through (no group or other execute bit, and not group-owned with one), or None. The
    run dir's own mode does not help group members who cannot reach it: the default
    ``$XDG_RUNTIME_DIR`` is 0700, for one."""
    if access.gid is None:
        return None
    for parent in run_dir.absolute().parents:
        st = parent.stat()
        others = st.st_mode & stat.S_IXOTH
        group = st.st_gid == access.gid and st.st_mode & stat.S_IXGRP
        if not (others or group):
            return parent
    return None


def share_socket(endpoint: str, access: Access) -> None:
    """Give a bound ipc:// socket file to the group (its mode came from the bind's umask)."""
    if access.gid is not None and endpoint.startswith("ipc://"):
        os.chown(endpoint[len("ipc://"):], -1, access.gid)


def token_ok(presented: bytes | None, expected: bytes) -> bool:
    """Constant-time comparison (no timing hint of how much of a guess was right)."""
    return hmac.compare_digest(presented or b"", expected)
