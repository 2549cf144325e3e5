"""The built-in guest: dirty log, stop/cont/quit, throttle, shared-memory lifetime."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from helpers import run_mfd, shm_entries, start_mfd

from mfd.errors import GuestError
from mfd.protocol.mapped_ram import words_to_bits
from mfd.shm import control
from mfd.shm.guest import throttle_sleep


def _ram(client) -> np.ndarray:
    (b,) = client.query()["blocks"]
    return np.fromfile(b["path"], dtype=np.uint64).reshape(-1, 512)


def test_dirty_log_covers_every_changed_page(guests):
    """Race-free log: every page that changed after a harvest is in the next harvest."""
    _, g = guests.start("32M", "--dirty-rate", "400M", "--zero-fraction", "0.2")
    g.harvest()
    before = _ram(g)
    time.sleep(0.3)
    g.stop()
    _, (log,) = g.harvest()
    after = _ram(g)
    changed = (before != after).any(axis=1)
    dirty = words_to_bits(log, len(changed))
    assert changed.sum() > 100
    assert not (changed & ~dirty).any(), "a write is missing from the dirty log"


def test_stop_cont_quit_and_throttle(guests):
    name, g = guests.start("16M", "--dirty-rate", "50M")
    g.stop()
    n = g.query()["pages-written"]
    time.sleep(0.1)
    assert g.query()["pages-written"] == n and g.query()["status"] == "paused"
    assert g.cont()["status"] == "running"
    deadline = time.monotonic() + 10
    while g.query()["pages-written"] == n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert g.query()["pages-written"] > n
    assert g.set_throttle(60)["cpu-throttle-percentage"] == 60
    with pytest.raises(GuestError, match=r"outside 0\.\.99"):
        g.set_throttle(100)
    r = run_mfd("guest", "--name", name, "--stop")
    assert r.returncode == 0 and '"status": "paused"' in r.stdout
    paths = [b["path"] for b in g.query()["blocks"]]
    assert all(os.path.exists(p) for p in paths)
    assert run_mfd("guest", "--name", name, "--quit").returncode == 0
    assert not any(os.path.exists(p) for p in paths)
    assert not control.is_alive(name)


def test_throttle_is_qemus_timeslice_rule():
    """cpu_throttle_thread: sleep pct/(1-pct) timeslices of 10 ms per timeslice run."""
    assert throttle_sleep(0) == 0
    assert throttle_sleep(50) == pytest.approx(0.010)
    assert throttle_sleep(80) == pytest.approx(0.040)
    assert throttle_sleep(99) == pytest.approx(0.990)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_guest_interrupted_unlinks_its_ram(tmp_path, sig):
    """Ctrl-C or SIGTERM of a foreground guest: its RAM is unlinked, nothing is printed
    about leaked resources (no resource_tracker involved)."""
    name = f"fg{os.getpid()}{sig}"

    def its_ram() -> set[str]:  # (another session's guests may come and go meanwhile)
        return {n for n in shm_entries() if n.startswith(f"mfd-{name}-")}

    p = start_mfd("guest", "--name", name, "--ram", "8M", "--block", "vram=4M",
                  "--dirty-rate", "10M")
    try:
        line = p.stdout.readline()
        assert "running" in line, p.stderr.read()
        assert len(its_ram()) == 2
        p.send_signal(sig)
        _, err = p.communicate(timeout=20)
    finally:
        p.kill()
        p.wait()
        left = its_ram()
        for n in left:  # a guest that did not unlink its RAM: the test fails, nothing stays
            os.unlink(os.path.join("/dev/shm", n))
    assert left == set()
    assert "resource_tracker" not in err and "Traceback" not in err
    assert not os.path.exists(control.socket_path(name))


def test_two_guests_with_one_name_are_refused(guests):
    name, _ = guests.start("4M")
    r = run_mfd("guest", "--name", name, "--ram", "4M")
    assert r.returncode == 1 and "already running" in r.stderr


def test_ram_larger_than_dev_shm_is_refused():
    """Sparse files would be created, and the guest killed by SIGBUS at the first write past
    the tmpfs's size (a container's 64 MiB /dev/shm): refused up front, one line."""
    p = run_mfd("guest", "--name", f"huge{os.getpid()}", "--ram", "100T")
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "/dev/shm has" in p.stderr and "the RAM needs 100.0 TiB" in p.stderr
