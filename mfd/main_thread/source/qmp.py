"""The monitor's handlers for a migration's source (``mfd.monitor.MonitorHandlers``).

They run on the monitor thread and never touch the migration: QMP's arguments are checked
here, with QEMU's words, and handed to :class:`~mfd.main_thread.source.session.Control`,
which the migration reads at its next tick.
"""

from __future__ import annotations

from mfd.errors import MfdError, UsageError
from mfd.main_thread.source.session import Control
from mfd.main_thread.state import MigrationStatus
from mfd.options import MigrateOptions
from mfd.workers import tcp
from mfd.workers.tls import tls_parameters


class SourceQMP:
    def __init__(self, control: Control, options: MigrateOptions) -> None:
        self.control = control
        self.options = options  # the capabilities, fixed at the start

    def query_migrate(self) -> dict:
        return self.control.query_migrate()

    def query_migrate_parameters(self) -> dict:
        return self.control.params.to_qmp() | tls_parameters(self.control.tls)

    def query_migrate_capabilities(self) -> list[dict]:
        return [{"capability": "multifd", "state": self.options.multifd},
                {"capability": "return-path", "state": True},
                {"capability": "auto-converge", "state": self.control.params.auto_converge},
                {"capability": "xbzrle", "state": self.options.xbzrle}]

    def migrate_set_parameters(self, args: dict) -> None:
        args = dict(args)
        if "tls-hostname" in args:  # for the connections of a resume (postcopy recovery)
            name = args.pop("tls-hostname")
            if not isinstance(name, str):
                raise UsageError("Invalid parameter type for 'tls-hostname', expected: string")
            if self.control.tls_options is None:
                raise UsageError("tls-hostname: this migration has no TLS (--tls-creds)")
            self.control.set_tls_hostname(name or None)
        self.control.update_params({k.replace("-", "_"): v for k, v in args.items()})

    def migrate_set_capabilities(self, capabilities: list[dict]) -> None:
        changes = {}
        for cap in capabilities:
            name, state = cap.get("capability"), cap.get("state")
            if name == "auto-converge" and isinstance(state, bool):
                changes["auto_converge"] = state
            elif name in ("multifd", "return-path") and state is True:
                continue
            else:
                raise UsageError(f"capability {name!r} cannot be set to {state!r} here")
        self.control.update_params(changes)

    def migrate_cancel(self) -> None:
        self.control.cancel("cancelled by migrate_cancel")

    def migrate_start_postcopy(self) -> None:
        if not self.options.postcopy:
            raise MfdError("Enable postcopy with migrate_set_capability before the start of "
                           "migration")
        self.control.start_postcopy()

    def migrate_resume(self, uri: str) -> None:
        """QMP ``migrate`` with ``resume``: only a postcopy-paused migration resumes."""
        status = self.control.status
        if status != MigrationStatus.POSTCOPY_PAUSED:
            raise MfdError(f"migrate resume: the migration is {status}, not postcopy-paused")
        tcp.parse_uri(uri)
        self.control.resume(uri)
