"""The state of a migration, one value at a time, with QEMU's names (``MigrationStatus``
in ``qapi/migration.json``): what ``query-migrate`` says as ``status``."""

from __future__ import annotations

from enum import StrEnum


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
