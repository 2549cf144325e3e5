"""RAMBlocks backed by files that every process maps ``MAP_SHARED``.

One owner per block file: :class:`SharedRAM` creates the files (``O_EXCL``) and is the only
code that unlinks them, in ``close()``; every other process :func:`attach` es by path and only
unmaps. Plain files under /dev/shm (or any path) are used instead of
``multiprocessing.shared_memory`` so no resource_tracker is involved: on 3.11 it unlinks
segments it did not create when an attaching process exits (gh-82300), and warns about
"leaked" ones, which is the early-unlink bug the lifetime tests guard against.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import mmap
import os
import re
from dataclasses import dataclass

import numpy as np

from mfd.errors import MfdError
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.sysutil import link_fd
from mfd.units import human

SHM_DIR = "/dev/shm"
MADV_POPULATE_READ = 22  # linux/mman.h, 5.14+; Python 3.11's mmap module lacks the name
WORDS_PER_PAGE = TARGET_PAGE_SIZE // 8
ZERO_CHUNK = 2 << 20  # bytes per write of zeros over preallocated RAM


@dataclass(frozen=True)
class RAMBlock:
    """A named region of guest RAM: QEMU's ``idstr`` and ``used_length``, and its backing."""

    idstr: str
    used_length: int
    path: str

    @property
    def num_pages(self) -> int:
        return self.used_length // TARGET_PAGE_SIZE


def shm_path(owner: str, idstr: str) -> str:
    """/dev/shm/mfd-<owner>-<idstr>; QEMU idstrs may hold '/' (``/rom@etc/acpi/tables``)."""
    safe = re.sub(r"[^A-Za-z0-9._@-]", "_", idstr)
    return os.path.join(SHM_DIR, f"mfd-{owner}-{safe}")


def check_block_size(idstr: str, size: int) -> None:
    if size <= 0 or size % TARGET_PAGE_SIZE:
        raise MfdError(f"block {idstr!r}: size {size} is not a positive multiple of "
                       f"{TARGET_PAGE_SIZE}")


def require_room(directory: str, blocks: list[tuple[str, int]]) -> None:
    """Refuse RAM that ``directory`` (a tmpfs) cannot hold: its files are sparse, so creating
    them succeeds, and the first write past the tmpfs's size kills the writer with SIGBUS."""
    need = sum(size for _, size in blocks)
    try:
        st = os.statvfs(directory)
    except OSError:
        return  # creating the files will say what is wrong with the directory
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise MfdError(f"{directory} has {human(free)} free, the RAM needs {human(need)} "
                       "(in a container, raise its shm_size)")


def write_at(fd: int, buffers: list, offset: int, size: int) -> None:
    """``buffers`` (``size`` bytes, at most IOV_MAX of them), one after the other, into the
    file from ``offset``: tmpfs writes whole, or fails."""
    n = os.pwritev(fd, buffers, offset)
    if n != size:
        raise MfdError(f"short write to RAM: {n} of {size} bytes")


def read_at(fd: int, out: np.ndarray, offset: int) -> None:
    """``out`` filled from the file at ``offset``."""
    n = os.preadv(fd, [out], offset)
    if n != out.nbytes:
        raise MfdError(f"short read of RAM: {n} of {out.nbytes} bytes")


