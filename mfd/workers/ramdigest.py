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


def content_digest(nonzero: np.ndarray, pages: np.ndarray) -> bytes:
    """One chunk's digest: ``nonzero`` is a bool per page of the chunk, ``pages`` a (n, 512)
    uint64 array holding exactly the chunk's nonzero pages, in order."""
    h = blake3.blake3(np.packbits(nonzero).tobytes())
    if len(pages):
        h.update(memoryview(np.ascontiguousarray(pages)).cast("B"))
    return h.digest()


def packet_digest(nonzero: np.ndarray, data: np.ndarray, checked: bool = False) -> bytes:
    """The digest of a whole-chunk packet from its data: ``nonzero`` says which pages of the
    chunk are normal (the others were sent or received as zero pages), ``data`` holds the
    normal pages. A normal page may still be all zero (a sender without zero-page detection
    sends those): zero-ness is judged on the data itself, as ``ram_digests`` judges RAM,
    unless the caller ``checked`` this very data already."""
    if checked:
        return content_digest(nonzero, data)
    content = nonzero.copy()
    rows = nonzero_rows(data, slice(0, len(data))) if len(data) else np.zeros(0, dtype=bool)
    content[np.flatnonzero(nonzero)] = rows
    return content_digest(content, data if rows.all() else data[rows])


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
        mask = nonzero_rows(chunk, slice(0, end - start))
        out += content_digest(mask, chunk if mask.all() else chunk[mask])
    return bytes(out)
