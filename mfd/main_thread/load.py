"""The destination loader for migration files (``ram_load`` for mapped-ram and streams).

::

    parse + validate the whole file (mfd.protocol.migration_file), before any write
    mapped-ram: per block, read file_bmap; runs of set bits, cut at 512 KiB chunks; jobs
                of whole chunks go to idle channels, which preadv straight into the
                destination's shared memory and hash each chunk they read; sync; every
                chunk digest equal to mfd's trailer's, when there is one
    stream:     pages placed as their records come, a run of records at a time (strided
                numpy copies, no per-page loop; mfd.shm.placer), from the file's mapping or
                from the decoder's buffer of a compressed stream (mfd.main_thread.decompress)

Where the stream starts: at the offset given, or after libvirt's save header found there
(mfd.protocol.libvirt_save).

Destination RAM must start zeroed: clear bits are never read (invariant 5). The targets are
created by the caller (fresh files, so they are zero).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mfd.errors import MfdError, ProtocolError
from mfd.main_thread import decompress
from mfd.main_thread.lazy import FileFaults
from mfd.main_thread.pipeline import ChannelPool, OnDone
from mfd.main_thread.scanner import chunk_jobs
from mfd.protocol import libvirt_save, livestream, trailer
from mfd.protocol import migration_file as mfile
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.ramruns import RunEvent, ZeroPages
from mfd.shm.placer import MappedPlacer
from mfd.shm.ramblock import RAMBlock, attach
from mfd.workers.file_channel import FileChannelConfig, channel_main
from mfd.xhooks import NO_HOOKS, XHooks

_HEAD = 4096  # bytes read to recognise what starts at an offset
QEVM = b"QEVM"


@dataclass
class LoadResult:
    file: mfile.MigrationFile
    seconds: float
    bytes_read: int
    verified: bool  # digests matched mfd's trailer


class OpenedFile:
    """A migration file, found where its stream starts, read up to its block list.

    The stream starts at ``offset`` (``file:PATH,offset=N``), or after the libvirt save
    header found there (``header``). An uncompressed file is mapped read-only. A mapped-ram
    file is parsed and validated whole here, before anything is written (its stream is a few
    KiB; its pages are read at random). A classic stream, as QEMU's loader reads it, is read
    here up to its block list (what the caller needs to make the destination), then again
    whole by :meth:`events` while a loader places its pages: one pass, whether it is mapped
    or decompressed (``file.compression``), validated as it goes (a restore writes only into
    destinations it removes on failure); :meth:`parse_all` reads it whole for a describer."""

    def __init__(self, path: str, offset: int = 0) -> None:
        self.path = path
        self.mm: mmap.mmap | None = None
        self.header: libvirt_save.SaveHeader | None = None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise MfdError(f"cannot open {path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size <= offset:
                raise ProtocolError(f"{path} is empty" if size == 0 else
                                    f"{path} has {size} bytes, nothing after offset {offset:#x}")
            self.start = self._find_stream(fd, offset, size)
            head = os.pread(fd, _HEAD, self.start)
            self.compression = decompress.detect(head)
            self._check_format(head)
            if self.compression is None:
                self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.size = size
        try:
            self.file = self._new_file()
            for ev in self.events():
                mfile.on_event(self.file, ev)
                if isinstance(ev, livestream.Blocks):
                    break
            if self.file.mapped_ram:
                assert self.mm is not None  # a compressed one is refused at its header
                self.file = mfile.parse(self.mm, size, self.start)
        except BaseException:
            self.close()
            raise

    def _new_file(self) -> mfile.MigrationFile:
        return mfile.MigrationFile(self.start, self.size, compression=self.compression)

    def parse_all(self) -> None:
        """A classic stream read whole into ``file`` (what ``mfd inspect`` shows)."""
        if self.file.mapped_ram:
            return
        if self.mm is not None:
            self.file = mfile.parse(self.mm, self.size, self.start)
            return
        self.file = self._new_file()
        for ev in self.events():
            mfile.on_event(self.file, ev)

    def _find_stream(self, fd: int, offset: int, size: int) -> int:
        """Where QEMU's stream starts: at ``offset``, or after a libvirt header there."""
        head = os.pread(fd, _HEAD, offset)
        if not libvirt_save.is_save_image(head):
            return offset
        need = libvirt_save.HEADER_SIZE + libvirt_save.data_len_of(head)
        if len(head) < need <= size - offset:
            head = os.pread(fd, need, offset)
        self.header = libvirt_save.decode(head, size, offset)
        return self.header.stream_offset

    def _check_format(self, head: bytes) -> None:
        """A libvirt header says what the stream went through: the stream must agree."""
        if self.header is None:
            return
        said = self.header.format if self.header.compressed else None
        if self.compression == said and (said or head.startswith(QEVM)):
            return
        found = f"a {self.compression} stream" if self.compression else \
            "an uncompressed QEMU stream" if head.startswith(QEVM) else \
            f"bytes {head[:8].hex(' ')}, neither QEVM nor a compressed stream"
        raise ProtocolError(f"{self.path}: the libvirt header says image format "
                            f"{self.header.format!r}, but at offset {self.start:#x} (after the "
                            f"header) there is {found}")

    def events(self) -> Iterator[livestream.Event]:
        """The stream's events from its start to its end, read from the file's mapping or
        decompressed; a stream cut short raises at its end."""
        if self.mm is not None:
            dec = livestream.StreamDecoder(self.path, framing=True, file=True,
                                           mapped_ram=mfile.mapped_ram_header)
            yield from dec.decode_all(self.mm, self.start, self.size)
            if not dec.eof:
                raise ProtocolError(mfile.truncated(dec.offset))
            return
        fmt = self.compression
        assert fmt is not None
        what = f"{fmt} stream in {self.path}"
        dec = livestream.StreamDecoder(what, framing=True, file=True)
        with decompress.Decompressed(self.path, self.start, fmt) as src:
            while not dec.done and (n := src.readinto(dec.buffer())):
                try:
                    events = dec.filled(n)
                except ProtocolError as e:
                    if not dec.header_done:
                        raise
                    # a stream that breaks after a good start: most likely the compressed
                    # data, which these formats check only at the end of a block or frame
                    raise ProtocolError(f"{e} (corrupt {fmt} data?)") from None
                yield from events
        if not dec.done and (not dec.eof or dec.end > dec.start):
            raise ProtocolError(f"{what}: truncated: QEMU's stream ends at its offset "
                                f"{dec.base + dec.end:#x}, " + (
                                    "inside the vmdesc" if dec.eof else
                                    "before QEMU_VM_EOF") + f" (a cut {fmt} file?)")
        self.file.stream_end = dec.offset

    def close(self) -> None:
        if self.mm is not None:
            # a failed load's traceback may still hold page views of the mapping (its
            # frames' locals): it is unmapped when they go
            with contextlib.suppress(BufferError):
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
                    direct_io: bool = False, faults: FileFaults | None = None,
                    x: XHooks = NO_HOOKS) -> tuple[int, bool]:
    """Returns bytes read and whether mfd's trailer was verified (False: no trailer).
    ``faults``: lazy restore, the running guest's faults served while the channels load
    (through its uffd, which they inherit)."""
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
        direct_io=direct_io, verify=verify,
        uffd=faults.fileno() if faults else -1,
        bases=tuple(faults.ram.bases) if faults else (), x=x)
        for i in range(channels)]
    moved = [0]

    def done(check: ChunkCheck | None, pairs: np.ndarray) -> OnDone:
        def on_done(nbytes: int, _mask: np.ndarray, digests: bytes) -> None:
            moved[0] += nbytes
            if check is not None:
                check.job_done(pairs, digests)
        return on_done

    with ChannelPool(configs, channel_main) as pool:
        if faults is not None:
            pool.watch(faults.fileno(), faults.serve)
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
    """Classic stream: pages placed as their records come, as QEMU's ``ram_load`` does (a
    later record of a page replaces an earlier one; a ZERO record clears only a page written
    before: the targets start zeroed). Copies straight from the file's mapping, or from the
    decoder's buffer of a decompressed stream."""
    blocks = opened.file.blocks
    mapped = [attach(targets[b.idstr], writable=True) for b in blocks]
    moved = 0
    try:
        index = {b.idstr: i for i, b in enumerate(blocks)}
        placer = MappedPlacer(mapped,
                              [np.zeros(b.num_pages, dtype=np.uint8) for b in blocks], None)
        for ev in opened.events():
            if isinstance(ev, RunEvent):  # XBZRLE: onto the page as it is now
                placer.run(index[ev.idstr], ev, "")
                if not isinstance(ev, ZeroPages):
                    moved += len(ev.pages) * TARGET_PAGE_SIZE
    finally:
        for m in mapped:
            m.close()
    return moved


def load(opened: OpenedFile, targets: dict[str, RAMBlock], channels: int,
         direct_io: bool = False, faults: FileFaults | None = None,
         x: XHooks = NO_HOOKS) -> LoadResult:
    mf = opened.file
    check_targets(mf, targets)
    start = time.monotonic()
    if mf.mapped_ram:
        moved, ok = load_mapped_ram(opened, targets, channels, direct_io, faults, x)
    else:  # mfd writes no stream files, so no trailer here (the parser refuses one)
        moved, ok = load_stream(opened, targets), False
    return LoadResult(mf, time.monotonic() - start, moved, ok)
