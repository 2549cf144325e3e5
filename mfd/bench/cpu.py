"""CPU time spent by each end of a migration (user + system, all threads, reaped children).

* a running process: ``/proc/PID/stat`` utime + stime (every thread, the exited ones
  included) + cutime + cstime (its children it has reaped), in clock ticks (10 ms);
* a child of ours that exits: :func:`wait_cpu` reaps it with ``wait4``, whose rusage is
  the same sum (the process and the children it reaped), in microseconds;
* this process (mfd's source, :func:`mfd.api.migrate` here): :class:`SelfCpu`, the
  ``getrusage`` RUSAGE_SELF delta plus the RUSAGE_CHILDREN delta (the channel processes it
  forked and reaped while it ran).
"""

from __future__ import annotations

import os
import resource
import select
import subprocess
from typing import Any

GiB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int | None) -> float | None:
    """utime + stime + cutime + cstime of ``pid``, seconds; None if it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": field 3 on
    return sum(int(x) for x in fields[11:15]) / TICK  # fields 14..17


def wait_cpu(proc: subprocess.Popen[Any], timeout: float) -> float | None:
    """Wait (at most ``timeout`` s) for ``proc`` to exit and reap it with ``wait4``; return
    its CPU seconds with its reaped children (None if someone else reaped it first). Raises
    ``subprocess.TimeoutExpired`` when it is still running."""
    if proc.returncode is not None:
        return None
    fd = os.pidfd_open(proc.pid)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(fd)
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    except ChildProcessError:  # Popen.poll() got there first
        proc.wait()
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ru.ru_utime + ru.ru_stime


def _self_and_children() -> tuple[float, float]:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


class SelfCpu:
    """CPU seconds of this process and of the children it reaped, while in the block."""

    def __init__(self) -> None:
        self.own = self.children = 0.0

    def __enter__(self) -> SelfCpu:
        self._start = _self_and_children()
        return self

    def __exit__(self, *exc: object) -> None:
        own, children = _self_and_children()
        self.own = own - self._start[0]
        self.children = children - self._start[1]

    @property
    def total(self) -> float:
        return self.own + self.children


def delta(before: float | None, after: float | None) -> float | None:
    return after - before if before is not None and after is not None else None


def per_gib(src: float | None, dst: float | None, size: int) -> dict[str, Any]:
    """What a run records: each end's CPU seconds and CPU seconds per GiB of RAM."""
    def scale(x: float | None) -> float | None:
        return x / (size / GiB) if x is not None else None
    return {"src_cpu_s": src, "dst_cpu_s": dst, "src_cpu_s_per_gib": scale(src),
            "dst_cpu_s_per_gib": scale(dst)}
