"""XBZRLE live: the built-in guest and the KVM guest between mfd ends, and real QEMU 10 both
ways (QEMU's source is the TCG boot-sector guest, whose sweep changes 4 bytes per page);
QEMU's own XBZRLE bytes re-encoded by mfd byte for byte."""

from __future__ import annotations

import contextlib
import os
import time
import uuid as uuidlib
from pathlib import Path

import numpy as np
import orjson
import pytest
from helpers import (
    QMP_TIMEOUT,
    WAIT,
    K,
    Mfd,
    assert_same_ram,
    finish,
    guest_state,
    needs_kvm,
    needs_qemu,
    one_line,
    quit_guest,
    run_exits,
    run_mfd,
    running,
    start_incoming,
    start_migrate,
    until,
    wait_listening,
    zero_file,
)

from mfd.bench.bootsector import SWEEP_CHAR, default_range, write_boot_image
from mfd.bench.qemu import QemuMachine
from mfd.errors import MfdError
from mfd.protocol import livestream, xbzrle
from mfd.qmp import monitor_command
from mfd.shm import control
from mfd.shm.ramblock import shm_path
from mfd.workers.tcp import free_ports

PAGE = 4096
SIZE = 32 << 20
LINK = ("--max-bandwidth", "20M")  # the guest below dirties 2.5x that


def migrate_with_xbzrle_hits(tmp_path: Path, port: int, src: str, *args: str) -> dict:
    """``mfd migrate --no-multifd --xbzrle`` of guest ``src`` (more options in ``args``),
    held in its rounds by a downtime limit of 0 (no round can meet it) until query-migrate
    shows pages sent as XBZRLE deltas, then let converge (limit 2 s): a page goes as a delta
    only once it was sent in a round after the first and is dirty again, so a migration that
    converged early (a guest slowed by a loaded machine) would show none. Its --json line."""
    qmp = str(tmp_path / "src.qmp")
    mig = start_migrate(port, "--guest", src, "--no-multifd", "--xbzrle", "--downtime-limit",
                        "0", "--monitor", qmp, "--json", *args)

    def deltas_sent() -> bool:
        assert mig.poll() is None, mig.stderr.read()
        with contextlib.suppress(MfdError):  # the monitor may not be up yet
            x = monitor_command(qmp, "query-migrate", None, 5.0)["return"]["xbzrle-cache"]
            return x["pages"] > 0 and x["bytes"] > 0
        return False

    until(deltas_sent, "no page went as an XBZRLE delta", 60, 0.05)
    assert monitor_command(qmp, "migrate-set-parameters", {"downtime-limit": 2000},
                           5.0) == {"return": {}}
    rc, out, err = finish(mig, 90)
    assert rc == 0, err
    return orjson.loads(out)


@pytest.mark.slow
def test_the_builtin_guest_moves_with_xbzrle(guests, tmp_path):
    """50 MB/s of 8-byte stamps over a 20 MB/s link: with XBZRLE each page sent again
    costs a few bytes, RAM is verified equal and the guest writes on at the destination."""
    src, _ = guests.start("32M", "--dirty-rate", "50M")
    dst = f"{src}d"
    guests.adopt(dst)
    port = free_ports(1)
    inc = start_incoming(port, "--guest", dst, "--json")
    q = migrate_with_xbzrle_hits(tmp_path, port, src, *LINK)
    x = q["xbzrle-cache"]
    assert q["status"] == "completed" and q["digests"]
    assert x["cache-size"] == 64 << 20 and x["pages"] > 0 and x["bytes"] > 0, x
    assert x["bytes"] < x["pages"] * PAGE / 10, "deltas of a few bytes per page"
    assert q["ram"]["dirty-sync-count"] >= 2
    rc, out, err = finish(inc)
    assert rc == 0 and orjson.loads(out)["verified"], err
    assert running(dst)


def test_xbzrle_refusals():
    for args, says in (
            (["--xbzrle"], "Multifd is not compatible with xbzrle"),
            (["--no-multifd", "--xbzrle", "--xbzrle-cache-size", "3M"],
             "Parameter 'xbzrle_cache_size' expects a power of two no less than the target "
             "page size")):
        r = run_mfd("migrate", "tcp:127.0.0.1:9", "--image", "mem=/nonexistent", *args)
        assert r.returncode == 2 and says in one_line(r.stderr), r.stderr


