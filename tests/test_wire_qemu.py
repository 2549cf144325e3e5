"""mfd and a real QEMU 10 on one TCP port, both directions (``shared/qemu-wire.md``).

QEMU -> mfd: ``-machine none`` paused, its RAM file a generated image, to ``mfd incoming``
writing an image; mfd -> QEMU: ``mfd migrate`` of an image to ``-incoming defer`` +
``migrate-incoming``. Multifd off / 1 / 2 / 4 channels, compression none / zlib / zstd,
zero-page-detection multifd / legacy / none, per-round sync and
multifd-flush-after-each-section, return-path on / off, each value in each direction and
a few combinations (not the cartesian product). Every success ends with QEMU's
``query-migrate`` ``completed``, mfd's result ``completed`` and the RAM equal byte for byte.

Then a running ``-machine pc`` guest (``mfd.bench.bootsector``) migrated live to
``mfd incoming --guest``, and mismatched settings, which must fail on mfd's side within
seconds with one line naming what differs.

mfd runs as its CLI (``python3 -m mfd incoming|migrate ... --json``), as a user runs it:
a process the test can always stop (SIGTERM, then SIGKILL), whatever mfd does. Every wait
is bounded; QEMU is closed (quit, then SIGTERM / SIGKILL) by its context manager.
"""

from __future__ import annotations

import os
import re
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    IMAGE_SIZE,
    QMP_TIMEOUT,
    WAIT,
    Mfd,
    assert_same_ram,
    needs_qemu,
    pages_of,
    quit_guest,
    source_copy,
    wait_listening,
    zero_file,
)

from mfd.bench.bootsector import SWEEP_CHAR, default_range, write_boot_image
from mfd.bench.qemu import QemuError, QemuMachine
from mfd.ramimage import generate
from mfd.shm import control
from mfd.shm.ramblock import shm_path
from mfd.workers.tcp import free_ports

pytestmark = [pytest.mark.qemu, needs_qemu]

PAGE = 4096
SIZE = IMAGE_SIZE  # conftest's image: 16 MiB
FAIL_WITHIN = 10.0  # a mismatch is noticed by mfd within this (from QEMU's migrate)
STOP_WITHIN = 8.0  # past --timeout: a channel stuck in a write is killed after 5 s
EACH = "migration.multifd-flush-after-each-section=on"
QEMU_UUID = "12345678-1234-5678-9abc-def012345678"
PC_BLOCKS = {"mem", "/rom@etc/acpi/tables", "pc.bios", "pc.rom", "/rom@etc/table-loader",
             "/rom@etc/acpi/rsdp"}


# ---------------------------------------------------------------------------- helpers


def qemu_status(q: QemuMachine) -> str:
    """query-migrate's status, or why there is none (QEMU may have exited or hang)."""
    try:
        return str(q.qmp("query-migrate").get("status"))
    except QemuError as e:
        return f"no answer: {str(e).splitlines()[0]}"


def strays(directory: Path, keep: set[str]) -> list[str]:
    return sorted(set(os.listdir(directory)) - keep)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 MiB, 90 % zero pages: about 1.6 MiB of data."""
    p = tmp_path_factory.mktemp("img") / "sparse16.bin"
    generate(str(p), SIZE, seed=5, zero=0.9, random=0.05)
    return p


@pytest.fixture(scope="module")
def image32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 MiB, about 16 MiB of it nonzero: more than a loopback socket buffers per channel
    (about 4 MiB here) when spread over 2 uncompressed channels."""
    p = tmp_path_factory.mktemp("img") / "ram32.bin"
    generate(str(p), 2 * SIZE, seed=3)
    return p


# A case: QEMU's multifd channels (0: multifd off), compression, zero-page-detection,
# multifd-flush-after-each-section, return-path.
Case = tuple[int, str, str, bool, bool]


def case_id(c: Case) -> str:
    ch, comp, zpd, each, rp = c
    return "-".join([f"{ch}ch" if ch else "nomultifd", comp, f"zpd_{zpd}",
                     "each" if each else "round", "rp" if rp else "norp"])


# The fast tier's cases, each way (no multifd, and 2 channels); the full suite runs them all.
FAST_CASES = {(0, "none", "multifd", False, False), (2, "none", "multifd", False, True)}


def tiered(cases: list[Case]) -> list:
    return [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow) for c in cases]


# ============================================================================ 1. QEMU -> mfd

