"""When to stop iterating, how fast we may go, and how hard to throttle the guest.

Mirrors ``migration/migration.c`` (``migration_update_counters``: bandwidth per >= 100 ms
window, ``threshold_size = bandwidth * downtime_limit``, expected downtime),
``migration/ram.c`` (``migration_trigger_throttle`` and ``mig_throttle_guest_down``) and
``migration_rate_limit`` (a budget of ``max-bandwidth / 10`` bytes per 100 ms window).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mfd.options import MigrationParameters
from mfd.protocol.constants import TARGET_PAGE_SIZE

BUFFER_DELAY = 0.100  # QEMU's window for bandwidth and rate limiting
THROTTLE_PERIOD = 1.0  # a dirty-rate period is judged at a bitmap sync >= 1 s after the last


class BandwidthMeter:
    """Bytes per second over the last complete window of at least 100 ms."""

    def __init__(self) -> None:
        self.window_start = time.monotonic()
        self.window_bytes = 0
        self.bandwidth = 0.0  # bytes per second

    def add(self, nbytes: int) -> None:
        self.window_bytes += nbytes
        now = time.monotonic()
        elapsed = now - self.window_start
        if elapsed >= BUFFER_DELAY:
            self.bandwidth = self.window_bytes / elapsed
            self.window_start = now
            self.window_bytes = 0

    def threshold(self, downtime_limit_ms: int) -> float:
        """Bytes that can still be sent within the downtime limit."""
        return self.bandwidth * downtime_limit_ms / 1000.0


class RateLimiter:
    """``max-bandwidth``: a budget of ``max-bandwidth / 10`` bytes per 100 ms window; over
    it, wait for the window's end (``migration_rate_limit``). A job can be larger than a
    window's budget (8 packets, 4 MiB), so what a window could not pay is carried into the
    next ones, and the wait lasts until it is paid: the rate holds for any job size.

    The wait is ``wait(seconds)``, a sleep unless the owner serves something meanwhile
    (postcopy: the pages the destination asks for, as QEMU's urgent request posts
    ``rate_limit_sem`` to cut the migration thread's wait short). What is sent during the
    wait counts in the window (QEMU counts every channel's bytes) but is never held."""

    def __init__(self, max_bandwidth: int) -> None:
        self.budget = max_bandwidth * BUFFER_DELAY
        self.window_start = time.monotonic()
        self.used = 0.0
        self.wait: Callable[[float], None] = time.sleep
        self.waiting = False  # in ``wait``: what is sent now is urgent

    def set_bandwidth(self, max_bandwidth: int) -> None:
        """A new ``max-bandwidth`` (``migrate-set-parameters``), from the next window on."""
        self.budget = max_bandwidth * BUFFER_DELAY

    def account(self, nbytes: int) -> None:
        if self.budget <= 0:
            return
        self.used += nbytes
        if self.waiting:
            return
        now = time.monotonic()
        passed = int((now - self.window_start) / BUFFER_DELAY)
        if passed:  # whole windows went by: each paid its budget
            self.window_start += passed * BUFFER_DELAY
            self.used = max(0.0, self.used - passed * self.budget)
        if self.used >= self.budget:
            windows = int(self.used // self.budget)
            self.waiting = True
            try:
                self.wait(max(0.0, self.window_start + windows * BUFFER_DELAY - now))
            finally:
                self.waiting = False
            self.window_start += windows * BUFFER_DELAY
            self.used -= windows * self.budget

    def disable(self) -> None:
        """At switchover QEMU lifts the limit."""
        self.budget = 0


class AutoConverge:
    """The dirty rate per period of >= 1 s (``migration_update_rates``), and at each
    period's end ``migration_trigger_throttle`` + ``mig_throttle_guest_down``."""

    def __init__(self, params: MigrationParameters) -> None:
        self.params = params
        self.percentage = 0
        self.dirty_rate_high_cnt = 0
        self.begin(0)

    def begin(self, transferred: int) -> None:
        """A period starts now; ``transferred``: the bytes sent so far."""
        self.period_start = time.monotonic()
        self.period_dirty = 0
        self.period_xfer = transferred

    def on_sync(self, dirty_pages: int, transferred: int) -> tuple[float, int | None] | None:
        """A bitmap sync found ``dirty_pages``. At the first sync >= 1 s after the period
        began: the period's dirty rate (pages per second) and a new throttle percentage
        (None: unchanged); a new period begins."""
        self.period_dirty += dirty_pages
        elapsed = time.monotonic() - self.period_start
        if elapsed < THROTTLE_PERIOD:
            return None
        rate = self.period_dirty / elapsed
        pct = self.on_period(self.period_dirty * TARGET_PAGE_SIZE,
                             transferred - self.period_xfer)
        self.begin(transferred)
        return rate, pct

    def on_period(self, bytes_dirty_period: int, bytes_xfer_period: int) -> int | None:
        """Judge one >= 1 s period; returns a new throttle percentage, or None."""
        threshold = bytes_xfer_period * self.params.throttle_trigger_threshold // 100
        if bytes_dirty_period <= threshold:
            return None
        self.dirty_rate_high_cnt += 1
        if self.dirty_rate_high_cnt < 2 or not self.params.auto_converge:
            return None
        self.dirty_rate_high_cnt = 0
        p = self.params
        if self.percentage == 0:
            self.percentage = p.cpu_throttle_initial
        else:
            inc = p.cpu_throttle_increment
            if p.cpu_throttle_tailslow:
                cpu_now = 100 - self.percentage
                cpu_ideal = cpu_now * (threshold / bytes_dirty_period)
                inc = int(min(cpu_now - cpu_ideal, inc))
            self.percentage = min(self.percentage + inc, p.max_cpu_throttle)
        return self.percentage
