"""XBZRLE (``migration/xbzrle.c``): a page sent again as the bytes that changed since the copy
the destination already has.

A page's delta is a sequence of pairs, each a run of equal bytes then a run of changed bytes:
``uleb128(zrun) uleb128(nzrun) nzrun bytes``. Runs are maximal (a changed run ends at the
first equal byte), only the first zero run may be empty, and an equal run at the end of the
page is not written. Numbers are QEMU's "small" ULEB128: one byte below 0x80, else two
(low 7 bits with 0x80, then the rest; a page is 4096 bytes). ``xbzrle_encode_buffer`` answers
0 for an unchanged page (nothing is sent) and -1 on overflow: the delta would not fit in a
page (precisely, the encoder gives up when a pair's bytes pass ``dlen`` = 4096, or when it
stands at ``dlen`` - 1 or later with the page's last equal run still to skip), and the whole
page is sent instead.

On the wire (``save_xbzrle_page``): a page record with ``RAM_SAVE_FLAG_XBZRLE``, then
``u8 ENCODING_FLAG_XBZRLE`` (1), ``be16`` delta length (at most a page), the delta. The
destination decodes it onto the page it has (``load_xbzrle``, ``xbzrle_decode_buffer``).

Both directions work on batches of pages with numpy: the runs of every page are found at
once from the byte-wise comparison, and the deltas are written (or applied) with a few
gathers and scatters, never a Python loop per byte or per page. Only the decoder's walk
through the pairs is a loop, over the pair index, each step on every delta of the batch.
"""

from __future__ import annotations

import numpy as np

from mfd.errors import ProtocolError
from mfd.protocol import constants as C
from mfd.protocol import ram
from mfd.protocol.constants import TARGET_PAGE_SIZE

PAGE = TARGET_PAGE_SIZE
ENCODING_FLAG_XBZRLE = ram.XBZRLE_ENCODING
UNCHANGED, OVERFLOW = 0, -1  # encode()'s lengths besides a delta's


def _uleb_size(v: np.ndarray) -> np.ndarray:
    return np.where(v < 0x80, 1, 2)


