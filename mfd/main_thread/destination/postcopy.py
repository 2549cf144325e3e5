"""The destination's half of postcopy: the guest runs before its RAM has all arrived.

Mirrors ``migration/postcopy-ram.c`` and ``ram.c``'s postcopy load, with mfd's processes::

    ADVISE     userfaultfd must work here (else fail now, before the guest is stopped)
    DISCARD    the pages still dirty at the source: holes again (MADV_REMOVE punches the
               shared file), not received
    LISTEN     the guest process opens a uffd, registers its mappings of every block for
               missing pages and passes the fd here (SCM_RIGHTS, a unix socket)
    RUN        the guest runs; a page it touches that is not here blocks it in the kernel
    faults     read here from the uffd: a page received (or received as zero, still a hole)
               is mapped (ZEROPAGE, which only wakes where a page is present); else asked
               for once on the return path (REQ_PAGES_ID / REQ_PAGES)
    pages      placed atomically in the guest's address space (UFFDIO_COPY of each run of
               consecutive pages, UFFDIO_ZEROPAGE), never written through a mapping here:
               a write seen half done, or a read that allocates a zero page, would corrupt
               the guest's RAM (QEMU pauses with EEXIST then); the receivedmap is set
               only once a page is placed
    end        every page is here: the guest closes its uffd

Hashes for verification are taken from the bytes placed, not read back from RAM.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import tempfile
import time

import numpy as np
import orjson

from mfd.errors import MfdError
from mfd.protocol import postcopy
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import page_runs
from mfd.shm import control, pagehash
from mfd.shm.ramblock import MappedBlock, RAMBlock
from mfd.shm.receivedmap import ReceivedMap
from mfd.shm.uffd import GuestRAM, UserfaultFd, open_uffd

LISTEN_TIMEOUT = 10.0
LATENCY_BUCKETS = 24  # QEMU's postcopy-latency-dist: 1 us .. 8 s


def check_userfaultfd() -> None:
    """ADVISE: the destination fails early when it cannot do postcopy here."""
    os.close(open_uffd())


class PostcopyPlacer:
    """The guest's uffd and what postcopy placed and asked for."""

    def __init__(self, blocks: list[RAMBlock], receivedmap: ReceivedMap,
                 hashes: pagehash.PageHashes | None, guest: control.GuestClient) -> None:
        self.blocks = blocks
        self.receivedmap = receivedmap
        self.hashes = hashes
        self.requested = [np.zeros(b.used_length // TARGET_PAGE_SIZE, dtype=bool)
                          for b in blocks]
        self.last_requested: str | None = None
        self.requests = 0  # query-migrate's postcopy-requests
        # (block, page) asked for -> when and by which thread it faulted (QEMU 10.1's
        # postcopy latency: from the fault to the page placed)
        self.waiting: dict[tuple[int, int], tuple[float, int]] = {}
        self.latencies: list[tuple[float, int]] = []  # (seconds, faulting thread) each
        self.guest_pid = int(guest.execute("describe")["pid"])  # to end it if it hangs
        self.ram = receive_uffd(guest, blocks)

    def fileno(self) -> int:
        return self.ram.uffd.fileno()

    def pages(self, block: int, pages: np.ndarray, data: np.ndarray) -> None:
        """PAGE records: each run of consecutive pages not here yet, gathered into one
        buffer (QEMU copies each page into its temp page too), placed by one UFFDIO_COPY."""
        received = self.receivedmap.received[block]
        todo = np.flatnonzero(received[pages] == 0)
        if not len(todo):
            return
        todo = todo[np.unique(pages[todo], return_index=True)[1]]  # sorted, each page once
        pages, rows = pages[todo], np.ascontiguousarray(data[todo])
        src = rows.ctypes.data
        at = 0
        for start, end in page_runs(pages).tolist():
            self.ram.uffd.copy(self.ram.address(block, start), src + at * TARGET_PAGE_SIZE,
                           (end - start) * TARGET_PAGE_SIZE)
            at += end - start
        received[pages] = 1
        self._resolved(block, pages)
        if self.hashes is not None:
            self.hashes.table[block][pages] = pagehash.hash_rows(rows)

    def zero(self, block: int, pages: np.ndarray) -> None:
        received = self.receivedmap.received[block]
        pages = np.unique(pages[received[pages] == 0])
        for start, end in page_runs(pages).tolist():
            self.ram.uffd.zeropage(self.ram.address(block, start),
                               (end - start) * TARGET_PAGE_SIZE)
        received[pages] = 1
        self._resolved(block, pages)
        if self.hashes is not None:
            self.hashes.table[block][pages] = 0

    def faults(self) -> bytes:
        """The guest's pending faults: the page requests they make (return path bytes)."""
        out = []
        for fault in self.ram.uffd.faults():
            block, page = self.ram.locate(fault.address)
            if self.receivedmap.received[block][page]:
                # here already (woken), or received as zero and still a hole (mapped now)
                self.ram.uffd.zeropage(self.ram.address(block, page), TARGET_PAGE_SIZE)
            elif not self.requested[block][page]:
                self.requested[block][page] = True
                self.waiting[(block, page)] = (time.monotonic(), fault.thread)
                out.append(self._request(block, page))
                self.requests += 1
        return b"".join(out)

    def requests_again(self) -> bytes:
        """After recovery: every page asked for and not here yet, asked for again (the
        source's new connection knows nothing of the old requests)."""
        self.last_requested = None
        return b"".join(
            self._request(block, page) for block, requested in enumerate(self.requested)
            for page in np.flatnonzero(
                requested & (self.receivedmap.received[block] == 0)).tolist())

    def _request(self, block: int, page: int) -> bytes:
        """REQ_PAGES_ID when the block differs from the last request's, else REQ_PAGES."""
        idstr = self.blocks[block].idstr
        named = idstr if idstr != self.last_requested else None
        self.last_requested = idstr
        return postcopy.encode_request(page * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE, named)

    def _resolved(self, block: int, pages: np.ndarray) -> None:
        """Pages placed: the latency of those a thread was waiting for (few: a loop)."""
        asked = pages[self.requested[block][pages]]
        if not len(asked):
            return
        now = time.monotonic()
        for page in asked.tolist():
            when = self.waiting.pop((block, page), None)
            if when is not None:
                self.latencies.append((now - when[0], when[1]))
        self.requested[block][asked] = False

    def latency(self) -> dict[str, object]:
        """QEMU 10.1's figures (``query-migrate``): the average from fault to placement of
        the pages asked for (ns), per faulting thread (the vCPUs), the log2 histogram of
        [2^n, 2^(n+1)) us buckets."""
        dist = [0] * LATENCY_BUCKETS
        threads: dict[int, list[float]] = {}
        for seconds, thread in self.latencies:
            dist[min(max(int(seconds * 1e6).bit_length() - 1, 0), LATENCY_BUCKETS - 1)] += 1
            threads.setdefault(thread, []).append(seconds)
        total = sum(s for s, _ in self.latencies)
        return {"postcopy-latency": round(total / len(self.latencies) * 1e9)
                if self.latencies else 0,
                "postcopy-vcpu-latency": [round(sum(xs) / len(xs) * 1e9)
                                          for xs in threads.values()],
                "postcopy-latency-dist": dist}

    def close(self) -> None:
        self.ram.close()


def discard(mapped: MappedBlock, receivedmap: np.ndarray, hashes: np.ndarray | None,
            runs: tuple[tuple[int, int], ...]) -> None:
    """POSTCOPY_RAM_DISCARD (before LISTEN): the pages are holes again and not received."""
    for start, length in runs:
        mapped.mm.madvise(mmap.MADV_REMOVE, start, length)
        pages = slice(start // TARGET_PAGE_SIZE, (start + length) // TARGET_PAGE_SIZE)
        receivedmap[pages] = 0
        if hashes is not None:
            hashes[pages] = 0


def receive_uffd(guest: control.GuestClient, blocks: list) -> GuestRAM:
    """LISTEN: ask the guest for its uffd, over a unix socket made for it; ``blocks``
    (anything with ``used_length``) are its RAM blocks, in order."""
    path = os.path.join(tempfile.mkdtemp(prefix="mfd-uffd-", dir=control.run_dir()), "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(LISTEN_TIMEOUT)
        guest.execute("postcopy-listen", socket=path)
        conn, _ = listener.accept()
        with conn:
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 1)
    except (OSError, TimeoutError) as e:
        raise MfdError(f"postcopy: the guest did not hand over its userfaultfd ({e})") \
            from None
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise MfdError("postcopy: the guest sent no userfaultfd")
    bases = [int(b) for b in orjson.loads(msg)]
    if len(bases) != len(blocks):
        os.close(fds[0])
        raise MfdError(f"postcopy: the guest mapped {len(bases)} blocks, expected "
                       f"{len(blocks)}")
    return GuestRAM(UserfaultFd(fds[0]), bases, [b.used_length for b in blocks])
