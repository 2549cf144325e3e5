"""Options are checked in one place (mfd/options.py) with one wording: each check's line
once, and the CLI, the API and the monitor saying the same line for the same bad value."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from helpers import run_mfd

import mfd
from mfd.errors import UsageError
from mfd.options import IncomingOptions, MigrateOptions, RestoreOptions, SaveOptions, check_ram
from mfd.options import MigrationParameters as P
from mfd.qmp import monitor_command
from mfd.workers.tcp import free_ports

PREEMPT = "Postcopy preempt requires postcopy-ram (QEMU's reason)"


def _channels(n: int) -> str:
    return f"Parameter 'multifd-channels' expects a value between 1 and 255, got {n}"


CHECKS = {
    "range": (lambda: P(multifd_channels=0).check(mapped_ram=False), _channels(0)),
    "negative": (lambda: P(max_bandwidth=-1).check(mapped_ram=False),
                 "Parameter 'max-bandwidth' must not be negative"),
    "xbzrle cache": (lambda: P(xbzrle_cache_size=3 << 20).check(mapped_ram=False),
                     "Parameter 'xbzrle_cache_size' expects a power of two no less than the "
                     "target page size"),
    "choice": (lambda: P(zero_page_detection="some").check(mapped_ram=False),
               "zero-page-detection 'some', expected one of multifd, legacy, none"),
    "compression with mapped-ram": (lambda: P(multifd_compression="zstd").check(
        mapped_ram=True), "Cannot use compression with mapped-ram"),
    "direct-io without mapped-ram": (lambda: P(direct_io=True).check(mapped_ram=False),
                                     "direct-io is only available with mapped-ram"),
    "not live": (lambda: P().updated({"multifd_channels": 4}, mapped_ram=False),
                 "parameter 'multifd-channels' cannot be changed while migrating"),
    "QAPI type": (lambda: P().updated({"max_bandwidth": True}, mapped_ram=False),
                  "Invalid parameter type for 'max-bandwidth', expected: integer"),
    "live and checked": (lambda: P().updated({"max_cpu_throttle": 100}, mapped_ram=False),
                         "Parameter 'max-cpu-throttle' expects a value between 1 and 99, "
                         "got 100"),
    "save offset": (lambda: SaveOptions(offset=-1).check(),
                    "Parameter 'offset' must not be negative"),
    "migrate preempt": (lambda: MigrateOptions(multifd=False, postcopy_preempt=True).check(),
                        PREEMPT),
    "postcopy-after": (lambda: MigrateOptions(multifd=False, postcopy_after=1).check(),
                       "--postcopy-after goes with --postcopy-ram"),
    "postcopy with multifd": (lambda: MigrateOptions(postcopy=True).check(),
                              "Postcopy is not yet compatible with multifd (QEMU's reason; use "
                              "--no-multifd)"),
    "xbzrle with multifd": (lambda: MigrateOptions(xbzrle=True).check(),
                            "Multifd is not compatible with xbzrle (QEMU's reason; use "
                            "--no-multifd)"),
    "incoming channels": (lambda: IncomingOptions(multifd_channels=256).check(),
                          _channels(256)),
    "incoming preempt": (lambda: IncomingOptions(postcopy_preempt=True).check(), PREEMPT),
    "lazy without a guest": (lambda: RestoreOptions(lazy=True).check(guest=False),
                             "a lazy restore starts a guest: give --guest, not --image"),
    "restore channels": (lambda: RestoreOptions(multifd_channels=0).check(guest=True),
                         _channels(0)),
    "no RAM": (lambda: check_ram("save", None, None), "save needs either images or a guest"),
    "both": (lambda: check_ram("incoming", {"mem": "x"}, "vm", required=False),
             "incoming takes either images or a guest, not both"),
}


@pytest.mark.parametrize("case", CHECKS)
def test_each_check_says_one_line(case):
    check, line = CHECKS[case]
    with pytest.raises(UsageError) as e:
        check()
    assert str(e.value) == line


def test_the_defaults_pass_and_a_live_change_applies():
    for mapped_ram in (False, True):
        P().check(mapped_ram=mapped_ram)
    for options in (SaveOptions(), MigrateOptions(), IncomingOptions()):
        options.check()
    RestoreOptions(lazy=True).check(guest=True)
    assert P().updated({"max_bandwidth": 1 << 20}, mapped_ram=False).max_bandwidth == 1 << 20


ZERO_CHANNELS = {
    "migrate": (["migrate", "tcp:127.0.0.1:9", "--image", "mem=/nonexistent",
                 "--multifd-channels", "0"],
                lambda: mfd.migrate("tcp:127.0.0.1:9", images={"mem": "/nonexistent"},
                                    params=P(multifd_channels=0))),
    "incoming": (["incoming", "--listen", "tcp:127.0.0.1:9", "--multifd-channels", "0"],
                 lambda: mfd.incoming("tcp:127.0.0.1:9",
                                      options=IncomingOptions(multifd_channels=0))),
    "save": (["save", "/nonexistent/x.mig", "--image", "mem=/nonexistent",
              "--multifd-channels", "0"],
             lambda: mfd.save("/nonexistent/x.mig", images={"mem": "/nonexistent"},
                              params=P(multifd_channels=0))),
    "restore": (["restore", "/nonexistent.mig", "--image", "mem=/nonexistent",
                 "--multifd-channels", "0"],
                lambda: mfd.restore("/nonexistent.mig", images={"mem": "/nonexistent"},
                                    options=RestoreOptions(multifd_channels=0))),
}


@pytest.mark.parametrize("command", ZERO_CHANNELS)
def test_the_cli_and_the_api_say_the_same_line(command):
    """Before any file, guest or socket is looked at."""
    args, call = ZERO_CHANNELS[command]
    with pytest.raises(UsageError) as e:
        call()
    assert str(e.value) == _channels(0)
    r = run_mfd(*args)
    assert r.returncode == 2 and r.stderr == f"mfd: {e.value}\n"


def test_the_monitor_says_the_cli_s_line(tmp_path):
    """migrate-set-parameters during a migration refuses a value in the words the CLI uses
    for the same value at the start."""
    cli = run_mfd("migrate", "tcp:127.0.0.1:9", "--image", "mem=/nonexistent",
                  "--cpu-throttle-initial", "0")
    assert cli.returncode == 2
    image = tmp_path / "ram.bin"
    image.write_bytes(os.urandom(8 << 20))  # at 1 MiB/s: active for seconds
    port, qmp = free_ports(1), f"/tmp/mfdopt-{os.getpid()}-{time.monotonic_ns()}.qmp"
    uri = f"tcp:127.0.0.1:{port}"
    procs = [subprocess.Popen([sys.executable, "-m", "mfd", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
             for args in (["incoming", "--listen", uri, "--image", f"mem={tmp_path / 'out'}"],
                          ["migrate", uri, "--image", f"mem={image}", "--max-bandwidth", "1M",
                           "--monitor", qmp])]
    try:
        deadline = time.monotonic() + 30
        while _status(qmp) != "active":
            assert time.monotonic() < deadline, "the migration did not start"
            time.sleep(0.05)
        reply = monitor_command(qmp, "migrate-set-parameters", {"cpu-throttle-initial": 0})
        line = cli.stderr.removeprefix("mfd: ").removesuffix("\n")
        assert reply == {"error": {"class": "GenericError", "desc": line}}
        monitor_command(qmp, "migrate_cancel")
    finally:
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _status(qmp: str) -> str | None:
    try:
        return monitor_command(qmp, "query-migrate")["return"]["status"]
    except mfd.MfdError:  # not up yet
        return None
