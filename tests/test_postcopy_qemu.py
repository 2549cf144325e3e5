"""Postcopy between mfd and a real QEMU 10, both directions (``shared/postcopy-facts.md``
section 8): ``-machine none`` with its RAM a /dev/shm file (share=on, as userfaultfd needs),
postcopy-ram set on both ends, multifd off (QEMU 10 refuses it with postcopy)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import QMP_TIMEOUT, Mfd, assert_same_ram, mfd_status, needs_qemu, until, wait_listening
from netutil import Relay

from mfd.bench.qemu import QemuMachine
from mfd.qmp import monitor_command
from mfd.ramimage import generate
from mfd.shm import control
from mfd.workers.tcp import free_ports

pytestmark = [pytest.mark.qemu, pytest.mark.slow, needs_qemu]

SIZE = 64 << 20
WAIT = 60.0


@pytest.fixture
def shm_file(tmp_path):
    """A RAM file in /dev/shm (QEMU's postcopy needs tmpfs), removed afterwards."""
    paths: list[str] = []

    def make(name: str) -> Path:
        path = Path("/dev/shm") / f"mfd-test-{os.getpid()}-{name}"
        paths.append(str(path))
        return path

    yield make
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
def test_mfd_to_qemu_postcopy(shm_file, guests, preempt):
    """A writing mfd guest switches to postcopy into QEMU; QEMU's RAM equals the source's
    (paused at the switch, --keep-source). QEMU's pmemsave during the slowed push reads
    pages not there yet: QEMU asks for them, mfd serves them first."""
    src, _ = guests.start("64M", "--dirty-rate", "100M")
    out = shm_file("qemu-dst")
    with open(out, "wb") as f:
        f.truncate(SIZE)
    port = free_ports(1)
    with QemuMachine(str(out), SIZE, incoming=True, timeout=QMP_TIMEOUT) as q:
        q.set_migration(postcopy=True, preempt=preempt)
        q.start_migrate_incoming(f"tcp:127.0.0.1:{port}")
        with Mfd("migrate", f"tcp:127.0.0.1:{port}", "--guest", src, "--no-multifd",
                 "--postcopy-ram", "--postcopy-after", "0.5", "--max-bandwidth", "30M",
                 "--max-postcopy-bandwidth", "8M", "--keep-source", "--json",
                 *(["--postcopy-preempt"] if preempt else [])) as mig:
            deadline = time.monotonic() + WAIT
            while q.qmp("query-migrate").get("status") != "postcopy-active":
                assert time.monotonic() < deadline and mig.alive(), mig.err
                time.sleep(0.02)
            q.qmp("pmemsave", val=32 << 20, size=1 << 20,
                  filename=str(shm_file("pmemsave")))
            res = mig.completed(WAIT)
        info = q.wait_migration(WAIT)
        assert info["status"] == "completed"
    assert res["status"] == "completed"
    assert res["ram"]["postcopy-requests"] > 0, "QEMU asked for no page"
    with control.GuestClient(src) as g:
        status = g.query()
        assert status["status"] == "paused"
        assert_same_ram(status["blocks"][0]["path"], out)


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
def test_qemu_to_mfd_postcopy(shm_file, guests, preempt):
    src = shm_file("qemu-src")
    generate(str(src), SIZE, seed=3)
    dst = f"pq{os.getpid()}"
    guests.adopt(dst)
    port = free_ports(1)
    with Mfd("incoming", "--listen", f"tcp:127.0.0.1:{port}", "--guest", dst,
             "--postcopy-ram", "--json", "--timeout", str(WAIT),
             *(["--postcopy-preempt"] if preempt else [])) as inc, \
            QemuMachine(str(src), SIZE, timeout=QMP_TIMEOUT) as q:
        wait_listening(port, inc.alive)
        q.set_migration(postcopy=True, preempt=preempt)
        q.qmp("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
        q.start_migrate(f"tcp:127.0.0.1:{port}")
        time.sleep(0.5)
        q.qmp("migrate-start-postcopy")
        info = q.wait_migration(WAIT)
        res = inc.completed(WAIT)
    assert info["status"] == "completed"
    assert res["status"] == "completed" and res["source"] == "qemu"
    assert_same_ram(src, res["blocks"]["mem"])


def test_qemu_to_mfd_postcopy_recovery(shm_file, guests, tmp_path):
    """QEMU's source, the link cut mid-postcopy: QEMU and mfd both pause; QEMU's migrate
    with resume=true to mfd's port completes it; RAM equal."""
    src = shm_file("qemu-src")
    generate(str(src), SIZE, seed=4)
    dst = f"pr{os.getpid()}"
    guests.adopt(dst)
    port, relay_port = free_ports(1), free_ports(1)
    dst_qmp = str(tmp_path / "dst.qmp")
    relay = Relay(relay_port, port, 1)
    try:
        with Mfd("incoming", "--listen", f"tcp:127.0.0.1:{port}", "--guest", dst,
                 "--postcopy-ram", "--json", "--timeout", str(WAIT), "--monitor",
                 dst_qmp) as inc, QemuMachine(str(src), SIZE, timeout=QMP_TIMEOUT) as q:
            wait_listening(port, inc.alive)
            q.set_migration(postcopy=True)
            q.qmp("migrate-set-parameters", **{"max-bandwidth": 16 << 20,
                                               "max-postcopy-bandwidth": 4 << 20})
            q.start_migrate(f"tcp:127.0.0.1:{relay_port}")
            time.sleep(0.5)
            q.qmp("migrate-start-postcopy")
            until(lambda: q.qmp("query-migrate")["status"] == "postcopy-active",
                  "QEMU did not start postcopy", WAIT)
            time.sleep(0.5)
            relay.cut()
            until(lambda: q.qmp("query-migrate")["status"] == "postcopy-paused",
                  "QEMU did not pause", WAIT)
            until(lambda: mfd_status(dst_qmp) == "postcopy-paused", "mfd did not pause", WAIT)
            assert monitor_command(dst_qmp, "migrate-recover",
                                   {"uri": f"tcp:127.0.0.1:{port}"}, 5.0) == {"return": {}}
            q.qmp("migrate", uri=f"tcp:127.0.0.1:{port}", resume=True)
            info = q.wait_migration(WAIT)
            res = inc.completed(WAIT)
        assert info["status"] == "completed" and res["status"] == "completed"
        assert_same_ram(src, res["blocks"]["mem"])
    finally:
        relay.cut()


def test_mfd_to_qemu_postcopy_recovery(shm_file, guests, tmp_path):
    """mfd's source, the link cut mid-postcopy: both pause; QEMU's migrate-recover on a
    new port and mfd's migrate with resume=true to it complete it; RAM equal."""
    src, _ = guests.start("64M", "--dirty-rate", "100M")
    out = shm_file("qemu-dst")
    with open(out, "wb") as f:
        f.truncate(SIZE)
    port, relay_port, again = free_ports(1), free_ports(1), free_ports(1)
    src_qmp = str(tmp_path / "src.qmp")
    relay = Relay(relay_port, port, 1)
    try:
        with QemuMachine(str(out), SIZE, incoming=True, timeout=QMP_TIMEOUT) as q:
            q.set_migration(postcopy=True)
            q.start_migrate_incoming(f"tcp:127.0.0.1:{port}")
            with Mfd("migrate", f"tcp:127.0.0.1:{relay_port}", "--guest", src,
                     "--no-multifd", "--postcopy-ram", "--postcopy-after", "0.5",
                     "--max-bandwidth", "30M", "--max-postcopy-bandwidth", "4M",
                     "--keep-source", "--json", "--monitor", src_qmp) as mig:
                until(lambda: q.qmp("query-migrate").get("status") == "postcopy-active",
                      "QEMU did not see postcopy start", WAIT)
                time.sleep(0.5)
                relay.cut()
                until(lambda: q.qmp("query-migrate").get("status") == "postcopy-paused",
                      "QEMU did not pause", WAIT)
                until(lambda: mfd_status(src_qmp) == "postcopy-paused", "mfd did not pause",
                      WAIT)
                q.qmp("migrate-recover", uri=f"tcp:127.0.0.1:{again}")
                assert monitor_command(src_qmp, "migrate", {"uri": f"tcp:127.0.0.1:{again}",
                                                            "resume": True}, 5.0) == \
                    {"return": {}}
                res = mig.completed(WAIT)
            info = q.wait_migration(WAIT)
        assert info["status"] == "completed" and res["status"] == "completed"
        with control.GuestClient(src) as g:
            assert_same_ram(g.query()["blocks"][0]["path"], out)
    finally:
        relay.cut()
