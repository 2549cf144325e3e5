"""The one placer: every received page goes into destination RAM through here.

Two implementations of one interface (DESIGN.md invariant 7)::

    MappedPlacer   through the block's file (and its mapping): live receive channels,
                   the main channel without multifd, stream files
    UffdPlacer     through a userfaultfd, atomically into a guest that already runs:
                   postcopy, lazy restore

    pages(block, pages, rows)    whole pages; a page twice in one run ends with its later
                                 copy, as QEMU's loader (``last_copies``)
    zero(block, pages)           zero pages, QEMU's rule: only a page received before is
                                 cleared (destination RAM starts zeroed)
    placed(block, pages, rows)   the hook every path ends in: the receivedmap, and the
                                 page hashes of what was placed (verification)

A path that puts bytes into RAM itself, faster than through ``pages`` (socket -> RAM by
splice or recvmsg_into, a decompressed run written to the block's file at once), ends in
``placed`` all the same; it keeps the rule by writing in payload order, later over earlier.

Both keep the receivedmap (one byte per page, ``mfd.shm.receivedmap``) and, when the
source is mfd and verifies, this end's page hash table (``mfd.shm.pagehash``): a mapped
placer hashes what RAM holds once the pages are placed (read back: a page placed at the
wrong offset, a corrupted write or two channels racing on one page show, not only what
arrived), a uffd placer the bytes it placed (it has no mapping of the guest's RAM).
Everything is per call, a packet or a run of records at a time: numpy, no Python per page.
"""

from __future__ import annotations

import time

import numpy as np

from mfd.protocol import xbzrle
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import page_runs
from mfd.protocol.ramruns import Pages, RunEvent, ZeroPages
from mfd.shm.pagehash import PageHashes, hash_pages, hash_rows
from mfd.shm.ramblock import WORDS_PER_PAGE, MappedBlock, read_at, write_at
from mfd.shm.uffd import GuestRAM
from mfd.sysutil import IOV_MAX

# pages placed, read back and hashed at a time (and moved and hashed at a time by both ends of
# a 4 MiB packet): 256 KiB, still in the core's cache when they are hashed
HOT_PAGES = 64


