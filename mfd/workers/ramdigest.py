"""Digests of guest RAM content, chunk by chunk, equal on both ends of a migration iff the
RAM is: how a live migration proves at switchover that every block arrived whole.

A chunk (128 pages, 512 KiB) hashes as ``blake3(packbits(nonzero) + its nonzero pages)``: a
page that is zero contributes one clear bit whether it is a hole (never written: on the
destination, never received) or a page of zeros, so the two ends agree although their
files' holes differ. Holes are found with SEEK_DATA/SEEK_HOLE and never read: reading a tmpfs
hole through a mapping would allocate it. Each channel hashes its own jobs, in parallel.
"""

from __future__ import annotations

import os

import blake3
import numpy as np

from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.shm.ramblock import MappedBlock, nonzero_rows


def chunk_digest(rows: np.ndarray, maybe: np.ndarray, checked: bool = False) -> bytes:
    """One chunk's digest from its pages where they are, without gathering them: ``rows`` is
    the chunk's (n, 512) uint64 pages (a view of RAM or of a buffer), ``maybe`` a bool per
    page, False for a page known to be zero (sent or received as a zero page, a hole), True
    for the others, whose zero-ness is judged on their data unless the caller ``checked``
    it already. The same bytes as hashing the mask and then the nonzero pages in order."""
    content = maybe.copy()
    if not checked and content.any():
        idx = np.flatnonzero(content)
        content[idx] = nonzero_rows(rows, slice(0, len(rows)) if len(idx) == len(rows)
                                    else idx)
    h = blake3.blake3(np.packbits(content).tobytes())
    edges = np.flatnonzero(np.diff(np.concatenate(([0], content.view(np.int8), [0]))))
    for lo, hi in edges.reshape(-1, 2).tolist():  # runs of nonzero pages, never per page
        h.update(memoryview(rows[lo:hi]).cast("B"))
    return h.digest()


def ram_digests(block: MappedBlock, pairs: np.ndarray, buffer: np.ndarray) -> bytes:
    """32 bytes per [start, end) pair of ``pairs`` (whole chunks, one pair each, ascending).
    Each chunk is read with one ``preadv`` into ``buffer`` (at least a chunk of (pages, 512)
    uint64): holes read as zeros without being allocated, no page faults, no scan of the
    file's extents (a guest writing pages at random leaves dozens per chunk), and the zero
    check then runs in cache."""
    out = bytearray()
    for start, end in pairs.reshape(-1, 2).tolist():  # per chunk, never per page
        chunk = buffer[: end - start]
        n = os.preadv(block.fd, [chunk], start * TARGET_PAGE_SIZE)
        if n != chunk.nbytes:
            raise OSError(f"short read of RAM: {n} of {chunk.nbytes} bytes")
        out += chunk_digest(chunk, np.ones(end - start, dtype=bool))
    return bytes(out)
