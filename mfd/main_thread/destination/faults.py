"""The guest's RAM in postcopy, through its userfaultfd: faults asked for, pages placed.

Mirrors ``migration/postcopy-ram.c``'s fault thread and ``ram.c``'s postcopy placement::

    LISTEN     the guest process opens a uffd, registers its mappings of every block for
               missing pages and passes the fd here (SCM_RIGHTS, a unix socket)
    faults     read here from the uffd: a page received (or received as zero, still a hole)
               is mapped (ZEROPAGE, which only wakes where a page is present); else asked
               for once on the return path (REQ_PAGES_ID / REQ_PAGES)
    pages      from the main channel and the preempt channel, placed atomically in the
               guest's address space by ``mfd.shm.placer.UffdPlacer`` (UFFDIO_COPY of each
               run of consecutive pages, UFFDIO_ZEROPAGE), never written through a mapping
               here: a write seen half done, or a read that allocates a zero page, would
               corrupt the guest's RAM (QEMU pauses with EEXIST then). A page twice in one
               run ends with its later copy; the receivedmap is set, and the page hashed
               from the bytes placed, only once it is placed
    end        every page is here: the guest closes its uffd

Lazy restore (``mfd.main_thread.lazy``) takes its guest's uffd the same way
(:func:`receive_uffd`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time

import numpy as np
import orjson

from mfd.errors import MfdError
from mfd.protocol import livestream, postcopy
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.shm import control, pagehash
from mfd.shm.placer import UffdPlacer
from mfd.shm.ramblock import RAMBlock
from mfd.shm.uffd import GuestRAM, UserfaultFd

LISTEN_TIMEOUT = 10.0
LATENCY_BUCKETS = 24  # QEMU's postcopy-latency-dist: 1 us .. 8 s


class PostcopyRAM:
    """The running guest's RAM, from LISTEN to the end: its uffd, the pages placed through
    it, the pages its faults asked for."""

    def __init__(self, ram: GuestRAM, blocks: list[RAMBlock], received: list[np.ndarray],
                 hashes: pagehash.PageHashes | None, guest_pid: int) -> None:
        """``received``: the receivedmap; ``hashes``: the page hash table when verifying;
        ``guest_pid``: the guest's process, to end it if the migration fails."""
        self.ram = ram
        self.index = {b.idstr: i for i, b in enumerate(blocks)}
        self.received = received
        self.placer = UffdPlacer(ram, received, hashes)
        self.asked = Requests(blocks)
        self.guest_pid = guest_pid

    @classmethod
    def listen(cls, guest: control.GuestClient, blocks: list[RAMBlock],
               received: list[np.ndarray], hashes: pagehash.PageHashes | None
               ) -> PostcopyRAM:
        pid = int(guest.execute("describe")["pid"])
        return cls(receive_uffd(guest, blocks), blocks, received, hashes, pid)

    def fileno(self) -> int:
        return self.ram.uffd.fileno()

    def place(self, ev: livestream.Event) -> None:
        """PAGE and ZERO records (the main channel's or the preempt channel's)."""
        block = self.index[ev.idstr]  # type: ignore[union-attr]
        fresh = ev.pages[self.received[block][ev.pages] == 0]  # type: ignore[union-attr]
        if not len(fresh):  # all here already (the guest may have written them since)
            return
        self.placer.run(block, ev, "postcopy: ")
        self.asked.resolved(block, fresh)

    def faults(self) -> bytes:
        """The guest's pending faults: the page requests they make (return path bytes)."""
        out = []
        for fault in self.ram.uffd.faults():
            block, page = self.ram.locate(fault.address)
            if self.received[block][page]:
                # here already (woken), or received as zero and still a hole (mapped now)
                self.ram.uffd.zeropage(self.ram.address(block, page), TARGET_PAGE_SIZE)
            else:
                out.append(self.asked.ask(block, page, fault.thread))
        return b"".join(out)

    def again(self) -> bytes:
        """After recovery: every page asked for and not here yet, asked for again (the
        source's new connection knows nothing of the old requests)."""
        return self.asked.again(self.received)

    def close(self) -> None:
        self.ram.close()


class Requests:
    """The pages asked for, each once, and QEMU 10.1's postcopy latency: from the fault
    to the page placed, kept as it goes (``query-migrate`` reads the figures often)."""

    def __init__(self, blocks: list[RAMBlock]) -> None:
        self.idstrs = [b.idstr for b in blocks]
        self.requested = [np.zeros(b.used_length // TARGET_PAGE_SIZE, dtype=bool)
                          for b in blocks]
        self.last_requested: str | None = None
        self.requests = 0  # query-migrate's postcopy-requests
        # (block, page) asked for -> when and by which thread it faulted
        self.waiting: dict[tuple[int, int], tuple[float, int]] = {}
        self.latencies: list[float] = []  # seconds, each page asked for and placed
        self.total = 0.0  # their sum
        self.threads: dict[int, list[float]] = {}  # faulting thread -> [seconds, pages]
        self.dist = [0] * LATENCY_BUCKETS

    def ask(self, block: int, page: int, thread: int) -> bytes:
        """A fault on a page not here: its request, unless it was asked for already."""
        if self.requested[block][page]:
            return b""
        self.requested[block][page] = True
        self.waiting[(block, page)] = (time.monotonic(), thread)
        self.requests += 1
        return self._request(block, page)

    def again(self, received: list[np.ndarray]) -> bytes:
        self.last_requested = None
        return b"".join(
            self._request(block, page) for block, requested in enumerate(self.requested)
            for page in np.flatnonzero(requested & (received[block] == 0)).tolist())

    def _request(self, block: int, page: int) -> bytes:
        """REQ_PAGES_ID when the block differs from the last request's, else REQ_PAGES."""
        idstr = self.idstrs[block]
        named = idstr if idstr != self.last_requested else None
        self.last_requested = idstr
        return postcopy.encode_request(page * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE, named)

    def resolved(self, block: int, pages: np.ndarray) -> None:
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
            self.total += seconds
            self.dist[min(max(int(seconds * 1e6).bit_length() - 1, 0),
                          LATENCY_BUCKETS - 1)] += 1
            thread = self.threads.setdefault(when[1], [0.0, 0])
            thread[0] += seconds
            thread[1] += 1
        self.requested[block][asked] = False

    def figures(self) -> dict[str, object]:
        """``query-migrate``'s: the requests, the average from fault to placement of the
        pages asked for (ns), per faulting thread (the vCPUs), the log2 histogram of
        [2^n, 2^(n+1)) us buckets."""
        return {"postcopy-requests": self.requests,
                "postcopy-latency": round(self.total / len(self.latencies) * 1e9)
                if self.latencies else 0,
                "postcopy-vcpu-latency": [round(total / count * 1e9)
                                          for total, count in self.threads.values()],
                "postcopy-latency-dist": list(self.dist)}


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
