"""Shared fixtures: QEMU's reference files, isolated guests, a /dev/shm leak check, a RAM
image. The plain helpers are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import IMAGE_SIZE, REFERENCE, Guests, shm_entries, unzstd

from mfd.ramimage import generate


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


@pytest.fixture
def guests():
    g = Guests()
    yield g
    g.cleanup()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IMAGE_SIZE (16 MiB): zero and nonzero pages (random and compressible) in runs of 16.
    (test_interop_qemu and test_qemu_driver have images of their own.)"""
    p = tmp_path_factory.mktemp("img") / "ram16.bin"
    generate(str(p), IMAGE_SIZE, seed=1)
    return p
