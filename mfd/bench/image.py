"""The RAM image every mode of a benchmark moves, and fresh copies of it as guest RAM.

Generated deterministically (:func:`mfd.ramimage.generate`: 4 KiB pages in runs of 16, the
given zero / random / compressible mix, zero pages as holes) or taken from a real RAM dump
(``--image``, used read-only). Each destination is checked against its blake3 outside the
timed region.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np

from mfd.bench.runs import unlink
from mfd.errors import UsageError

MiB = 1 << 20
PAGE = 4096


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def fdatasync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def digest(path: str) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(path)
    return h.hexdigest()


@dataclass
class Image:
    path: str
    size: int
    blake3: str
    info: dict[str, Any]  # how it was made, its page mix, allocated bytes

    def check(self, path: str, what: str) -> None:
        """Raise unless ``path`` holds exactly this image; the message counts the pages
        that differ."""
        actual = os.path.getsize(path)
        if actual != self.size:
            raise RuntimeError(f"{what} has {actual} bytes, expected {self.size}")
        if digest(path) != self.blake3:
            raise RuntimeError(f"{what} differs from the image in "
                               f"{differing_pages(self.path, path, self.size)} pages")

    def copy(self, dst: str, *, ram: str = "sparse", fresh: bool = True, start: int = 0) -> str:
        """A fresh copy at ``dst`` (e.g. in /dev/shm, as guest RAM); ``fresh=False`` writes
        the image's data into the existing zeroed file ``dst`` (a new guest's RAM), from
        byte ``start`` on (a KVM guest's program and page tables are below).

        "sparse": the image's zero pages stay holes, as RAM a guest never touched;
        "allocated": every page is in memory, zero pages written as zeros (freed memory).
        """
        if fresh:
            unlink(dst)
        fi = os.open(self.path, os.O_RDONLY)
        fo = os.open(dst, os.O_WRONLY | (os.O_CREAT | os.O_EXCL if fresh else 0), 0o600)
        try:
            if ram == "allocated":
                os.posix_fallocate(fo, 0, self.size)
            elif fresh:
                os.ftruncate(fo, self.size)
            pos = start
            while pos < self.size:  # copy only the image's data extents
                try:
                    start = os.lseek(fi, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(fi, start, os.SEEK_HOLE)
                while start < end:  # not copy_file_range: EXDEV from a disk to tmpfs
                    buf = os.pread(fi, min(8 * MiB, end - start), start)
                    os.pwrite(fo, buf, start)
                    start += len(buf)
                pos = end
        finally:
            os.close(fi)
            os.close(fo)
        return dst


def zeroed(path: str, size: int) -> str:
    """A fresh sparse file of ``size`` zero bytes (a destination RAM)."""
    with open(path, "wb") as f:
        os.ftruncate(f.fileno(), size)
    return path


def differing_pages(a: str, b: str, size: int) -> int:
    """Number of 4 KiB pages that differ (only for the error message of a failed check)."""
    x = np.memmap(a, dtype=np.uint64, mode="r", shape=(size // 8,))
    y = np.memmap(b, dtype=np.uint64, mode="r", shape=(size // 8,))
    step = 64 * MiB // 8
    bad = 0
    for i in range(0, size // 8, step):
        d = (x[i : i + step] != y[i : i + step]).reshape(-1, PAGE // 8).any(axis=1)
        bad += int(d.sum())
    return bad


def generate(path: str, size: int, *, zero: float, random: float, seed: int,
             sync: bool = False) -> Image:
    """The benchmark image at ``path``; ``sync`` flushes it to the disk (so "cold" reads can
    evict it)."""
    from mfd.ramimage import generate as fill

    t0 = time.perf_counter()
    kinds = fill(path, size, seed=seed, zero=zero, random=random, run=16)
    if sync:
        fdatasync_path(path)
    info = {"source": "generated", "pages": kinds, "seed": seed, "run": 16, "zero": zero,
            "random": random, "allocated": allocated(path),
            "generate_seconds": time.perf_counter() - t0}
    return Image(path, size, digest(path), info)


def from_dump(path: str) -> Image:
    """A real RAM dump as the image (read, never written)."""
    size = os.path.getsize(path)
    if size <= 0 or size % PAGE:
        raise UsageError(f"mfd bench: --image {path}: {size} bytes is not a positive "
                         f"multiple of {PAGE}")
    mm = np.memmap(path, dtype=np.uint64, mode="r", shape=(size // 8,))
    zero = 0
    step = 64 * MiB // 8
    for i in range(0, size // 8, step):
        zero += int((~mm[i : i + step].reshape(-1, PAGE // 8).any(axis=1)).sum())
    del mm
    info = {"source": "dump", "dump": os.path.abspath(path),
            "pages": {"zero": zero, "nonzero": size // PAGE - zero},
            "allocated": allocated(path)}
    return Image(path, size, digest(path), info)
