"""The source's XBZRLE: QEMU's page cache and ``save_xbzrle_page``, a batch at a time.

QEMU's cache (``migration/page_cache.c``) has ``xbzrle-cache-size / 4096`` slots (a power of
two); a page's slot is its RAM address / 4096 modulo that, and each slot keeps one page's
bytes, its address and its age, the bitmap sync count when it was last used. Per page sent
again (from the second round on: ``xbzrle_started``), in page order:

* a zero page: its slot takes a zero page (``xbzrle_cache_zero_page``), as any insert;
* a page not in the cache (a miss): sent whole, and inserted, unless its slot holds another
  page used in the last 2 syncs (``CACHED_PAGE_LIFETIME``) or this is the last stage (the
  guest stopped: nothing is inserted or updated any more);
* a hit: the slot's age is refreshed, the delta from the cached copy is encoded; an
  unchanged page is not sent at all; an overflow is sent whole; the cache takes the page's
  new bytes (except unchanged, and in the last stage).

Here the batch's pages are copied once from guest RAM (QEMU's ``current_buf``), the deltas
of every hit are encoded together (:func:`mfd.protocol.xbzrle.encode`), and the cache is a
numpy array of slots updated with one scatter: the page bytes are copied as often as QEMU
copies them (into the buffer, into the cache). Pages of one batch that share a slot are
taken in turns, so each slot sees its pages in order, as QEMU's one-by-one loop does.

:class:`Xbzrle` is all the source's stream sender needs: a batch of a block's pages in
(zero and normal), the pages to send whole and the XBZRLE records out, the counters of
``query-migrate``'s ``xbzrle-cache`` kept as it goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mfd.protocol import xbzrle
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.shm.ramblock import RAMBlock

PAGE = TARGET_PAGE_SIZE
CACHED_PAGE_LIFETIME = 2
DEFAULT_CACHE_SIZE = 64 << 20  # QEMU's xbzrle-cache-size


@dataclass
class XbzrleCounters:
    """QEMU's ``xbzrle-cache`` object of ``query-migrate``; the rates are those of the last
    round (QEMU: of the last rate period)."""

    cache_size: int
    bytes: int = 0
    pages: int = 0
    cache_miss: int = 0
    overflow: int = 0
    cache_miss_rate: float = 0.0
    encoding_rate: float = 0.0
    _round: tuple[int, int, int] = (0, 0, 0)  # cache_miss, pages, bytes at the round's start

    def to_qmp(self) -> dict[str, object]:
        return {"cache-size": self.cache_size, "bytes": self.bytes, "pages": self.pages,
                "cache-miss": self.cache_miss, "cache-miss-rate": self.cache_miss_rate,
                "encoding-rate": self.encoding_rate, "overflow": self.overflow}

    def end_round(self, pages_sent: int) -> None:
        """``migration_update_rates``: the misses per page handled, and the bytes of the
        pages that hit over the bytes their records took."""
        m0, p0, b0 = self._round
        self.cache_miss_rate = (self.cache_miss - m0) / pages_sent if pages_sent else 0.0
        self.encoding_rate = (self.pages - p0) * PAGE / (self.bytes - b0) \
            if self.pages != p0 and self.bytes != b0 else 0.0
        self._round = (self.cache_miss, self.pages, self.bytes)


@dataclass
class Batch:
    """What to send for one batch of normal pages: ``whole`` pages (their bytes in ``rows``)
    and XBZRLE ``deltas`` of ``encoded`` pages (``lengths``, ``starts`` into ``data``)."""

    whole: np.ndarray
    rows: np.ndarray
    encoded: np.ndarray
    lengths: np.ndarray
    starts: np.ndarray
    data: np.ndarray


class XbzrleCache:
    def __init__(self, cache_size: int) -> None:
        slots = cache_size // PAGE
        self.mask = slots - 1
        self.data = np.zeros((slots, PAGE), dtype=np.uint8)  # touched slots only get memory
        self.addr = np.full(slots, -1, dtype=np.int64)
        self.age = np.zeros(slots, dtype=np.int64)
        self.counters = XbzrleCounters(cache_size)

    def zero_pages(self, addrs: np.ndarray, generation: int) -> None:
        """``xbzrle_cache_zero_page`` for each: the slot takes a zero page if it may."""
        for turn in _turns(self._slot(addrs)):
            slot = self._slot(addrs[turn])
            ok = self._may_insert(slot, addrs[turn], generation)
            self.data[slot[ok]] = 0
            self._stamp(slot[ok], addrs[turn][ok], generation)

    def encode(self, addrs: np.ndarray, rows: np.ndarray, generation: int,
               last_stage: bool) -> Batch:
        """``save_xbzrle_page`` for each normal page (``rows``: its bytes, copied from
        RAM); the pages not sent at all (unchanged) are in neither list."""
        whole, encoded, parts = [], [], []
        for turn in _turns(self._slot(addrs)):
            a, r = addrs[turn], rows[turn]
            slot = self._slot(a)
            hit = self.addr[slot] == a
            self.age[slot[hit]] = generation
            miss = np.flatnonzero(~hit)
            self.counters.cache_miss += len(miss)
            if not last_stage and len(miss):
                ok = self._may_insert(slot[miss], a[miss], generation)
                ins = miss[ok]
                self.data[slot[ins]] = r[ins]
                self._stamp(slot[ins], a[ins], generation)
            whole.append(turn[miss])
            hits = np.flatnonzero(hit)
            self.counters.pages += len(hits)
            if not len(hits):
                continue
            lengths, data, starts = xbzrle.encode(self.data[slot[hits]], r[hits])
            if not last_stage:
                changed = hits[lengths != xbzrle.UNCHANGED]
                self.data[slot[changed]] = r[changed]
            over = lengths == xbzrle.OVERFLOW
            self.counters.overflow += int(over.sum())
            self.counters.bytes += int(over.sum()) * PAGE
            whole.append(turn[hits[over]])
            sent = lengths > 0
            encoded.append(turn[hits[sent]])
            parts.append((lengths[sent], starts[sent], data))
        return _batch(rows, whole, encoded, parts)

    def _slot(self, addrs: np.ndarray) -> np.ndarray:
        """``cache_get_cache_pos``: the page number modulo the slots."""
        return (addrs // PAGE) & self.mask

    def _may_insert(self, slot: np.ndarray, addrs: np.ndarray, generation: int) -> np.ndarray:
        """``cache_insert``'s rule: not over another page used in the last 2 syncs."""
        other = (self.addr[slot] != -1) & (self.addr[slot] != addrs)
        return ~(other & (self.age[slot] + CACHED_PAGE_LIFETIME > generation))

    def _stamp(self, slot: np.ndarray, addrs: np.ndarray, generation: int) -> None:
        self.addr[slot] = addrs
        self.age[slot] = generation


