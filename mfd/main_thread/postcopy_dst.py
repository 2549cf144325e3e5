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

from mfd.errors import MfdError, ProtocolError
from mfd.protocol import postcopy
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import page_runs
from mfd.shm import control, pagehash
from mfd.shm.ramblock import MappedBlock, RAMBlock
from mfd.shm.receivedmap import ReceivedMap
from mfd.shm.uffd import UserfaultFd, open_uffd

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
        self.latency_dist = [0] * LATENCY_BUCKETS  # [2^n, 2^(n+1)) us
        self.thread_latency: dict[int, list[float]] = {}  # thread -> [seconds, faults]
        self.latencies: list[float] = []  # each one, seconds (for medians and p99)
        self.guest_pid = int(guest.execute("describe")["pid"])  # to end it if it hangs
        self.uffd, self.bases = receive_uffd(guest, len(blocks))
        self.ends = [base + b.used_length for base, b in zip(self.bases, blocks, strict=True)]

    def fileno(self) -> int:
        return self.uffd.fileno()

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
            self.uffd.copy(self.bases[block] + start * TARGET_PAGE_SIZE,
                           src + at * TARGET_PAGE_SIZE, (end - start) * TARGET_PAGE_SIZE)
            at += end - start
        received[pages] = 1
        self._resolved(block, pages)
        if self.hashes is not None:
            self.hashes.table[block][pages] = pagehash.hash_rows(rows)

    def zero(self, block: int, pages: np.ndarray) -> None:
        received = self.receivedmap.received[block]
        pages = np.unique(pages[received[pages] == 0])
        for start, end in page_runs(pages).tolist():
            self.uffd.zeropage(self.bases[block] + start * TARGET_PAGE_SIZE,
                               (end - start) * TARGET_PAGE_SIZE)
        received[pages] = 1
        self._resolved(block, pages)
        if self.hashes is not None:
            self.hashes.table[block][pages] = 0

    def faults(self) -> bytes:
        """The guest's pending faults: the page requests they make (return path bytes)."""
        out = []
        for fault in self.uffd.faults():
            block = next((i for i, (lo, hi) in enumerate(zip(self.bases, self.ends,
                                                             strict=True))
                          if lo <= fault.address < hi), None)
            if block is None:  # not ours: the kernel sends only registered ranges
                raise ProtocolError(f"userfaultfd: a fault at {fault.address:#x}, outside "
                                    "every RAM block")
            page = (fault.address - self.bases[block]) // TARGET_PAGE_SIZE
            if self.receivedmap.received[block][page]:
                # here already (woken), or received as zero and still a hole (mapped now)
                self.uffd.zeropage(self.bases[block] + page * TARGET_PAGE_SIZE,
                                   TARGET_PAGE_SIZE)
            elif not self.requested[block][page]:
                self.requested[block][page] = True
                self.waiting[(block, page)] = (time.monotonic(), fault.thread)
                idstr = self.blocks[block].idstr
                out.append(postcopy.encode_request(
                    page * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE,
                    idstr if idstr != self.last_requested else None))
                self.last_requested = idstr
                self.requests += 1
        return b"".join(out)

    def requests_again(self) -> bytes:
        """After recovery: every page asked for and not here yet, asked for again (the
        source's new connection knows nothing of the old requests)."""
        out = []
        self.last_requested = None
        for block, requested in enumerate(self.requested):
            idstr = self.blocks[block].idstr
            pending = np.flatnonzero(requested & (self.receivedmap.received[block] == 0))
            for page in pending.tolist():
                out.append(postcopy.encode_request(
                    page * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE,
                    idstr if idstr != self.last_requested else None))
                self.last_requested = idstr
        return b"".join(out)

    def _resolved(self, block: int, pages: np.ndarray) -> None:
        """Pages placed: the latency of those a thread was waiting for (few: a loop)."""
        asked = pages[self.requested[block][pages]]
        if not len(asked):
            return
        now = time.monotonic()
        for page in asked.tolist():
            when = self.waiting.pop((block, page), None)
            if when is None:
                continue
            seconds = now - when[0]
            self.latencies.append(seconds)
            bucket = max(0, int(seconds * 1e6)).bit_length() - 1
            self.latency_dist[min(max(bucket, 0), LATENCY_BUCKETS - 1)] += 1
            per = self.thread_latency.setdefault(when[1], [0.0, 0])
            per[0] += seconds
            per[1] += 1
        self.requested[block][asked] = False

    def latency(self) -> dict[str, object]:
        """QEMU 10.1's figures (``query-migrate``): the average from fault to placement of
        the pages asked for (ns), per faulting thread (the vCPUs), the log2 histogram (us)."""
        total = sum(s for s, _ in self.thread_latency.values())
        count = sum(n for _, n in self.thread_latency.values())
        return {"postcopy-latency": round(total / count * 1e9) if count else 0,
                "postcopy-vcpu-latency": [round(s / n * 1e9) for s, n in
                                          self.thread_latency.values()],
                "postcopy-latency-dist": list(self.latency_dist)}

    def close(self) -> None:
        """Unregister the guest's RAM through our copy of its uffd: a thread of the guest
        blocked on a page (a zero page received as a hole, touched just now) is woken and
        maps it itself; the guest may then close its own fd whenever it is told."""
        for base, b in zip(self.bases, self.blocks, strict=True):
            with contextlib.suppress(OSError):
                self.uffd.unregister(base, b.used_length)
        self.uffd.close()


def discard(mapped: MappedBlock, receivedmap: np.ndarray, hashes: np.ndarray | None,
            runs: tuple[tuple[int, int], ...]) -> None:
    """POSTCOPY_RAM_DISCARD (before LISTEN): the pages are holes again and not received."""
    for start, length in runs:
        mapped.mm.madvise(mmap.MADV_REMOVE, start, length)
        pages = slice(start // TARGET_PAGE_SIZE, (start + length) // TARGET_PAGE_SIZE)
        receivedmap[pages] = 0
        if hashes is not None:
            hashes[pages] = 0


def receive_uffd(guest: control.GuestClient, nblocks: int) -> tuple[UserfaultFd, list[int]]:
    """LISTEN: ask the guest for its uffd, over a unix socket made for it."""
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
    if len(bases) != nblocks:
        os.close(fds[0])
        raise MfdError(f"postcopy: the guest mapped {len(bases)} blocks, expected {nblocks}")
    return UserfaultFd(fds[0]), bases
