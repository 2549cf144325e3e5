"""A mapped-ram channel process: writes (save) or reads (restore) pages at fixed file offsets.

Mirrors QEMU's file channels (``multifd_file_send``/``file_write_ramblock_iov`` and
``multifd_file_recv_data``): each channel opens the file itself (``O_DIRECT`` with
direct-io), reads guest RAM straight from shared memory and ``pwritev``s each run of
contiguous pages at ``pages_offset + page * page_size``; on restore it ``preadv``s each run
straight into the destination's shared memory. Only offsets cross the socket.

::

    main process (ROUTER)  --JOB(block, pages)-->  channel (DEALER)
                           <--DONE(nonzero mask)--   save: zero check, pwritev per run
                           --JOB(block, runs)--->    restore: preadv per run, then the
                           <--DONE(digests)-------   digest of each chunk just read
                           --DIGEST(block, runs)->   save completion: digest of each chunk
                           <--DONE(digests)-------   of the final RAM (mfd's trailer)

The process around it is ``mfd.workers.channel``'s. A restore places pages by ``preadv``
straight into RAM: mapped-ram has one slot per page, so no page comes twice, and it keeps
no receivedmap and no page hashes (the trailer's chunk digests verify it), so there is
nothing for the placer's hook to do. A lazy restore places them through the running guest's
userfaultfd (``mfd.shm.placer.UffdPlacer``).
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass

import numpy as np

from mfd.protocol import messages
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import page_runs
from mfd.protocol.trailer import CHUNK_PAGES, chunk_digests, whole_chunks
from mfd.shm.placer import UffdPlacer
from mfd.shm.ramblock import MappedBlock, RAMBlock, attach, nonzero_pages
from mfd.shm.uffd import GuestRAM, UserfaultFd
from mfd.workers.channel import Channel, Link, run_channel
from mfd.xhooks import NO_HOOKS, XHooks

SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


@dataclass(frozen=True)
class FileChannelConfig:
    channel_id: int
    endpoint: str  # the main process's ROUTER
    parent_pid: int  # the main process: the channel exits when it is gone
    path: str  # the migration file
    saving: bool  # True: pages -> file; False: file -> pages
    blocks: tuple[RAMBlock, ...]
    pages_offsets: tuple[int, ...]  # per block, absolute file offsets
    direct_io: bool = False
    zero_page_detection: bool = True  # multifd mode: the channel finds zero pages
    verify: bool = False  # restore: hash each chunk read (the file has mfd's trailer)
    digest_chunks: bool = False  # save of RAM that no longer changes: hash whole-chunk jobs
    x: XHooks = NO_HOOKS  # test-only: channel_delays (sleep after each job, a slow disk)
    # lazy restore: the running guest's userfaultfd (inherited) and where each block is
    # mapped in the guest: pages are read into a buffer here and placed with UFFDIO_COPY
    uffd: int = -1
    bases: tuple[int, ...] = ()


def channel_main(cfg: FileChannelConfig) -> None:
    run_channel(cfg, FileChannel)


def open_channel_fd(path: str, saving: bool, direct_io: bool) -> int:
    flags = (os.O_WRONLY if saving else os.O_RDONLY) | (os.O_DIRECT if direct_io else 0)
    return os.open(path, flags)


class FileChannel(Channel):
    def __init__(self, cfg: FileChannelConfig, link: Link | None) -> None:
        super().__init__(link)
        self.cfg = cfg
        self.fd = open_channel_fd(cfg.path, cfg.saving, cfg.direct_io)
        # lazy restore never touches the guest's RAM through a mapping (a page written
        # there would be seen half done by the running guest): no mapping at all, pages
        # placed through its uffd (inherited), each block where the guest maps it
        self.placer = None if cfg.uffd < 0 else UffdPlacer(
            GuestRAM(UserfaultFd(cfg.uffd), list(cfg.bases),
                     [b.used_length for b in cfg.blocks]),
            [np.zeros(b.num_pages, dtype=np.uint8) for b in cfg.blocks], None)
        self.blocks: list[MappedBlock] = [] if self.placer is not None else \
            [attach(b, writable=not cfg.saving) for b in cfg.blocks]
        self.buf = np.empty((0, TARGET_PAGE_SIZE), dtype=np.uint8)

    def handle(self, kind: bytes, job_id: int, block: int, pages: np.ndarray,
               flags: int) -> list:
        if kind == messages.DIGEST:
            reply = messages.encode_done(job_id, 0, None,
                                         self._digests(block, pages.reshape(-1, 2)))
        elif kind == messages.JOB and self.cfg.saving:
            reply = self.save_pages(job_id, block, pages)
        elif kind == messages.JOB:
            reply = self.load_runs(job_id, block, pages)
        else:
            return super().handle(kind, job_id, block, pages, flags)
        if self.cfg.x.delay(self.cfg.channel_id):  # test-only: slow to finish after its I/O
            time.sleep(self.cfg.x.delay(self.cfg.channel_id))
        return reply

    def save_pages(self, job_id: int, block: int, pages: np.ndarray) -> list:
        """Zero check per packet (max over (pages, 512) words), then one pwritev per run."""
        if self.cfg.zero_page_detection:
            nonzero = nonzero_pages(self.blocks[block], pages)
        else:
            nonzero = np.ones(len(pages), dtype=bool)
        runs = page_runs(pages[nonzero])
        moved = self._io(block, runs, os.pwritev, "write")
        digest = b""
        if self.cfg.digest_chunks and len(pages) <= CHUNK_PAGES and \
                len(whole_chunks(pages, self.cfg.blocks[block].num_pages)[0]) == 1:
            digest = chunk_digests(self.blocks[block].view, runs, TARGET_PAGE_SIZE)
        if moved and not self.cfg.direct_io:
            # start writeback now, so the fdatasync at completion finds little left to do
            base = self.cfg.pages_offsets[block]
            first, last = int(runs[0][0]), int(runs[-1][1])
            _libc.sync_file_range(self.fd, base + first * TARGET_PAGE_SIZE,
                                  (last - first) * TARGET_PAGE_SIZE, SYNC_FILE_RANGE_WRITE)
        return messages.encode_done(job_id, moved, nonzero, digest)

    def load_runs(self, job_id: int, block: int, pairs: np.ndarray) -> list:
        """``preadv`` each run straight into the destination block, then hash its chunks
        while they are still in this CPU's cache. The main process has already asked the
        kernel to read this job's span ahead (``mfd.main_thread.load.readahead``)."""
        runs = pairs.reshape(-1, 2)
        if self.placer is not None:
            return self._load_lazy(job_id, block, runs)
        moved = self._io(block, runs, os.preadv, "read")
        digests = self._digests(block, runs) if self.cfg.verify else b""
        return messages.encode_done(job_id, moved, None, digests)

    def _load_lazy(self, job_id: int, block: int, runs: np.ndarray) -> list:
        """Lazy restore: the job's runs read one after the other into a buffer, placed
        atomically in the running guest by the placer, which leaves alone a page its fault
        placed first (the guest may have written it since); the chunk digests taken from
        the buffer, each chunk's runs being consecutive there too."""
        assert self.placer is not None
        runs = runs.astype(np.int64)
        lengths = runs[:, 1] - runs[:, 0]
        count = int(lengths.sum())
        if len(self.buf) < count:
            self.buf = np.empty((count, TARGET_PAGE_SIZE), dtype=np.uint8)
        rows = self.buf[:count]
        view = memoryview(rows).cast("B")
        self._io(block, runs, os.preadv, "read", view)
        ends = np.cumsum(lengths)  # where each run ends in the buffer
        self.placer.pages(block, np.repeat(runs[:, 0] - ends + lengths, lengths)
                          + np.arange(count), rows)
        digests = b""
        if self.cfg.verify:
            last = np.flatnonzero(np.diff(runs[:, 0] // CHUNK_PAGES, append=-1))  # per chunk
            starts = np.concatenate(([0], ends[last[:-1]]))
            digests = b"".join(chunk_digests(view, np.array([[a, b]]), TARGET_PAGE_SIZE)
                               for a, b in zip(starts.tolist(), ends[last].tolist(),
                                               strict=True))
        return messages.encode_done(job_id, count * TARGET_PAGE_SIZE, None, digests)

    def _digests(self, block: int, runs: np.ndarray) -> bytes:
        return chunk_digests(self.blocks[block].view, runs, TARGET_PAGE_SIZE)

    def _io(self, block: int, runs: np.ndarray, io, verb: str,
            buffer: memoryview | None = None) -> int:
        """One ``pwritev``/``preadv`` per run of pages, between the runs' slots in the file
        and the block (or ``buffer``, where the runs follow each other)."""
        view = self.blocks[block].view if buffer is None else buffer
        base = self.cfg.pages_offsets[block]
        moved = 0
        for start, end in runs.tolist():
            a, b = start * TARGET_PAGE_SIZE, end * TARGET_PAGE_SIZE
            at = a if buffer is None else moved
            n = io(self.fd, [view[at : at + b - a]], base + a)
            if n != b - a:
                hint = " (file truncated?)" if verb == "read" else ""
                raise OSError(f"short {verb}: {n} of {b - a} bytes at {base + a:#x}{hint}")
            moved += n
        return moved

    def close(self) -> None:
        os.close(self.fd)
        for b in self.blocks:
            b.close()
