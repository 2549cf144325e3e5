"""RAM verification at switchover (``mfd.shm.pagehash``) bites: a destination that damages a
page as it places it (one byte flipped, the page placed at its neighbour's offset, a packet's
pages thrown away) fails the migration with one line naming the block and the offset, the
source's guest keeps running, and nothing is left in /dev/shm.

The damage is done by the receive channels (test-only ``--x-fault KIND@OFFSET``) each time
they place the page, so a guest that writes the page again cannot repair it in a later
round; which pages it damaged the test knows from the hook itself (``XHooks.damaged``).
Each test was once run with the comparison switched off (``_compare`` returning at once):
every one of them failed, the migration reporting success.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import (
    finish,
    needs_kvm,
    one_line,
    running,
    shm_entries,
    start_incoming,
)

import mfd
from mfd.errors import MfdError
from mfd.options import MigrationParameters
from mfd.shm import control
from mfd.shm.kvmguest import DATA
from mfd.workers.tcp import free_ports
from mfd.xhooks import XHooks

RAM = 32 << 20
PAGE = 4096
FAULT_AT = DATA + 100 * PAGE  # in the KVM guest's data area too
_DIFFERS = re.compile(r"RAM differs from the source's at switchover: block 'mem', "
                      r"(\d+) page\(s\), first at offset (0x[0-9a-f]+)")


def _guest_with_data(guests, *args: str) -> str:
    """A guest whose RAM holds data (random bytes; a KVM guest's past its program), then
    runs and writes at 20 MiB/s."""
    src, g = guests.start(str(RAM), "--stopped", "--dirty-rate", "20M", *args)
    start = DATA if "--kvm" in args else 0
    with g:
        (block,) = g.query()["blocks"]
        with open(block["path"], "r+b") as f:
            f.seek(start)
            f.write(np.random.default_rng(7).bytes(RAM - start))
        g.cont()
    return src


def _ram(name: str) -> bytes:
    with control.GuestClient(name) as g, open(g.query()["blocks"][0]["path"], "rb") as f:
        return f.read()


def _faulty_migration(guests, fault: str, *guest_args: str) -> None:
    src = _guest_with_data(guests, *guest_args)
    dst = f"{src}d"
    guests.adopt(dst)
    before = shm_entries()
    port = free_ports(1)
    inc = start_incoming(port, "--guest", dst, "--x-fault", f"{fault}@{FAULT_AT:#x}")
    with pytest.raises(MfdError) as failed:
        mfd.migrate(f"tcp:127.0.0.1:{port}", guest=src,
                    params=MigrationParameters(multifd_channels=4))
    rc, out, err = finish(inc)
    assert rc == 1 and "completed" not in out, err
    line = one_line(err)
    said = _DIFFERS.search(line)
    assert said and line.startswith("mfd: incoming migration failed"), line
    assert _DIFFERS.search(str(failed.value)).groups() == said.groups(), failed.value
    # the offset named is one the channels damaged: for a flipped byte or a misplaced page,
    # the page itself; for a dropped packet, one of its pages (not sent again), with data
    first = int(said.group(2), 16)
    assert first // PAGE in XHooks(fault=(fault, FAULT_AT // PAGE)).damaged(RAM // PAGE), first
    if fault != "drop":
        assert first == FAULT_AT
    else:
        assert any(_ram(src)[first : first + PAGE]), "a page the source holds non-zero"
    if "--kvm" in guest_args:
        with control.GuestClient(src) as g:
            assert g.query()["status"] == "running"
    else:
        assert running(src), "the source's guest must keep running"
    assert not control.is_alive(dst)
    assert shm_entries() <= before, "the destination left RAM in /dev/shm"


@pytest.mark.parametrize("fault", ["corrupt", pytest.param("misplace", marks=pytest.mark.slow),
                                   pytest.param("drop", marks=pytest.mark.slow)])
def test_a_damaged_page_fails_the_migration(guests, fault):
    _faulty_migration(guests, fault)


@needs_kvm
@pytest.mark.slow
def test_a_corrupted_page_of_a_kvm_guest_fails_the_migration(guests):
    _faulty_migration(guests, "corrupt", "--kvm")


@pytest.mark.slow
def test_with_no_verify_the_same_damage_goes_through(guests):
    """The check is what bites: with mfd migrate --no-verify neither end hashes, and the
    page the destination corrupts is not noticed (why verification is on by default)."""
    src = _guest_with_data(guests)
    dst = f"{src}d"
    guests.adopt(dst)
    port = free_ports(1)
    inc = start_incoming(port, "--guest", dst, "--stopped",
                         "--x-fault", f"corrupt@{FAULT_AT:#x}")
    res = mfd.migrate(f"tcp:127.0.0.1:{port}", guest=src,
                      params=MigrationParameters(multifd_channels=2),
                      options=mfd.MigrateOptions(verify=False, keep_source=True))
    rc, out, err = finish(inc)
    assert rc == 0 and res.status == "completed", err
    # it did damage the page: both guests stopped at switchover, their RAM differs there only
    ours, theirs = (np.frombuffer(_ram(name), dtype=np.uint8) for name in (dst, src))
    differ = np.flatnonzero(ours != theirs)
    assert differ.tolist() == [FAULT_AT + 100], differ[:8]
    assert "RAM not verified (the source said --no-verify)" in out
    assert res.digests == {} and res.query_migrate["x-verify-time"] == 0


@pytest.mark.parametrize("multifd", [True, False])
def test_no_verify_moves_ram_exactly(tmp_path, multifd):
    img, out = tmp_path / "src.bin", tmp_path / "dst.bin"
    img.write_bytes(np.random.default_rng(3).bytes(4 << 20) + bytes(4 << 20))
    port = free_ports(1)
    inc = start_incoming(port, "--image", f"mem={out}")
    res = mfd.migrate(f"tcp:127.0.0.1:{port}", images={"mem": str(img)},
                      params=MigrationParameters(multifd_channels=2),
                      options=mfd.MigrateOptions(multifd=multifd, verify=False))
    rc, said, err = finish(inc)
    assert rc == 0 and res.status == "completed", err
    assert "not verified" in said and out.read_bytes() == img.read_bytes()


def test_page_hashes_follow_the_pages_in_any_order():
    """``hash_pages`` slices RAM for one run in order and reads each page otherwise: pages
    out of order whose span happens to equal their count ([0, 3, 2, 1]) are not a run."""
    from mfd.shm.pagehash import hash_pages, hash_rows

    words = np.random.default_rng(1).integers(0, 2**63, (8, 512), dtype=np.uint64)
    for pages in ([0, 1, 2, 3], [0, 3, 2, 1], [5, 2], [7]):
        p = np.array(pages)
        assert (hash_pages(words, p) == hash_rows(words[p])).all(), pages
