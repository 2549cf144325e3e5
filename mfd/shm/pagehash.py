"""Page hashes: how both ends of a live migration prove at switchover that RAM arrived whole,
with the work done while the guest still runs.

Every page a channel moves is hashed by that channel as it moves it: the source's from the
guest RAM it sends, the destination's from its RAM right after placing the page there (so a
page placed at the wrong offset, a corrupted payload or two channels racing on one page show,
not only what was sent). Each hash goes into a table, one 64-bit entry per page of every
block, in one shared file all of that end's processes map. A page is hashed again only when
it is moved again, so while the guest is stopped the ends hash only what the final round
moves; at switchover the source sends its table (8 bytes per 4 KiB page) and the destination
compares it with its own, page by page.

The hash is linear: the page as 1024 little-endian 32-bit words times 1024 fixed odd 64-bit
keys, summed mod 2**64. A zero page hashes to 0 (so a hole, never received, needs no read);
two pages that differ collide only if the difference vanishes mod 2**64, at most 2**-33 for
any difference of 32-bit words with keys drawn at random (a difference in one word never
vanishes: its keys are odd). The keys are fixed, not drawn per migration: this catches
transport and placement faults, not a guest that crafts colliding pages. Against blake3 per
512 KiB chunk (what mfd's file trailer keeps): numpy computes it for a whole packet in one
call, at 0.2 s per GiB on one core here (blake3: 0.34), and per page, so a guest that writes
at random does not make whole chunks stale.
"""

from __future__ import annotations

import os

import blake3
import numpy as np

from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import page_runs
from mfd.shm.ramblock import MappedBlock, RAMBlock, attach, per_page, per_page_size

HASH_SIZE = 8  # bytes per page in a table
_WORDS = TARGET_PAGE_SIZE // 4
KEYS = np.frombuffer(blake3.blake3(b"mfd page hash keys 1").digest(length=8 * _WORDS),
                     dtype="<u8") | np.uint64(1)
KEYS.flags.writeable = False
# a packet read back in at most this many runs is read with preadv (no page faults on pages
# just spliced into the file); more, through the mapping
PREAD_RUNS = 16


def hash_rows(rows: np.ndarray) -> np.ndarray:
    """One hash per page of ``rows``, (n, 512) uint64 pages anywhere (RAM, a buffer)."""
    return np.einsum("ij,j->i", rows.view("<u4"), KEYS)


def hash_pages(words: np.ndarray, pages: np.ndarray, buffer: np.ndarray) -> np.ndarray:
    """The hashes of ``pages`` of a (pages, 512) view of RAM: one run is hashed where it is,
    scattered pages gathered into ``buffer`` (at least len(pages) rows) first."""
    if not len(pages):
        return np.zeros(0, dtype=np.uint64)
    if int(pages[-1]) - int(pages[0]) + 1 == len(pages):
        return hash_rows(words[int(pages[0]) : int(pages[-1]) + 1])
    return hash_rows(np.take(words, pages, axis=0, out=buffer[: len(pages)]))


def hash_placed(block: MappedBlock, pages: np.ndarray, buffer: np.ndarray) -> np.ndarray:
    """The hashes of ``pages`` as the destination's RAM holds them now. Pages in a few runs
    (spliced into the file, not yet mapped here) are read with one preadv per run into
    ``buffer``; many short runs were written through the mapping, and are read there."""
    runs = page_runs(pages)
    if len(runs) > PREAD_RUNS:
        return hash_pages(block.words, pages, buffer)
    rows = buffer[: len(pages)]
    at = 0
    for lo, hi in runs.tolist():  # a few runs per packet, never per page
        part = rows[at : at + hi - lo]
        n = os.preadv(block.fd, [part], lo * TARGET_PAGE_SIZE)
        if n != part.nbytes:
            raise OSError(f"short read of RAM: {n} of {part.nbytes} bytes")
        at += hi - lo
    return hash_rows(rows)


def table_size(blocks: list[RAMBlock]) -> int:
    """Bytes of a table's file for ``blocks``."""
    return per_page_size(blocks, HASH_SIZE)


class PageHashes:
    """One end's table: ``table[block][page]``, in the file ``where`` (``table_size``
    bytes, zeroed: every page starts as a zero page), mapped by every process of that end.
    Channels write disjoint entries (a page is moved by one channel per round, and rounds
    are synced), each an aligned 8-byte store."""

    def __init__(self, where: RAMBlock, blocks: list[RAMBlock]) -> None:
        self.blocks = blocks
        self.mapped = attach(where, writable=True)
        self.table = per_page(self.mapped, blocks, np.uint64)

    def tables(self) -> dict[str, bytes]:
        return {b.idstr: t.tobytes() for b, t in zip(self.blocks, self.table, strict=True)}

    def close(self) -> None:
        self.table = []
        self.mapped.close()


def wall_share(seconds: list[float]) -> float:
    """How much of the wall clock ``seconds`` of hashing in parallel channels take: the
    busiest channel's, or all of them spread over the machine's cores, whichever is more."""
    if not seconds:
        return 0.0
    return max(max(seconds), sum(seconds) / (os.cpu_count() or 1))


def first_difference(theirs: bytes, ours: np.ndarray) -> tuple[int, int] | None:
    """(pages that differ, the first of them), or None when the tables are equal."""
    bad = np.flatnonzero(np.frombuffer(theirs, dtype=np.uint64) != ours)
    return (len(bad), int(bad[0])) if len(bad) else None
