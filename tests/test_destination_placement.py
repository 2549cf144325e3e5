"""The destination's main process places the main channel's pages: a page twice in one run
of records ends with its later copy, as QEMU's loader, on both of its paths.

Records are decoded from the stream's bytes (bare RAM records, as the preempt channel's
decoder reads them: the same events as the main channel's) and handed to the handler the
session gives them: ``IncomingRAM.pages`` before postcopy (through the mapping), and
``PostcopyRAM.place`` from LISTEN on, through a real userfaultfd: a /dev/shm file mapped
here and registered on a uffd of this process, as a guest registers its RAM. Only pages
placed are read back: a read of a missing page would wait for this very process to place
it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile

import numpy as np
import pytest

from mfd.main_thread.destination.faults import PostcopyRAM
from mfd.main_thread.destination.ram import IncomingRAM
from mfd.protocol import livestream, ram
from mfd.shm.pagehash import PageHashes, hash_rows, table_size
from mfd.shm.ramblock import SHM_DIR, RAMBlock
from mfd.shm.uffd import GuestRAM, UserfaultFd, open_uffd

PAGE = 4096
PAGES = 32
BLOCK = "mem"


def page_of(fill: int) -> bytes:
    return bytes([fill]) * PAGE


def _file(size: int) -> str:
    fd, path = tempfile.mkstemp(prefix="mfd-test-postcopy-", dir="/dev/shm")
    os.ftruncate(fd, size)
    os.close(fd)
    return path


@pytest.fixture
def guest():
    """(PostcopyRAM on a registered mapping, that mapping, its receivedmap, its hashes)."""
    block = RAMBlock(BLOCK, PAGES * PAGE, _file(PAGES * PAGE))
    table = RAMBlock("pagehash", table_size([block]), _file(table_size([block])))
    fd = os.open(block.path, os.O_RDWR)
    mm = mmap.mmap(fd, PAGES * PAGE, mmap.MAP_SHARED)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    uffd = UserfaultFd(open_uffd())
    uffd.register(base, PAGES * PAGE)
    received = [np.zeros(PAGES, dtype=np.uint8)]
    hashes = PageHashes(table, [block])
    postcopy = PostcopyRAM(GuestRAM(uffd, [base], [PAGES * PAGE]), [block], received, hashes,
                        guest_pid=0)
    try:
        yield postcopy, mm, received, hashes
    finally:
        postcopy.close()  # unregisters: the mapping may go
        hashes.close()
        mm.close()
        os.close(fd)
        for path in (block.path, table.path):
            os.unlink(path)


def events(records: bytes) -> list[livestream.Event]:
    decoder = livestream.StreamDecoder("preempt channel", preempt={BLOCK: PAGES * PAGE})
    out = decoder.feed(records)
    assert out and decoder.start == decoder.end, "records left undecoded"
    return out


def place(postcopy: PostcopyRAM, records: bytes) -> None:
    """``records`` decoded, each event to postcopy's handler."""
    for ev in events(records):
        postcopy.place(ev)


TWICE = (ram.encode_page(3 * PAGE, page_of(0x33), BLOCK)  # names the block
         + ram.encode_page(5 * PAGE, page_of(0xA1), None)
         + ram.encode_page(6 * PAGE, page_of(0x66), None)
         + ram.encode_page(5 * PAGE, page_of(0xB2), None))


def test_a_page_twice_in_one_run_of_the_main_channel_ends_with_its_later_copy():
    """Without multifd, before postcopy: through the mapping (``MappedPlacer``)."""
    dest = IncomingRAM(SHM_DIR, [(BLOCK, PAGES * PAGE)])
    try:
        dest.start_placing(verifying=True)
        assert [ev.pages.tolist() for ev in events(TWICE)] == [[3], [5, 6, 5]]  # one run
        for ev in events(TWICE):
            dest.place(ev)
        assert bytes(dest.mapped[0].view[5 * PAGE:6 * PAGE]) == page_of(0xB2)
        assert np.flatnonzero(dest.received[0]).tolist() == [3, 5, 6]
        assert dest.hashes is not None
        assert int(dest.hashes.table[0][5]) == int(
            hash_rows(np.frombuffer(page_of(0xB2), np.uint64).reshape(1, -1))[0])
    finally:
        dest.close()


def test_a_page_twice_in_one_postcopy_run_ends_with_its_later_copy(guest):
    """From LISTEN on: through the guest's uffd (``UffdPlacer``), hashed as placed."""
    postcopy, mm, received, hashes = guest
    place(postcopy, TWICE)
    assert mm[5 * PAGE:6 * PAGE] == page_of(0xB2)
    assert mm[6 * PAGE:7 * PAGE] == page_of(0x66)
    assert np.flatnonzero(received[0]).tolist() == [3, 5, 6]
    want = hash_rows(np.frombuffer(page_of(0xB2) + page_of(0x66), np.uint64).reshape(2, -1))
    assert hashes.table[0][[5, 6]].tolist() == want.tolist()


def test_a_page_the_guest_has_is_left_alone(guest):
    """A later run never replaces a placed page (the guest may have written it since),
    nor does a zero record; a zero record places a page not there yet."""
    postcopy, mm, received, _ = guest
    place(postcopy, ram.encode_page(5 * PAGE, page_of(0xB2), BLOCK))
    place(postcopy, ram.encode_page(5 * PAGE, page_of(0xC3), BLOCK)
          + ram.encode_zero_page(5 * PAGE, None) + ram.encode_zero_page(7 * PAGE, None))
    assert mm[5 * PAGE:6 * PAGE] == page_of(0xB2)
    assert mm[7 * PAGE:8 * PAGE] == bytes(PAGE)
    assert np.flatnonzero(received[0]).tolist() == [5, 7]


def test_a_page_asked_for_is_resolved_once_placed(guest):
    """A fault's request is answered by the page arriving: its latency is counted once,
    however many copies of it the run had."""
    postcopy, _, _, _ = guest
    assert postcopy.asked.ask(0, 9, thread=7)
    assert postcopy.asked.ask(0, 9, thread=7) == b""  # asked once
    place(postcopy, ram.encode_page(8 * PAGE, page_of(1), BLOCK)
          + ram.encode_page(9 * PAGE, page_of(1), None)
          + ram.encode_page(9 * PAGE, page_of(2), None))
    figures = postcopy.asked.figures()
    assert figures["postcopy-requests"] == 1 and sum(figures["postcopy-latency-dist"]) == 1
    assert len(figures["postcopy-vcpu-latency"]) == 1
    assert postcopy.again() == b""  # here: nothing to ask for again
