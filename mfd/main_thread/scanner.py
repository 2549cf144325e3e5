"""Page search over ``bmap`` (``migration_bitmap_find_dirty`` / ``find_dirty_block``).

bmap is QEMU's layout: little-endian u64 words, bit set = the page must be sent. The scan is
word-level: ``flatnonzero`` over words, then the set bits of only the non-zero words, in
windows so the index arrays stay small whatever the RAM size (bounded memory).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mfd.protocol.constants import (
    MAPPED_RAM_LOAD_BUF_SIZE,
    MULTIFD_PAGE_COUNT,
    TARGET_PAGE_SIZE,
)
from mfd.protocol.mapped_ram import set_runs
from mfd.protocol.trailer import CHUNK_PAGES

WINDOW_WORDS = 1 << 14  # 1 Mi pages (4 GiB of RAM) per scan window


def new_bmap(num_pages: int) -> np.ndarray:
    """All pages dirty, as at setup (``ram_list_init_bitmaps``); bits past the end clear."""
    words = np.full((num_pages + 63) // 64, np.uint64(0xFFFF_FFFF_FFFF_FFFF), dtype="<u8")
    tail = num_pages % 64
    if tail:
        words[-1] = np.uint64((1 << tail) - 1)
    return words


def popcount(words: np.ndarray) -> int:
    return int(np.unpackbits(words.view(np.uint8)).sum()) if len(words) else 0


def set_pages(words: np.ndarray, pages: np.ndarray) -> None:
    """Mark ``pages`` dirty again in a bmap (what :func:`take_dirty` took and was not sent)."""
    pages = pages.astype(np.uint64, copy=False)
    np.bitwise_or.at(words, (pages >> np.uint64(6)).astype(np.intp),
                     np.left_shift(np.uint64(1), pages & np.uint64(63)))


def take_dirty(words: np.ndarray, start: int, count: int) -> np.ndarray:
    """Indices of the set bits in ``words[start:start+count]``, clearing them.

    QEMU clears a page's bit before it sends the page (``migration_bitmap_clear_dirty``):
    a write after this point sets it again in the guest's log and reaches the next round.
    """
    window = words[start : start + count]
    nz = np.flatnonzero(window)
    if len(nz) == 0:
        return np.empty(0, dtype=np.uint32)
    bits = np.unpackbits(window[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
    row, col = np.nonzero(bits)
    window[nz] = 0
    return ((nz[row] + start) * 64 + col).astype(np.uint32)


def dirty_batches(words: np.ndarray, batch: int = MULTIFD_PAGE_COUNT, lo: int = 0,
                  hi: int | None = None) -> Iterator[np.ndarray]:
    """One round over a block's bmap (its words ``lo`` to ``hi``): batches of at most
    ``batch`` dirty pages, in order, numbered from the block's start."""
    hi = len(words) if hi is None else hi
    for start in range(lo, hi, WINDOW_WORDS):
        pages = take_dirty(words, start, min(WINDOW_WORDS, hi - start))
        for i in range(0, len(pages), batch):
            yield pages[i : i + batch]


# Pages per restore/digest job: 8 MiB. Each job costs a ZeroMQ round trip (~60 us on this
# 2-core machine); 1 MiB jobs left a 2 GiB restore 15-25% slower than 8 MiB ones. Reads stay
# within a chunk, so none is longer than QEMU's 1 MiB MAPPED_RAM_LOAD_BUF_SIZE.
JOB_PAGES = 8 * MAPPED_RAM_LOAD_BUF_SIZE // TARGET_PAGE_SIZE


def chunk_jobs(bits: np.ndarray) -> list[np.ndarray]:
    """The pages of a page map (bool per page) as jobs of whole digest chunks.

    Runs of set bits are cut at chunk boundaries (512 KiB of RAM), and consecutive chunks
    share a job while the pages before them add up to less than JOB_PAGES: a job moves less
    than JOB_PAGES plus one chunk. A channel can then hash every chunk of its job by itself.
    Each job is a flat u32 array of [start, end) pairs.
    """
    runs = set_runs(bits)
    if len(runs) == 0:
        return []
    starts, ends = runs[:, 0], runs[:, 1]
    first = starts // CHUNK_PAGES
    pieces = (ends - 1) // CHUNK_PAGES - first + 1
    idx = np.repeat(np.arange(len(runs)), pieces)
    chunk = first[idx] + np.arange(len(idx)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    s = np.maximum(starts[idx], chunk * CHUNK_PAGES)
    e = np.minimum(ends[idx], (chunk + 1) * CHUNK_PAGES)
    heads = np.flatnonzero(np.concatenate(([True], chunk[1:] != chunk[:-1])))  # chunk starts
    in_chunk = np.add.reduceat(e - s, heads)  # pages of each chunk
    before = np.cumsum(in_chunk) - in_chunk
    group = before // JOB_PAGES  # a chunk joins the job its predecessors' pages reached
    cuts = heads[np.flatnonzero(np.diff(group)) + 1]
    cut = np.stack((s, e), axis=1).astype(np.uint32)
    return [c.reshape(-1) for c in np.split(cut, cuts)]
