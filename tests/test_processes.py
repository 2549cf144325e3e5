"""mfd starting processes of its own (guest daemons, ``mfd incoming`` for the demo and the
bench, TLS relays) runs the same mfd in them, wherever it was started from."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from mfd import __version__
from mfd.shm import control
from mfd.sysutil import python_m


@pytest.fixture
def clone_dir(tmp_path):
    """A working directory holding a folder named ``mfd`` that is not this mfd (a clone of
    the repository, say): ``python -m mfd`` there would import it."""
    (tmp_path / "mfd").mkdir()
    (tmp_path / "mfd" / "__init__.py").write_text("")
    return tmp_path


def test_the_trap_is_real(clone_dir):
    r = subprocess.run([sys.executable, "-m", "mfd", "--version"], cwd=clone_dir,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


def test_a_child_runs_this_mfd_whatever_the_working_directory(clone_dir):
    argv, env = python_m("mfd", "--version")
    r = subprocess.run(argv, env=env, cwd=clone_dir, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"mfd {__version__}", r.stderr


def test_guest_daemonize_from_a_directory_with_an_mfd_folder(clone_dir):
    name = f"pm{uuid.uuid4().hex[:8]}"
    r = subprocess.run([sys.executable, "-P", "-m", "mfd", "guest", "--name", name, "--ram",
                        "8M", "--daemonize"], cwd=clone_dir, capture_output=True, text=True,
                       timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert control.is_alive(name)
    finally:
        control.release(name)
