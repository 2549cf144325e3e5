"""Digests of guest RAM content, chunk by chunk, equal on both ends of a migration iff the
RAM is: how a live migration proves at switchover that every block arrived whole.

A chunk (128 pages, 512 KiB) hashes as ``blake3(packbits(nonzero) + its nonzero pages)``: a
page that is zero contributes one clear bit whether it is a hole (never written: on the
destination, never received) or a page of zeros, so the two ends agree although their
files' holes differ. Holes are found with SEEK_DATA/SEEK_HOLE and never read: reading a tmpfs
hole through a mapping would allocate it. Each channel hashes its own jobs, in parallel.
"""

from __future__ import annotations

import blake3
import numpy as np

from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import set_runs
from mfd.shm.ramblock import MappedBlock, nonzero_pages


def ram_digests(block: MappedBlock, pairs: np.ndarray) -> bytes:
    """32 bytes per [start, end) pair of ``pairs`` (whole chunks, one pair each, ascending)."""
    runs = pairs.reshape(-1, 2)
    lo, hi = int(runs[0, 0]), int(runs[-1, 1])
    nonzero = nonzero_pages(block, np.arange(lo, hi))
    view = block.view
    out = bytearray()
    for start, end in runs.tolist():  # per chunk, never per page
        mask = nonzero[start - lo : end - lo]
        h = blake3.blake3(np.packbits(mask).tobytes())
        for a, b in (set_runs(mask) + start).tolist():
            h.update(view[a * TARGET_PAGE_SIZE : b * TARGET_PAGE_SIZE])
        out += h.digest()
    return bytes(out)
