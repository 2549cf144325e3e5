"""The live view on a terminal: its last frame comes before the summary, which ends the
output (seen through a pseudo-terminal, as a person at a terminal sees it)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def in_a_terminal(*args: str, timeout: float = 120) -> tuple[int, str]:
    """``python -m mfd ARGS`` with a 120x40 terminal as stdin, stdout and stderr; its exit
    status and everything it wrote, control sequences removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "mfd", *args], stdin=slave, stdout=slave,
                         stderr=slave, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while chunk := _read(master, deadline):
            out += chunk
    finally:
        os.close(master)
        if p.poll() is None and time.monotonic() >= deadline:
            p.kill()
        rc = p.wait(10)
    return rc, ANSI.sub("", out.decode(errors="replace"))


def _read(fd: int, deadline: float) -> bytes:
    """The next bytes, or b"" once every writer has closed the terminal (EIO) or at the
    deadline."""
    if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def test_the_demos_summary_comes_after_the_live_views_last_frame():
    rc, text = in_a_terminal("demo", "--ram", "32M", "--dirty-rate", "10M", "--no-kvm",
                             "--multifd-channels", "2")
    assert rc == 0, text
    last_frame = text.rfind("expected downtime")  # a row of the view's table
    summary = text.find("completed in")
    assert 0 <= last_frame < summary, text
    assert "│ completed │" in text[:summary], "the last frame shows the end"
    assert "│" not in text[summary:], "nothing of the view after the summary"