# Every value of every axis at least once. With multifd-flush-after-each-section the
# source is the sparse image (1.6 MiB of data); the same mode with more data than the
# channels' socket buffers hold is test_qemu_to_mfd_flush_each_section_with_data.
QEMU_TO_MFD: list[Case] = [
    (0, "none", "multifd", False, False),
    (0, "none", "legacy", False, True),
    (0, "none", "none", False, False),
    (1, "zlib", "legacy", False, True),
    (2, "none", "multifd", False, True),
    (2, "zstd", "none", False, False),
    (4, "none", "legacy", False, False),
    (2, "none", "multifd", True, False),
    (4, "zlib", "none", True, True),
    (1, "zstd", "legacy", True, True),
]


def incoming_args(port: int, case: Case, *extra: str) -> list[str]:
    """mfd incoming's options for a QEMU source: what QEMU does not say on the wire."""
    ch, comp, _, each, _ = case
    args = ["incoming", "--listen", f"tcp:127.0.0.1:{port}", "--json", *extra]
    if ch:
        args += ["--multifd-channels", str(ch), "--multifd-compression", comp]
        if each:
            args.append("--multifd-flush-after-each-section")
    return args


def qemu_to_mfd(src: Path, out: Path, case: Case) -> tuple[dict, dict]:
    """Migrate QEMU's RAM file ``src`` to mfd incoming writing ``out``: QEMU's final
    query-migrate and mfd's --json result."""
    ch, comp, zpd, each, rp = case
    port = free_ports(1)
    with Mfd(*incoming_args(port, case, "--image", f"mem={out}", "--timeout", str(WAIT))
             ) as inc, \
            QemuMachine(str(src), SIZE, timeout=QMP_TIMEOUT,
                        globals=[EACH] if each else []) as q:
        wait_listening(port, inc.alive)
        q.set_migration(multifd_channels=ch, multifd_compression=comp,
                        zero_page_detection=zpd, return_path=rp)
        q.start_migrate(f"tcp:127.0.0.1:{port}")
        try:
            info = q.wait_migration(WAIT)
        except QemuError as e:  # mfd's stderr says more
            inc.close()
            raise AssertionError(f"{e}\nmfd incoming: exit {inc.rc}: {inc.err}") from None
        assert q.query_status() == "postmigrate"
        res = inc.completed()
    return info, res


@pytest.mark.parametrize("case", tiered(QEMU_TO_MFD), ids=case_id)
def test_qemu_to_mfd(tmp_path: Path, image: Path, sparse: Path, case: Case) -> None:
    image = sparse if case[3] else image
    src, out = source_copy(image, tmp_path), tmp_path / "out.bin"
    info, res = qemu_to_mfd(src, out, case)
    assert info["status"] == "completed"
    assert (info["ram"]["multifd-bytes"] > 0) == (case[0] > 0)
    assert res["status"] == "completed" and res["source"] == "qemu"
    assert not res["verified"]  # QEMU sends no digests: the comparison below is the check
    assert res["blocks"] == {"mem": str(out)}
    assert_same_ram(image, out)
    assert strays(tmp_path, {"src.bin", "out.bin"}) == []


@pytest.mark.parametrize("mfd_each", [True, False], ids=["same-mode", "mfd-per-round"])
@pytest.mark.slow
def test_qemu_to_mfd_flush_each_section_with_data(tmp_path: Path, image32: Path,
                                                  mfd_each: bool) -> None:
    """Uncompressed, 2 channels, 32 MiB: QEMU flushes the START section's footer only
    after its channels moved on, so mfd syncs at the EOS record itself (as QEMU's loader
    does; waiting for the footer deadlocked). The same mode completes; a destination in
    per-round mode says so within seconds."""
    src, out = source_copy(image32, tmp_path), tmp_path / "out.bin"
    port = free_ports(1)
    case = (2, "none", "multifd", mfd_each, False)
    with Mfd(*incoming_args(port, case, "--image", f"mem={out}", "--timeout", "4")) as inc, \
            QemuMachine(str(src), 2 * SIZE, timeout=QMP_TIMEOUT, globals=[EACH]) as q:
        wait_listening(port, inc.alive)
        q.set_migration(multifd_channels=2)
        t0 = time.monotonic()
        q.start_migrate(f"tcp:127.0.0.1:{port}")
        if mfd_each:
            inc.completed()
            assert q.wait_migration(WAIT)["status"] == "completed"
            assert_same_ram(src, out)
        else:
            line = inc.failed(WAIT)
            assert "syncs after each section" in line, line
            assert inc.ended_at - t0 < FAIL_WITHIN


