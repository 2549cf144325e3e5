"""Tests for mfd.bench.qemu, the real-QEMU driver that the interop tests and benchmarks build on.

They run QEMU itself, so they are skipped where qemu-system-x86_64 >= 9 is not installed.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import needs_qemu, qemu_temp_files

from mfd.bench.qemu import (
    QemuError,
    QemuMachine,
    qemu_binary,
    qemu_restore,
    qemu_save,
    qemu_version,
)

pytestmark = [pytest.mark.qemu, needs_qemu]

PAGE = 4096
IMAGE_SIZE = 4 << 20
REF_IMAGE_SHA256 = "9f0f4101c1bfa421f6d6e5be656aede2dfee9a0cc078078196e3dcbe26676ec5"


def _qemu_count() -> int:
    out = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True, text=True).stdout
    return len(out.split())


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Every test must leave no socket dir and no /dev/shm copy behind."""
    before = qemu_temp_files()
    yield
    assert qemu_temp_files() - before == set()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 MiB RAM image: runs of 16 pages, half zero, a quarter random, a quarter text-like."""
    rng = np.random.default_rng(20261122)
    pages = np.zeros((IMAGE_SIZE // PAGE, PAGE), dtype=np.uint8)
    runs = len(pages) // 16
    counts = [runs // 2, runs // 4, runs - runs // 2 - runs // 4]  # zero, random, text
    kinds = rng.permutation(np.repeat([0, 1, 2], counts))
    words = np.frombuffer(b"lorem ipsum dolor sit amet migration page ", dtype=np.uint8)
    for run, kind in enumerate(kinds):
        for i in range(run * 16, run * 16 + 16):
            if kind == 1:
                pages[i] = rng.integers(0, 256, PAGE, dtype=np.uint8)
            elif kind == 2:
                pages[i] = np.resize(np.roll(words, i), PAGE)
                pages[i, :8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "ram_4M.bin"
    path.write_bytes(pages.tobytes())
    return path


def test_version() -> None:
    version = qemu_version()
    assert version is not None and version >= (9, 0, 0)
    assert qemu_binary() == qemu_binary()  # cached, stable


@pytest.mark.parametrize("channels", [0, 2])
def test_save_restore_roundtrip(image: Path, tmp_path: Path, channels: int) -> None:
    mig = tmp_path / "out.mig"
    saved = qemu_save(str(image), str(mig), mapped_ram=True, multifd_channels=channels)
    assert saved["query_migrate"]["status"] == "completed"
    assert saved["seconds"] > 0
    with mig.open("rb") as f:
        assert f.read(4) == b"QEVM"

    out = tmp_path / "restored.bin"
    out.write_bytes(b"\xaa" * 100)  # must be replaced by a zeroed file, not reused
    restored = qemu_restore(str(mig), str(out), IMAGE_SIZE, multifd_channels=channels)
    assert restored["query_migrate"]["status"] == "completed"
    assert out.read_bytes() == image.read_bytes()


def test_save_restore_with_offset(image: Path, tmp_path: Path) -> None:
    mig = tmp_path / "offset.mig"
    qemu_save(str(image), str(mig), multifd_channels=2, offset=PAGE)
    with mig.open("rb") as f:
        f.seek(PAGE)
        assert f.read(4) == b"QEVM"
    out = tmp_path / "restored.bin"
    qemu_restore(str(mig), str(out), IMAGE_SIZE, multifd_channels=2, offset=PAGE)
    assert out.read_bytes() == image.read_bytes()


def test_reference_case1_restores(tmp_path: Path, reference: dict[str, Path]) -> None:
    expected = reference["ram_16M_seed1.bin"].read_bytes()
    assert hashlib.sha256(expected).hexdigest() == REF_IMAGE_SHA256

    out = tmp_path / "restored.bin"
    result = qemu_restore(str(reference["case1_mapped-ram.mig"]), str(out), len(expected),
                          mapped_ram=True)
    assert result["query_migrate"]["status"] == "completed"
    assert out.read_bytes() == expected


@pytest.mark.parametrize("channels", [0, 2])
def test_truncated_to_64_bytes_raises(image: Path, tmp_path: Path, channels: int) -> None:
    mig = tmp_path / "good.mig"
    qemu_save(str(image), str(mig))
    bad = tmp_path / "bad.mig"
    bad.write_bytes(mig.read_bytes()[:64])

    before = _qemu_count()
    with pytest.raises(QemuError, match=r"migrate-incoming .* failed") as err:
        qemu_restore(str(bad), str(tmp_path / "out.bin"), IMAGE_SIZE, multifd_channels=channels)
    assert "error" in str(err.value)  # e.g. "load of migration failed: Input/output error"
    assert err.value.query_migrate is not None
    assert err.value.query_migrate["status"] == "failed"
    assert _qemu_count() == before


def test_truncated_pages_multifd_crash_is_reported(image: Path, tmp_path: Path) -> None:
    """QEMU 10.0.2 SIGSEGVs on a short read in the multifd load path; we must not hang."""
    mig = tmp_path / "good.mig"
    qemu_save(str(image), str(mig))
    bad = tmp_path / "bad.mig"
    bad.write_bytes(mig.read_bytes()[: (1 << 20) + IMAGE_SIZE // 2 + 100])

    before = _qemu_count()
    for channels in (0, 2):
        # Without multifd QEMU reports the short read; with multifd it has been seen to crash.
        with pytest.raises(QemuError, match="migrate-incoming") as err:
            qemu_restore(str(bad), str(tmp_path / "out.bin"), IMAGE_SIZE, multifd_channels=channels)
        assert "Partial read" in str(err.value) or "SIGSEGV" in str(err.value)
    assert _qemu_count() == before


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="No such file"):
        qemu_restore(str(tmp_path / "nope.mig"), str(tmp_path / "out.bin"), IMAGE_SIZE)


def test_qmp_errors_and_refused_combination(image: Path, tmp_path: Path) -> None:
    ram = tmp_path / "ram.bin"
    shutil.copyfile(image, ram)
    with QemuMachine(str(ram), IMAGE_SIZE, timeout=20) as m:
        with pytest.raises(QemuError, match="no-such-command"):
            m.qmp("no-such-command")
        assert m.qmp("query-status")["status"] == "prelaunch"
        # Multifd without mapped-ram cannot go to a file: QEMU refuses at migrate.
        m.set_migration(mapped_ram=False, multifd_channels=2)
        with pytest.raises(QemuError, match="multi-channel"):
            m.migrate(f"file:{tmp_path / 'x.mig'}")
    m.close()  # idempotent
    with pytest.raises(QemuError, match="closed"):
        m.qmp("query-status")


def test_wrong_ram_size_is_rejected(image: Path) -> None:
    with pytest.raises(QemuError, match="expected"):
        QemuMachine(str(image), IMAGE_SIZE + PAGE)
