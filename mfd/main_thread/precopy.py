"""The precopy iteration shared by a mapped-ram file save and a live migration.

Mirrors ``migration/ram.c`` (``ram_save_setup`` / ``ram_save_iterate`` /
``ram_save_complete``) and ``migration/migration.c``'s iteration (bandwidth, switchover,
auto-converge). It decides which pages go and when to stop; where they go is the caller's,
a :class:`Sink` handed to each round, as QEMU hands ``ram_save_iterate`` its QEMUFile::

    start            attach RAM, bmap = all ones, the guest's dirty log starts
    round(sink)      sink.begin_section | sweep: take dirty pages word by word, <= batch_pages
                     of one block per sink.pages (legacy zero-page detection here, on the
                     main thread: sink.zero) | sink.end_round: flush + sync | sink.end_section
    iterate(sink)    round, bitmap sync, counters; every >= 1 s period: dirty rate and
                     auto-converge; stop when remaining / bandwidth + switchover_cost()
                     <= downtime-limit (QEMU: remaining <= bandwidth x downtime-limit), or
                     when switch_due() says postcopy
    stop             stop the guest, lift the rate limit, final bitmap sync (the caller
                     then runs the final round)
    account          what a sink moved: query-migrate's counters, the bandwidth meter and
                     max-bandwidth (the rate limiter waits here)

A failure anywhere lets the guest run again, unthrottled (:meth:`Precopy.resume_guest`):
the source stays authoritative.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from mfd.errors import MfdError
from mfd.main_thread.convergence import AutoConverge, BandwidthMeter, RateLimiter
from mfd.main_thread.pipeline import OnDone
from mfd.main_thread.scanner import dirty_batches, new_bmap, popcount, set_pages
from mfd.main_thread.stats import MigrationStats
from mfd.options import MigrationParameters
from mfd.protocol import constants as C
from mfd.shm.control import GuestClient
from mfd.shm.ramblock import MappedBlock, RAMBlock, attach, nonzero_rows
from mfd.xhooks import NO_HOOKS, XHooks

Progress = Callable[[MigrationStats], None]


class Sink(Protocol):
    """Where a round's pages go: a file save's channels, or a live source's senders."""

    def begin_section(self, final: bool) -> None:
        """A PART (final: END) section's header goes out before the round's records."""

    def pages(self, block: int, pages: np.ndarray) -> None:
        """One batch of a block's dirty pages, sorted; what moved is reported to
        :meth:`Precopy.account` (at once, or when a channel says DONE)."""

    def zero(self, block: int, pages: np.ndarray) -> None:
        """zero-page-detection=legacy: the main thread found these pages zero."""

    def end_round(self) -> None:
        """Flush and sync at the end of a full pass over RAM."""

    def end_section(self, final: bool) -> None:
        """EOS and the section footer."""


def _never() -> bool:
    return False


def _free() -> float:
    return 0.0