# ============================================================================ 2. mfd -> QEMU

# The same axes from mfd's side: mfd's zero-page-detection; multifd off is --no-multifd
# (MigrateOptions(multifd=False)) with QEMU multifd_channels=0; return-path is the QEMU
# destination's capability (it answers mfd's OPEN_RETURN_PATH whatever it says). With
# multifd, every (flush mode, zero-page mode) pair: the inputs QEMU 10 crashes on or
# loses pages with (qemu-wire.md 5) are never sent, in any mode.
MFD_TO_QEMU: list[Case] = [
    (0, "none", "multifd", False, False),
    (0, "none", "legacy", False, True),
    (0, "none", "none", False, False),
    (2, "none", "multifd", False, True),
    (4, "zstd", "multifd", False, False),
    (1, "zlib", "legacy", False, True),
    (2, "zlib", "none", False, False),
    (1, "none", "multifd", True, True),
    (4, "none", "legacy", True, True),
    (2, "zstd", "none", True, False),
]


def migrate_args(port: int, src: Path, case: Case, *extra: str) -> list[str]:
    ch, comp, zpd, each, _ = case
    args = ["migrate", f"tcp:127.0.0.1:{port}", "--image", f"mem={src}", "--json",
            "--multifd-compression", comp, "--zero-page-detection", zpd, *extra]
    args += ["--multifd-channels", str(ch)] if ch else ["--no-multifd"]
    if each:
        args.append("--multifd-flush-after-each-section")
    return args


@pytest.mark.parametrize("case", tiered(MFD_TO_QEMU), ids=case_id)
def test_mfd_to_qemu(tmp_path: Path, image: Path, case: Case) -> None:
    ch, comp, _, each, rp = case
    out = zero_file(tmp_path / "out.bin", SIZE)
    port = free_ports(1)
    with QemuMachine(str(out), SIZE, incoming=True, timeout=QMP_TIMEOUT,
                     globals=[EACH] if each else []) as q:
        q.set_migration(multifd_channels=ch, multifd_compression=comp, return_path=rp)
        q.start_migrate_incoming(f"tcp:127.0.0.1:{port}")
        with Mfd(*migrate_args(port, image, case, "--timeout", str(WAIT))) as mig:
            res = mig.completed()  # exit 0 only after the destination's SHUT(0)
        info = q.wait_migration(WAIT)
        assert info["status"] == "completed"
        assert q.query_status() == "paused"  # -S, and mfd's images say "paused"
        assert q.stderr_tail() == ""  # not even "Expected vmdescription section"
    assert res["status"] == "completed"
    assert res["digests"] == {}  # QEMU has none: the comparison below is the check
    assert res["ram"]["normal"] > 0
    assert "the destination is QEMU" in mig.err  # its warning that RAM is not verified
    assert_same_ram(image, out)


def qemu_destination_fails(tmp_path: Path, image: Path, *, dst_size: int = SIZE,
                           exit_on_error: bool, qemu: dict | None = None,
                           mfd_args: tuple[str, ...] = (), mfd_timeout: float = WAIT,
                           qemu_compression: str = "none") -> tuple[Mfd, float, str, str]:
    """mfd migrate (2 channels) to a QEMU destination that fails: mfd (ended, or stopped
    after its --timeout + STOP_WITHIN), how long it ran, QEMU's final status and its
    stderr."""
    out = zero_file(tmp_path / "out.bin", dst_size)
    port = free_ports(1)
    with QemuMachine(str(out), dst_size, incoming=True, timeout=QMP_TIMEOUT,
                     **(qemu or {})) as q:
        q.set_migration(multifd_channels=2, multifd_compression=qemu_compression)
        q.qmp("migrate-incoming", uri=f"tcp:127.0.0.1:{port}",
              **{"exit-on-error": exit_on_error})
        t0 = time.monotonic()
        with Mfd(*migrate_args(port, image, (2, "none", "multifd", False, False),
                               "--timeout", str(mfd_timeout), *mfd_args)) as mig:
            mig.wait(mfd_timeout + STOP_WITHIN)
            elapsed = (mig.ended_at or time.monotonic()) - t0
        status = qemu_status(q)
        stderr = q.stderr_tail()
    return mig, elapsed, status, stderr


