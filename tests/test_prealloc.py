"""``mfd incoming --prealloc NAME=SIZE``: the destination's RAM allocated and zeroed before it
listens, as QEMU's ``prealloc=on``, and taken for the source's block NAME when its list comes.

A migration into that RAM arrives whole (from mfd and from a real QEMU, precopy and
postcopy); a source whose block has another size, or
that lists no such block, fails the migration in one line and leaves nothing in /dev/shm; bad
option values are refused before anything is allocated. The RAM is unnamed until the commit.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from helpers import (
    IMAGE_SIZE,
    POSTCOPY_LINK,
    QMP_TIMEOUT,
    WAIT,
    Mfd,
    assert_same_ram,
    finish,
    needs_qemu,
    one_line,
    postcopy_pair,
    run_mfd,
    running,
    shm_entries,
    source_copy,
    start_incoming,
    start_migrate,
    wait_listening,
)

import mfd
from mfd.bench.qemu import QemuMachine
from mfd.options import MigrationParameters
from mfd.ramimage import generate
from mfd.shm import control
from mfd.workers.tcp import free_ports

MiB = 1 << 20


def unnamed_ram(pid: int) -> list[os.stat_result]:
    """The O_TMPFILE files ``pid`` holds: RAM with no name yet."""
    fds = Path(f"/proc/{pid}/fd")
    found = []
    for fd in fds.iterdir():
        target = os.readlink(fd)
        if "/#" in target and target.endswith(" (deleted)"):
            found.append(os.stat(fd))
    return found


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_the_ram_is_allocated_before_listening_and_a_migration_fills_it(tmp_path,
                                                                        compression):
    """Every page of the preallocated block is allocated (no hole) while mfd listens, it has
    no name, and an mfd source's image arrives in it byte for byte (through the channels'
    mappings: raw pages from the socket, zstd decoded straight into RAM)."""
    img, out = tmp_path / "src.bin", tmp_path / "dst.bin"
    generate(str(img), 8 * MiB, seed=7)
    port = free_ports(1)
    inc = start_incoming(port, "--image", f"mem={out}", "--prealloc", "mem=8M", "--json")
    ram = unnamed_ram(inc.pid)
    assert [(s.st_size, s.st_blocks * 512) for s in ram] == [(8 * MiB, 8 * MiB)]
    assert not out.exists()
    res = mfd.migrate(f"tcp:127.0.0.1:{port}", images={"mem": str(img)},
                      params=MigrationParameters(multifd_channels=2,
                                                 multifd_compression=compression))
    rc, stdout, err = finish(inc)
    assert rc == 0, err
    assert res.status == "completed" and orjson.loads(stdout)["verified"]
    assert out.read_bytes() == img.read_bytes()


def test_a_guest_moves_into_preallocated_ram(guests):
    src, _ = guests.start("32M", "--dirty-rate", "10M")
    dst = f"{src}d"
    guests.adopt(dst)
    port = free_ports(1)
    inc = start_incoming(port, "--guest", dst, "--prealloc", "mem=32M", "--json")
    res = mfd.migrate(f"tcp:127.0.0.1:{port}", guest=src,
                      params=MigrationParameters(multifd_channels=2))
    rc, out, err = finish(inc)
    assert rc == 0, err
    assert res.status == "completed"
    assert orjson.loads(out)["digests"] == res.digests
    assert running(dst)


def test_postcopy_into_preallocated_ram(guests):
    """A page already in RAM never faults; the source's DISCARD makes a hole of every page
    it has not sent (or must send again), so the guest still asks for what it lacks."""
    src, dst, port, inc = postcopy_pair(guests, "--json", "--prealloc", "mem=64M")
    mig = start_migrate(port, "--guest", src, "--no-multifd", "--postcopy-ram",
                        "--postcopy-after", "1", *POSTCOPY_LINK, "--json")
    rc, out, err = finish(mig)
    assert rc == 0, err
    assert orjson.loads(out)["ram"]["postcopy-requests"] > 0
    rc, out, err = finish(inc)
    assert rc == 0, err
    assert orjson.loads(out)["verified"]
    assert running(dst)


@pytest.mark.qemu
@needs_qemu
@pytest.mark.parametrize(("channels", "compression"), [(0, "none"), (2, "none"), (2, "zstd")],
                         ids=["nomultifd", "2ch", "2ch-zstd"])
def test_qemu_to_preallocated_ram(tmp_path, image, channels, compression):
    """QEMU's packets (zero pages swapped out of order) into the mappings, zstd's through
    the channel's buffer."""
    src, out = source_copy(image, tmp_path), tmp_path / "out.bin"
    port = free_ports(1)
    multifd = ["--multifd-channels", str(channels), "--multifd-compression", compression] \
        if channels else []
    with Mfd("incoming", "--listen", f"tcp:127.0.0.1:{port}", "--image", f"mem={out}",
             "--prealloc", f"mem={IMAGE_SIZE}", "--timeout", str(WAIT), "--json",
             *multifd) as inc, \
            QemuMachine(str(src), IMAGE_SIZE, timeout=QMP_TIMEOUT) as q:
        wait_listening(port, inc.alive)
        q.set_migration(multifd_channels=channels, multifd_compression=compression)
        q.start_migrate(f"tcp:127.0.0.1:{port}")
        assert q.wait_migration(WAIT)["status"] == "completed"
        res = inc.completed()
    assert res["source"] == "qemu" and res["blocks"] == {"mem": str(out)}
    assert_same_ram(image, out)


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("prealloc", "expect"), [
    (["mem=32M"], "Length mismatch: mem: 0x1000000 in != 0x2000000 (the RAM allocated ahead, "
                  "--prealloc mem=32.0 MiB)"),
    (["mem=16M", "rom=16M"], "RAM block 'rom' was allocated ahead (--prealloc) but the "
                             "source has no such block (its blocks: mem)"),
], ids=["size", "unknown"])
def test_a_source_that_does_not_fit_fails_in_one_line(guests, prealloc, expect):
    """Nothing of the destination (its RAM, its guest) is left in /dev/shm, and the
    source's guest is still there."""
    src, _ = guests.start("16M")
    dst = f"{src}d"
    guests.adopt(dst)
    before = shm_entries()
    port = free_ports(1)
    inc = start_incoming(port, "--guest", dst,
                         *(a for p in prealloc for a in ("--prealloc", p)))
    mig = start_migrate(port, "--guest", src)
    rc, _, err = finish(inc)
    assert rc == 1
    assert one_line(err) == f"mfd: incoming migration failed: {expect}"
    rc, _, err = finish(mig)
    assert rc == 1, err
    assert control.is_alive(src) and not control.is_alive(dst)
    assert shm_entries() == before