class MappedBlock:
    """A process's mapping of one RAMBlock; ``close()`` unmaps and never unlinks. The file
    stays open: its holes (SEEK_DATA/SEEK_HOLE) say which pages were never written."""

    def __init__(self, block: RAMBlock, *, writable: bool) -> None:
        self.block = block
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            self.fd = os.open(block.path, flags)
        except OSError as e:
            raise MfdError(f"cannot open RAM block {block.idstr!r} at {block.path}: "
                           f"{e.strerror}") from None
        try:
            size = os.fstat(self.fd).st_size
            if size < block.used_length:
                raise MfdError(f"RAM block {block.idstr!r} at {block.path} has {size} bytes, "
                               f"expected {block.used_length}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self.mm = mmap.mmap(self.fd, block.used_length, mmap.MAP_SHARED, prot)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.mm)

    @property
    def address(self) -> int:
        """Where the block is mapped in this process (userfaultfd speaks addresses)."""
        view = np.frombuffer(self.mm, dtype=np.uint8, count=1)
        return int(view.ctypes.data)

    @property
    def words(self) -> np.ndarray:
        """The block as (num_pages, 512) uint64: zero checks and stamps, no copies."""
        return np.frombuffer(self.mm, dtype=np.uint64).reshape(-1, WORDS_PER_PAGE)

    def populate(self, start: int, end: int) -> None:
        """Map pages [start, end) in one call (MADV_POPULATE_READ) rather than a fault per
        page: a first pass over 1 GiB of a fresh mapping went from 0.43 to 0.11 s. Only for
        pages with data: populating a hole of tmpfs would allocate it."""
        with contextlib.suppress(OSError):  # Linux < 5.14: the faults happen anyway
            self.mm.madvise(MADV_POPULATE_READ, start * TARGET_PAGE_SIZE,
                            (end - start) * TARGET_PAGE_SIZE)

    def close(self) -> None:
        self.view.release()
        # numpy views may still reference the mmap; it is unmapped when they go away.
        with contextlib.suppress(BufferError):
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def data_runs(fd: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """[start, end) runs of the pages in [lo, hi) that hold data in the block's backing file.

    The rest are holes: pages nobody ever wrote (guest RAM a VM never touched, a sparse
    image's zero pages), which read as zero without being read at all. A page partly in a
    hole counts as data. One SEEK_DATA/SEEK_HOLE pair per extent, never per page.
    """
    st = os.fstat(fd)
    if st.st_blocks * 512 >= st.st_size:
        # no hole at all (a guest that touched all its RAM): SEEK_HOLE would scan from
        # each start to the file's end, once per call (1 GiB: 1-2 ms a call)
        return [(lo, hi)]
    runs = []
    while lo < hi:
        extent = next_extent(fd, lo)
        if extent is None or extent[0] >= hi:
            break
        runs.append((extent[0], min(extent[1], hi)))
        lo = extent[1]
    return runs


def next_extent(fd: int, page: int) -> tuple[int, int] | None:
    """The first [start, end) of pages holding data at or after ``page``, whole (its end
    may lie far beyond), or None if only holes follow."""
    try:
        data = os.lseek(fd, page * TARGET_PAGE_SIZE, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # only a hole up to the end of the file
            return None
        raise
    hole = os.lseek(fd, data, os.SEEK_HOLE)
    return data // TARGET_PAGE_SIZE, -(-hole // TARGET_PAGE_SIZE)


class DataExtents:
    """:func:`data_runs` that remembers what it found to be data. A page with data stays
    data (guests never punch holes), so a range inside a known extent costs no system
    call; only where a hole was seen it asks again (the guest may have written there since:
    a write after the caller's dirty bits were cleared is in the next round anyway).
    SEEK_HOLE scans to the next hole however far beyond the range asked about, so asking
    per packet about RAM that is nearly all data cost 1-2 ms a call (a 1 GiB migration:
    21 s instead of 1.3 s)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.known: list[tuple[int, int]] = []  # sorted, disjoint data extents (pages)

    def runs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        p = lo
        while p < hi:
            i = bisect.bisect_right(self.known, (p, 1 << 62)) - 1
            if i >= 0 and self.known[i][1] > p:  # inside a known extent
                end = min(self.known[i][1], hi)
                out.append((p, end))
                p = end
                continue
            extent = next_extent(self.fd, p)
            if extent is None or extent[0] >= hi:
                break
            start, end = extent
            self._learn(start, end)
            out.append((start, min(end, hi)))
            p = min(end, hi)
        return out

    def _learn(self, start: int, end: int) -> None:
        """Insert [start, end), merged with the neighbours it touches (never a pass over
        all extents: a sparse 2 GiB image has tens of thousands)."""
        known = self.known
        i = bisect.bisect_left(known, (start, end))
        if i > 0 and known[i - 1][1] >= start:  # touches the one before
            i -= 1
            start = known[i][0]
            end = max(end, known[i][1])
            del known[i]
        while i < len(known) and known[i][0] <= end:  # and the ones after
            end = max(end, known[i][1])
            del known[i]
        known.insert(i, (start, end))


def nonzero_rows(words: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """Which of ``rows`` (indices or a slice of pages) of a (pages, 512) uint64 view hold a
    nonzero word, cheaply: a page with a nonzero sample word (first, middle, last) is nonzero
    without reading the rest, as QEMU's ``buffer_is_zero`` checks a few words first; only the
    others are scanned whole."""
    nonzero = (words[rows, 0] | words[rows, WORDS_PER_PAGE // 2] | words[rows, -1]) != 0
    rest = np.flatnonzero(~nonzero)
    if len(rest):
        idx = np.arange(rows.start, rows.stop)[rest] if isinstance(rows, slice) else rows[rest]
        nonzero[rest] = words[idx].max(axis=1) != 0
    return nonzero


def nonzero_pages(block: MappedBlock, pages: np.ndarray,
                  runs: list[tuple[int, int]] | None = None) -> np.ndarray:
    """multifd zero-page detection of one job's pages (``multifd_send_zero_page_detect``):
    a bool per page. Contiguous pages (every job of a first round) are checked only where
    the block's file has data (``runs``, where the caller knows them, e.g. from its
    :class:`DataExtents`): holes are zero without a read, which would also allocate
    memory for them. Scattered pages are checked where they are."""
    words = block.words
    lo, hi = int(pages[0]), int(pages[-1]) + 1
    if hi - lo != len(pages):
        return nonzero_rows(words, pages)
    nonzero = np.zeros(len(pages), dtype=bool)
    for start, end in data_runs(block.fd, lo, hi) if runs is None else runs:
        block.populate(start, end)
        nonzero[start - lo : end - lo] = nonzero_rows(words, slice(start, end))
    return nonzero


def attach(block: RAMBlock, *, writable: bool = False) -> MappedBlock:
    return MappedBlock(block, writable=writable)


def per_page_size(blocks: list[RAMBlock], itemsize: int) -> int:
    """Bytes of a file holding ``itemsize`` bytes per page of every block (whole pages)."""
    n = sum(b.num_pages for b in blocks) * itemsize
    return -(-n // TARGET_PAGE_SIZE) * TARGET_PAGE_SIZE


def per_page(mapped: MappedBlock, blocks: list[RAMBlock], dtype: type) -> list[np.ndarray]:
    """A file of ``per_page_size`` bytes as one array per block, an item per page: the
    destination's receivedmap, each end's page hashes."""
    flat = np.frombuffer(mapped.mm, dtype=dtype)
    starts = np.cumsum([0] + [b.num_pages for b in blocks]).tolist()
    return [flat[a:b] for a, b in itertools.pairwise(starts)]


class SharedRAM:
    """The owner of a set of block files: creates them zeroed, unlinks them in ``close()``."""

    def __init__(self, owner: str, blocks: list[tuple[str, int]]) -> None:
        self.blocks: list[RAMBlock] = []
        self.owned = True
        require_room(SHM_DIR, blocks)
        try:
            for idstr, size in blocks:
                check_block_size(idstr, size)
                path = shm_path(owner, idstr)
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    raise MfdError(f"{path} already exists: is a guest named {owner!r} running "
                                   "(or left over from a crash; remove the file)?") from None
                self.blocks.append(RAMBlock(idstr, size, path))
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        except BaseException:
            self.close()
            raise

    @classmethod
    def attached(cls, blocks: list[RAMBlock]) -> SharedRAM:
        """Blocks someone else owns for now (an incoming migration's unnamed RAM): nothing is
        unlinked until :meth:`take` hands the named files over."""
        ram = cls.__new__(cls)
        ram.blocks = list(blocks)
        ram.owned = False
        return ram

    def take(self, blocks: list[RAMBlock]) -> None:
        """Become the owner (the unlinker) of ``blocks``: the same RAM, now with names."""
        self.blocks = list(blocks)
        self.owned = True

    def close(self) -> None:
        """Unlink every block file this owner created or took (idempotent)."""
        if self.owned:
            for b in self.blocks:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(b.path)
        self.blocks = []

    def __enter__(self) -> SharedRAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PendingRAM:
    """Destination RAM that has no name until the migration succeeds.

    Each block is an ``O_TMPFILE`` file held only by file descriptors: every process of the
    incoming migration reaches it as ``/proc/<pid>/fd/<fd>``, and a destination that fails,
    or is killed outright, leaves nothing behind in /dev/shm (the kernel frees the RAM with
    the last descriptor or mapping). :meth:`link` names a block once the migration succeeded.
    """

    def __init__(self, directory: str, blocks: list[tuple[str, int]], *,
                 zeroed: bool = False, ahead: PendingRAM | None = None) -> None:
        """``zeroed``: every page allocated and zeroed now, as QEMU's ``prealloc=on``
        (otherwise the files are sparse: a page is allocated when first written);
        ``ahead``: RAM made so before the block list was known (``mfd incoming
        --prealloc``), taken over whole: each of its blocks must be one of ``blocks``, of
        the same size (QEMU's "Length mismatch"), and is used as it is."""
        self.fds: list[int] = []
        self.blocks: list[RAMBlock] = []
        # each block's pages all exist (zeroed now, or ahead): writing one allocates nothing
        self.allocated: list[bool] = []
        made = ahead.hand_over() if ahead is not None else {}
        made_names = set(made)
        try:
            unknown = sorted(set(made) - {idstr for idstr, _ in blocks})
            if unknown:
                raise MfdError(f"RAM block {unknown[0]!r} was allocated ahead (--prealloc) "
                               f"but the source has no such block (its blocks: "
                               f"{', '.join(idstr for idstr, _ in blocks)})")
            require_room(directory, [(i, n) for i, n in blocks if i not in made])
            for idstr, size in blocks:
                check_block_size(idstr, size)
                if idstr in made:
                    fd, have = made.pop(idstr)
                    self.fds.append(fd)
                    if have != size:  # QEMU's ram_load_precopy, in its words
                        raise MfdError(f"Length mismatch: {idstr}: {size:#x} in != {have:#x} "
                                       f"(the RAM allocated ahead, --prealloc "
                                       f"{idstr}={human(have)})")
                    path = _fd_path(fd)
                else:
                    path = self._tmpfile(directory, size, zeroed)
                self.blocks.append(RAMBlock(idstr, size, path))
                self.allocated.append(zeroed or idstr in made_names)
        except BaseException:
            for fd, _ in made.values():
                os.close(fd)
            self.close()
            raise

    def _tmpfile(self, directory: str, size: int, zeroed: bool) -> str:
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError as e:
            raise MfdError(f"cannot create RAM in {directory}: {e.strerror}") from None
        self.fds.append(fd)
        try:
            os.ftruncate(fd, size)
            if zeroed:
                _write_zeros(fd, size)
        except OSError as e:
            raise MfdError(f"cannot {'allocate' if zeroed else 'size'} RAM in {directory} "
                           f"to {size} bytes: {e.strerror}") from None
        return _fd_path(fd)

    def hand_over(self) -> dict[str, tuple[int, int]]:
        """idstr -> (descriptor, size) of every block, which the caller now owns."""
        made = {b.idstr: (fd, b.used_length) for b, fd in zip(self.blocks, self.fds,
                                                                strict=True)}
        self.fds, self.blocks, self.allocated = [], [], []
        return made

    def link(self, i: int, path: str) -> None:
        """Give block i the name ``path`` (which must not exist)."""
        try:
            link_fd(self.fds[i], path)
        except FileExistsError:
            raise MfdError(f"{path} already exists") from None
        except OSError as e:
            raise MfdError(f"cannot create {path}: {e.strerror}") from None

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def _fd_path(fd: int) -> str:
    return f"/proc/{os.getpid()}/fd/{fd}"


def _write_zeros(fd: int, size: int) -> None:
    """Allocate and zero every page, as QEMU's ``prealloc=on`` touches each. Zeros written
    in 2 MiB chunks cost 0.39 CPU-s per GiB of /dev/shm here; fallocate and then
    MADV_POPULATE_WRITE (what makes fallocate's pages uptodate) 0.59. fallocate alone
    (0.24) is not QEMU's prealloc: its pages are zeroed only when first touched."""
    zeros = memoryview(bytes(ZERO_CHUNK))
    offset = 0
    while offset < size:
        offset += os.pwrite(fd, zeros[:size - offset], offset)