@pytest.mark.parametrize("exit_on_error", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["keep", "exit-on-error"])
def test_mfd_to_qemu_of_another_ram_size(tmp_path: Path, image: Path,
                                         exit_on_error: bool) -> None:
    """QEMU refuses the block size: SHUT(1) on the return path, then (exit-on-error) exits."""
    mig, elapsed, status, stderr = qemu_destination_fails(
        tmp_path, image, dst_size=2 * SIZE, exit_on_error=exit_on_error)
    line = mig.failed(0)
    # QEMU says SHUT(1), then closes everything; a channel that meets the closed socket
    # first wins the race for the message, as mfd keeps only an mfd destination's reason
    # (MainChannel.reason ignores SHUT): both seen
    assert re.fullmatch(r"mfd: migration failed: (the destination failed to load the "
                        r"migration \(SHUT 1\)|(main channel|channel \d+ failed): "
                        r"connection lost \(.*\))", line), line
    assert elapsed < FAIL_WITHIN
    assert "Size mismatch: mem: 0x1000000 != 0x2000000" in stderr
    if exit_on_error:
        assert status.startswith("no answer: QEMU exited with status 1"), status
    else:
        assert status == "failed"


@pytest.mark.slow
def test_mfd_to_qemu_of_another_machine_type(tmp_path: Path, image: Path) -> None:
    """The configuration section is refused before the return path opens: QEMU just
    closes the main channel."""
    mig, elapsed, status, stderr = qemu_destination_fails(
        tmp_path, image, exit_on_error=False, mfd_args=("--machine", "pc"))
    line = mig.failed(0)
    assert re.fullmatch(r"mfd: migration failed: (main channel|channel \d+ failed): "
                        r"connection lost.*", line), line
    assert elapsed < FAIL_WITHIN
    assert status == "failed"
    assert "Machine type received is 'pc' and local is 'none'" in stderr


@pytest.mark.slow
def test_mfd_to_qemu_with_another_uuid_exit_on_error(tmp_path: Path, image: Path) -> None:
    """QEMU's default exit-on-error: it refuses the channel's uuid and exits; mfd sees its
    connections go."""
    mig, elapsed, status, stderr = qemu_destination_fails(
        tmp_path, image, exit_on_error=True, qemu={"uuid": QEMU_UUID})
    line = mig.failed(0)
    assert re.fullmatch(r"mfd: migration failed: (main channel|channel \d+ failed): "
                        r"connection lost.*", line), line
    assert elapsed < FAIL_WITHIN
    assert f"and expected uuid '{QEMU_UUID}'" in stderr
    assert status.startswith("no answer: QEMU exited with status 1"), status


@pytest.mark.parametrize("what", ["uuid", "compression"])
@pytest.mark.slow
def test_mfd_to_qemu_that_fails_and_stays(tmp_path: Path, image: Path, what: str) -> None:
    """exit-on-error false: QEMU refuses a channel (uuid; compression flags, where QEMU's
    status may even stay "active") and keeps the main channel open. mfd cannot learn why,
    but it gives up at its own --timeout, with one line. A send channel blocked on a QEMU
    channel that stopped reading does not see STOP: mfd's pool kills it after its
    JOIN_TIMEOUT (5 s), so the end may come that much later (seen with compression)."""
    kwargs: dict[str, Any] = ({"qemu": {"uuid": QEMU_UUID}} if what == "uuid"
                              else {"qemu_compression": "zstd"})
    mig, elapsed, status, stderr = qemu_destination_fails(
        tmp_path, image, exit_on_error=False, mfd_timeout=2, **kwargs)
    assert mig.rc is not None, f"mfd migrate --timeout 2 still running after {elapsed:.1f} s"
    line = mig.failed(0)
    assert line.startswith("mfd: migration "), line
    assert elapsed < 2 + STOP_WITHIN
    if what == "uuid":
        assert f"and expected uuid '{QEMU_UUID}'" in stderr
        assert status == "failed"


# ============================================================================ 3. live source


