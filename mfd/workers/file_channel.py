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
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
import traceback
from dataclasses import dataclass

import numpy as np
import zmq

from mfd.protocol import messages
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import page_runs
from mfd.protocol.trailer import CHUNK_PAGES, chunk_digests, whole_chunks
from mfd.shm.ramblock import MappedBlock, RAMBlock, attach, nonzero_pages
from mfd.shm.uffd import UserfaultFd
from mfd.sysutil import set_parent_death_signal
from mfd.xhooks import NO_HOOKS, XHooks

SYNC_FILE_RANGE_WRITE = 2
ERROR_LINGER_MS = 2000  # how long a failing channel's last ERROR may take to go out
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


def die_with_parent() -> None:
    """The channel must not outlive the main process (which alone unlinks shm)."""
    set_parent_death_signal(signal.SIGTERM)


def channel_main(cfg: FileChannelConfig) -> None:
    """Process entry point: one DEALER socket, one file descriptor, one loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    die_with_parent()
    if os.getppid() != cfg.parent_pid:  # died before PR_SET_PDEATHSIG was in place
        return
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cfg.endpoint)
    try:
        channel = FileChannel(cfg)
        try:
            sock.send_multipart(messages.encode_ready(cfg.channel_id))
            while True:
                if not sock.poll(1000):
                    if os.getppid() != cfg.parent_pid:
                        return
                    continue
                frames = sock.recv_multipart()  # small frames: copies are cheapest
                kind = frames[0]
                if kind == messages.STOP:
                    return
                if kind not in (messages.JOB, messages.DIGEST):
                    raise RuntimeError(f"unexpected message {kind[:16]!r}")
                job_id, block, pages, _ = messages.decode_job(frames)
                reply = channel.run(job_id, block, pages, kind == messages.DIGEST)
                if cfg.x.delay(cfg.channel_id):  # test-only: slow to finish after its I/O
                    time.sleep(cfg.x.delay(cfg.channel_id))
                sock.send_multipart(reply)
        finally:
            channel.close()
    except Exception:
        sock.send_multipart([messages.ERROR, traceback.format_exc().encode()])
        # read before the main process sees the process gone: LINGER 0 could drop it
        sock.setsockopt(zmq.LINGER, ERROR_LINGER_MS)
        raise SystemExit(1) from None
    finally:
        sock.close()
        ctx.term()


def open_channel_fd(path: str, saving: bool, direct_io: bool) -> int:
    flags = (os.O_WRONLY if saving else os.O_RDONLY) | (os.O_DIRECT if direct_io else 0)
    return os.open(path, flags)


class FileChannel:
    def __init__(self, cfg: FileChannelConfig) -> None:
        self.cfg = cfg
        self.fd = open_channel_fd(cfg.path, cfg.saving, cfg.direct_io)
        self.uffd = UserfaultFd(cfg.uffd) if cfg.uffd >= 0 else None
        # lazy restore never touches the guest's RAM through a mapping (a page written
        # there would be seen half done by the running guest): no mapping at all
        self.blocks: list[MappedBlock] = [] if self.uffd else \
            [attach(b, writable=not cfg.saving) for b in cfg.blocks]
        self.buf = np.empty(0, dtype=np.uint8)

    def run(self, job_id: int, block: int, pages: np.ndarray, digest_only: bool) -> list:
        if digest_only:
            return messages.encode_done(job_id, 0, None,
                                        self._digests(block, pages.reshape(-1, 2)))
        if self.cfg.saving:
            return self.save_pages(job_id, block, pages)
        return self.load_runs(job_id, block, pages)

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
        if self.uffd is not None:
            return self._load_lazy(job_id, block, runs)
        moved = self._io(block, runs, os.preadv, "read")
        digests = self._digests(block, runs) if self.cfg.verify else b""
        return messages.encode_done(job_id, moved, None, digests)

    def _load_lazy(self, job_id: int, block: int, runs: np.ndarray) -> list:
        """Lazy restore: the job's chunks read into a buffer (from the first chunk's start,
        so chunk digests come out as from RAM), each run placed atomically in the running
        guest; a page its fault had placed first is left alone (the same bytes)."""
        assert self.uffd is not None
        first = int(runs[0, 0]) // CHUNK_PAGES * CHUNK_PAGES
        span = (int(runs[-1, 1]) - first) * TARGET_PAGE_SIZE
        if len(self.buf) < span:
            self.buf = np.empty(span, dtype=np.uint8)
        view = memoryview(self.buf)
        rel = runs - first
        base = self.cfg.pages_offsets[block]
        moved = 0
        for start, (a, b) in zip(runs[:, 0].tolist(), (rel * TARGET_PAGE_SIZE).tolist(),
                                 strict=True):
            n = os.preadv(self.fd, [view[a:b]], base + start * TARGET_PAGE_SIZE)
            if n != b - a:
                raise OSError(f"short read: {n} of {b - a} bytes at "
                              f"{base + start * TARGET_PAGE_SIZE:#x} (file truncated?)")
            self.uffd.copy(self.cfg.bases[block] + start * TARGET_PAGE_SIZE,
                           self.buf.ctypes.data + a, b - a)
            moved += n
        digests = chunk_digests(view, rel, TARGET_PAGE_SIZE) if self.cfg.verify else b""
        return messages.encode_done(job_id, moved, None, digests)

    def _digests(self, block: int, runs: np.ndarray) -> bytes:
        return chunk_digests(self.blocks[block].view, runs, TARGET_PAGE_SIZE)

    def _io(self, block: int, runs: np.ndarray, io, verb: str) -> int:
        """One ``pwritev``/``preadv`` per run of pages, between the block and its slots."""
        view = self.blocks[block].view
        base = self.cfg.pages_offsets[block]
        moved = 0
        for start, end in runs.tolist():
            a, b = start * TARGET_PAGE_SIZE, end * TARGET_PAGE_SIZE
            n = io(self.fd, [view[a:b]], base + a)
            if n != b - a:
                hint = " (file truncated?)" if verb == "read" else ""
                raise OSError(f"short {verb}: {n} of {b - a} bytes at {base + a:#x}{hint}")
            moved += n
        return moved

    def close(self) -> None:
        os.close(self.fd)
        for b in self.blocks:
            b.close()
