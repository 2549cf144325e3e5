"""The destination loader for migration files (``ram_load`` for mapped-ram and streams).

::

    parse + validate the whole file (mfd.protocol.migration_file), before any write
    mapped-ram: per block, read file_bmap; runs of set bits, cut at 512 KiB chunks; jobs
                of whole chunks go to idle channels, which preadv straight into the
                destination's shared memory and hash each chunk they read; sync; every
                chunk digest equal to mfd's trailer's, when there is one
    stream:     every page's last record, copied with strided numpy views (no per-page loop)

Destination RAM must start zeroed: clear bits are never read (invariant 5). The targets are
created by the caller (fresh files, so they are zero).
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass

import numpy as np

from mfd.errors import MfdError, ProtocolError
from mfd.main_thread.pipeline import ChannelPool, OnDone
from mfd.main_thread.scanner import chunk_jobs
from mfd.protocol import migration_file as mfile
from mfd.protocol import trailer
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.shm.ramblock import RAMBlock, attach
from mfd.workers.file_channel import FileChannelConfig, channel_main

RECORD_STRIDE = 8 + TARGET_PAGE_SIZE  # a PAGE|CONTINUE record: be64 header + data


@dataclass
class LoadResult:
    file: mfile.MigrationFile
    seconds: float
    bytes_read: int
    verified: bool  # digests matched mfd's trailer


class OpenedFile:
    """A read-only mapping of a migration file, parsed and validated."""

    def __init__(self, path: str, offset: int = 0) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise MfdError(f"cannot open {path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size <= offset:
                raise ProtocolError(f"{path} is empty" if size == 0 else
                                    f"{path} has {size} bytes, nothing after offset {offset:#x}")
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.path = path
        try:
            self.file = mfile.parse(self.mm, size, offset)
        except BaseException:
            self.mm.close()
            raise

    def close(self) -> None:
        self.mm.close()

    def __enter__(self) -> OpenedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_targets(mf: mfile.MigrationFile, targets: dict[str, RAMBlock]) -> None:
    """Every block of the file needs a destination of exactly its size (QEMU SIGSEGVs on a
    smaller one and silently leaves a larger one's tail alone)."""
    names = [b.idstr for b in mf.blocks]
    missing = [n for n in names if n not in targets]
    if missing:
        raise MfdError(f"no destination for RAM block(s) {', '.join(map(repr, missing))} "
                       f"(the file has {', '.join(map(repr, names))}; given: "
                       f"{', '.join(map(repr, targets)) or 'none'})")
    extra = [n for n in targets if n not in names]
    if extra:
        raise MfdError(f"the file has no RAM block {', '.join(map(repr, extra))} "
                       f"(it has {', '.join(map(repr, names))})")
    for b in mf.blocks:
        t = targets[b.idstr]
        if t.used_length != b.used_length:
            raise MfdError(f"block {b.idstr!r} is {b.used_length} bytes in the file but "
                           f"{t.used_length} at the destination")


class ChunkCheck:
    """Restore side of mfd's trailer: the chunk digests the channels report, compared with
    the trailer's as they arrive; chunks no job covers must be empty (no page in the file)."""

    def __init__(self, idstr: str, want: bytes) -> None:
        self.idstr = idstr
        self.want = np.frombuffer(want, dtype=np.uint8).reshape(-1, trailer.DIGEST_SIZE)
        self.covered = np.zeros(len(self.want), dtype=bool)
        self.bad: list[int] = []

    def job_done(self, pairs: np.ndarray, digests: bytes) -> None:
        chunks, got = trailer.job_digests(pairs, digests)
        self.covered[chunks] = True
        self.bad.extend(chunks[(got != self.want[chunks]).any(axis=1)].tolist())

    def check(self) -> None:
        empty = np.frombuffer(trailer.EMPTY_DIGEST, dtype=np.uint8)
        self.bad.extend(np.flatnonzero(~self.covered & (self.want != empty).any(axis=1))
                        .tolist())
        if self.bad:
            first = min(self.bad)
            raise ProtocolError(
                f"restored block {self.idstr!r} does not match the digest in the file's mfd "
                f"trailer in {len(set(self.bad))} chunk(s) of "
                f"{trailer.CHUNK_PAGES * TARGET_PAGE_SIZE >> 10} KiB, first at RAM offset "
                f"{first * trailer.CHUNK_PAGES * TARGET_PAGE_SIZE:#x} (file corrupt?)")


READAHEAD = 32 << 20  # file bytes asked for ahead of the job handed out


def readahead(mm: mmap.mmap, at: int, asked: int) -> int:
    """Ask the kernel to read the file up to READAHEAD bytes past ``at`` in the background
    (MADV_WILLNEED on the file's mapping is POSIX_FADV_WILLNEED), from ``asked`` on, the end
    of what was asked for before; returns the new end. The one place restore reads ahead:
    when each channel asked only for its own job's span as it started it, one channel alone
    waited for the disk on every job (a cold 1 GiB restore: 2.1-4.9 s against 0.8 s with
    two channels)."""
    end = min(at + READAHEAD, len(mm))
    start = max(at, asked)
    if end - start >= READAHEAD // 4:  # in steps of 8 MiB, not a call per job
        mm.madvise(mmap.MADV_WILLNEED, start, end - start)
        return end
    return asked


def load_mapped_ram(opened: OpenedFile, targets: dict[str, RAMBlock], channels: int,
                    direct_io: bool = False) -> tuple[int, bool]:
    """Returns bytes read and whether mfd's trailer was verified (False: no trailer)."""
    mf = opened.file
    blocks = [targets[b.idstr] for b in mf.blocks]
    verify = mf.trailer is not None
    checks = [ChunkCheck(b.idstr, mf.trailer.blocks[b.idstr].chunks) if verify else None
              for b in mf.blocks]
    work = [(i, chunk_jobs(mfile.read_bitmap(opened.mm, b))) for i, b in enumerate(mf.blocks)]
    configs = [FileChannelConfig(
        channel_id=i, endpoint="", parent_pid=0, path=opened.path, saving=False,
        blocks=tuple(blocks),
        pages_offsets=tuple(b.mapped_ram.pages_offset for b in mf.blocks),
        direct_io=direct_io, verify=verify) for i in range(channels)]
    moved = [0]

    def done(check: ChunkCheck | None, pairs: np.ndarray) -> OnDone:
        def on_done(nbytes: int, _mask: np.ndarray, digests: bytes) -> None:
            moved[0] += nbytes
            if check is not None:
                check.job_done(pairs, digests)
        return on_done

    with ChannelPool(configs, channel_main) as pool:
        for block, jobs in work:
            base = mf.blocks[block].mapped_ram.pages_offset
            asked = base
            for pairs in jobs:
                if not direct_io:
                    asked = readahead(opened.mm, base + int(pairs[0]) * TARGET_PAGE_SIZE,
                                      asked)
                pool.send(block, pairs, done(checks[block], pairs))
        pool.sync()
    for check in checks:
        if check is not None:
            check.check()
    return moved[0], verify


def load_stream(opened: OpenedFile, targets: dict[str, RAMBlock]) -> int:
    """Classic stream: each page's last PAGE record, copied in strided runs."""
    src = np.frombuffer(opened.mm, dtype=np.uint8)
    moved = 0
    for b in opened.file.blocks:
        state = b.page_state
        assert state is not None
        pages = np.flatnonzero(state >= 0)
        if len(pages) == 0:
            continue
        offs = state[pages]
        # runs of consecutive pages whose records follow each other (PAGE|CONTINUE)
        brk = np.flatnonzero((np.diff(pages) != 1) | (np.diff(offs) != RECORD_STRIDE)) + 1
        dst = attach(targets[b.idstr], writable=True)
        try:
            out = np.frombuffer(dst.mm, dtype=np.uint8).reshape(-1, TARGET_PAGE_SIZE)
            for seg_p, seg_o in zip(np.split(pages, brk), np.split(offs, brk), strict=True):
                view = np.lib.stride_tricks.as_strided(
                    src[int(seg_o[0]):], shape=(len(seg_o), TARGET_PAGE_SIZE),
                    strides=(RECORD_STRIDE, 1), writeable=False)
                out[int(seg_p[0]) : int(seg_p[-1]) + 1] = view
                moved += len(seg_p) * TARGET_PAGE_SIZE
            del out
        finally:
            dst.close()
    return moved


def load(opened: OpenedFile, targets: dict[str, RAMBlock], channels: int,
         direct_io: bool = False) -> LoadResult:
    mf = opened.file
    check_targets(mf, targets)
    start = time.monotonic()
    if mf.mapped_ram:
        moved, ok = load_mapped_ram(opened, targets, channels, direct_io)
    else:  # mfd writes no stream files, so no trailer here (the parser refuses one)
        moved, ok = load_stream(opened, targets), False
    return LoadResult(mf, time.monotonic() - start, moved, ok)
