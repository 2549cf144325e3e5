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

The hash is xxHash's XXH3 (64 bits) of the page, xored with XXH3 of a zero page so that a
zero page hashes to 0: a hole, never received, needs no read, and a fresh table (zeros) says
"all zero". XXH3 is not keyed: this catches transport and placement faults, not a guest that
crafts colliding pages. It runs once per page through ``map`` (C calls, no Python bytecode
per page) because nothing vectorized with numpy is as fast: on one core here, 0.30 us a
page in cache and 0.43 gathered from L3, against 0.62 / 1.10 for the fastest sound numpy
hash (the page as 32-bit words times 64-bit keys, summed mod 2**64, with ``einsum``; 64-bit
words would be 30% faster but blind to an even number of words differing only in their top
bit), and 0.34 s per GiB for blake3 per 512 KiB chunk (what mfd's file trailer keeps, and
what the live check used to hash, whole chunks going stale under a guest writing at random).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import xxhash

from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.peer import HASH_SIZE
from mfd.shm.ramblock import RAMBlock, attach, per_page, per_page_size

_XXH3 = xxhash.xxh3_64_intdigest
ZERO_PAGE = np.uint64(_XXH3(bytes(TARGET_PAGE_SIZE)))


def _hash_each(pages: Iterable, count: int) -> np.ndarray:
    return np.fromiter(map(_XXH3, pages), dtype=np.uint64, count=count) ^ ZERO_PAGE


def hash_rows(rows: np.ndarray) -> np.ndarray:
    """One hash per page of ``rows``, (n, 512) uint64 pages anywhere (RAM, a buffer)."""
    return _hash_each(rows, len(rows))


def hash_pages(words: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """The hashes of ``pages`` of a (pages, 512) view of RAM, each read where it is."""
    if len(pages) and int(pages[-1]) - int(pages[0]) + 1 == len(pages) \
            and bool(np.all(pages[1:] > pages[:-1])):  # one run in order: slice, no gather
        return hash_rows(words[int(pages[0]) : int(pages[-1]) + 1])
    return _hash_each(map(words.__getitem__, pages.tolist()), len(pages))


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

    def record(self, block: int, words: np.ndarray, pages: np.ndarray) -> None:
        """The hashes of ``pages`` as ``words`` holds them now (the source's as it sent
        them, the destination's as it placed them)."""
        self.table[block][pages] = hash_pages(words, pages)

    def tables(self) -> dict[str, memoryview]:
        """Each block's table as bytes, without a copy (views of the shared file)."""
        return {b.idstr: memoryview(t).cast("B")
                for b, t in zip(self.blocks, self.table, strict=True)}

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