def test_a_stream_with_a_bad_xbzrle_delta_is_one_line(tmp_path):
    """A classic stream whose XBZRLE record runs past its page: mfd restore says so in one
    line and leaves the target as it was."""
    from mfd.protocol import constants as C
    from mfd.protocol import devices, ram, stream

    body = (stream.encode_file_header() + stream.encode_configuration(
        stream.Configuration("none"))
        + stream.encode_section_start(C.QEMU_VM_SECTION_START, devices.RAM_SECTION_ID, "ram",
                                      0, 4)
        + ram.encode_mem_size(4 * PAGE) + ram.encode_block_entry("mem", 4 * PAGE)
        + ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID)
        + stream.encode_section_part(C.QEMU_VM_SECTION_PART, devices.RAM_SECTION_ID)
        + ram.encode_page(PAGE, bytes(PAGE), "mem")
        + xbzrle.encode_records(np.array([PAGE]), np.array([5]), np.array([0]),
                                np.frombuffer(bytes.fromhex("ff1f02aabb"), np.uint8), None)
        + ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID)
        + stream.encode_eof())
    path = tmp_path / "bad.mig"
    path.write_bytes(body)
    r = run_mfd("restore", str(path), "--image", f"mem={tmp_path / 'out.bin'}")
    assert r.returncode == 1 and "XBZRLE delta does not decode" in one_line(r.stderr), r.stderr


@needs_kvm
@pytest.mark.slow
def test_the_kvm_guest_moves_with_xbzrle(guests, tmp_path):
    """The KVM guest's 8-byte stores go as XBZRLE deltas; the destination is the same guest
    (RAM, counter, registers) and runs K exits exactly as a VM restored from the source's
    state at switchover."""
    src, _ = guests.start("64M", "--kvm", "--dirty-rate", "50M")
    dst, twin = f"{src}d", f"{src}t"
    guests.adopt(dst)
    guests.adopt(twin)
    port = free_ports(1)
    inc = start_incoming(port, "--guest", dst, "--stopped")
    q = migrate_with_xbzrle_hits(tmp_path, port, src, "--max-bandwidth", "32M", "--keep-source")
    assert finish(inc)[0] == 0 and q["ram"]["dirty-sync-count"] >= 2
    xbzrle_used(q)
    with control.GuestClient(src) as s, control.GuestClient(dst) as d:
        at_switchover = guest_state(s)
        assert guest_state(d) == at_switchover
    mig = tmp_path / "source.mig"
    assert run_mfd("save", str(mig), "--guest", src).returncode == 0
    assert run_mfd("restore", str(mig), "--guest", twin).returncode == 0
    with control.GuestClient(dst) as d, control.GuestClient(twin) as t:
        after_d, after_t = run_exits(d, K), run_exits(t, K)
    assert after_d["exits"] == at_switchover["exits"] + K and after_d == after_t


# ---------------------------------------------------------------------------- real QEMU


def sweeping_qemu(tmp_path: Path, **kwargs) -> tuple[QemuMachine, Path]:
    """``-machine pc`` TCG, the boot-sector guest sweeping its pages (4 bytes each), a few
    sweeps done; its RAM file."""
    ram = zero_file(tmp_path / "qemu-ram.bin", SIZE)
    boot = tmp_path / "boot.img"
    write_boot_image(boot, *default_range(SIZE))
    q = QemuMachine(str(ram), SIZE, machine="pc", accel="tcg", boot=str(boot), paused=False,
                    timeout=QMP_TIMEOUT, **kwargs)
    deadline = time.monotonic() + WAIT
    while q.serial_text().count(SWEEP_CHAR.decode()) < 3:
        assert time.monotonic() < deadline, f"guest not sweeping: {q.serial_text()!r}"
        time.sleep(0.01)
    # a link slower than the sweep: rounds, and pages sent again
    q.set_migration(xbzrle=True, max_bandwidth=32 << 20)
    return q, ram


def migrate_until_xbzrle(q: QemuMachine, uri: str) -> dict:
    """QEMU migrates until it has sent XBZRLE pages, then its guest is stopped: QEMU judges
    convergence by dirty pages x 4096, not by the few bytes XBZRLE sends of them, so a
    guest sweeping its RAM never converges on its own."""
    q.start_migrate(uri)
    deadline = time.monotonic() + WAIT
    while q.qmp("query-migrate").get("xbzrle-cache", {}).get("bytes", 0) == 0:
        assert time.monotonic() < deadline, q.qmp("query-migrate")
        time.sleep(0.05)
    q.qmp("stop")
    return q.wait_migration(WAIT)


