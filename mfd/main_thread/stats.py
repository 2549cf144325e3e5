"""Migration counters with QEMU's ``query-migrate`` names."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mfd.main_thread.state import MigrationStatus
from mfd.protocol.constants import TARGET_PAGE_SIZE

if TYPE_CHECKING:
    from mfd.main_thread.xbzrle import XbzrleCounters


@dataclass
class MigrationStats:
    status: MigrationStatus = MigrationStatus.SETUP  # moved by the session that owns these
    start: float = field(default_factory=time.monotonic)
    setup_time: float = 0.0
    stop_time: float | None = None  # when the guest was stopped for switchover
    end_time: float | None = None
    run_time: float | None = None  # postcopy: when the destination's guest was told to run
    transferred: int = 0  # bytes written or sent (pages + stream)
    total: int = 0  # bytes of RAM
    remaining: int = 0  # dirty bytes still to send
    normal: int = 0  # pages sent with data
    duplicate: int = 0  # zero pages (QEMU's name)
    dirty_sync_count: int = 0  # rounds (bitmap syncs)
    dirty_pages_rate: float = 0.0  # pages per second dirtied in the last period
    bandwidth: float = 0.0  # bytes per second
    expected_downtime: float = 0.0  # ms
    cpu_throttle_percentage: int = 0
    verify_time: float | None = None  # live migration: seconds of the downtime spent verifying
    postcopy_requests: int = 0  # pages the destination asked for during postcopy
    rounds: list[dict] = field(default_factory=list)
    xbzrle: XbzrleCounters | None = None  # with the xbzrle capability

    @property
    def total_time_ms(self) -> float:
        end = self.end_time if self.end_time is not None else time.monotonic()
        return (end - self.start) * 1000.0

    @property
    def downtime_ms(self) -> float | None:
        """From the guest's stop to its run at the destination (postcopy: RUN sent)."""
        end = self.run_time if self.run_time is not None else self.end_time
        if self.stop_time is None or end is None:
            return None
        return (end - self.stop_time) * 1000.0

    def query_migrate(self) -> dict[str, object]:
        """The shape of QEMU's ``query-migrate`` reply."""
        out: dict[str, object] = {
            "status": self.status,
            "total-time": round(self.total_time_ms),
            "setup-time": round(self.setup_time * 1000.0),
            "expected-downtime": round(self.expected_downtime),
            "ram": {
                "transferred": self.transferred,
                "remaining": self.remaining,
                "total": self.total,
                "duplicate": self.duplicate,
                "normal": self.normal,
                "normal-bytes": self.normal * TARGET_PAGE_SIZE,
                "mbps": round(self.bandwidth * 8 / 1e6, 3),
                "dirty-pages-rate": round(self.dirty_pages_rate),
                "dirty-sync-count": self.dirty_sync_count,
                "pages-per-second": round(self.bandwidth / TARGET_PAGE_SIZE),
                "postcopy-requests": self.postcopy_requests,
            },
        }
        if self.downtime_ms is not None:
            out["downtime"] = round(self.downtime_ms)
        if self.cpu_throttle_percentage:
            out["cpu-throttle-percentage"] = self.cpu_throttle_percentage
        if self.verify_time is not None:  # mfd's own, so x- as QEMU marks experimental ones
            out["x-verify-time"] = round(self.verify_time * 1000)
        if self.run_time is not None:  # postcopy: when the destination's guest ran (ms)
            out["x-postcopy-run-at"] = round((self.run_time - self.start) * 1000)
        if self.xbzrle is not None:
            out["xbzrle-cache"] = self.xbzrle.to_qmp()
        return out
