"""Runs of RAM records that CONTINUE one block, read whole: the hot part of the stream.

Without multifd (and with legacy zero-page detection) QEMU's main channel is mostly
records that name no block (RAM_SAVE_FLAG_CONTINUE): ZERO (9 bytes), PAGE (8 + 4096) and
XBZRLE (11 + its delta). :func:`read` takes as many of them as follow each other whole and
makes one event per run (``ZeroPages``, ``Pages``, ``XbzrlePages``), offsets checked
against the block and zero pages' fill bytes; the stream decoder
(``mfd.protocol.livestream``) calls it where a RAM record starts and decodes anything else
itself. No I/O; page data stay where they are in the reader's buffer (views).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from mfd.errors import ProtocolError
from mfd.protocol import constants as C
from mfd.protocol import ram
from mfd.protocol.codec import Reader

ZERO_CONT = C.RAM_SAVE_FLAG_ZERO | C.RAM_SAVE_FLAG_CONTINUE
ZERO_RECORD = 9  # be64 word + fill byte
PAGE_CONT = C.RAM_SAVE_FLAG_PAGE | C.RAM_SAVE_FLAG_CONTINUE
PAGE_RECORD = 8 + C.TARGET_PAGE_SIZE
XBZRLE_CONT = C.RAM_SAVE_FLAG_XBZRLE | C.RAM_SAVE_FLAG_CONTINUE
XBZRLE_HEADER = 8 + 3  # be64 word, encoding flag, be16 length
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
# a run of records is read in Python up to RUN_FIRST records (numpy costs more for a few),
# then by numpy in growing looks, up to RUN_BYTES of stream per event (a whole mmap'd file
# is never scanned at once)
RUN_FIRST = 16
RUN_BYTES = 8 << 20


@dataclass(frozen=True)
class ZeroPages:
    idstr: str
    pages: np.ndarray


@dataclass(frozen=True, eq=False)
class Pages:
    idstr: str
    pages: np.ndarray
    data: np.ndarray  # (len(pages), TARGET_PAGE_SIZE) uint8
    offset: int = -1  # absolute stream offset of data[0]; the records follow each other

    @property
    def offsets(self) -> np.ndarray:
        """The absolute stream offset of each page's data (a run's records are contiguous)."""
        return self.offset + np.arange(len(self.pages), dtype=np.int64) * PAGE_RECORD


@dataclass(frozen=True, eq=False)
class XbzrlePages:
    idstr: str
    pages: np.ndarray
    data: np.ndarray  # uint8, the records' bytes; each delta at its start
    starts: np.ndarray
    lengths: np.ndarray


RunEvent = ZeroPages | Pages | XbzrlePages


def read(r: Reader, idstr: str, used_length: int, events: list) -> bool:
    """Runs of ZERO|CONTINUE, PAGE|CONTINUE and XBZRLE|CONTINUE records of block ``idstr``,
    as many as follow each other whole (they change no state: one item, however short the
    runs), appended to ``events``; False if none is at the reader."""
    first = len(events)
    runs = _Runs(r, idstr, used_length - C.TARGET_PAGE_SIZE)
    while r.remaining >= 8:
        (low,) = _U16.unpack_from(r.buf, r.pos + 6)  # the record's flags, peeked
        flags = low & ram.FLAG_MASK
        if flags == ZERO_CONT:
            event = runs.zero()
        elif flags == XBZRLE_CONT:
            event = runs.xbzrle()
        else:
            event = runs.pages() if flags == PAGE_CONT else None
        if event is None:
            break
        events.append(event)
    return len(events) > first


class _Runs:
    """The records at ``r`` of block ``idstr``, whose last page is at offset ``limit``."""

    def __init__(self, r: Reader, idstr: str, limit: int) -> None:
        self.r = r
        self.idstr = idstr
        self.limit = limit

    def zero(self) -> ZeroPages | None:
        """ZERO|CONTINUE records (legacy zero-page detection sends one per zero page)."""
        run = self._run(ZERO_RECORD, ZERO_CONT)
        if run is None:
            return None
        k, pages = run
        self.r.seek(self.r.pos + k * ZERO_RECORD, "zero page records")
        return ZeroPages(self.idstr, pages)

    def pages(self) -> Pages | None:
        """PAGE|CONTINUE records (pages on the main channel, without multifd)."""
        run = self._run(PAGE_RECORD, PAGE_CONT)
        if run is None:
            return None
        k, pages = run
        r = self.r
        # frombuffer holds the buffer (an mmap cannot be closed under the view);
        # np.ndarray(buffer=) would not
        data = np.frombuffer(r.buf, dtype=np.uint8, count=k * PAGE_RECORD,
                             offset=r.pos).reshape(k, PAGE_RECORD)[:, 8:]
        offset = r.offset + 8
        r.seek(r.pos + k * PAGE_RECORD, "page records")
        return Pages(self.idstr, pages, data, offset)

    def xbzrle(self) -> XbzrlePages | None:
        """XBZRLE|CONTINUE records, as many as are whole: their headers are read one by one
        (each delta's length says where the next record starts), the deltas stay where
        they are for the caller to apply together."""
        r = self.r
        buf, pos, end = r.buf, r.pos, r.pos + r.remaining
        pages, starts, lengths = [], [], []
        while pos + XBZRLE_HEADER <= end:
            addr = self._continued(pos, XBZRLE_CONT)
            if addr is None:
                break
            (length,) = _U16.unpack_from(buf, pos + 9)
            length = ram.xbzrle_header(buf[pos + 8], length,
                                       lambda why, at=pos + 8: r.error(why, at=at))
            if pos + XBZRLE_HEADER + length > end:
                break
            pages.append(addr // C.TARGET_PAGE_SIZE)
            starts.append(pos + XBZRLE_HEADER - r.pos)
            lengths.append(length)
            pos += XBZRLE_HEADER + length
        if not pages:
            return None
        data = np.frombuffer(buf, dtype=np.uint8, count=pos - r.pos, offset=r.pos)
        r.seek(pos, "XBZRLE records")
        return XbzrlePages(self.idstr, np.array(pages, dtype=np.int64), data,
                           np.array(starts, dtype=np.int64), np.array(lengths, dtype=np.int64))

    def _run(self, size: int, flags: int) -> tuple[int, np.ndarray] | None:
        """Consecutive CONTINUE records of ``size`` bytes with these flags: (their count,
        page numbers), offsets checked against the block and zero pages' fill bytes; None
        if there is none. A short run is read in Python (numpy costs more for a few
        records); one that reaches RUN_FIRST records is read by numpy, in growing looks:
        the cost follows the run's length, never the buffer's."""
        r = self.r
        n = min(r.remaining, RUN_BYTES) // size
        if n == 0:
            return None
        zero = size == ZERO_RECORD
        buf, pos = r.buf, r.pos
        pages: list[int] = []
        while len(pages) < min(n, RUN_FIRST):
            addr = self._continued(pos, flags)
            if addr is None:
                break
            if zero and buf[pos + 8]:
                raise self._fill(buf[pos + 8], pos + 8)
            pages.append(addr // C.TARGET_PAGE_SIZE)
            pos += size
        if len(pages) < RUN_FIRST or len(pages) == n:
            if not pages:
                return None
            return len(pages), np.array(pages, dtype=np.int64)
        # views that never leave this call (np.ndarray(buffer=) does not hold the buffer)
        words = np.ndarray((n,), dtype=">u8", buffer=buf, offset=r.pos, strides=(size,))
        k = RUN_FIRST
        while k < n:  # all of the last look matched: look twice as far
            more = words[k : k + k] & np.uint64(ram.FLAG_MASK)
            bad = np.flatnonzero(more != flags)
            if len(bad):
                k += int(bad[0])
                break
            k += len(more)
        addrs = words[:k] & ~np.uint64(ram.FLAG_MASK)
        if int(addrs.max()) > self.limit:
            i = int(np.argmax(addrs > self.limit))  # the first one
            raise self._past_block(int(addrs[i]), r.pos + i * size)
        if zero:
            fill = np.ndarray((k,), dtype=np.uint8, buffer=buf, offset=r.pos + 8,
                              strides=(size,))
            if fill.any():
                i = int(np.argmax(fill != 0))
                raise self._fill(int(fill[i]), r.pos + i * size + 8)
        return k, (addrs // C.TARGET_PAGE_SIZE).astype(np.int64)

    def _continued(self, pos: int, flags: int) -> int | None:
        """The offset of the CONTINUE record with ``flags`` at ``pos`` (at most the block's
        last page), or None if another record is there."""
        (word,) = _U64.unpack_from(self.r.buf, pos)
        if word & ram.FLAG_MASK != flags:
            return None
        addr = word ^ flags
        if addr > self.limit:
            raise self._past_block(addr, pos)
        return addr

    def _past_block(self, addr: int, at: int) -> ProtocolError:
        return self.r.error(f"page offset {addr:#x} is past the end of block {self.idstr!r} "
                            f"(used_length {self.limit + C.TARGET_PAGE_SIZE:#x})", at=at)

    def _fill(self, fill: int, at: int) -> ProtocolError:
        return self.r.error(f"zero page record with fill byte {fill:#04x}, expected 0",
                            at=at)
