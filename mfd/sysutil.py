"""Linux calls the standard library does not wrap."""

from __future__ import annotations

import ctypes
import errno
import os

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def set_parent_death_signal(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG): get ``sig`` when the parent dies (0: never)."""
    _libc.prctl(PR_SET_PDEATHSIG, int(sig))


AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_FOLLOW = 0x400


def link_fd(fd: int, path: str) -> None:
    """Give the open file ``fd`` (an O_TMPFILE file) the name ``path``: linkat(fd, "",
    AT_EMPTY_PATH), which root may do (and, since Linux 6.10, whoever opened the file); else
    through /proc/self/fd, which some kernels refuse with EXDEV. Raises OSError."""
    if _libc.linkat(fd, b"", AT_FDCWD, os.fsencode(path), AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.ENOENT, errno.EPERM, errno.EINVAL):
        raise OSError(err, os.strerror(err), path)
    os.link(f"/proc/self/fd/{fd}", path, follow_symlinks=True)
