"""The source's QMP handlers and Control, the one surface the monitor thread shares with a
migration: every request checked on the monitor's side (parameters by
``MigrationParameters.updated``, with its words), taken once by the migration, the
parameters in force shown by queries."""

from __future__ import annotations

import pytest

from mfd.errors import MfdError, UsageError
from mfd.main_thread.source.qmp import SourceQMP
from mfd.main_thread.source.session import Control
from mfd.main_thread.state import MigrationStatus
from mfd.main_thread.stats import MigrationStats
from mfd.options import MigrateOptions, MigrationParameters
from mfd.workers.tls import TLSOptions


def handlers(**options) -> tuple[SourceQMP, Control]:
    control = Control(MigrationParameters(), None, MigrationStats(total=1 << 20))
    return SourceQMP(control, MigrateOptions(**options)), control


def test_parameters_are_checked_queued_and_taken_once():
    qmp, control = handlers()
    qmp.migrate_set_parameters({"max-bandwidth": 1000})
    qmp.migrate_set_capabilities([{"capability": "auto-converge", "state": True}])
    assert qmp.query_migrate_parameters()["max-bandwidth"] == 0, "not in force before a tick"
    params = control.take_params()
    assert params is not None and params.max_bandwidth == 1000 and params.auto_converge
    assert control.take_params() is None
    assert qmp.query_migrate_parameters()["max-bandwidth"] == 1000
    assert {"capability": "auto-converge", "state": True} in qmp.query_migrate_capabilities()


@pytest.mark.parametrize(("args", "words"), [
    ({"downtime-limit": 3_000_000},
     "Parameter 'downtime-limit' expects a value between 0 and 2000000, got 3000000"),
    ({"max-bandwidth": -1}, "Parameter 'max-bandwidth' must not be negative"),
    ({"multifd-channels": 4}, "parameter 'multifd-channels' cannot be changed while migrating"),
])
def test_a_refused_parameter_changes_nothing(args, words):
    qmp, control = handlers()
    with pytest.raises(UsageError, match=words):
        qmp.migrate_set_parameters(args)
    assert control.take_params() is None


def test_cancel_postcopy_and_resume_are_requests():
    qmp, control = handlers(postcopy=True, multifd=False)
    qmp.migrate_start_postcopy()
    qmp.migrate_cancel()
    assert control.postcopy_requested
    assert control.cancel_requested == "cancelled by migrate_cancel"
    with pytest.raises(MfdError, match="the migration is setup, not postcopy-paused"):
        qmp.migrate_resume("tcp:127.0.0.1:1")
    control.stats.status = MigrationStatus.POSTCOPY_PAUSED
    qmp.migrate_resume("tcp:127.0.0.1:1")
    assert control.take_resume() == "tcp:127.0.0.1:1" and control.take_resume() is None
    with pytest.raises(MfdError, match="Enable postcopy"):
        handlers()[0].migrate_start_postcopy()


def test_tls_hostname_is_for_a_resume():
    qmp, control = handlers()
    with pytest.raises(UsageError, match="this migration has no TLS"):
        qmp.migrate_set_parameters({"tls-hostname": "dst"})
    control.tls_options = TLSOptions(creds="/nowhere")
    qmp.migrate_set_parameters({"tls-hostname": "dst"})
    assert control.tls_options.hostname == "dst"