@pytest.mark.parametrize(("args", "expect"), [
    (["--prealloc", "mem"], "argument --prealloc: expected NAME=VALUE, got 'mem'"),
    (["--prealloc", "mem=lots"], "argument --prealloc: not a size: 'lots'"),
    (["--prealloc", "mem=0"], "--prealloc mem=0: the size is not a positive multiple of 4096"),
    (["--prealloc", "mem=1000"], "--prealloc mem=1000: the size is not a positive multiple "
                                 "of 4096"),
    (["--prealloc", "mem=1M", "--prealloc", "mem=2M"], "--prealloc mem: given twice"),
    (["--prealloc", "rom=1M", "--image", "mem=/tmp/never.bin"],
     "--prealloc rom: no --image rom=PATH to put it in"),
], ids=["no-size", "not-a-size", "zero", "unaligned", "twice", "no-image"])
def test_bad_values_are_refused_in_one_line(args, expect):
    r = run_mfd("incoming", "--listen", "tcp:127.0.0.1:1", *args)
    assert r.returncode == 2
    assert expect in one_line(r.stderr), r.stderr


def test_more_than_the_directory_holds_is_refused(tmp_path):
    """The whole size is checked against the directory's room before a byte is written."""
    free = os.statvfs("/dev/shm")
    too_much = (free.f_bavail * free.f_frsize // MiB + 1024) * MiB
    r = run_mfd("incoming", "--listen", f"tcp:127.0.0.1:{free_ports(1)}", "--prealloc",
                f"mem={too_much}")
    assert r.returncode == 1
    assert "/dev/shm has" in one_line(r.stderr) and "the RAM needs" in r.stderr
