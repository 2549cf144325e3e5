"""The precopy loop shared by a mapped-ram file save and a live migration over sockets.

Mirrors ``migration/ram.c`` (``ram_save_setup`` / ``ram_save_iterate`` /
``ram_save_complete``) and ``migration/migration.c``'s iteration (bandwidth, switchover,
auto-converge). What differs between a file and a socket is a handful of hooks::

    start            attach RAM, bmap = all ones, the guest's dirty log starts
    round            begin_section | sweep: take dirty pages word by word, <= 128 pages of
                     one block per job, each to an idle channel (legacy zero-page detection
                     here, on the main thread) | end_round: flush + sync (file: LOCAL;
                     socket: SYNC ALL + MULTIFD_FLUSH) | end_section
    iterate          round, bitmap sync, counters; every >= 1 s period: dirty rate and
                     auto-converge; stop when remaining / bandwidth + switchover_cost()
                     <= downtime-limit (QEMU: remaining <= bandwidth x downtime-limit)
    stop_guest       stop the guest, lift the rate limit, final bitmap sync (the caller
                     then runs the final round)

A failure anywhere lets the guest run again, unthrottled: the source stays authoritative.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import numpy as np

from mfd.errors import MfdError
from mfd.main_thread.convergence import AutoConverge, BandwidthMeter, RateLimiter
from mfd.main_thread.pipeline import ChannelPool, OnDone
from mfd.main_thread.scanner import dirty_batches, new_bmap, popcount, set_pages
from mfd.main_thread.stats import MigrationStats
from mfd.options import MigrationParameters
from mfd.protocol import constants as C
from mfd.shm.control import GuestClient
from mfd.shm.ramblock import MappedBlock, RAMBlock, attach, nonzero_rows
from mfd.xhooks import NO_HOOKS, XHooks

Progress = Callable[[MigrationStats], None]


class Precopy:
    """One migration's source side; subclasses say where pages and the stream go."""

    pool: ChannelPool

    def __init__(self, blocks: list[RAMBlock], params: MigrationParameters,
                 guest: GuestClient | None, progress: Progress | None,
                 batch_pages: int = C.MULTIFD_PAGE_COUNT, x: XHooks = NO_HOOKS) -> None:
        names = [b.idstr for b in blocks]
        if len(set(names)) != len(names):
            raise MfdError(f"duplicate RAM block names: {names}")
        if not blocks:
            raise MfdError("nothing to migrate: no RAM blocks")
        self.blocks = blocks
        self.params = params
        self.guest = guest
        self.progress = progress
        self.batch_pages = batch_pages
        self.x = x  # test-only: ignore_dirty_log, skip_round_sync
        self.stats = MigrationStats(total=sum(b.used_length for b in blocks))
        self.was_running = False
        self.manual_protect = False  # the guest's log is cleared per chunk (_clear_chunks)
        self.mapped: list[MappedBlock] = []
        self.final_round = False

    # ------------------------------------------------------------------ hooks

    def begin_section(self, final: bool) -> None:
        """A PART (final: END) section's header goes out before the round's records."""

    def end_round(self) -> None:
        """Flush and sync at the end of a full pass over RAM."""

    def end_section(self, final: bool) -> None:
        """EOS and the section footer."""

    def on_legacy_zero(self, block: int, pages: np.ndarray) -> None:
        """zero-page-detection=legacy: the main thread found these pages zero."""

    def switchover_cost(self) -> float:
        """Seconds the switchover takes beyond sending what remains (QEMU: none)."""
        return 0.0

    def postcopy_due(self) -> bool:
        """After a round: switch to postcopy now (asked for, or its time has come)."""
        return False

    def send_pages(self, block: int, pages: np.ndarray) -> None:
        """Hand one batch of a block's dirty pages to an idle channel."""
        self.pool.send(block, pages, self._sent(block, pages))

    def on_done(self, block: int, pages: np.ndarray, moved: int, nonzero: np.ndarray,
                digest: bytes) -> None:
        """A channel finished a job: count what it moved (subclasses add their bookkeeping)."""
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

    # ------------------------------------------------------------------ setup

    def start_guest_log(self, stop_first: bool = False) -> bool:
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

    def set_params(self, params: MigrationParameters) -> None:
        """``migrate-set-parameters`` while migrating: the rate limit and the convergence
        parameters apply from the next window / period (as in QEMU)."""
        self.params = params
        self.limiter.set_bandwidth(params.max_bandwidth)
        self.throttle.params = params

    def resume_guest(self) -> None:
        """After a failure: the guest runs again, unthrottled (invariant 7)."""
        if self.guest is not None and self.was_running:
            with contextlib.suppress(MfdError):
                self.guest.set_throttle(0)
                self.guest.cont()

    def release(self) -> None:
        for m in self.mapped:
            m.close()
        self.mapped = []

    # ------------------------------------------------------------------ rounds

    def _sent(self, block: int, pages: np.ndarray) -> OnDone:
        return lambda moved, nonzero, digests: self.on_done(block, pages, moved, nonzero,
                                                            digests)

    def round(self, final: bool = False) -> None:
        """One sweep over every block's bmap, between a section's header and its end; the
        final round (guest stopped) is ram_save_complete's, in the END section."""
        self.round_bytes = 0
        self.final_round = final  # QEMU's last_stage
        start = time.monotonic()
        legacy = self.params.zero_page_detection == "legacy"
        self.begin_section(final)
        self._sweep(legacy, final)
        if not self.x.skip_round_sync:
            self.end_round()
        self.end_section(final)
        self.stats.dirty_sync_count += 1
        elapsed = time.monotonic() - start
        self.stats.rounds.append({"round": self.stats.dirty_sync_count,
                                  "bytes": self.round_bytes, "seconds": elapsed,
                                  "throttle": self.stats.cpu_throttle_percentage})

    def _sweep(self, legacy: bool, final: bool) -> None:
        """The round's pages to the channels, batch by batch. A switch to postcopy comes
        between batches, as QEMU's between its iterations, not at the round's end: what was
        not sent stays dirty (and is discarded at the switch)."""
        for i, words in enumerate(self.bmap):
            for lo, hi in self._clear_chunks(i, words):
                batches = dirty_batches(words, self.batch_pages, lo, hi)
                for batch in batches:
                    if not final and self.postcopy_due():
                        for rest in (batch, *batches):
                            set_pages(words, rest)
                        return
                    self._queue(i, batch, legacy)

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

    def _queue(self, block: int, pages: np.ndarray, legacy: bool) -> None:
        """Hand one batch of dirty pages to the channels."""
        self.stats.remaining -= len(pages) * C.TARGET_PAGE_SIZE
        if legacy:  # the main thread finds zero pages (zero-page-detection=legacy)
            nonzero = nonzero_rows(self.mapped[block].words, pages)
            zero = pages[~nonzero]
            if len(zero):
                self.on_legacy_zero(block, zero)
                self.stats.duplicate += len(zero)
            pages = pages[nonzero]
            if len(pages) == 0:
                return
        self.send_pages(block, pages)

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

    def iterate(self, live: bool) -> None:
        """Rounds until the rest fits in the downtime limit (one round when not live)."""
        self.stats.remaining = self.remaining()
        if not live:
            self.round()
            return
        period_start = time.monotonic()
        period_dirty = 0
        period_xfer = self.stats.transferred
        while True:
            self.round()
            dirty = self.bitmap_sync()
            period_dirty += dirty
            self.stats.remaining = self.stats.rounds[-1]["remaining"] = self.remaining()
            self.stats.bandwidth = self.meter.bandwidth
            extra = self.switchover_cost()
            if self.meter.bandwidth:
                self.stats.expected_downtime = \
                    (self.stats.remaining / self.meter.bandwidth + extra) * 1000
            now = time.monotonic()
            if now - period_start >= 1.0:
                self.stats.dirty_pages_rate = period_dirty / (now - period_start)
                pct = self.throttle.on_period(period_dirty * C.TARGET_PAGE_SIZE,
                                              self.stats.transferred - period_xfer)
                if pct is not None:
                    assert self.guest is not None
                    self.guest.set_throttle(pct)
                    self.stats.cpu_throttle_percentage = pct
                period_start, period_dirty, period_xfer = now, 0, self.stats.transferred
            if self.progress is not None:
                self.progress(self.stats)
            if self.stats.remaining + extra * self.meter.bandwidth \
                    <= self.meter.threshold(self.params.downtime_limit) or self.postcopy_due():
                return

    def stop_guest(self) -> dict | None:
        """Stop the guest, lift the rate limit, harvest what it dirtied since the last sync.
        Returns the guest's final status (None without a guest)."""
        self.stats.stop_time = time.monotonic()
        status = None
        if self.guest is not None:
            status = self.guest.stop()
            self.limiter.disable()
            self.bitmap_sync()
            self.stats.remaining = self.remaining()
        self.stats.status = "device"
        return status
