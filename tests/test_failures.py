"""Failure handling: a crashed channel, Ctrl-C, a guest that goes away. The source stays
authoritative, shared memory is neither leaked nor unlinked early, nothing hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from helpers import alive, children, shm_entries, start_mfd, until

import mfd
from mfd.errors import BrokenPipeline
from mfd.options import RestoreOptions
from mfd.ramimage import generate


def _wait_channels(p: subprocess.Popen, n: int) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = children(p.pid)
        if len(pids) >= n:
            return pids
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.01)
    raise AssertionError("channels did not start")


def test_killed_channel_fails_the_save_and_the_guest_keeps_running(tmp_path, guests):
    """A crashed channel: one clear line, no partial file, the guest's RAM intact and still
    owned by the guest (no early unlink), the guest running again."""
    name, g = guests.start("32M", "--dirty-rate", "100M")
    paths = [b["path"] for b in g.query()["blocks"]]
    mig = tmp_path / "x.mig"
    # a slow channel keeps the save busy long enough to kill the other one mid-way
    p = start_mfd("save", str(mig), "--guest", name, "--downtime-limit", "1",
                  "--max-bandwidth", "20M")
    victim = _wait_channels(p, 2)[0]
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert err.count("\n") == 1 and "died unexpectedly (killed by SIGKILL)" in err, err
    assert not mig.exists()
    assert all(os.path.exists(path) for path in paths)
    assert g.query()["status"] == "running"


def test_ctrl_c_cancels_the_save_cleanly(tmp_path, guests):
    name, g = guests.start("32M", "--dirty-rate", "100M")
    mig = tmp_path / "x.mig"
    p = start_mfd("save", str(mig), "--guest", name, "--downtime-limit", "1",
                  "--max-bandwidth", "20M")
    pids = _wait_channels(p, 2)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err.strip() == "mfd: interrupted"
    assert not mig.exists()
    until(lambda: not any(alive(c) for c in pids), "a channel outlived its save", 10)
    assert g.query()["status"] == "running"


def test_sigkill_of_the_save_leaves_no_channel_behind(tmp_path):
    img = tmp_path / "img.bin"
    generate(str(img), 256 << 20, seed=2)
    p = start_mfd("save", str(tmp_path / "k.mig"), "--image", f"mem={img}",
                  "--multifd-channels", "3", "--max-bandwidth", "50M")
    pids = _wait_channels(p, 3)
    p.kill()
    p.wait()
    until(lambda: not any(alive(c) for c in pids), "channels must die with the main process", 10)


def test_channel_error_breaks_the_pool(tmp_path):
    """A channel that fails (its file was truncated under it after the parse) is reported
    as BrokenPipeline naming the channel and the cause; the restore writes nothing."""
    from mfd.main_thread import load

    img = tmp_path / "img.bin"
    generate(str(img), 8 << 20, seed=3, zero=0.0)
    mig = tmp_path / "x.mig"
    mfd.save(str(mig), images={"mem": str(img)})
    out = tmp_path / "out.bin"
    with load.OpenedFile(str(mig)) as opened:
        hdr = opened.file.blocks[0].mapped_ram
        os.truncate(mig, hdr.pages_offset + (1 << 20))
        with pytest.raises(BrokenPipeline, match=r"channel \d failed: OSError: short read"):
            mfd.api._restore_images(opened, {"mem": str(out)},
                                    RestoreOptions(multifd_channels=2))
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["img.bin", "x.mig"]


def test_nothing_left_in_dev_shm_after_a_restore_into_a_guest_fails(tmp_path, guests):
    before = shm_entries()
    bad = tmp_path / "bad.mig"
    img = tmp_path / "img.bin"
    generate(str(img), 4 << 20, seed=4)
    mfd.save(str(bad), images={"mem": str(img)})
    data = bytearray(bad.read_bytes())
    data[-100] ^= 0xFF  # inside the trailer: the restore must refuse it
    bad.write_bytes(bytes(data))
    with pytest.raises(mfd.MfdError):
        mfd.restore(str(bad), guest=f"r{os.getpid()}")
    assert shm_entries() == before