class Xbzrle:
    """The source's XBZRLE over its RAM blocks: the cache is keyed by RAM address (QEMU's
    ``ram_addr_t``: each block's pages after the blocks before it)."""

    def __init__(self, cache_size: int, blocks: list[RAMBlock]) -> None:
        self.cache = XbzrleCache(cache_size)
        self.counters = self.cache.counters
        self.base = np.cumsum([0] + [b.used_length for b in blocks[:-1]])
        self.round_pages = 0  # pages handled since the round began (cache-miss-rate)

    def encode(self, block: int, zero: np.ndarray, normal: np.ndarray, words: np.ndarray,
               generation: int, last_stage: bool) -> Batch | None:
        """``save_xbzrle_page`` for a batch of the block's pages (offsets into ``normal``
        in the answer): zero pages go into the cache, the others are copied once from
        ``words`` (guest RAM) and sent whole or as their deltas. None: no normal page."""
        base, page = int(self.base[block]), np.int64(PAGE)
        if len(zero):
            self.cache.zero_pages(base + zero * page, generation)
        self.round_pages += len(zero) + len(normal)
        if not len(normal):
            return None
        rows = words.view(np.uint8)[normal]  # QEMU's current_buf
        return self.cache.encode(base + normal * page, rows, generation, last_stage)

    def records(self, normal: np.ndarray, batch: Batch, idstr: str | None) -> bytes:
        """The batch's XBZRLE records (the first names the block unless ``idstr`` is None),
        counted as QEMU counts them: each record but its 8-byte header (idstr included)."""
        data = xbzrle.encode_records(normal[batch.encoded] * np.int64(PAGE), batch.lengths,
                                     batch.starts, batch.data, idstr)
        self.counters.bytes += len(data) - 8 * len(batch.encoded)
        return data

    def end_round(self) -> None:
        self.counters.end_round(self.round_pages)
        self.round_pages = 0


def _turns(slots: np.ndarray) -> list[np.ndarray]:
    """Indices of the batch in turns whose slots are all different, each slot's pages in
    batch order across the turns (almost always one turn)."""
    order = np.argsort(slots, kind="stable")
    s = slots[order]
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] != s[:-1]
    group_start = np.maximum.accumulate(np.where(new, np.arange(len(s)), 0))
    rank = np.arange(len(s)) - group_start  # a page's place among its slot's pages
    return [np.sort(order[rank == t]) for t in range(int(rank.max(initial=-1)) + 1)]


def _batch(rows: np.ndarray, whole: list[np.ndarray], encoded: list[np.ndarray],
           parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Batch:
    w = np.concatenate(whole) if whole else np.empty(0, dtype=np.int64)
    w.sort()
    if not parts:
        empty = np.empty(0, dtype=np.int64)
        return Batch(w, rows[w], empty, empty, empty, np.empty(0, dtype=np.uint8))
    lengths = np.concatenate([p[0] for p in parts])
    base = np.cumsum([0] + [len(p[2]) for p in parts[:-1]])
    starts = np.concatenate([p[1] + b for p, b in zip(parts, base, strict=True)])
    data = np.concatenate([p[2] for p in parts])
    return Batch(w, rows[w], np.concatenate(encoded), lengths, starts, data)