def last_copies(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The placement rule: each page once, with its last copy (QEMU's loader writes records
    in order, so the later one stays). Returns the pages in increasing order and, for each,
    the index of its copy in the run; None when the run is in increasing order already, as
    every sender but QEMU's multifd (which swaps zero pages out of a packet) and a hostile
    one sends it: one comparison then."""
    if _increasing(pages):
        return pages, None
    order = np.argsort(pages, kind="stable")  # equal pages keep their order: later last
    pages = pages[order]
    last = np.empty(len(pages), dtype=bool)
    np.not_equal(pages[1:], pages[:-1], out=last[:-1])
    last[-1] = True
    if not last.all():
        pages, order = pages[last], order[last]
    return pages, order


def _increasing(pages: np.ndarray) -> bool:
    return len(pages) < 2 or bool((pages[1:] > pages[:-1]).all())


class Placer:
    """What both implementations share: the rule, the receivedmap and the hook."""

    def __init__(self, received: list[np.ndarray], hashes: PageHashes | None) -> None:
        """``received``: each block's receivedmap (a byte per page); ``hashes``: this end's
        page hash table when verifying, else None."""
        self.received = received
        self.hashes = hashes
        self.hashing = 0.0  # seconds spent hashing pages (thread time), see take_hashing

    def take_hashing(self) -> float:
        """Seconds spent hashing since the last call."""
        seconds, self.hashing = self.hashing, 0.0
        return seconds

    def pages(self, block: int, pages: np.ndarray, rows: np.ndarray) -> None:
        """Whole pages: ``rows[i]`` (4096 bytes, any dtype) is page ``pages[i]``."""
        pages, order = last_copies(pages)
        rows = rows.view(np.uint8).reshape(len(rows), TARGET_PAGE_SIZE)
        for at in range(0, len(pages), HOT_PAGES):  # hashed while in the cache
            part = slice(at, at + HOT_PAGES)
            done, placed = self._write(block, pages[part], rows[part] if order is None
                                       else rows, None if order is None else order[part])
            self.placed(block, done, placed)

    def zero(self, block: int, pages: np.ndarray) -> None:
        raise NotImplementedError

    def xbzrle(self, block: int, pages: np.ndarray, data: np.ndarray, starts: np.ndarray,
               lengths: np.ndarray, where: str) -> None:
        raise NotImplementedError(f"{where}: XBZRLE pages cannot be placed here")

    def run(self, block: int, ev: RunEvent, where: str) -> None:
        """One run of a stream's RAM records (``mfd.protocol.ramruns``), by its kind;
        ``where`` names the stream in an XBZRLE delta's refusal."""
        if isinstance(ev, Pages):
            self.pages(block, ev.pages, ev.data)
        elif isinstance(ev, ZeroPages):
            self.zero(block, ev.pages)
        else:
            self.xbzrle(block, ev.pages, ev.data, ev.starts, ev.lengths,
                        f"{where}block {ev.idstr!r}: XBZRLE page")

    def placed(self, block: int, pages: np.ndarray, rows: np.ndarray | None) -> None:
        """``pages`` are in RAM now: received, and hashed. ``rows``: the bytes placed, in
        the order of ``pages``, or None when they went straight into RAM (a page may then
        be named twice: RAM holds its later copy)."""
        self.received[block][pages] = 1
        if self.hashes is not None and len(pages):
            started = time.thread_time()
            self._hash(block, pages, rows)
            self.hashing += time.thread_time() - started

    def _write(self, block: int, pages: np.ndarray, rows: np.ndarray,
               order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Put page ``pages[i]`` (increasing) in place from ``rows[order[i]]`` (``rows[i]``
        without an order); returns the pages placed and their bytes (None: read them back)."""
        raise NotImplementedError

    def _hash(self, block: int, pages: np.ndarray, rows: np.ndarray | None) -> None:
        """The page hashes of ``pages``, just placed, into the table."""
        raise NotImplementedError


class MappedPlacer(Placer):
    """Into RAM this process maps writable (``blocks``). Whole pages go in through each
    block's file, a ``pwrite`` per run of consecutive pages, as a spliced run does: the
    page cache takes the bytes without the fault, and for a fresh page without the zeroing,
    that a store through the mapping costs (0.49 against 0.64 CPU-s per 512 MiB of QEMU's
    packets into fresh tmpfs here; 0.40 against 0.42 into RAM allocated ahead). Hashes are
    read back the same way, into a buffer, rather than by mapping each page in; in a block
    ``allocated`` ahead (``--prealloc``), whose pages its writers map in first (no
    allocation: 0.43 us a page), through the mapping (0.19 us a page, against 0.74)."""

    def __init__(self, blocks: list[MappedBlock], received: list[np.ndarray],
                 hashes: PageHashes | None, allocated: list[bool] | None = None) -> None:
        super().__init__(received, hashes)
        self.blocks = blocks
        self.fds = [b.fd for b in blocks]
        self.words = [b.words for b in blocks]  # zero and XBZRLE pages: in place
        self.allocated = allocated or [False] * len(blocks)
        self.readback = np.empty((HOT_PAGES, WORDS_PER_PAGE), dtype=np.uint64)

    def _write(self, block: int, pages: np.ndarray, rows: np.ndarray,
               order: np.ndarray | None) -> tuple[np.ndarray, None]:
        """A ``pwritev`` per run of consecutive pages, straight from ``rows``: a slice of
        it when the run's rows follow each other there, else one buffer per row (QEMU's
        swapped order; a stream's records, each after its header), never a gather."""
        if self.hashes is not None and self.allocated[block]:
            self.map_in(block, pages)  # hashed through the mapping next (see _hash)
        contiguous = order is None and rows.flags.c_contiguous
        each = None if contiguous else list(rows)
        index = None if order is None else order.tolist()
        fd, at = self.fds[block], 0
        for start, end in page_runs(pages).tolist():
            for first in range(start, end, IOV_MAX):  # a pwritev takes IOV_MAX buffers
                n = min(end - first, IOV_MAX)
                if each is None:
                    buffers = [rows[at : at + n]]
                elif index is None:
                    buffers = each[at : at + n]
                else:  # no Python per page: map over a C method
                    buffers = list(map(each.__getitem__, index[at : at + n]))
                write_at(fd, buffers, first * TARGET_PAGE_SIZE, n * TARGET_PAGE_SIZE)
                at += n
        return pages, None

    def map_in(self, block: int, pages: np.ndarray) -> None:
        """Map ``pages`` (increasing) of a block allocated ahead in, a call per run rather
        than a fault per page. Whoever writes a page of such a block maps it in first (this
        placer when it will hash it, a channel before it reads into the mapping), so that
        :meth:`_hash` finds it mapped."""
        for start, end in page_runs(pages).tolist():
            self.blocks[block].populate(start, end)

    def zero(self, block: int, pages: np.ndarray) -> None:
        """QEMU's rule: memset only a page received before; one never received is still
        zero and stays untouched (unallocated), hashing to 0 without a read."""
        received = self.received[block]
        again = pages[received[pages] != 0]
        if len(again):
            self.words[block][again] = 0
        received[pages] = 1
        if self.hashes is not None:
            self.hashes.table[block][pages] = 0  # hash of a zero page (pagehash)
            if len(again):  # read back, as every page placed here
                self.placed(block, again, None)

    def xbzrle(self, block: int, pages: np.ndarray, data: np.ndarray, starts: np.ndarray,
               lengths: np.ndarray, where: str) -> None:
        """XBZRLE deltas applied onto the pages as they are (``xbzrle_decode_buffer``),
        in order: a page twice in one run gets both deltas, the later one last."""
        xbzrle.decode_into(self.words[block].view(np.uint8), pages, data, starts, lengths,
                           where)
        self.placed(block, np.unique(pages), None)

    def _hash(self, block: int, pages: np.ndarray, rows: np.ndarray | None) -> None:
        """Read back from RAM, whatever ``rows`` held: what a page placed at the wrong
        offset, a damaged write or two channels racing on a page left there shows. Read
        HOT_PAGES at a time into a buffer that stays in the cache while it is hashed
        (0.74 us a page here, against 1.14 reading a 4 MiB packet at once)."""
        if not _increasing(pages):  # a page named twice (raw pages, in payload order)
            pages = np.unique(pages)
        table = self.hashes.table[block]
        if self.allocated[block]:  # mapped in by its writer (map_in)
            table[pages] = hash_pages(self.words[block], pages)
            return
        fd, buffer = self.fds[block], self.readback
        for start, end in page_runs(pages).tolist():
            for at in range(start, end, HOT_PAGES):
                out = buffer[: min(HOT_PAGES, end - at)]
                read_at(fd, out, at * TARGET_PAGE_SIZE)
                table[at : at + len(out)] = hash_rows(out)


class UffdPlacer(Placer):
    """Into a running guest's RAM, atomically (UFFDIO_COPY, UFFDIO_ZEROPAGE): a page is
    filled before it is mapped, never written through a mapping the guest could see half
    done. A page the guest already has (received in an earlier run, or placed by its own
    fault) is left alone: the guest may have written it since."""

    def __init__(self, ram: GuestRAM, received: list[np.ndarray],
                 hashes: PageHashes | None) -> None:
        super().__init__(received, hashes)
        self.ram = ram

    def _write(self, block: int, pages: np.ndarray, rows: np.ndarray,
               order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Each run of consecutive pages not here yet gathered into one buffer (QEMU copies
        each page into its temp page too), placed by one UFFDIO_COPY."""
        if order is not None:
            rows = rows[order]
        todo = self.received[block][pages] == 0
        if not todo.all():
            pages, rows = pages[todo], rows[todo]
        rows = np.ascontiguousarray(rows)
        src, at = rows.ctypes.data, 0
        for start, end in page_runs(pages).tolist():
            self.ram.uffd.copy(self.ram.address(block, start), src + at * TARGET_PAGE_SIZE,
                               (end - start) * TARGET_PAGE_SIZE)
            at += end - start
        return pages, rows

    def zero(self, block: int, pages: np.ndarray) -> None:
        """Zero pages mapped (UFFDIO_ZEROPAGE), unless here already."""
        pages = np.unique(pages[self.received[block][pages] == 0])
        for start, end in page_runs(pages).tolist():
            self.ram.uffd.zeropage(self.ram.address(block, start),
                                   (end - start) * TARGET_PAGE_SIZE)
        self.received[block][pages] = 1
        if self.hashes is not None:
            self.hashes.table[block][pages] = 0

    def _hash(self, block: int, pages: np.ndarray, rows: np.ndarray | None) -> None:
        assert rows is not None, "a uffd placer always has the bytes it placed"
        self.hashes.table[block][pages] = hash_rows(rows)