@pytest.mark.parametrize("channels", [2, 0], ids=["multifd2", "nomultifd"])
@pytest.mark.slow
def test_running_qemu_guest_to_mfd_guest(tmp_path: Path, channels: int) -> None:
    """-machine pc, TCG, the boot-sector guest sweeping [1 MiB, 31 MiB) while it migrates to
    ``mfd incoming --guest NAME --stopped``. QEMU stops the guest before the last round, so
    its RAM file afterwards (postmigrate) is what mfd must have, page for page."""
    size = 2 * SIZE
    ram = zero_file(tmp_path / "qemu-ram.bin", size)
    boot = tmp_path / "boot.img"
    start, end = default_range(size)
    write_boot_image(boot, start, end)
    name = f"wire{uuidlib.uuid4().hex[:8]}"
    port = free_ports(1)
    case = (channels, "none", "multifd", False, False)
    try:
        with Mfd(*incoming_args(port, case, "--guest", name, "--stopped",
                                "--timeout", str(WAIT))) as inc, \
                QemuMachine(str(ram), size, machine="pc", accel="tcg", boot=str(boot),
                            paused=False, timeout=QMP_TIMEOUT) as q:
            deadline = time.monotonic() + WAIT
            while q.serial_text().count(SWEEP_CHAR.decode()) < 3:
                assert time.monotonic() < deadline, f"guest not sweeping: {q.serial_text()!r}"
                time.sleep(0.01)
            wait_listening(port, inc.alive)
            q.set_migration(multifd_channels=channels)
            before = q.serial_text().count(SWEEP_CHAR.decode())
            q.start_migrate(f"tcp:127.0.0.1:{port}")
            info = q.wait_migration(WAIT)
            assert q.query_status() == "postmigrate"
            swept = q.serial_text().count(SWEEP_CHAR.decode()) - before
            res = inc.completed()
            assert res["status"] == "completed" and res["source"] == "qemu"
            assert set(res["blocks"]) == PC_BLOCKS
            for idstr, path in res["blocks"].items():
                assert path == shm_path(name, idstr) and os.path.exists(path), idstr

            assert info["status"] == "completed"
            ram_info = info["ram"]
            # live: the guest rewrote its pages while they went, many went more than once
            assert ram_info["transferred"] > size, ram_info
            assert (ram_info["multifd-bytes"] > 0) == bool(channels)
            assert swept >= 1  # the guest ran during the migration

            # both stopped now: mfd's `mem` is QEMU's, every page (including the one the
            # loop was on: QEMU stopped the vCPU before its last round)
            assert_same_ram(ram, shm_path(name, "mem"))
            counters = pages_of(ram)[start // PAGE:end // PAGE, :4].copy().view("<u4")[:, 0]
            assert (counters > 0).all()
            with control.GuestClient(name, timeout=5) as g:
                assert g.query()["status"] == "paused"  # --stopped
    finally:
        quit_guest(name)


@pytest.mark.slow
def test_qemu_to_mfd_guest_names_the_guest(tmp_path: Path, image: Path) -> None:
    src = source_copy(image, tmp_path)
    name = f"wire{uuidlib.uuid4().hex[:8]}"
    port = free_ports(1)
    try:
        with Mfd(*incoming_args(port, (2, "none", "multifd", False, False), "--guest", name,
                                "--timeout", str(WAIT))) as inc, \
                QemuMachine(str(src), SIZE, timeout=QMP_TIMEOUT) as q:
            wait_listening(port, inc.alive)
            q.set_migration(multifd_channels=2)
            q.start_migrate(f"tcp:127.0.0.1:{port}")
            assert q.wait_migration(WAIT)["status"] == "completed"
            res = inc.completed()
        assert res["blocks"] == {"mem": shm_path(name, "mem")}
        assert_same_ram(image, shm_path(name, "mem"))
        assert res["guest"] == name
    finally:
        quit_guest(name)


# ============================================================================ 4. mismatches

# QEMU source settings, mfd incoming's options, what mfd's one line must say. The source
# is the sparse image (the flush-mode check with more data is tested above).
MISMATCHES = {
    "channels-4-vs-2": ({"multifd_channels": 4}, ["--multifd-channels", "2"],
                        r"channel id [23], expected 0\.\.1"),
    "channels-1-vs-2": ({"multifd_channels": 1}, ["--multifd-channels", "2"],
                        r"the source opened 1 multifd channel\(s\), this destination "
                        r"expects 2"),
    "compression-zstd-vs-none": ({"multifd_channels": 2, "multifd_compression": "zstd"},
                                 ["--multifd-compression", "none"],
                                 r"compression flags 0x4 \(zstd\), expected 0x0 \(none\)"),
    "flush-round-vs-each": ({"multifd_channels": 2},
                            ["--multifd-flush-after-each-section"],
                            r"the source sends MULTIFD_FLUSH .*"
                            r"--multifd-flush-after-each-section"),
    "flush-each-vs-round": ({"multifd_channels": 2, "globals": [EACH]}, [],
                            r"the source syncs after each section .*"
                            r"--multifd-flush-after-each-section"),
    "uuid": ({"multifd_channels": 2, "uuid": QEMU_UUID}, [],
             rf"uuid {QEMU_UUID}, expected 00000000-0000-0000-0000-000000000000"),
}


@pytest.mark.parametrize(("what", "rp"), [
    ("compression-zstd-vs-none", False),  # the fast tier's; the full suite's all
    *(pytest.param(what, False, marks=pytest.mark.slow) for what in MISMATCHES
      if what != "compression-zstd-vs-none"),
    pytest.param("compression-zstd-vs-none", True, marks=pytest.mark.slow),
    pytest.param("flush-round-vs-each", True, marks=pytest.mark.slow),
], ids=lambda v: v if isinstance(v, str) else ("rp" if v else "norp"))
def test_qemu_to_mfd_mismatch(tmp_path: Path, sparse: Path, what: str, rp: bool) -> None:
    settings, mfd_args, expect = MISMATCHES[what]
    settings = dict(settings)
    machine = {k: settings.pop(k) for k in ("uuid", "globals") if k in settings}
    src, out = source_copy(sparse, tmp_path), tmp_path / "out.bin"
    port = free_ports(1)
    with Mfd("incoming", "--listen", f"tcp:127.0.0.1:{port}", "--image", f"mem={out}",
             "--timeout", str(WAIT), *mfd_args) as inc, \
            QemuMachine(str(src), SIZE, timeout=QMP_TIMEOUT, **machine) as q:
        wait_listening(port, inc.alive)
        q.set_migration(return_path=rp, **settings)
        t0 = time.monotonic()
        q.start_migrate(f"tcp:127.0.0.1:{port}")
        # the source opening fewer channels is noticed after CHANNEL_GRACE_S (5 s)
        limit = FAIL_WITHIN + (5 if what == "channels-1-vs-2" else 0)
        line = inc.failed(limit)
        elapsed = inc.ended_at - t0
        status = qemu_status(q)  # may be anything; QEMU is closed below regardless
    assert line.startswith("mfd: incoming migration failed: "), line
    assert re.search(expect, line), line
    assert elapsed < limit
    assert not out.exists()
    assert strays(tmp_path, {"src.bin"}) == []
    if rp:  # mfd said SHUT(1) on the return path
        assert status == "failed", status


# ============================================================================ 5. replays

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "wire-samples"


@pytest.mark.slow
def test_replayed_channels_that_closed_are_forgotten(tmp_path: Path, sparse: Path) -> None:
    """QEMU's recorded connections replayed into mfd incoming, the main channel garbled:
    the multifd channels 0 and 1 say their MultiFDInit and a packet, then close. Each is
    forgotten with one warning line, and the genuine QEMU source that follows, whose
    channels reuse those ids, migrates (it failed "multifd channel 0 connected twice")."""
    import socket

    chan0 = (SAMPLES / "chan-id0-nocomp.head4k.bin").read_bytes()
    chan1 = chan0[:24] + bytes([1]) + chan0[25:]  # MultiFDInit's id
    garbled = b"XEVM" + (SAMPLES / "main-nocomp.bin").read_bytes()[4:]
    src, out = source_copy(sparse, tmp_path), tmp_path / "out.bin"
    port = free_ports(1)
    case: Case = (2, "none", "multifd", False, True)
    with Mfd(*incoming_args(port, case, "--image", f"mem={out}", "--timeout", str(WAIT))
             ) as inc:
        wait_listening(port, inc.alive)
        for data in (chan0, chan1, garbled):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(data)
        time.sleep(1)  # sorted (each within 100 ms), and the channels forgotten
        with QemuMachine(str(src), SIZE, timeout=QMP_TIMEOUT) as q:
            q.set_migration(multifd_channels=2, multifd_compression="none",
                            zero_page_detection="multifd", return_path=True)
            q.start_migrate(f"tcp:127.0.0.1:{port}")
            info = q.wait_migration(WAIT)
            res = inc.completed()
    assert info["status"] == "completed" and res["status"] == "completed"
    assert_same_ram(src, out)
    warnings = inc.err.strip().splitlines()
    for i in (0, 1):
        assert f"mfd incoming: forgot multifd channel {i} from 127.0.0.1:" in inc.err, warnings
    assert sum("neither a main channel" in line for line in warnings) == 1, warnings
    assert len(warnings) == 3, warnings
