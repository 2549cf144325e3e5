"""Linux calls the standard library does not wrap."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
IOV_MAX = 1024  # Linux's UIO_MAXIOV: the most buffers one sendmsg/readv/pwritev takes
libc = ctypes.CDLL(None, use_errno=True)  # shared: mfd.shm.kvm adds ioctl


def set_parent_death_signal(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG): get ``sig`` when the parent dies (0: never)."""
    libc.prctl(PR_SET_PDEATHSIG, int(sig))


def set_process_name(name: str) -> None:
    """prctl(PR_SET_NAME): what ps and top show for this process (at most 15 bytes)."""
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``docker stop``, a closed terminal), raised like Ctrl-C so that
    every ``finally`` runs: the guest resumes, the shared memory is unlinked."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def end_like_ctrl_c() -> None:
    """Make SIGTERM and SIGHUP raise :class:`Terminated` in the main thread."""
    def on_term(signum: int, frame: object) -> None:
        raise Terminated(signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_term)


def default_signals() -> None:
    """A forked channel dies of SIGTERM as usual: the pool's way to stop a straggler."""
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_FOLLOW = 0x400


def link_fd(fd: int, path: str) -> None:
    """Give the open file ``fd`` (an O_TMPFILE file) the name ``path``: linkat(fd, "",
    AT_EMPTY_PATH), which root may do (and, since Linux 6.10, whoever opened the file); else
    through /proc/self/fd, which some kernels refuse with EXDEV. Raises OSError."""
    if libc.linkat(fd, b"", AT_FDCWD, os.fsencode(path), AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.ENOENT, errno.EPERM, errno.EINVAL):
        raise OSError(err, os.strerror(err), path)
    os.link(f"/proc/self/fd/{fd}", path, follow_symlinks=True)


def python_m(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """The argv and environment for mfd starting a process of its own, ``python -m
    MODULE ARGS`` (a guest daemon, an incoming migration, a TLS relay), that runs this very
    mfd. ``-P`` (Python 3.11's safe path) keeps the working directory off the child's
    path, so a folder named ``mfd`` there (a clone of mfd, say) cannot shadow it; the
    directory this mfd came from goes first on PYTHONPATH, unless it is a site-packages
    directory (the child finds it there anyway)."""
    import site

    import mfd

    env = os.environ.copy()
    root = os.path.dirname(os.path.dirname(os.path.abspath(mfd.__file__)))
    sites = {os.path.realpath(d) for d in [*site.getsitepackages(), site.getusersitepackages()]}
    path = env.get("PYTHONPATH", "")
    if os.path.realpath(root) not in sites and path.split(os.pathsep)[0] != root:
        env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    return [sys.executable, "-P", "-m", module, *args], env
