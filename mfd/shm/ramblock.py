"""RAMBlocks backed by files that every process maps ``MAP_SHARED``.

One owner per block file: :class:`SharedRAM` creates the files (``O_EXCL``) and is the only
code that unlinks them, in ``close()``; every other process :func:`attach` es by path and only
unmaps. Plain files under /dev/shm (or any path) are used instead of
``multiprocessing.shared_memory`` so no resource_tracker is involved: on 3.11 it unlinks
segments it did not create when an attaching process exits (gh-82300), and warns about
"leaked" ones, which is the early-unlink bug the lifetime tests guard against.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
from dataclasses import dataclass

import numpy as np

from mfd.errors import MfdError
from mfd.protocol.constants import TARGET_PAGE_SIZE

SHM_DIR = "/dev/shm"
WORDS_PER_PAGE = TARGET_PAGE_SIZE // 8


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


class MappedBlock:
    """A process's mapping of one RAMBlock; ``close()`` unmaps and never unlinks."""

    def __init__(self, block: RAMBlock, *, writable: bool) -> None:
        self.block = block
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            fd = os.open(block.path, flags)
        except OSError as e:
            raise MfdError(f"cannot open RAM block {block.idstr!r} at {block.path}: "
                           f"{e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < block.used_length:
                raise MfdError(f"RAM block {block.idstr!r} at {block.path} has {size} bytes, "
                               f"expected {block.used_length}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self.mm = mmap.mmap(fd, block.used_length, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        self.view = memoryview(self.mm)

    @property
    def words(self) -> np.ndarray:
        """The block as (num_pages, 512) uint64: zero checks and stamps, no copies."""
        return np.frombuffer(self.mm, dtype=np.uint64).reshape(-1, WORDS_PER_PAGE)

    def close(self) -> None:
        self.view.release()
        # numpy views may still reference the mmap; it is unmapped when they go away.
        with contextlib.suppress(BufferError):
            self.mm.close()


def data_runs(fd: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """[start, end) runs of the pages in [lo, hi) that hold data in the block's backing file.

    The rest are holes: pages nobody ever wrote (guest RAM a VM never touched, a sparse
    image's zero pages), which read as zero without being read at all. A page partly in a
    hole counts as data. One SEEK_DATA/SEEK_HOLE pair per extent, never per page.
    """
    start, end = lo * TARGET_PAGE_SIZE, hi * TARGET_PAGE_SIZE
    runs = []
    while start < end:
        try:
            data = os.lseek(fd, start, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole up to the end of the file
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        runs.append((data // TARGET_PAGE_SIZE, -(-hole // TARGET_PAGE_SIZE)))
        start = hole
    return runs


def attach(block: RAMBlock, *, writable: bool = False) -> MappedBlock:
    return MappedBlock(block, writable=writable)


class SharedRAM:
    """The owner of a set of block files: creates them zeroed, unlinks them in ``close()``."""

    def __init__(self, owner: str, blocks: list[tuple[str, int]]) -> None:
        self.blocks: list[RAMBlock] = []
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

    def close(self) -> None:
        """Unlink every block file this owner created (idempotent)."""
        for b in self.blocks:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(b.path)
        self.blocks = []

    def __enter__(self) -> SharedRAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
