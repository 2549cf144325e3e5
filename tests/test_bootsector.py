"""mfd.bench.bootsector's guest in a real QEMU, and QEMU-to-QEMU TCP migrations of it.

The sector's bytes are checked against what GNU as assembled from the same program; the rest
boots it in ``qemu-system-x86_64 -machine pc -accel tcg`` (64 MiB, RAM in /dev/shm) through
:class:`mfd.bench.qemu.QemuMachine`, skipped where QEMU >= 9 is not installed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import needs_qemu, qemu_temp_files

from mfd.bench.bootsector import (
    ENTRY_CHAR,
    SECTOR,
    SWEEP_CHAR,
    boot_sector,
    default_range,
    program_listing,
    write_boot_image,
)
from mfd.bench.qemu import QemuError, QemuMachine
from mfd.workers.tcp import free_ports

PAGE = 4096
MIB = 1 << 20
RAM_SIZE = 64 * MIB
WAIT = 10.0  # bound on every wait for the guest
TIMEOUT = 20.0  # QemuMachine: startup, each QMP reply, each migration
# Above 1 MiB, SeaBIOS (QEMU 10.0.2) leaves data only in the top half of a 64 MiB guest: its
# temporary high zone (seen at 0x2fe1000-0x3000000) and its tables (0x3fe0000-0x3fe3000).
BIOS_HIGH = RAM_SIZE // 2

# GNU as 2.40 (`as --32`, objcopy -O binary) on the same program, start 1 MiB, end 63 MiB:
# the code (0x00-0x4f), then GDT and GDTR (0x50-0x6d).
GOLDEN_CODE = bytes.fromhex(
    "fae4920c0224fee69231c08ed80f0116687c0f20c00c010f22c0ea1f7c0800"
    "66b810008ed88ec08ed0bc007c000066baf803b050eebb00001000ff0381c3"
    "0010000081fb0000f00372f0b02eeeebe6"
)
GOLDEN_GDT = bytes.fromhex(
    "0000000000000000ffff0000009acf00ffff00000092cf001700507c0000"
)


# --------------------------------------------------------------------------- the sector


def test_sector_bytes_match_gnu_as() -> None:
    sector = boot_sector(MIB, 63 * MIB)
    assert len(sector) == SECTOR
    assert sector[-2:] == b"\x55\xaa"
    assert sector[: len(GOLDEN_CODE)] == GOLDEN_CODE
    assert sector[0x50:0x6E] == GOLDEN_GDT
    assert sector[0x6E:SECTOR - 2] == bytes(SECTOR - 2 - 0x6E)
    assert boot_sector() == sector  # the defaults: 64 MiB of RAM


def test_listing_is_the_sector() -> None:
    start, end = 0x123000, 0xFFFFF000
    sector = boot_sector(start, end)
    listing = program_listing(start, end)
    for offset, code, asm, _ in listing:
        assert sector[offset:offset + len(code)] == code, asm
    assert listing[0][0] == 0
    assert sum(len(code) for _, code, _, _ in listing) == listing[-1][0] + len(listing[-1][1])
    assert start.to_bytes(4, "little") in sector
    assert end.to_bytes(4, "little") in sector


@pytest.mark.parametrize(
    ("start", "end"),
    [(MIB - PAGE, 2 * MIB), (MIB + 1, 2 * MIB), (MIB, 2 * MIB + 8), (2 * MIB, 2 * MIB),
     (3 * MIB, 2 * MIB), (MIB, 1 << 32)],
)
def test_bad_ranges_are_refused(start: int, end: int) -> None:
    with pytest.raises(ValueError):
        boot_sector(start, end)


def test_default_range_and_image(tmp_path: Path) -> None:
    assert default_range(RAM_SIZE) == (MIB, 63 * MIB)
    with pytest.raises(ValueError):
        default_range(2 * MIB)
    path = tmp_path / "boot.img"
    write_boot_image(path, 2 * MIB, 4 * MIB, size=4 * SECTOR)
    data = path.read_bytes()
    assert data == boot_sector(2 * MIB, 4 * MIB) + bytes(3 * SECTOR)
    with pytest.raises(ValueError):
        write_boot_image(path, size=SECTOR + 1)


# --------------------------------------------------------------------------- in QEMU


@pytest.fixture
def ram_file() -> Iterator[Callable[[], str]]:
    """Makes zero-filled 64 MiB RAM files in /dev/shm (like real guest RAM); removes them, and
    checks that the driver left no socket directory behind. Not named mfd-*: conftest's
    leak check would see them from a session running beside this one."""
    before = qemu_temp_files()
    made: list[str] = []
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None

    def make() -> str:
        fd, path = tempfile.mkstemp(prefix="bootsector-test-", suffix=".ram", dir=shm)
        made.append(path)
        os.ftruncate(fd, RAM_SIZE)
        os.close(fd)
        return path

    try:
        yield make
    finally:
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    assert qemu_temp_files() - before == set()


def _pc(ram: str, image: Path, **kwargs: object) -> QemuMachine:
    return QemuMachine(ram, RAM_SIZE, machine="pc", accel="tcg", boot=str(image),
                       timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]


def _wait_sweeps(m: QemuMachine, count: int) -> str:
    """Poll the serial file until ``count`` sweeps were reported; return what it holds."""
    deadline = time.monotonic() + WAIT
    while (text := m.serial_text()).count(SWEEP_CHAR.decode()) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} sweeps not seen within {WAIT:g} s: serial "
                                 f"{text[:80]!r}, status {m.query_status()}, "
                                 f"stderr {m.stderr_tail()!r}")
        time.sleep(0.01)
    return text


def _pages(path: str) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8).reshape(-1, PAGE)


def _counters(pages: np.ndarray) -> np.ndarray:
    return pages[:, :4].copy().view("<u4")[:, 0]


def _check_stopped_sweep(pages: np.ndarray, start: int, end: int, serial: str) -> int:
    """Counters of a stopped guest: k + 1 below the loop's position, k from there on, k the
    sweeps reported on the serial port; the rest of each page in the range untouched."""
    assert serial.startswith(ENTRY_CHAR.decode())
    sweeps = serial.count(SWEEP_CHAR.decode())
    assert serial == ENTRY_CHAR.decode() + SWEEP_CHAR.decode() * sweeps
    counters = _counters(pages[start // PAGE:end // PAGE])
    ahead = int(np.count_nonzero(counters == sweeps + 1))
    assert ahead < len(counters)  # the loop writes its character before the next sweep
    assert (counters[:ahead] == sweeps + 1).all()
    assert (counters[ahead:] == sweeps).all()
    assert not pages[start // PAGE:end // PAGE, 4:].any()
    return sweeps


@pytest.mark.qemu
@needs_qemu
def test_guest_sweeps_its_range_only(ram_file: Callable[[], str], tmp_path: Path) -> None:
    start, end = 2 * MIB, 32 * MIB
    image = tmp_path / "boot.img"
    write_boot_image(image, start, end)
    ram = ram_file()
    with _pc(ram, image, paused=False) as m:
        assert m.query_status() == "running"
        _wait_sweeps(m, 3)
        m.qmp("stop")
        first = _pages(ram)
        sweeps = _check_stopped_sweep(first, start, end, m.serial_text())
        assert sweeps >= 3
        m.qmp("cont")
        _wait_sweeps(m, sweeps + 2)
        m.qmp("stop")
        second = _pages(ram)
        assert _check_stopped_sweep(second, start, end, m.serial_text()) >= sweeps + 2
        assert m.stderr_tail() == ""

    above = np.arange(len(second)) >= MIB // PAGE
    outside = above & ((np.arange(len(second)) < start // PAGE)
                       | (np.arange(len(second)) >= end // PAGE))
    # the guest never writes outside its range, the BIOS was done before the first sweep
    assert (first[outside] == second[outside]).all()
    touched = np.flatnonzero(outside & second.any(axis=1)) * PAGE
    assert (touched >= BIOS_HIGH).all(), [hex(a) for a in touched[:8]]


MIGRATIONS = {
    "multifd2": {"multifd_channels": 2},
    "plain": {},
    "multifd2-rp-legacy-flush-each-section": {
        "multifd_channels": 2, "return_path": True, "zero_page_detection": "legacy",
        "machine": {"uuid": "12345678-1234-5678-9abc-def012345678",
                    "globals": ["migration.multifd-flush-after-each-section=on"]},
    },
}


@pytest.mark.qemu
@needs_qemu
@pytest.mark.parametrize("case", list(MIGRATIONS))
def test_tcp_migration_of_running_guest(ram_file: Callable[[], str], tmp_path: Path,
                                        case: str) -> None:
    params = dict(MIGRATIONS[case])
    machine_opts: dict[str, object] = params.pop("machine", {})  # type: ignore[assignment]
    start, end = default_range(RAM_SIZE)
    image = tmp_path / "boot.img"
    write_boot_image(image, start, end)
    src_ram, dst_ram = ram_file(), ram_file()
    uri = f"tcp:127.0.0.1:{free_ports(1)}"
    with _pc(src_ram, image, paused=False, **machine_opts) as src, \
            _pc(dst_ram, image, incoming=True, **machine_opts) as dst:
        _wait_sweeps(src, 3)
        assert dst.query_status() == "inmigrate"
        for m in (src, dst):
            m.set_migration(**params)  # type: ignore[arg-type]
        dst.start_migrate_incoming(uri)
        src.start_migrate(uri)
        src_info = src.wait_migration()
        dst_info = dst.wait_migration()
        assert src_info["status"] == dst_info["status"] == "completed"
        ram = src_info["ram"]
        # live: the guest rewrote its pages while they were sent, so many were sent twice
        assert ram["normal"] > RAM_SIZE // PAGE
        assert (ram["multifd-bytes"] > 0) == bool(params.get("multifd_channels"))
        assert src.query_status() == "postmigrate"
        assert dst.query_status() == "paused"  # -S: not started after the load

        # both stopped: the destination's RAM is the source's, byte for byte
        src_pages, dst_pages = _pages(src_ram), _pages(dst_ram)
        assert src_pages.tobytes() == dst_pages.tobytes()
        counters = _counters(src_pages[start // PAGE:end // PAGE])
        assert (counters > 0).all()
        assert dst.serial_text() == ""

        # and the guest goes on where it stopped, on the destination
        dst.qmp("cont")
        _wait_sweeps(dst, 2)
        assert dst.query_status() == "running"


@pytest.mark.qemu
@needs_qemu
def test_driver_options(ram_file: Callable[[], str], tmp_path: Path) -> None:
    ram = ram_file()
    with pytest.raises(QemuError, match="boot image"):
        QemuMachine(ram, RAM_SIZE, machine="pc", boot=str(tmp_path / "missing.img"))
    with pytest.raises(ValueError, match="','"):
        QemuMachine(ram, RAM_SIZE, uuid="a,b")
    with QemuMachine(ram, RAM_SIZE, timeout=TIMEOUT) as m:  # the old default: -machine none
        assert m.query_status() == "prelaunch"
        assert m.serial_text() == ""
        with pytest.raises(QemuError, match="incoming=True"):
            m.start_migrate_incoming("tcp:127.0.0.1:1")
        # mapped-ram over TCP: refused at once by QEMU, not after a timeout
        m.set_migration(mapped_ram=True, multifd_channels=2)
        with pytest.raises(QemuError, match="seekable"):
            m.start_migrate(f"tcp:127.0.0.1:{free_ports(1)}")
