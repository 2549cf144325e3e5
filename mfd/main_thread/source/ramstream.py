"""The ram section on the main channel: a round's frame, and the pages it carries itself.

The rounds' sink (:class:`mfd.main_thread.precopy.Sink`) of a live migration::

    begin_section   PART (final round: END) section header; the next record names its block
    pages           with multifd: to the channels (MultifdSender); without: PAGE records, each
                    header followed by the page straight from guest memory (one sendmsg of up
                    to INLINE_PAGES), ZERO records for zero pages, and with XBZRLE from the
                    second round on, a changed page as its delta (mfd.main_thread.xbzrle)
    zero            legacy zero-page detection: ZERO records
    end_round       with multifd: SYNC on every channel (+ MULTIFD_FLUSH)
    end_section     EOS and the footer; to mfd, PING(MFD_ROUND_PING) after a precopy round
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from mfd.main_thread.precopy import Precopy
from mfd.main_thread.source.channel import MainChannel
from mfd.main_thread.source.multifd import MultifdSender
from mfd.main_thread.source.verify import Verification
from mfd.main_thread.xbzrle import Xbzrle
from mfd.protocol import constants as C
from mfd.protocol import devices, ram, stream
from mfd.shm.ramblock import DataExtents, nonzero_pages
from mfd.sysutil import IOV_MAX

# pages per sendmsg of PAGE records on the main channel (two buffers each, <= IOV_MAX)
INLINE_PAGES = IOV_MAX // 2


class RamStream:
    def __init__(self, channel: MainChannel, precopy: Precopy, extents: list[DataExtents],
                 verification: Verification, xbzrle: Xbzrle | None,
                 multifd: MultifdSender | None) -> None:
        self.channel = channel
        self.precopy = precopy  # what moved is counted there
        self.blocks = precopy.blocks
        self.mapped = precopy.mapped
        self.stats = precopy.stats
        self.detect_zero = precopy.params.zero_page_detection != "none"
        self.extents = extents
        self.verification = verification
        self.xbzrle = xbzrle
        self.multifd = multifd  # None: the pages go here
        self.last_block: int | None = None  # the block the last record named
        self.final = False  # the final round (QEMU's last_stage)

    # ------------------------------------------------------------------ the rounds' sink

    def begin_section(self, final: bool) -> None:
        kind = C.QEMU_VM_SECTION_END if final else C.QEMU_VM_SECTION_PART
        self.channel.send(stream.encode_section_part(kind, devices.RAM_SECTION_ID))
        self.last_block = None  # QEMU names the block again in every section
        self.final = final

    def pages(self, block: int, pages: np.ndarray) -> None:
        if self.multifd is not None:
            self.multifd.send(block, pages)
        else:
            self.inline(block, pages)

    def zero(self, block: int, pages: np.ndarray) -> None:
        """zero-page-detection=legacy: RAM_SAVE_FLAG_ZERO records on the main stream."""
        self.verification.zero(block, pages)
        self.channel.send(self._zero_records(block, pages))

    def end_round(self) -> None:
        if self.multifd is not None:
            self.multifd.end_round()

    def end_section(self, final: bool) -> None:
        if self.xbzrle is not None:
            self.xbzrle.end_round()
        data = ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID)
        if self.channel.peer_mfd and not final:
            data += self.channel.round_ping()
        self.channel.send(data)

    def postcopy(self) -> None:
        """After the switch: whole and zero pages only (QEMU's postcopy destination takes
        no XBZRLE)."""
        self.xbzrle = None

    # ------------------------------------------------------------------ pages

    def inline(self, block: int, pages: np.ndarray) -> None:
        """Without multifd the main channel carries the pages (``ram_save_page``): zero
        pages as ZERO records (found here; holes without a touch), the others as PAGE
        records, each header followed by the page straight from guest memory."""
        words = self.mapped[block].words
        nonzero = np.ones(len(pages), dtype=bool)
        if self.detect_zero:
            lo, hi = int(pages[0]), int(pages[-1]) + 1
            runs = self.extents[block].runs(lo, hi) if hi - lo == len(pages) else None
            nonzero = nonzero_pages(self.mapped[block], pages, runs)
        before = self.stats.transferred
        zero = pages[~nonzero]
        if len(zero):
            self.channel.send(self._zero_records(block, zero))
        normal = pages[nonzero]
        self.verification.zero(block, zero)  # no channel to hash them: this process does
        self.verification.record(block, words, normal)
        # QEMU's xbzrle_started: from the second round on (the cache holds what went)
        if self.xbzrle is not None and self.stats.dirty_sync_count >= 1:
            self._xbzrle(block, zero, normal)
        else:
            self.whole(block, normal, guest_rows(words, normal))
        moved = self.stats.transferred - before
        self.stats.transferred = before  # account() counts it
        self.precopy.account(pages, moved, nonzero)
        # no pool waits between batches here (the rate limiter sleeps, the socket rarely
        # blocks): cancel, --timeout and the monitor's parameters are seen each batch
        self.channel.tick()

    def whole(self, block: int, pages: np.ndarray, rows: Iterable) -> None:
        """PAGE records, each header followed by the page's bytes (``rows``, in order)."""
        rows = iter(rows)
        for at in range(0, len(pages), INLINE_PAGES):
            part = pages[at : at + INLINE_PAGES]
            self.channel.send(page_records(part, itertools.islice(rows, len(part)),
                                           self._name(block)))

    def _xbzrle(self, block: int, zero: np.ndarray, normal: np.ndarray) -> None:
        """``save_xbzrle_page`` for the batch: pages whole or as their deltas."""
        assert self.xbzrle is not None
        batch = self.xbzrle.encode(block, zero, normal, self.mapped[block].words,
                                   self.stats.dirty_sync_count, self.final)
        if batch is None:
            return
        self.whole(block, normal[batch.whole], batch.rows)
        if len(batch.encoded):
            self.channel.send(self.xbzrle.records(normal, batch, self._name(block)))

    def _zero_records(self, block: int, pages: np.ndarray) -> bytes:
        addrs = pages.astype(np.int64) * C.TARGET_PAGE_SIZE
        first = ram.encode_zero_page(int(addrs[0]), self._name(block))
        return first + ram.encode_zero_records(addrs[1:])

    def _name(self, block: int) -> str | None:
        """The block's idstr for a record that does not CONTINUE the block named last."""
        if self.last_block == block:
            return None
        self.last_block = block
        return self.blocks[block].idstr


def guest_rows(words: np.ndarray, pages: np.ndarray) -> Iterable:
    """Each page's row of guest memory, a view (no copy), in order."""
    return (words[p] for p in pages.tolist())


def page_records(pages: np.ndarray, rows: Iterable, idstr: str | None) -> list:
    """PAGE records of ``pages`` (at most IOV_MAX / 2 of them, sorted) as buffers for one
    sendmsg: each be64 header followed by the page's bytes (``rows``: straight from guest
    memory, or a copy), the first naming the block unless ``idstr`` is None (it CONTINUEs
    the block named last)."""
    addrs = pages.astype(np.uint64) * np.uint64(C.TARGET_PAGE_SIZE)
    first = ram.encode_page_header(int(addrs[0]), C.RAM_SAVE_FLAG_PAGE, idstr)
    rest = (addrs[1:] | np.uint64(C.RAM_SAVE_FLAG_PAGE | C.RAM_SAVE_FLAG_CONTINUE)
            ).astype(">u8")
    headers = [first, *rest.view(np.uint8).reshape(-1, 8)]
    return [b for pair in zip(headers, rows, strict=True) for b in pair]
