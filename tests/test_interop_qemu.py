"""Real QEMU 10 loads what mfd writes, and mfd restores what QEMU writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import needs_qemu

import mfd
from mfd.bench.qemu import QemuError, QemuMachine, qemu_restore, qemu_save
from mfd.options import MigrationParameters, RestoreOptions, SaveOptions
from mfd.ramimage import generate

pytestmark = [pytest.mark.qemu, needs_qemu]

SIZE = (32 << 20) + 40 * 1024  # the last bitmap word is partly used


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "ram.bin"
    generate(str(p), SIZE, seed=11)
    return p


@pytest.mark.parametrize(("mode", "qemu_channels"), [
    ("multifd", 4),
    *(pytest.param(m, c, marks=pytest.mark.slow)
      for m, c in (("multifd", 0), ("none", 0), ("none", 4))),
])
def test_qemu_loads_what_mfd_wrote(tmp_path, image, mode, qemu_channels):
    mig = tmp_path / "mfd.mig"
    mfd.save(str(mig), images={"mem": str(image)},
             params=MigrationParameters(multifd_channels=3, zero_page_detection=mode))
    out = tmp_path / "qemu-ram.bin"
    qemu_restore(str(mig), str(out), SIZE, multifd_channels=qemu_channels)
    assert out.read_bytes() == image.read_bytes()


@pytest.mark.slow
def test_qemu_loads_a_live_save_of_a_writing_guest(tmp_path, guests):
    """The trailer after the vmdesc does not bother QEMU, nor does a guest's runstate."""
    name, g = guests.start("16M", "--dirty-rate", "200M", "--zero-fraction", "0.2")
    mig = tmp_path / "live.mig"
    mfd.save(str(mig), guest=name)
    (block,) = g.query()["blocks"]
    out = tmp_path / "qemu-ram.bin"
    qemu_restore(str(mig), str(out), 16 << 20, multifd_channels=2)
    assert out.read_bytes() == Path(block["path"]).read_bytes()


@pytest.mark.parametrize("qemu_channels", [0, 2])
@pytest.mark.parametrize("mfd_channels", [1, 4])
def test_mfd_restores_what_qemu_wrote(tmp_path, image, qemu_channels, mfd_channels):
    mig = tmp_path / "qemu.mig"
    qemu_save(str(image), str(mig), multifd_channels=qemu_channels)
    out = tmp_path / "out.bin"
    mfd.restore(str(mig), images={"mem": str(out)},
                options=RestoreOptions(multifd_channels=mfd_channels))
    assert out.read_bytes() == image.read_bytes()


def test_mfd_restores_a_qemu_stream_file_at_an_offset(tmp_path, image):
    mig = tmp_path / "qemu-stream.mig"
    mig.write_bytes(b"H" * 8192)
    qemu_save(str(image), str(mig), mapped_ram=False, offset=8192)
    assert mig.read_bytes()[:8192] == b"H" * 8192
    out = tmp_path / "out.bin"
    mfd.restore(str(mig), images={"mem": str(out)}, options=RestoreOptions(offset=8192))
    assert out.read_bytes() == image.read_bytes()


@pytest.mark.parametrize("program", ["zstd", "gzip", pytest.param("bzip2", marks=pytest.mark.slow),
                                     pytest.param("xz", marks=pytest.mark.slow), "lzop"])
def test_mfd_restores_a_compressed_qemu_stream(tmp_path, image, program):
    """``migrate exec:"PROGRAM -c > FILE"``: QEMU's stream through a compressor, no header
    (libvirt's save_image_format pipes it the same way, tests/test_libvirt.py)."""
    if shutil.which(program) is None:
        pytest.skip(f"no {program} here (.ci/setup installs it)")
    ram = tmp_path / "ram.bin"
    shutil.copyfile(image, ram)
    mig = tmp_path / f"qemu.{program}"
    with QemuMachine(str(ram), SIZE) as m:
        m.set_migration()
        m.migrate(f"exec:{program} -c > {mig}")
    assert mfd.inspect(str(mig))["compression"] == program
    out = tmp_path / "out.bin"
    mfd.restore(str(mig), images={"mem": str(out)})
    assert out.read_bytes() == image.read_bytes()


def test_qemu_refuses_an_mfd_file_with_another_machine_name(tmp_path, image):
    """The configuration section is QEMU's: a machine name QEMU does not run is refused."""
    mig = tmp_path / "pc.mig"
    mfd.save(str(mig), images={"mem": str(image)}, options=SaveOptions(machine="pc-q35-10.0"))
    with pytest.raises(QemuError, match=r"Machine type received is 'pc-q35-10\.0'"):
        qemu_restore(str(mig), str(tmp_path / "x.bin"), SIZE)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("mfd-qemu")]