class Precopy:
    """One source's rounds over its RAM; the caller owns the session around them."""

    def __init__(self, blocks: list[RAMBlock], params: MigrationParameters,
                 guest: GuestClient | None, stats: MigrationStats,
                 progress: Progress | None = None, batch_pages: int = C.MULTIFD_PAGE_COUNT,
                 x: XHooks = NO_HOOKS) -> None:
        names = [b.idstr for b in blocks]
        if len(set(names)) != len(names):
            raise MfdError(f"duplicate RAM block names: {names}")
        if not blocks:
            raise MfdError("nothing to migrate: no RAM blocks")
        self.blocks = blocks
        self.params = params
        self.guest = guest
        self.stats = stats
        self.progress = progress
        self.batch_pages = batch_pages
        self.x = x  # test-only: ignore_dirty_log, skip_round_sync
        self.was_running = False
        self.manual_protect = False  # the guest's log is cleared per chunk (_clear_chunks)
        self.mapped: list[MappedBlock] = []
        self.round_bytes = 0

    # ------------------------------------------------------------------ the guest

    def start(self, stop_first: bool = False) -> bool:
        """Attach RAM, bmap all ones, start the guest's dirty log; True if the guest runs
        (a live migration: more than one round)."""
        self.mapped = [attach(b) for b in self.blocks]
        self.bmap = [new_bmap(b.num_pages) for b in self.blocks]
        self.meter = BandwidthMeter()
        self.limiter = RateLimiter(self.params.max_bandwidth)
        self.throttle = AutoConverge(self.params)
        if self.guest is None:
            return False
        status = self.guest.query()
        self.was_running = status["status"] == "running"
        self.manual_protect = bool(status["workload"].get("manual_protect"))
        if stop_first and self.was_running:
            self.guest.stop()
        self.guest.harvest()  # the dirty log starts now; bmap is all ones anyway
        return self.guest.query()["status"] == "running"

    def stop(self) -> dict | None:
        """Stop the guest, lift the rate limit, harvest what it dirtied since the last sync.
        Returns the guest's final status (None without a guest)."""
        self.stats.stop_time = time.monotonic()
        if self.guest is None:
            return None
        status = self.guest.stop()
        self.limiter.disable()
        self.bitmap_sync()
        self.stats.remaining = self.remaining()
        return status

    def resume_guest(self) -> None:
        """After a failure: the guest runs again, unthrottled (invariant 8)."""
        if self.guest is not None and self.was_running:
            with contextlib.suppress(MfdError):
                self.guest.set_throttle(0)
                self.guest.cont()

    def release(self) -> None:
        for m in self.mapped:
            m.close()
        self.mapped = []

    def set_params(self, params: MigrationParameters) -> None:
        """``migrate-set-parameters`` while migrating: the rate limit and the convergence
        parameters apply from the next window / period (as in QEMU)."""
        self.params = params
        self.limiter.set_bandwidth(params.max_bandwidth)
        self.throttle.params = params

    # ------------------------------------------------------------------ what moved

    def account(self, pages: np.ndarray, moved: int, nonzero: np.ndarray) -> None:
        """A sink moved ``pages`` (``nonzero``: which had data) in ``moved`` bytes."""
        n = int(nonzero.sum())
        self.stats.normal += n
        self.stats.duplicate += len(pages) - n
        self.stats.transferred += moved
        self.round_bytes += moved
        self.meter.add(moved)
        # max-bandwidth counts what went out (QEMU: stream + multifd bytes), so zero pages
        # cost almost nothing; over budget, this waits for the window's end before more
        # work is handed out
        self.limiter.account(moved)

    def sent(self, pages: np.ndarray) -> OnDone:
        """The callback of a channel job that moves ``pages``: :meth:`account`."""
        return lambda moved, nonzero, digests: self.account(pages, moved, nonzero)

    def report(self) -> None:
        """The progress callback, with the bandwidth of the last window."""
        if self.progress is not None:
            self.stats.bandwidth = self.meter.bandwidth
            self.progress(self.stats)

    # ------------------------------------------------------------------ rounds

    def round(self, sink: Sink, final: bool = False,
              switch_due: Callable[[], bool] = _never) -> None:
        """One sweep over every block's bmap, between a section's header and its end; the
        final round (guest stopped) is ram_save_complete's, in the END section."""
        self.round_bytes = 0
        start = time.monotonic()
        sink.begin_section(final)
        self._sweep(sink, switch_due)
        if not self.x.skip_round_sync:
            sink.end_round()
        sink.end_section(final)
        self.stats.dirty_sync_count += 1
        elapsed = time.monotonic() - start
        self.stats.rounds.append({"round": self.stats.dirty_sync_count,
                                  "bytes": self.round_bytes, "seconds": elapsed,
                                  "throttle": self.stats.cpu_throttle_percentage})

    def _sweep(self, sink: Sink, switch_due: Callable[[], bool]) -> None:
        """The round's pages to the sink, batch by batch. A switch to postcopy comes
        between batches, as QEMU's between its iterations, not at the round's end: what was
        not sent stays dirty (and is discarded at the switch)."""
        legacy = self.params.zero_page_detection == "legacy"
        for i, words in enumerate(self.bmap):
            for lo, hi in self._clear_chunks(i, words):
                batches = dirty_batches(words, self.batch_pages, lo, hi)
                for batch in batches:
                    if switch_due():
                        for rest in (batch, *batches):
                            set_pages(words, rest)
                        return
                    self._queue(sink, i, batch, legacy)

    def _clear_chunks(self, block: int, words: np.ndarray) -> Iterator[tuple[int, int]]:
        """The block's bmap in clear_bmap chunks, as word ranges [lo, hi). A KVM guest with
        manual dirty log protect gets each chunk's dirty pages cleared in its log (write-
        protected again) just before they are read, as QEMU's
        ``migration_clear_memory_region_dirty_bitmap`` does: writes after the clear are
        logged for the next round, and a harvest never had to protect all RAM at once."""
        if not self.manual_protect:
            yield 0, len(words)
            return
        assert self.guest is not None
        step = (1 << self.params.x_clear_bitmap_shift) // 64  # words per chunk
        for lo in range(0, len(words), step):
            hi = min(lo + step, len(words))
            if words[lo:hi].any():
                self.guest.clear_log(block, lo * 64, words[lo:hi])
                yield lo, hi

    def _queue(self, sink: Sink, block: int, pages: np.ndarray, legacy: bool) -> None:
        """Hand one batch of dirty pages to the sink."""
        self.stats.remaining -= len(pages) * C.TARGET_PAGE_SIZE
        if legacy:  # the main thread finds zero pages (zero-page-detection=legacy)
            nonzero = nonzero_rows(self.mapped[block].words, pages)
            zero = pages[~nonzero]
            if len(zero):
                sink.zero(block, zero)
                self.stats.duplicate += len(zero)
            pages = pages[nonzero]
            if len(pages) == 0:
                return
        sink.pages(block, pages)

    def bitmap_sync(self) -> int:
        """``migration_bitmap_sync``: OR the guest's log into bmap; returns dirty pages."""
        assert self.guest is not None
        status, logs = self.guest.harvest()
        if self.x.ignore_dirty_log:
            logs = [np.zeros_like(w) for w in self.bmap]
        dirty = 0
        for words, log in zip(self.bmap, logs, strict=True):
            if len(log) != len(words):
                raise MfdError("guest returned a dirty log of the wrong size")
            dirty += popcount(log)
            np.bitwise_or(words, log, out=words)
        self.stats.cpu_throttle_percentage = int(status["cpu-throttle-percentage"])
        return dirty

    def remaining(self) -> int:
        return sum(popcount(w) for w in self.bmap) * C.TARGET_PAGE_SIZE

    def iterate(self, sink: Sink, live: bool, switch_due: Callable[[], bool] = _never,
                switchover_cost: Callable[[], float] = _free) -> None:
        """Rounds until the rest fits in the downtime limit (one round when not live), or
        until ``switch_due()`` (postcopy). ``switchover_cost()``: seconds the switchover
        takes beyond sending what remains (QEMU: none)."""
        self.stats.remaining = self.remaining()
        if not live:
            self.round(sink)
            return
        self.throttle.begin(self.stats.transferred)
        while True:
            self.round(sink, switch_due=switch_due)
            dirty = self.bitmap_sync()
            self.stats.remaining = self.stats.rounds[-1]["remaining"] = self.remaining()
            self.stats.bandwidth = self.meter.bandwidth
            extra = switchover_cost()
            if self.meter.bandwidth:
                self.stats.expected_downtime = \
                    (self.stats.remaining / self.meter.bandwidth + extra) * 1000
            self._auto_converge(dirty)
            self.report()
            if self.stats.remaining + extra * self.meter.bandwidth \
                    <= self.meter.threshold(self.params.downtime_limit) or switch_due():
                return

    def _auto_converge(self, dirty: int) -> None:
        """At the end of a period: the dirty rate, and the guest throttled harder."""
        ended = self.throttle.on_sync(dirty, self.stats.transferred)
        if ended is None:
            return
        self.stats.dirty_pages_rate, pct = ended
        if pct is not None:
            assert self.guest is not None
            self.guest.set_throttle(pct)
            self.stats.cpu_throttle_percentage = pct
