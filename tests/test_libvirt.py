"""libvirt's save images, made by a real libvirt 11 + QEMU 10, restored and inspected by mfd.

A transient TCG domain with no disk and 64 MiB of file-backed shared RAM (so its RAM is a
file the test reads and writes) is paused, given a RAM pattern, and saved by ``virsh save``
raw, sparse (mapped-ram) with 4 channels, and zstd; after each save ``virsh restore
--paused`` brings it back, and the next save is made from it. For every image, every block
mfd restores (1 and 4 channels) must equal every other image's, and the main block must
equal what QEMU holds after ``virsh restore --paused`` of that image. The synthetic header
refusals are in tests/test_bad_files.py (the libvirt-* bases).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers import run_mfd
from libvirtd import Libvirtd, missing

import mfd
from mfd.options import RestoreOptions
from mfd.ramimage import generate

pytestmark = pytest.mark.slow

RAM = 64 << 20
SAVES = {  # image format -> virsh save options
    "raw": [],
    "sparse": ["--image-format", "sparse", "--parallel-channels", "4"],
    "zstd": ["--image-format", "zstd"],
}


@pytest.fixture(scope="module")
def libvirtd():
    if why := missing():
        pytest.skip(why)
    daemon = Libvirtd()
    try:
        yield daemon
    finally:
        daemon.stop()


def domain_xml(name: str, machine: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='KiB'>{RAM >> 10}</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>"""


def restored_blocks(sav: Path, out: Path, names: list[str], channels: int) -> dict[str, str]:
    """mfd restore of every block; their sha256."""
    out.mkdir()
    mfd.restore(str(sav), images={n: str(out / n.replace("/", "_")) for n in names},
                options=RestoreOptions(multifd_channels=channels))
    return {n: hashlib.sha256((out / n.replace("/", "_")).read_bytes()).hexdigest()
            for n in names}


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_mfd_restores_what_libvirt_saved(libvirtd, tmp_path, machine):
    name = f"mfd-{machine}"
    xml = tmp_path / "domain.xml"
    xml.write_text(domain_xml(name, machine))
    libvirtd.virsh("create", xml)
    libvirtd.virsh("suspend", name)
    # the guest's RAM, a pattern of zero, random and text pages written into it while paused
    generate(str(libvirtd.ram_file(name)), RAM, seed=11, create=False)
    pattern = libvirtd.ram_file(name).read_bytes()
    want: dict[str, str] | None = None
    try:
        for fmt, options in SAVES.items():
            sav = tmp_path / f"{fmt}.sav"
            libvirtd.virsh("save", name, sav, *options)
            libvirtd.virsh("restore", "--paused", sav)
            held = libvirtd.ram_file(name).read_bytes()  # what QEMU holds
            assert held == pattern, f"{fmt}: QEMU itself did not get the RAM back"

            d = mfd.inspect(str(sav))
            lv = d["libvirt"]
            assert lv["magic"] == "LibvirtQemudSave" and lv["version"] == 2
            assert lv["image_format"] == fmt and lv["was_running"] is False
            assert lv["domain"]["name"] == name and lv["domain"]["memory"] == RAM
            assert d["offset"] == lv["stream_offset"] == 92 + lv["data_len"]
            assert d["compression"] == ("zstd" if fmt == "zstd" else None)
            assert d["format"] == ("mapped-ram" if fmt == "sparse" else "stream")
            names = [b["idstr"] for b in d["ram_blocks"]]
            assert "pc.ram" in names

            for channels in (1, 4):
                got = restored_blocks(sav, tmp_path / f"{fmt}-{channels}", names, channels)
                assert got["pc.ram"] == hashlib.sha256(held).hexdigest(), \
                    f"{fmt}, {channels} channel(s): pc.ram differs from QEMU's"
                want = want or got
                assert got == want, f"{fmt}, {channels} channel(s): blocks differ from raw's"
    finally:
        libvirtd.virsh("destroy", name)


def test_cli_reads_a_libvirt_image_without_offset(libvirtd, tmp_path, guests):
    """As a user runs it: inspect shows the header, restore --guest makes a paused mfd
    guest whose main block is what QEMU holds."""
    name = "mfd-cli"
    xml = tmp_path / "domain.xml"
    xml.write_text(domain_xml(name, "pc"))
    libvirtd.virsh("create", xml)
    libvirtd.virsh("suspend", name)
    generate(str(libvirtd.ram_file(name)), RAM, seed=12, create=False)
    sav = tmp_path / "vm.sav"
    try:
        libvirtd.virsh("save", name, sav, "--image-format", "zstd")
        libvirtd.virsh("restore", "--paused", sav)
        held = libvirtd.ram_file(name).read_bytes()
    finally:
        libvirtd.virsh("destroy", name)
    r = run_mfd("inspect", str(sav))
    assert r.returncode == 0, r.stderr
    assert "libvirt save image (LibvirtQemudSave version 2)" in r.stdout
    assert f"domain '{name}', memory {RAM} (64.0 MiB)" in r.stdout
    assert "zstd-compressed stream" in r.stdout
    r = run_mfd("restore", str(sav), "--guest", "lvguest", "--multifd-channels", "4")
    assert r.returncode == 0, r.stderr
    guests.adopt("lvguest")
    from mfd.shm import control

    with control.GuestClient("lvguest") as g:
        blocks = {b["idstr"]: b["path"] for b in g.query()["blocks"]}
    assert Path(blocks["pc.ram"]).read_bytes() == held
