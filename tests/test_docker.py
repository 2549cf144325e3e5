"""The two-node demo (docker-compose.yml) in a real Docker engine.

The image is built as a user builds it (``docker compose build``), on a base made here
without a registry: tests/docker/base-image.sh debootstraps a minimal bookworm from this
machine's apt mirror and imports it (kept between runs as BASE_TAG). Each test runs its own
compose project and removes it (containers, network, volume) at the end, whatever happens.
Where no Docker engine runs, every test here skips and says why; ``.ci/docker`` installs and
starts one.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from mfd.shm import kvm

ROOT = Path(__file__).resolve().parent.parent
BASE_TAG = "mfd-base-local:bookworm"
DIGEST = "[0-9a-f]{64}"
_projects = itertools.count()
pytestmark = pytest.mark.slow


def _compose_command() -> list[str] | None:
    """Compose v2 (the docker plugin) where there is one, else v1 (docker-compose)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def _why_no_docker() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command (bash .ci/docker installs one)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        lines = (info.stderr or info.stdout).strip().splitlines()
        return f"no Docker engine runs here: {lines[-1] if lines else 'docker info failed'}"
    if _compose_command() is None:
        return "no docker compose / docker-compose"
    return None


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode == 0, f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


class Project:
    """One compose project of docker-compose.yml, with the test's settings."""

    def __init__(self, settings: dict[str, str]) -> None:
        self.name = f"mfdtest{os.getpid()}x{next(_projects)}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MFD_", "COMPOSE_"))}
        self.env = env | {"MFD_BASE_IMAGE": BASE_TAG} | settings
        self.compose = [*_compose_command(), "-p", self.name]

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return _run([*self.compose, *args], timeout, cwd=ROOT, env=self.env)

    def container(self, service: str) -> str:
        (cid,) = self("ps", "-a", "-q", service).stdout.split()
        return cid

    def inspect(self, what: str) -> dict:
        return orjson.loads(_run(["docker", "inspect", what], 60).stdout)[0]

    def logs(self, service: str) -> str:
        p = _run(["docker", "logs", self.container(service)], 60)
        return p.stdout + p.stderr

    def wait_for_log(self, service: str, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.logs(service)
            if text in out:
                return out
            time.sleep(0.2)
        raise AssertionError(f"{service} did not log {text!r} within {timeout:g} s:\n{out}")

    def wait_exit(self, service: str, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.inspect(self.container(service))["State"]
            if state["Status"] in ("exited", "dead"):
                return state["ExitCode"]
            time.sleep(0.3)
        raise AssertionError(f"{service} still runs after {timeout:g} s:\n{self.logs(service)}")

    def guest(self, service: str) -> dict:
        """The guest's status, asked through its control socket inside the container."""
        p = self("exec", "-T", service, "mfd", "guest", "--name", "vm0", "--query")
        return orjson.loads(p.stdout)


@pytest.fixture(scope="module")
def image() -> None:
    """The project's image, built with compose on a base made without a registry."""
    why = _why_no_docker()
    if why:
        pytest.skip(why)
    if subprocess.run(["docker", "image", "inspect", BASE_TAG],
                      capture_output=True).returncode != 0:
        _run(["bash", str(ROOT / "tests/docker/base-image.sh"), BASE_TAG], 900)
    Project({})("build", "node-b", timeout=1200)


@pytest.fixture
def project(image) -> Iterator[Callable[..., Project]]:
    made: list[Project] = []

    def make(**settings: str) -> Project:
        made.append(Project(settings))
        return made[-1]

    yield make
    for p in made:
        p("down", "-v", "--remove-orphans", "-t", "5", timeout=120)


def _verified(log: str, where: str) -> list[str]:
    return re.findall(rf"verification: block 'mem' blake3 ({DIGEST}) {where}: OK", log)


def _same_ram_and_runs_on_b(a_log: str, a_how: str, b_log: str, b_how: str, where: str) -> None:
    """Each node printed its own blake3 of the guest's RAM at the switchover: the same one;
    the guest runs on node B; nothing crashed."""
    ours, theirs = _verified(a_log, a_how), _verified(b_log, b_how)
    assert len(ours) == 1 and ours == theirs, (a_log, b_log)
    assert f"guest vm0 is running here, {where}" in b_log
    assert "Traceback" not in a_log + b_log


def _writes_on(p: Project, service: str) -> None:
    """The guest runs in ``service``: its status says so, and it keeps writing."""
    first = p.guest(service)
    time.sleep(1.0)
    second = p.guest(service)
    assert first["status"] == second["status"] == "running"
    assert second["pages-written"] > first["pages-written"]


PROBE = """
import socket, sys
from concurrent.futures import ThreadPoolExecutor
def probe(host):
    try:
        socket.create_connection((host, int(sys.argv[1])), timeout=2).close()
        return f"{host} connected"
    except OSError as e:
        return f"{host} {type(e).__name__}"
print("\\n".join(ThreadPoolExecutor(8).map(probe, sys.argv[2:])))
"""


def _host_addresses() -> list[str]:
    """Every IPv4 address of this machine but loopback, and one beyond it."""
    out = _run(["ip", "-4", "-o", "addr", "show"], 30).stdout
    mine = [m for m in re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
            if not m.startswith("127.")]
    return [*mine, "1.1.1.1"]


def _unreachable_from(p: Project, service: str) -> None:
    """Nothing outside the compose network answers ``service``: not this machine on any of
    its addresses (a port that listens on all of them), not the world."""
    with socket.create_server(("0.0.0.0", 0)) as listener:
        port = listener.getsockname()[1]
        out = p("exec", "-T", service, "python3", "-c", PROBE, str(port), *_host_addresses(),
                timeout=120).stdout
    assert "connected" not in out, f"{service} reaches beyond the compose network:\n{out}"


def test_live_migration_between_two_containers(project):
    """`docker compose up`: node A's guest migrates live to node B and runs there."""
    p = project(MFD_RAM="256M", MFD_DIRTY_RATE="20M", MFD_RUN_AFTER="8")
    p("up", "-d", timeout=300)  # node A starts once node B's health check passed
    # the nodes talk only to each other: an internal network, no port published, no route out
    net = p.inspect(f"{p.name}_migration")
    assert net["Internal"] is True
    b = p.inspect(p.container("node-b"))
    assert set(b["NetworkSettings"]["Networks"]) == {f"{p.name}_migration"}
    assert not any(b["NetworkSettings"]["Ports"].values())
    _unreachable_from(p, "node-b")
    assert p.wait_exit("node-a", 180) == 0, p.logs("node-a")
    # the guest runs on node B, and only there
    _writes_on(p, "node-b")
    assert p.wait_exit("node-b", 60) == 0, p.logs("node-b")

    a_log, b_log = p.logs("node-a"), p.logs("node-b")
    assert "live migration: round 1" in a_log  # the live progress
    # the containers get KVM where this machine has it, and the demo uses it
    guest = "a KVM vCPU" if kvm.unavailable() is None else "the built-in workload"
    assert f"(half of it data), {guest} dirtying" in a_log, a_log
    done = re.search(r"completed in ([\d.]+) s: (\d+) rounds, .* \((\d+) MiB/s\).* downtime "
                     r"(\d+) ms", a_log)
    assert done and int(done.group(2)) >= 1, a_log
    _same_ram_and_runs_on_b(a_log, "at the source, found equal by the destination", b_log,
                            "at the destination, found equal by the source", "at the destination")


def test_postcopy_between_two_containers(project):
    """MFD_POSTCOPY=1: after a second of precopy node A switches to postcopy; node B's
    guest runs at once, its missing pages fetched through /dev/userfaultfd (Docker's
    default seccomp refuses the syscall, the device the image makes works)."""
    if not os.path.exists("/dev/userfaultfd"):
        pytest.skip("no /dev/userfaultfd on this machine")
    p = project(MFD_RAM="256M", MFD_DIRTY_RATE="200M", MFD_MAX_BANDWIDTH="64M",
                MFD_POSTCOPY="1", MFD_RUN_AFTER="3")
    p("up", "-d", timeout=300)
    assert p.wait_exit("node-a", 180) == 0, p.logs("node-a")
    assert p.wait_exit("node-b", 60) == 0, p.logs("node-b")
    a_log, b_log = p.logs("node-a"), p.logs("node-b")
    assert "then postcopy" in a_log and "page(s) the destination's guest asked for" in a_log
    assert "postcopy: the guest ran here before its RAM had arrived" in b_log, b_log
    _same_ram_and_runs_on_b(a_log, "at the source, found equal by the destination", b_log,
                            "at the destination, found equal by the source", "at the destination")


def test_tls_between_two_containers(project):
    """MFD_TLS=1: the certs service makes a CA and node B's certificate (for the name
    node-b) into the project's volume; every connection is TLS 1.3, node B checks node A's
    certificate, and the guest arrives whole."""
    p = project(MFD_RAM="256M", MFD_DIRTY_RATE="20M", MFD_TLS="1", MFD_RUN_AFTER="3")
    p("up", "-d", timeout=300)
    assert p.wait_exit("node-a", 180) == 0, p.logs("node-a")
    assert p.wait_exit("node-b", 60) == 0, p.logs("node-b")
    a_log, b_log = p.logs("node-a"), p.logs("node-b")
    assert "every connection TLS 1.3" in a_log, a_log
    assert "(TLS, the source's certificate checked)" in b_log, b_log
    _same_ram_and_runs_on_b(a_log, "at the source, found equal by the destination", b_log,
                            "at the destination, found equal by the source", "at the destination")


def test_node_b_killed_mid_migration(project):
    """Node B dies mid-migration: node A says so, its guest keeps running, exit 1."""
    p = project(MFD_RAM="256M", MFD_DIRTY_RATE="20M", MFD_MAX_BANDWIDTH="16M",
                MFD_RUN_AFTER="8")
    p("up", "-d", timeout=300)
    p.wait_for_log("node-a", "migrating to tcp://node-b:4444", 120)
    time.sleep(1.5)  # 128 MiB of data at 16 MiB/s: the migration is far from done
    p("kill", "node-b")
    a_log = p.wait_for_log("node-a", "migration failed:", 20)
    assert "completed in" not in a_log
    _writes_on(p, "node-a")
    assert p.wait_exit("node-a", 60) == 1
    a_log = p.logs("node-a")
    assert "guest vm0 is running here, at the source" in a_log
    last = a_log.strip().splitlines()[-1]
    assert last.startswith("mfd: ") and "lost" in last, a_log
    assert "Traceback" not in a_log


def test_file_scenario_save_on_a_restore_on_b(project):
    """The second scenario: a parallel mapped-ram save on node A to a shared volume, restored
    and resumed on node B."""
    p = project(MFD_RAM="128M", MFD_DIRTY_RATE="20M", MFD_RUN_AFTER="3")
    p("--profile", "file", "up", "-d", "save-a", "restore-b", timeout=300)
    assert p.wait_exit("restore-b", 180) == 0, p.logs("restore-b")
    assert p.wait_exit("save-a", 10) == 0
    a_log, b_log = p.logs("save-a"), p.logs("restore-b")
    assert "saving to /files/vm0.mig over 4 channels (mapped-ram)" in a_log
    _same_ram_and_runs_on_b(a_log, "saved in the file's trailer", b_log,
                            "restored, equal to the file's trailer", "after the restore")


def test_guest_larger_than_shm_size(project):
    """A user raises MFD_RAM past the container's /dev/shm: node A says so in one line (no
    SIGBUS later), node B gives up after MFD_TIMEOUT; both exit 1."""
    p = project(MFD_RAM="256M", MFD_SHM_SIZE="64m", MFD_TIMEOUT="5")
    p("up", "-d", timeout=300)
    assert p.wait_exit("node-a", 120) == 1
    a_log = p.logs("node-a").strip()
    assert a_log.splitlines()[-1] == ("mfd: guest 'vm0' failed to start: /dev/shm has 64.0 MiB "
                                      "free, the RAM needs 256.0 MiB (in a container, raise "
                                      "its shm_size)"), a_log
    assert p.wait_exit("node-b", 60) == 1
    b_log = p.logs("node-b").strip()
    assert b_log.splitlines()[-1].startswith("mfd: "), b_log
    assert "Traceback" not in a_log + b_log
