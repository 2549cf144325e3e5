"""The state of a migration, one value at a time, with QEMU's names (``MigrationStatus``
in ``qapi/migration.json``): what ``query-migrate`` says as ``status``."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from mfd.errors import BrokenPipeline, Cancelled
from mfd.workers.tcp import LinkLost


class MigrationStatus(StrEnum):
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"  # the guest is stopped, the final round is under way
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def in_postcopy(self) -> bool:
        return self.name.startswith("POSTCOPY")

    @property
    def finished(self) -> bool:
        return self in (MigrationStatus.COMPLETED, MigrationStatus.FAILED,
                        MigrationStatus.CANCELLED)


def failure(e: BaseException, peer_reason: Callable[[], str | None]
            ) -> tuple[MigrationStatus, str, str | None]:
    """How a migration ended on error: its status, the reason, and the other end's own
    reason when a channel lost its connection because that end gave up (it says why
    better)."""
    cancelled = isinstance(e, Cancelled | KeyboardInterrupt)
    status = MigrationStatus.CANCELLED if cancelled else MigrationStatus.FAILED
    lost = isinstance(e, LinkLost) or (isinstance(e, BrokenPipeline) and e.link_lost)
    why = peer_reason() if lost else None
    return status, why or ("interrupted" if isinstance(e, KeyboardInterrupt) else str(e)), why
