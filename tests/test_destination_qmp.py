"""The destination's QMP handlers: they see the session only through ``Control`` (a
snapshot out, a cancel request in), never its objects."""

from __future__ import annotations

import pytest

from mfd.errors import Cancelled, MfdError
from mfd.main_thread.destination.qmp import Control, QmpHandlers
from mfd.main_thread.state import MigrationStatus
from mfd.options import IncomingOptions
from mfd.workers import tcp


def handlers(**options: object) -> tuple[Control, QmpHandlers]:
    control = Control(tcp.parse_uri("tcp:127.0.0.1:4444"), IncomingOptions(**options))
    return control, QmpHandlers(control)


def test_queries_answer_from_the_last_snapshot():
    control, qmp = handlers()
    assert qmp.query_migrate()["status"] == "setup"
    control.publish(parameters={"multifd-channels": 4}, multifd=False, return_path=True,
                    postcopy={"postcopy-requests": 3})
    control.move(MigrationStatus.ACTIVE)
    q = qmp.query_migrate()
    assert q["status"] == "active" and q["postcopy-requests"] == 3 and "error-desc" not in q
    assert qmp.query_migrate_parameters()["multifd-channels"] == 4
    assert qmp.query_migrate_capabilities() == [
        {"capability": "multifd", "state": False}, {"capability": "return-path", "state": True}]
    control.move(MigrationStatus.FAILED, "the source closed the connection")
    q = qmp.query_migrate()
    assert q["status"] == "failed" and q["error-desc"] == "the source closed the connection"


def test_cancel_is_a_request_the_session_checks():
    control, qmp = handlers()
    control.check()
    qmp.migrate_cancel()
    with pytest.raises(Cancelled, match="cancelled by migrate_cancel"):
        control.check()


def test_the_timeout_is_checked_with_cancel():
    control, _ = handlers(timeout=0.0)
    with pytest.raises(Cancelled, match=r"no migration completed within 0 s \(--timeout\)"):
        control.check()


def test_recover_only_when_paused_and_on_our_port():
    control, qmp = handlers()
    with pytest.raises(MfdError, match="the migration is setup, not postcopy-paused"):
        qmp.migrate_recover("tcp:127.0.0.1:4444")
    control.move(MigrationStatus.POSTCOPY_PAUSED)
    with pytest.raises(MfdError, match=r"listens at .*, and resumes there"):
        qmp.migrate_recover("tcp:127.0.0.1:5555")
    qmp.migrate_recover("tcp:127.0.0.1:4444")
    with pytest.raises(MfdError, match="with mfd incoming's options"):
        qmp.migrate_set_parameters({"max-bandwidth": 1})
