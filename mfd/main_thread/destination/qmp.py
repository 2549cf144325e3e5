"""The monitor's side of an incoming migration: QMP commands that never touch the session.

The monitor (``mfd.monitor``) runs its handlers on its own thread; the session runs on the
main thread. They meet only in :class:`Control`, under one lock::

    monitor thread                Control                      session (main thread)
    migrate_cancel      --> cancel request          --> check(): raises Cancelled
    query-migrate*      <-- Snapshot (frozen)       <-- move(status), the one place the
                                                        status changes; publish(): at
                                                        every check (<= 100 ms)
    migrate-recover     <-- (the status, our port: it only checks; a paused destination
                             takes the source's next main connection anyway)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

from mfd.errors import Cancelled, MfdError
from mfd.main_thread.state import MigrationStatus
from mfd.options import IncomingOptions
from mfd.workers import tcp
from mfd.workers.tls import tls_parameters


@dataclass(frozen=True)
class Snapshot:
    """What the monitor may know of the session, as of its last publish."""

    status: MigrationStatus = MigrationStatus.SETUP
    error: str | None = None  # why it failed or was cancelled
    parameters: dict = field(default_factory=dict)  # multifd's (``Channels.parameters``)
    multifd: bool = True  # false once the source started without it
    return_path: bool = False
    postcopy: dict = field(default_factory=dict)  # requests and latency, once it ran


class Control:
    def __init__(self, addr: tcp.Address, options: IncomingOptions) -> None:
        self.addr = addr
        self.start = time.monotonic()
        self.timeout = options.timeout
        self.tls = tls_parameters(options.tls)
        self._lock = threading.Lock()
        self._cancel: str | None = None  # the monitor's request
        self._snapshot = Snapshot()
        self.status = MigrationStatus.SETUP  # the session's (only its thread moves it)

    # the session's side

    def check(self) -> None:
        """Raise :class:`Cancelled` if the monitor cancelled, or --timeout passed."""
        with self._lock:
            why = self._cancel
        if why is not None:
            raise Cancelled(why)
        if self.timeout is not None and time.monotonic() - self.start > self.timeout:
            raise Cancelled(f"no migration completed within {self.timeout:g} s (--timeout)")

    def move(self, status: MigrationStatus, error: str | None = None) -> None:
        """The session's state moves (``error``: why it failed or was cancelled)."""
        self.status = status
        self.publish(status=status, error=error)

    def publish(self, **changes: object) -> None:
        with self._lock:
            self._snapshot = replace(self._snapshot, **changes)

    # the monitor's side

    def cancel(self, why: str) -> None:
        with self._lock:
            self._cancel = self._cancel or why

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot


class QmpHandlers:
    """``mfd.monitor.MonitorHandlers`` for an incoming migration."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def query_migrate(self) -> dict:
        s = self.control.snapshot()
        out: dict[str, object] = {
            "status": s.status.value,
            "total-time": round((time.monotonic() - self.control.start) * 1000),
            **s.postcopy}
        if s.error is not None:
            out["error-desc"] = s.error
        return out

    def query_migrate_parameters(self) -> dict:
        return {**self.control.snapshot().parameters, **self.control.tls}

    def query_migrate_capabilities(self) -> list[dict]:
        s = self.control.snapshot()
        return [{"capability": "multifd", "state": s.multifd},
                {"capability": "return-path", "state": s.return_path}]

    def migrate_set_parameters(self, args: dict) -> None:
        raise MfdError("set the destination's parameters with mfd incoming's options")

    def migrate_set_capabilities(self, capabilities: list[dict]) -> None:
        raise MfdError("set the destination's capabilities with mfd incoming's options")

    def migrate_cancel(self) -> None:
        self.control.cancel("cancelled by migrate_cancel")

    def migrate_recover(self, uri: str) -> None:
        """QEMU's migrate-recover: mfd incoming resumes on the port it listens on anyway
        (a postcopy-paused destination takes the source's next main connection)."""
        addr = self.control.addr
        if tcp.parse_uri(uri).port != addr.port:
            raise MfdError(f"migrate-recover: this destination listens at {addr}, "
                           "and resumes there")
        status = self.control.snapshot().status
        if status is not MigrationStatus.POSTCOPY_PAUSED:
            raise MfdError(f"migrate-recover: the migration is {status.value}, not "
                           "postcopy-paused")