def xbzrle_used(info: dict) -> dict:
    x = info["xbzrle-cache"]
    assert x["pages"] > 0 and x["bytes"] > 0, x
    return x


@needs_qemu
@pytest.mark.slow
def test_qemu_to_mfd_with_xbzrle(tmp_path):
    name = f"xb{uuidlib.uuid4().hex[:8]}"
    port = free_ports(1)
    try:
        q, ram = sweeping_qemu(tmp_path)
        with q, Mfd("incoming", "--listen", f"tcp:127.0.0.1:{port}", "--guest", name,
                    "--stopped", "--json", "--timeout", str(WAIT)) as inc:
            wait_listening(port, inc.alive)
            info = migrate_until_xbzrle(q, f"tcp:127.0.0.1:{port}")
            assert info["status"] == "completed"
            xbzrle_used(info)
            assert inc.completed()["source"] == "qemu"
            assert_same_ram(ram, shm_path(name, "mem"))
    finally:
        quit_guest(name)


@needs_qemu
@pytest.mark.slow
def test_qemus_xbzrle_bytes_are_mfds(tmp_path):
    """QEMU's stream to a file (``exec:``): every XBZRLE delta in it is what mfd's encoder
    makes of the page before and after it, byte for byte; and ``mfd restore`` of the file
    is QEMU's RAM."""
    stream_file = tmp_path / "xbzrle.mig"
    q, ram = sweeping_qemu(tmp_path)
    with q:
        info = migrate_until_xbzrle(q, f"exec:cat > {stream_file}")
        assert info["status"] == "completed"
        used = xbzrle_used(info)
    sizes: dict[str, int] = {}
    image: dict[str, np.ndarray] = {}
    checked = 0
    for ev in livestream.StreamDecoder("file", file=True).feed(stream_file.read_bytes()):
        if isinstance(ev, livestream.Blocks):
            sizes = dict(ev.blocks)
            image = {b: np.zeros((n // PAGE, PAGE), dtype=np.uint8) for b, n in sizes.items()}
        elif isinstance(ev, livestream.Pages):
            image[ev.idstr][ev.pages] = ev.data
        elif isinstance(ev, livestream.ZeroPages):
            image[ev.idstr][ev.pages] = 0
        elif isinstance(ev, livestream.XbzrlePages):
            old = image[ev.idstr][ev.pages].copy()
            xbzrle.decode_into(image[ev.idstr], ev.pages, ev.data, ev.starts, ev.lengths)
            lengths, data, starts = xbzrle.encode(old, image[ev.idstr][ev.pages])
            assert lengths.tolist() == ev.lengths.tolist()
            for i in range(len(lengths)):
                ours = data[starts[i] : starts[i] + lengths[i]]
                theirs = ev.data[ev.starts[i] : ev.starts[i] + ev.lengths[i]]
                assert ours.tobytes() == theirs.tobytes()
            checked += len(lengths)
    assert checked > 0 and checked <= used["pages"]
    assert image["mem"].tobytes() == ram.read_bytes()
    out = tmp_path / "restored"
    out.mkdir()
    images = [f"{b}={out / b.replace('/', '_')}" for b in sizes]
    args = [x for i in images for x in ("--image", i)]
    r = run_mfd("restore", str(stream_file), *args)
    assert r.returncode == 0, r.stderr
    assert_same_ram(ram, out / "mem")


@needs_qemu
@pytest.mark.slow
def test_mfd_to_qemu_with_xbzrle(guests, tmp_path):
    """The built-in guest (its block is ``mem``) to QEMU ``-machine none``: QEMU loads
    mfd's XBZRLE records; its RAM is the source's, paused at the switchover."""
    src, _ = guests.start("32M", "--dirty-rate", "50M")
    dst = zero_file(tmp_path / "qemu-ram.bin", SIZE)
    port = free_ports(1)
    with QemuMachine(str(dst), SIZE, incoming=True, timeout=QMP_TIMEOUT) as q:
        q.set_migration()
        q.start_migrate_incoming(f"tcp:127.0.0.1:{port}")
        xbzrle_used(migrate_with_xbzrle_hits(tmp_path, port, src, *LINK, "--keep-source"))
        assert q.wait_migration(WAIT)["status"] == "completed"
    with control.GuestClient(src) as s:
        assert s.query()["status"] == "paused"
        path = s.query()["blocks"][0]["path"]
    assert os.path.exists(path)
    assert_same_ram(path, dst)