def _put_uleb(out: np.ndarray, at: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Write QEMU's small ULEB128 of each ``v`` at ``at``; returns the positions after."""
    two = v >= 0x80
    out[at] = np.where(two, (v & 0x7F) | 0x80, v)
    out[at[two] + 1] = v[two] >> 7
    return at + 1 + two


def _segments(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat indices of the ranges [starts[i], starts[i] + counts[i]), in order."""
    total = int(counts.sum())
    before = np.cumsum(counts) - counts
    return np.repeat(starts - before, counts) + np.arange(total)


def encode(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The deltas from ``old`` to ``new`` pages (both (k, PAGE) uint8).

    Returns ``lengths`` (per page: the delta's length, :data:`UNCHANGED` or
    :data:`OVERFLOW`), ``data`` (the deltas of the pages with a length > 0, in page order)
    and ``starts`` (where each page's delta begins in ``data``)."""
    k = len(new)
    pad = np.zeros((k, PAGE + 2), dtype=bool)
    np.not_equal(old, new, out=pad[:, 1:-1])
    edges = np.flatnonzero(pad[:, 1:] != pad[:, :-1])  # each row: start, end, start, ...
    row = edges[0::2] // (PAGE + 1)
    start, end = edges[0::2] % (PAGE + 1), edges[1::2] % (PAGE + 1)
    first = np.ones(len(row), dtype=bool)
    first[1:] = row[1:] != row[:-1]
    prev_end = np.empty_like(end)
    prev_end[1:] = end[:-1]
    prev_end[first] = 0
    zrun, nzrun = start - prev_end, end - start
    size = _uleb_size(zrun) + _uleb_size(nzrun) + nzrun
    total = np.bincount(row, weights=size, minlength=k).astype(np.int64)
    runs = np.bincount(row, minlength=k)
    is_last = np.ones(len(row), dtype=bool)
    is_last[:-1] = row[1:] != row[:-1]
    last = np.zeros(k, dtype=np.int64)
    last[row[is_last]] = end[is_last]
    tail = last < PAGE  # an equal run ends the page: skipped, after a check at dlen - 2
    overflow = (total > PAGE) | (tail & (total > PAGE - 2))
    lengths = np.where(runs == 0, UNCHANGED, np.where(overflow, OVERFLOW, total))
    keep = lengths[row] > 0
    row, start, zrun, nzrun, size = row[keep], start[keep], zrun[keep], nzrun[keep], size[keep]
    at = np.cumsum(size) - size
    data = np.empty(int(size.sum()), dtype=np.uint8)
    at = _put_uleb(data, at, zrun)
    at = _put_uleb(data, at, nzrun)
    data[_segments(at, nzrun)] = new.reshape(-1)[_segments(row * PAGE + start, nzrun)]
    sizes = np.where(lengths > 0, lengths, 0)
    return lengths, data, np.cumsum(sizes) - sizes


def encode_records(addrs: np.ndarray, lengths: np.ndarray, starts: np.ndarray,
                   data: np.ndarray, idstr: str | None) -> bytes:
    """XBZRLE page records for the pages at ``addrs`` (offsets in one block) with their
    deltas, built in one numpy pass: the first names the block unless ``idstr`` is None
    (CONTINUE), the others CONTINUE it."""
    n = len(addrs)
    first = ram.encode_page_header(int(addrs[0]), C.RAM_SAVE_FLAG_XBZRLE, idstr)
    size = 8 + 3 + lengths
    size[0] += len(first) - 8
    at = np.cumsum(size) - size
    out = np.empty(int(size.sum()), dtype=np.uint8)
    words = (addrs.astype(np.uint64) | np.uint64(C.RAM_SAVE_FLAG_XBZRLE
                                                 | C.RAM_SAVE_FLAG_CONTINUE)).astype(">u8")
    out[_segments(at[1:], np.full(n - 1, 8))] = words[1:].view(np.uint8)
    out[: len(first)] = np.frombuffer(first, dtype=np.uint8)
    after = at + size - lengths - 3
    out[after] = ENCODING_FLAG_XBZRLE
    out[after + 1] = lengths >> 8
    out[after + 2] = lengths & 0xFF
    out[_segments(after + 3, lengths)] = data[_segments(starts, lengths)]
    return out.tobytes()


def decode_into(ram: np.ndarray, pages: np.ndarray, data: np.ndarray, starts: np.ndarray,
                lengths: np.ndarray, where: str = "XBZRLE page") -> None:
    """Apply deltas onto pages of ``ram`` ((n, PAGE) uint8, written in place): page
    ``pages[i]``'s delta is ``data[starts[i] : starts[i] + lengths[i]]``, applied in order.
    A delta QEMU's decoder refuses (a number cut short or longer than two bytes, an empty
    zero run after the first or an empty changed run, a run past the page or past the delta)
    raises :class:`ProtocolError` naming the page (``where`` and its offset) before any
    page is written."""
    if len(np.unique(pages)) != len(pages):  # a page twice: each delta on the one before
        for i in range(len(pages)):
            decode_into(ram, pages[i : i + 1], data, starts[i : i + 1], lengths[i : i + 1],
                        where)
        return
    k = len(pages)
    ends = starts + lengths
    cur = starts.astype(np.int64).copy()
    pos = np.zeros(k, dtype=np.int64)  # where in the page the next run starts
    active = np.flatnonzero(lengths > 0)
    padded = np.concatenate((data, np.zeros(2, dtype=np.uint8)))  # reads past: checked
    seg_page, seg_at, seg_src, seg_len = [], [], [], []
    step = 0
    while len(active):
        c, e = cur[active], ends[active]
        bad = e - c < 2
        zrun, c, bad2 = _get_uleb(padded, c)
        bad |= bad2 | (zrun == 0) & (step > 0)
        p = pos[active] + zrun
        bad |= p > PAGE
        bad |= e - c < 2
        nzrun, c, bad3 = _get_uleb(padded, c)
        bad |= bad3 | (nzrun == 0) | (p + nzrun > PAGE) | (c + nzrun > e)
        if bad.any():
            i = int(active[np.argmax(bad)])
            raise ProtocolError(f"{where} at {int(pages[i]) * PAGE:#x}: its XBZRLE delta "
                                "does not decode (QEMU: decode error): a run past the page "
                                "or the delta, or a malformed length")
        seg_page.append(active)
        seg_at.append(p)
        seg_src.append(c)
        seg_len.append(nzrun)
        pos[active] = p + nzrun
        cur[active] = c + nzrun
        active = active[cur[active] < ends[active]]
        step += 1
    if not seg_page:
        return
    page, at, src, n = (np.concatenate(x) for x in (seg_page, seg_at, seg_src, seg_len))
    ram.reshape(-1)[_segments(pages[page] * PAGE + at, n)] = data[_segments(src, n)]


def _get_uleb(data: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """QEMU's small ULEB128 at each ``at``: values, positions after, and which are bad (a
    second byte with its high bit set)."""
    b0 = data[at].astype(np.int64)
    two = b0 >= 0x80
    b1 = data[at + 1].astype(np.int64)
    value = np.where(two, (b0 & 0x7F) | (b1 << 7), b0)
    return value, at + 1 + two, two & (b1 >= 0x80)
