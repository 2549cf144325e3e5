"""``mfd demo`` in its five shapes, on this machine: both ends (the README's main command),
and each node's role of the two-node demo (what the containers run), without Docker."""

from __future__ import annotations

import os
import re

import orjson
import pytest
from helpers import run_mfd, shm_entries, start_mfd, until

from mfd.workers.tcp import free_ports

DIGEST = "[0-9a-f]{64}"


def _digests(out: str, how: str) -> list[str]:
    return re.findall(rf"verification: block 'mem' blake3 ({DIGEST}) {how}: OK", out)


def test_demo_end_to_end():
    """The README's main command, small: a live migration on this machine, verified."""
    before = shm_entries()
    p = run_mfd("demo", "--ram", "64M", "--dirty-rate", "20M", "--json")
    assert p.returncode == 0, p.stderr
    out = orjson.loads(p.stdout)
    assert out["ok"] and out["digests"] == out["destination_digests"]
    assert out["migrate"]["status"] == "completed"
    assert shm_entries() == before


@pytest.mark.slow
def test_node_roles_over_loopback(tmp_path):
    """Node B listens with a monitor (its health check is `mfd qmp`), node A connects by host
    name; each prints its own digest of the RAM at switchover, and they are equal."""
    before = shm_entries()
    port, qmp, tag = free_ports(1), str(tmp_path / "b.qmp"), os.getpid()
    b = start_mfd("demo", "--listen", f"tcp://127.0.0.1:{port}", "--monitor", qmp,
                  "--name", f"b{tag}", "--run-after", "1")
    try:
        until(lambda: run_mfd("qmp", qmp, "query-migrate").returncode == 0, "no monitor")
        assert orjson.loads(run_mfd("qmp", qmp, "query-migrate").stdout)["status"] == "setup"
        bad = run_mfd("qmp", qmp, "no-such-command")
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1
        assert "CommandNotFound" in bad.stderr
        a = run_mfd("demo", "--connect", f"tcp://localhost:{port}", "--name", f"a{tag}",
                    "--ram", "32M", "--dirty-rate", "10M", "--multifd-channels", "4")
        assert a.returncode == 0, a.stderr
        out, err = b.communicate(timeout=60)
    finally:
        if b.poll() is None:
            b.kill()
            b.communicate()
    assert b.returncode == 0, err
    ours = _digests(a.stdout, "at the source, found equal by the destination")
    assert len(ours) == 1 and ours == _digests(out, "at the destination, found equal by the "
                                                    "source")
    assert re.search(rf"guest b{tag} is running here, at the destination \([1-9]\d* pages", out)
    assert "completed in" in a.stdout and "live migration: round" in a.stderr
    assert shm_entries() == before


@pytest.mark.slow
def test_file_roles(tmp_path):
    """Node A saves its running guest, node B restores the file into a guest that runs."""
    before = shm_entries()
    f, tag = str(tmp_path / "vm.mig"), os.getpid()
    a = run_mfd("demo", "--save", f, "--name", f"a{tag}", "--ram", "32M", "--dirty-rate", "10M")
    assert a.returncode == 0, a.stderr
    b = run_mfd("demo", "--restore", f, "--name", f"b{tag}", "--run-after", "0.5")
    assert b.returncode == 0, b.stderr
    saved = _digests(a.stdout, "saved in the file's trailer")
    assert len(saved) == 1 and saved == _digests(b.stdout,
                                                 "restored, equal to the file's trailer")
    assert f"guest b{tag} is running here, after the restore" in b.stdout
    assert shm_entries() == before


def test_bad_demo_options(tmp_path):
    for args, says in [(["--timeout", "5"], "go with --listen"),
                       (["--run-after", "-1"], "--run-after"),
                       (["--connect", "tcp://x:1", "--listen", "tcp://y:2"], "not allowed"),
                       (["--connect", "nonsense"], "not a migration address")]:
        p = run_mfd("demo", *args, "--ram", "4M")
        assert p.returncode == 2 and p.stderr.count("\n") == 1, (args, p.stderr)
        assert says in p.stderr, (args, p.stderr)
    p = run_mfd("qmp", str(tmp_path / "none.qmp"), "query-migrate")
    assert p.returncode == 1 and p.stderr == f"mfd: no monitor at {tmp_path / 'none.qmp'}\n"
    p = run_mfd("qmp", str(tmp_path / "none.qmp"), "query-migrate", "[1]")
    assert p.returncode == 2 and "expected a JSON object" in p.stderr
