"""The destination loader for migration files (``ram_load`` for mapped-ram and streams).

::

    parse + validate the whole file (mfd.protocol.migration_file), before any write
    mapped-ram: per block, read file_bmap; runs of set bits, cut at 1 MiB
                (MAPPED_RAM_LOAD_BUF_SIZE); jobs of runs up to 1 MiB go to idle channels,
                which preadv straight into the destination's shared memory; sync
    stream:     every page's last record, copied with strided numpy views (no per-page loop)
    verify:     blake3 of every block against mfd's trailer, when there is one

Destination RAM must start zeroed: clear bits are never read (invariant 5). The targets are
created by the caller (fresh files, so they are zero).
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass

import blake3
import numpy as np

from mfd.errors import MfdError, ProtocolError
from mfd.main_thread.pipeline import ChannelPool
from mfd.protocol import migration_file as mfile
from mfd.protocol.constants import MAPPED_RAM_LOAD_BUF_SIZE, TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import set_runs
from mfd.shm.ramblock import RAMBlock, attach
from mfd.workers.file_channel import FileChannelConfig, channel_main

RUN_PAGES = MAPPED_RAM_LOAD_BUF_SIZE // TARGET_PAGE_SIZE  # 256 pages = 1 MiB
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


def _jobs(bits: np.ndarray) -> list[np.ndarray]:
    """Runs of set bits cut at 1 MiB, grouped into jobs of at most 1 MiB of pages."""
    runs = set_runs(bits)
    if len(runs) == 0:
        return []
    starts, ends = runs[:, 0], runs[:, 1]
    pieces = np.maximum(1, -(-(ends - starts) // RUN_PAGES))
    idx = np.repeat(np.arange(len(runs)), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    s = starts[idx] + (np.arange(len(idx)) - first) * RUN_PAGES
    e = np.minimum(s + RUN_PAGES, ends[idx])
    cut = np.stack((s, e), axis=1)
    # group consecutive runs while their pages add up to <= 1 MiB
    group = np.cumsum(e - s) // RUN_PAGES
    group = np.concatenate(([0], group[:-1]))  # a run starts the group its predecessor ended
    bounds = np.flatnonzero(np.diff(group)) + 1
    return [c.astype(np.uint32).reshape(-1) for c in np.split(cut, bounds)]


def load_mapped_ram(opened: OpenedFile, targets: dict[str, RAMBlock], channels: int,
                    direct_io: bool = False) -> int:
    mf = opened.file
    blocks = [targets[b.idstr] for b in mf.blocks]
    work = [(i, _jobs(mfile.read_bitmap(opened.mm, b))) for i, b in enumerate(mf.blocks)]
    configs = [FileChannelConfig(
        channel_id=i, endpoint="", parent_pid=0, path=opened.path, saving=False,
        blocks=tuple(blocks),
        pages_offsets=tuple(b.mapped_ram.pages_offset for b in mf.blocks),
        direct_io=direct_io) for i in range(channels)]
    moved = [0]

    def on_done(_context: object, nbytes: int, _mask: np.ndarray) -> None:
        moved[0] += nbytes

    with ChannelPool(configs, channel_main, on_done) as pool:
        for block, jobs in work:
            for runs in jobs:
                pool.send(block, runs)
        pool.sync()
    return moved[0]


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


def verify(mf: mfile.MigrationFile, targets: dict[str, RAMBlock]) -> bool:
    """Compare each restored block's blake3 with mfd's trailer; False if there is none."""
    if mf.trailer is None:
        return False
    for b in mf.blocks:
        want = mf.trailer.blocks.get(b.idstr)
        if want is None:
            raise ProtocolError(f"mfd trailer has no digest for block {b.idstr!r}")
        m = attach(targets[b.idstr])
        try:
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            h.update(m.view)
            got = h.hexdigest()
        finally:
            m.close()
        if got != want.blake3:
            raise ProtocolError(f"restored block {b.idstr!r} does not match the digest in the "
                                f"file's mfd trailer (file corrupt?)")
    return True


def load(opened: OpenedFile, targets: dict[str, RAMBlock], channels: int,
         direct_io: bool = False) -> LoadResult:
    mf = opened.file
    check_targets(mf, targets)
    start = time.monotonic()
    if mf.mapped_ram:
        moved = load_mapped_ram(opened, targets, channels, direct_io)
    else:
        moved = load_stream(opened, targets)
    ok = verify(mf, targets)
    return LoadResult(mf, time.monotonic() - start, moved, ok)
