"""Shared fixtures: QEMU's reference files, isolated guest sockets, a /dev/shm leak check."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from mfd.shm import control

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference"


def shm_entries() -> set[str]:
    """mfd's files in /dev/shm; a benchmark running beside the suite (mfd-bench*) is not
    ours to judge."""
    return {n for n in os.listdir("/dev/shm")
            if n.startswith("mfd-") and not n.startswith("mfd-bench")}


@pytest.fixture(autouse=True)
def no_shm_leak():
    """Every test leaves /dev/shm as it found it (one owner unlinks, nobody leaks)."""
    before = shm_entries()
    yield
    leaked = shm_entries() - before
    assert not leaked, f"left in /dev/shm: {sorted(leaked)}"


@pytest.fixture(scope="session", autouse=True)
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    os.environ["MFD_RUN_DIR"] = str(d)
    return d


def unzstd(path: Path, out: Path) -> Path:
    if not out.exists():
        data = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
        out.write_bytes(data)
    return out


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[str, Path]:
    """QEMU 10's reference files and RAM images, decompressed once."""
    if not REFERENCE.is_dir():
        pytest.skip(f"no reference files at {REFERENCE}")
    d = tmp_path_factory.mktemp("reference")
    out = {}
    for p in REFERENCE.glob("*.zst"):
        name = p.name[: -len(".zst")]
        out[name] = unzstd(p, d / name)
    img = d / "ram_16M8K_seed1.bin"
    img.write_bytes(out["ram_16M_seed1.bin"].read_bytes()
                    + out["ram_16M8K_seed1.tail.bin"].read_bytes())
    out["ram_16M8K_seed1.bin"] = img
    return out


class Guests:
    """Start background guests by name; quit (and so unlink) them all at teardown."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def start(self, ram: str = "64M", *extra: str) -> tuple[str, control.GuestClient]:
        name = f"t{uuid.uuid4().hex[:8]}"
        client = control.start_guest_daemon(["--name", name, "--ram", ram, *extra], name)
        self.names.append(name)
        return name, client

    def adopt(self, name: str) -> None:
        self.names.append(name)

    def cleanup(self) -> None:
        for name in self.names:
            with contextlib.suppress(Exception), control.GuestClient(name, timeout=5) as g:
                g.quit()


@pytest.fixture
def guests():
    g = Guests()
    yield g
    g.cleanup()


def run_mfd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI as a user runs it."""
    return subprocess.run([sys.executable, "-m", "mfd", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def qemu_temp_files() -> set[str]:
    """Socket dirs and /dev/shm RAM copies mfd's QEMU driver creates (all mfd-qemu-*)."""
    from mfd.bench.qemu import TMP_PREFIX

    found = set()
    for d in {"/dev/shm", tempfile.gettempdir()}:
        if os.path.isdir(d):
            found |= {os.path.join(d, n) for n in os.listdir(d) if n.startswith(TMP_PREFIX)}
    return found
