"""A real guest: a KVM vCPU running mfd's x86-64 program (mfd guest --kvm), migrated live,
saved, restored, throttled. Skipped, with the reason, where KVM cannot run."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from helpers import (
    MANY_ROUNDS,
    K,
    finish,
    guest_state,
    live_save_matches,
    needs_kvm,
    run_exits,
    run_mfd,
    shm_entries,
    start_incoming,
)

import mfd
from mfd.options import MigrationParameters, SaveOptions
from mfd.qmp import monitor_command
from mfd.shm import control
from mfd.workers.tcp import free_ports
from mfd.xhooks import XHooks


def _flip_rax_bit(regs_hex: str) -> str:
    regs = bytearray.fromhex(regs_hex)
    regs[0] ^= 1  # RAX bit 0: the program's xorshift state
    return regs.hex()


@needs_kvm
@pytest.mark.slow
def test_determinism_across_a_live_migration(tmp_path, guests):
    """A KVM guest migrates live while it writes. The destination (kept paused, QEMU's -S)
    runs K exits; a second VM made from the source's state at switchover (the source kept
    paused, QEMU's postmigrate; saved and restored) runs K exits too: RAM, counter and
    registers are identical. A third VM from the same state with one register bit flipped
    differs: the comparison bites."""
    src, _ = guests.start("64M", "--kvm", "--dirty-rate", "50M")
    dst, twin, flipped = f"{src}d", f"{src}t", f"{src}f"
    for n in (dst, twin, flipped):
        guests.adopt(n)
    port = free_ports(1)
    inc = start_incoming(port, "--guest", dst, "--stopped")
    res = mfd.migrate(f"tcp://127.0.0.1:{port}", guest=src,
                      params=MigrationParameters(multifd_channels=2),
                      options=mfd.MigrateOptions(keep_source=True))
    assert finish(inc)[0] == 0 and res.rounds >= 2
    with control.GuestClient(src) as s, control.GuestClient(dst) as d:
        assert s.query()["status"] == d.query()["status"] == "paused"
        at_switchover = guest_state(s)
        assert guest_state(d) == at_switchover  # the migration itself: the same guest
        source = s.query()
    mig = tmp_path / "source.mig"
    assert run_mfd("save", str(mig), "--guest", src).returncode == 0
    assert run_mfd("restore", str(mig), "--guest", twin).returncode == 0
    # the flipped one: the source's RAM and state by hand, one bit of RAX changed
    w = dict(source["workload"], regs=_flip_rax_bit(source["workload"]["regs"]))
    control.start_guest_daemon(["--name", flipped, "--block", "mem=64M", "--stopped",
                                "--x-resume", orjson.dumps(w).decode()], flipped).close()
    with control.GuestClient(flipped) as f:
        with open(f.query()["blocks"][0]["path"], "r+b") as ram:  # no truncation: it is mapped
            ram.write(Path(source["blocks"][0]["path"]).read_bytes())
        with control.GuestClient(dst) as d, control.GuestClient(twin) as t:
            assert guest_state(t) == at_switchover
            after_d, after_t = run_exits(d, K), run_exits(t, K)
            after_f = run_exits(f, K)
    assert after_d["exits"] == at_switchover["exits"] + K
    assert after_d["ram"] != at_switchover["ram"]  # it did run
    assert after_d == after_t
    assert after_f["ram"] != after_d["ram"] and after_f["regs"] != after_d["regs"]


HARD_KVM = ["--kvm", "--dirty-rate", "400M", "--pattern", "random"]


@needs_kvm
@pytest.mark.parametrize("protect", ["manual-protect", "get-clears"])
@pytest.mark.slow
def test_no_lost_write_under_kvms_dirty_log(tmp_path, guests, protect):
    """A hard-writing vCPU, a live save over many rounds (throttled until it converges):
    the file restores to exactly the RAM the vCPU left at the switchover. The link is
    capped so the first round lasts seconds: a vCPU starved by a loaded machine still
    dirties pages in it, and the save cannot converge before its third round."""
    extra = [] if protect == "manual-protect" else ["--x-no-manual-protect"]
    params = replace(MANY_ROUNDS, max_bandwidth=32 << 20)
    assert live_save_matches(tmp_path, guests, [*HARD_KVM, *extra], params,
                             SaveOptions(), min_rounds=3, ram="64M")


@needs_kvm
@pytest.mark.slow
def test_no_lost_write_bites_without_kvms_dirty_log(tmp_path, guests):
    assert not live_save_matches(tmp_path, guests, HARD_KVM, MigrationParameters(),
                                 SaveOptions(x=XHooks(ignore_dirty_log=True)), min_rounds=1,
                                 ram="64M")


@needs_kvm
@pytest.mark.slow
def test_auto_converge_throttles_a_kvm_guest(tmp_path, guests):
    """A vCPU dirtying faster than the link: the migration converges only as the throttle
    rises in QEMU's steps, seen in query-migrate's cpu-throttle-percentage."""
    src, _ = guests.start("64M", "--kvm", "--dirty-rate", "100M", "--pattern", "random")
    dst = f"{src}d"
    guests.adopt(dst)
    port = free_ports(1)
    inc = start_incoming(port, "--guest", dst)
    qmp = str(tmp_path / "src.qmp")
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            try:
                q = monitor_command(qmp, "query-migrate")["return"]
            except mfd.MfdError:
                continue
            seen.add(int(q.get("cpu-throttle-percentage", 0)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        res = mfd.migrate(f"tcp://127.0.0.1:{port}", guest=src, monitor=qmp,
                          params=MigrationParameters(multifd_channels=2,
                                                     max_bandwidth=24 << 20,
                                                     auto_converge=True),
                          options=mfd.MigrateOptions(timeout=120))
    finally:
        done.set()
        watcher.join()
    assert finish(inc)[0] == 0
    assert res.status == "completed"
    steps = sorted(s for s in seen if s)
    assert steps and steps[0] == 20 and all((s - 20) % 10 == 0 for s in steps), seen
    with control.GuestClient(dst) as d:
        assert d.query()["status"] == "running"
        assert d.query()["cpu-throttle-percentage"] == 0  # the destination runs unthrottled


def test_kvm_unavailable_is_one_line(tmp_path):
    """Where /dev/kvm is not KVM (here: /dev/null bound over it in a mount namespace of its
    own), --kvm is one line and exit 1, and so is mfd bench kvm; mfd demo falls back to the
    built-in guest."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a mount namespace here (not root?)")
    before = shm_entries()
    script = ("[ ! -e /dev/kvm ] || mount --bind /dev/null /dev/kvm;"
              f" {sys.executable} -m mfd guest --name nokvm --kvm --ram 64M; echo rc=$?;"
              f" {sys.executable} -m mfd demo --ram 16M --dirty-rate 10M --json;"
              f" {sys.executable} -m mfd bench kvm --quick --out {tmp_path / 'bench'};"
              " echo rc=$?")
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                       timeout=120)
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith("mfd: --kvm: no KVM here: /dev/kvm"), p.stderr
    out = p.stdout.splitlines()
    assert out[0] == "rc=1" and out[-1] == "rc=1", p.stdout  # guest --kvm, bench kvm
    assert orjson.loads(out[1])["ok"] is True  # the demo: the built-in guest
    assert lines[-1].startswith("mfd: bench kvm: no KVM here: /dev/kvm"), p.stderr
    assert shm_entries() == before


