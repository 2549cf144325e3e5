"""userfaultfd as postcopy uses it, across processes, on a /dev/shm mapping (no mocks).

The owner maps the RAM file, opens the uffd, registers its mapping and passes the fd to this
process, which serves the owner's faults with UFFDIO_COPY and UFFDIO_ZEROPAGE, as the
incoming migration does for its guest.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import orjson
import pytest

from mfd.errors import MfdError
from mfd.shm.uffd import UserfaultFd, open_uffd

PAGE = 4096
PAGES = 64

OWNER = textwrap.dedent("""
    import ctypes, mmap, os, socket, sys
    from mfd.shm.uffd import UserfaultFd, open_uffd
    sock = socket.socket(fileno=int(sys.argv[1]))
    fd = os.open(sys.argv[2], os.O_RDWR)
    mm = mmap.mmap(fd, {size}, mmap.MAP_SHARED)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    uffd = open_uffd()
    UserfaultFd(uffd).register(base, {size})
    socket.send_fds(sock, [base.to_bytes(8, "little")], [uffd])
    sock.recv(1)  # the server is ready
    out = ctypes.create_string_buffer({page})
    sums = []
    for p in [int(x) for x in sys.argv[3].split(",")]:
        ctypes.memmove(out, base + p * {page}, {page})  # blocks until the page is placed
        sums.append(sum(out.raw))
    sock.sendall(repr(sums).encode() + b"\\n")
    sock.recv(1)  # keeps the uffd open until the server is done
""").format(size=PAGES * PAGE, page=PAGE)


def page_of(p: int) -> bytes:
    return bytes([p % 251 + 1]) * PAGE


@pytest.fixture
def ram():
    fd, path = tempfile.mkstemp(prefix="mfd-uffd-test-", dir="/dev/shm")
    os.ftruncate(fd, PAGES * PAGE)
    os.close(fd)
    yield path
    os.unlink(path)


def test_faults_of_another_process_are_served_here(ram):
    """The owner reads pages it does not have: each read blocks in the kernel until this
    process places the page (data or zero); a page placed before its read does not fault;
    a second placement of a present page is refused, not written."""
    touch = [3, 10, 11, 40, 3, 63, 5]
    pre = 5  # placed before the owner reads it: no fault
    ours, theirs = socket.socketpair()
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(theirs.fileno()), ram,
                              ",".join(map(str, touch))], pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        msg, fds, _, _ = socket.recv_fds(ours, 8, 1)
        base = int.from_bytes(msg, "little")
        uffd = UserfaultFd(fds[0])
        src = np.frombuffer(b"".join(page_of(p) for p in range(PAGES)), dtype=np.uint8)
        addr = src.ctypes.data
        assert uffd.copy(base + pre * PAGE, addr + pre * PAGE, PAGE)
        ours.sendall(b"g")
        faulted: list[int] = []
        ours.settimeout(0.01)
        reply = b""
        for _ in range(3000):  # bounded: 30 s
            for f in uffd.faults():
                p = (f.address - base) // PAGE
                faulted.append(p)
                if p % 2:
                    assert uffd.zeropage(base + p * PAGE, PAGE)
                else:
                    assert uffd.copy(base + p * PAGE, addr + p * PAGE, PAGE)
            try:
                reply += ours.recv(4096)
            except TimeoutError:
                continue
            if reply.endswith(b"\n"):
                break
        sums = orjson.loads(reply)
        want = [0 if p % 2 and p != pre else sum(page_of(p)) for p in touch]
        assert sums == want
        assert sorted(faulted) == sorted({p for p in touch if p != pre})
        # present: refused (and woken), the page keeps what it has
        assert not uffd.copy(base + 10 * PAGE, addr + 11 * PAGE, PAGE)
        assert not uffd.zeropage(base + 10 * PAGE, PAGE)
        with open(ram, "rb") as f:
            assert os.pread(f.fileno(), PAGE, 10 * PAGE) == page_of(10)
        ours.sendall(b"q")
        assert owner.wait(10) == 0
        uffd.close()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        ours.close()


def test_a_registration_outside_any_mapping_is_one_error():
    uffd = UserfaultFd(open_uffd())
    try:
        with pytest.raises(MfdError, match="cannot register"):
            uffd.register(0x1000, PAGE)
    finally:
        uffd.close()


def test_a_run_with_a_page_there_already_still_places_the_rest(ram):
    """A multi-page COPY stops at a present page (EEXIST when it is the first, EAGAIN after
    some): the rest of the run must still be placed, or those pages would stay holes (a lazy
    restore's channel racing a fault lost whole runs this way before it was handled)."""
    import ctypes
    import mmap

    fd = os.open(ram, os.O_RDWR)
    mm = mmap.mmap(fd, PAGES * PAGE, mmap.MAP_SHARED)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    uffd = UserfaultFd(open_uffd())
    try:
        uffd.register(base, PAGES * PAGE)
        src = np.frombuffer(b"".join(page_of(p) for p in range(PAGES)), dtype=np.uint8)
        addr = src.ctypes.data
        assert uffd.copy(base + 10 * PAGE, addr + 10 * PAGE, PAGE)  # a fault's page
        assert uffd.copy(base + 20 * PAGE, addr + 20 * PAGE, PAGE)
        assert not uffd.copy(base + 10 * PAGE, addr + 10 * PAGE, 6 * PAGE)  # 10 is there
        assert not uffd.copy(base + 18 * PAGE, addr + 18 * PAGE, 4 * PAGE)  # 20 is there
        assert uffd.zeropage(base + 30 * PAGE, 2 * PAGE)  # nothing there yet
        for p in [*range(10, 16), *range(18, 22)]:
            assert os.pread(fd, PAGE, p * PAGE) == page_of(p), p
    finally:
        uffd.close()
        del src
        mm.close()
        os.close(fd)