@needs_kvm
def test_a_sequential_kvm_guest_sweeps_its_pages_in_turn(guests):
    """``--kvm --pattern sequential`` runs SWEEP (the boot-sector guest's loop): after K
    exits from a fresh start each data page's u32 at offset 0 counts the sweeps that
    reached it, one more for the pages below where it stopped."""
    import numpy as np

    from mfd.shm.kvmguest import DATA, iterations_per_exit

    rate = 400 << 20
    _, g = guests.start("4M", "--kvm", "--dirty-rate", str(rate), "--pattern", "sequential",
                        "--stopped")
    st = run_exits(g, 20)
    done = 20 * iterations_per_exit(rate)
    assert st["counter"] == done
    ram = np.fromfile(g.query()["blocks"][0]["path"], dtype=np.uint32).reshape(-1, 1024)
    pages = ram[DATA // 4096 :, 0]
    sweeps, at = divmod(done, len(pages))
    assert sweeps >= 1 and (pages[:at] == sweeps + 1).all() and (pages[at:] == sweeps).all()
    assert not ram[DATA // 4096 :, 1:].any(), "nothing else in a page is written"


def test_kvm_refuses_zero_fraction_in_one_line():
    p = run_mfd("guest", "--name", "kvmzf", "--ram", "4M", "--kvm", "--zero-fraction", "0.5")
    assert p.returncode == 2 and p.stderr.strip() == "mfd guest: --kvm takes no --zero-fraction", \
        p.stderr
