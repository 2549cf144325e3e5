"""The tests' shared helpers (plain functions and classes; the fixtures are in conftest.py).

Running mfd as a user does (``run_mfd``, ``start_mfd`` and the ``Mfd`` process wrapper), and
waiting for it; guests; processes seen through /proc; live-migration pairs between mfd ends
and with QEMU; the KVM guest's state; RAM compared page by page. Loopback relays and fake
sources are in netutil.py, the private libvirtd in libvirtd.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
import orjson
import pytest

import mfd
from mfd.bench.qemu import TMP_PREFIX, qemu_binary
from mfd.errors import MfdError
from mfd.options import MigrationParameters, SaveOptions
from mfd.qmp import monitor_command
from mfd.shm import control, kvm
from mfd.workers.tcp import free_ports

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference"
PAGE = 4096
IMAGE_SIZE = 16 << 20  # conftest's ``image``
WAIT = 20.0  # bound on a migration with QEMU, on either end (they take 0.2-3 s)
QMP_TIMEOUT = 10.0  # QemuMachine: startup and each QMP reply

needs_qemu = pytest.mark.skipif(qemu_binary() is None,
                                reason="qemu-system-x86_64 >= 9 not installed")
WHY_NO_KVM = kvm.unavailable()
needs_kvm = pytest.mark.skipif(WHY_NO_KVM is not None, reason=f"no KVM here: {WHY_NO_KVM}")


# ---------------------------------------------------------------------------- waiting


def until(cond: Callable[[], object], what: str | Callable[[], str], timeout: float = 30,
          step: float = 0.02) -> None:
    """Wait for ``cond()``; fail with ``what`` (a callable: its answer, asked only then) if it
    is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(step)


def listening(port: int) -> bool:
    """A socket listens on 127.0.0.1:port (read from /proc: a probing connection would be
    a stranger on mfd's port)."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(path) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_listening(port: int, alive: Callable[[], bool] | None = None,
                   timeout: float = 20.0) -> None:
    """Until something listens on ``port``; failing at once if ``alive()`` says the process
    that should listen has ended."""
    def up() -> bool:
        assert alive is None or alive(), "mfd incoming ended before it listened"
        return listening(port)

    until(up, f"mfd incoming did not listen within {timeout:g} s", timeout, 0.01)


# ---------------------------------------------------------------------------- mfd as a user runs it


def sigint_default() -> None:
    """A child's ``preexec_fn``: SIGINT at its default disposition, as from a terminal. A
    suite started as a background job (``python3 -m pytest &`` in a script) runs with
    SIGINT ignored, and children inherit that through exec: Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_mfd(*args: str, **popen: object) -> subprocess.Popen:
    """``python3 -m mfd ARGS`` as a process, stdout and stderr piped as text unless
    ``popen`` says otherwise, SIGINT at its default."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True} | popen
    return subprocess.Popen([sys.executable, "-m", "mfd", *args], preexec_fn=sigint_default,
                            **popen)  # type: ignore[call-overload]


def run_mfd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, to its end."""
    return subprocess.run([sys.executable, "-m", "mfd", *args], capture_output=True, text=True,
                          timeout=timeout)


def start_incoming(port: int, *args: str) -> subprocess.Popen:
    """``mfd incoming --listen tcp:127.0.0.1:PORT ARGS``, once it listens."""
    inc = start_mfd("incoming", "--listen", f"tcp:127.0.0.1:{port}", *args)
    wait_listening(port, lambda: inc.poll() is None)
    return inc


def start_migrate(port: int, *args: str) -> subprocess.Popen:
    return start_mfd("migrate", f"tcp:127.0.0.1:{port}", *args)


def finish(p: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    """The process's end within ``timeout`` (else it is killed and the test fails): exit
    status, stdout, stderr."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"did not finish within {timeout} s: {err}") from None
    return p.returncode, out, err


def one_line(err: str) -> str:
    """The line mfd ends with (warnings may come before it); never a traceback."""
    lines = err.strip().splitlines()
    assert len(lines) >= 1 and "Traceback" not in err, err
    return lines[-1]


def only_line(text: str) -> str:
    """``text`` is one line, and not a traceback: that line."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


class Mfd:
    """``python3 -m mfd ARGS`` as a user runs it (a process: whatever mfd does, the test can
    stop it); stopped with SIGTERM, then SIGKILL, if still running at ``close()``."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.p = start_mfd(*args)
        self.rc: int | None = None
        self.out = self.err = ""
        self.ended_at: float | None = None

    def alive(self) -> bool:
        return self.p.poll() is None

    def wait(self, timeout: float) -> bool:
        """Whether it ended within ``timeout``; then rc, out, err."""
        try:
            self.out, self.err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self.rc, self.ended_at = self.p.returncode, time.monotonic()
        return True

    def close(self) -> None:
        if self.rc is not None:
            return
        self.p.terminate()
        if not self.wait(10):
            self.p.kill()
            self.wait(10)

    def __enter__(self) -> Mfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def completed(self, timeout: float = WAIT) -> dict:
        """Ended with status 0 within ``timeout``: its --json line."""
        assert self.wait(timeout), f"mfd {self.args[0]} did not end within {timeout:g} s"
        assert self.rc == 0, f"mfd {self.args[0]}: exit {self.rc}: {self.err}"
        return orjson.loads(self.out)

    def failed(self, timeout: float) -> str:
        """Ended with status 1 within ``timeout``: its one line on stderr."""
        assert self.wait(timeout), f"mfd {self.args[0]} did not end within {timeout:g} s"
        assert self.rc == 1, f"mfd {self.args[0]}: exit {self.rc}: {self.err}"
        return only_line(self.err)


def mfd_status(qmp: str) -> str | None:
    """query-migrate's status on an mfd monitor; None while it does not answer."""
    try:
        return monitor_command(qmp, "query-migrate", None, 2.0)["return"]["status"]
    except (MfdError, KeyError):
        return None


# ---------------------------------------------------------------------------- files


def shm_entries() -> set[str]:
    """mfd's files in /dev/shm; a benchmark running beside the suite (mfd-bench*) is not
    ours to judge."""
    return {n for n in os.listdir("/dev/shm")
            if n.startswith("mfd-") and not n.startswith("mfd-bench")}


def qemu_temp_files() -> set[str]:
    """Socket dirs and /dev/shm RAM copies mfd's QEMU driver creates (all mfd-qemu-*)."""
    found = set()
    for d in {"/dev/shm", tempfile.gettempdir()}:
        if os.path.isdir(d):
            found |= {os.path.join(d, n) for n in os.listdir(d) if n.startswith(TMP_PREFIX)}
    return found


def unzstd(path: Path, out: Path) -> Path:
    """``path`` decompressed to ``out`` (once)."""
    if not out.exists():
        data = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
        out.write_bytes(data)
    return out


def zero_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def source_copy(image: Path, tmp_path: Path) -> Path:
    """QEMU maps its RAM file shared: each source gets its own copy of the image."""
    src = tmp_path / "src.bin"
    shutil.copyfile(image, src)
    return src


def pages_of(path: Path | str) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8).reshape(-1, PAGE)


def assert_same_ram(expected: Path | str, got: Path | str) -> None:
    a, b = pages_of(expected), pages_of(got)
    assert a.shape == b.shape
    bad = np.flatnonzero((a != b).any(axis=1))
    assert len(bad) == 0, f"{len(bad)} page(s) differ, first at {[hex(p * PAGE) for p in bad[:8]]}"


# ---------------------------------------------------------------------------- processes


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name: state, ppid, ... (OSError if gone)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (an mfd process's: its forked channels)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if int(_stat(name)[1]) == pid:
                    out.append(int(name))
    return out


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` as {pid: starttime} (starttime tells a reused pid
    apart)."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                fields = _stat(name)
                stats[int(name)] = (int(fields[1]), fields[19])  # ppid, starttime
    out, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for p, (ppid, start) in stats.items():
            if ppid == parent and p not in out:
                out[p] = start
                todo.append(p)
    return out


def alive(pid: int, start: str | None = None) -> bool:
    """Running, not a zombie (and, given ``start``, the process that started then)."""
    try:
        fields = _stat(pid)
    except OSError:
        return False
    return fields[0] != "Z" and (start is None or fields[19] == start)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rss_anon_kib(pid: int) -> int:
    """Private (anonymous) resident memory: RSS without the shared RAM mappings."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------- guests


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


def running(name: str) -> bool:
    """The guest runs unthrottled and writes."""
    try:
        with control.GuestClient(name, timeout=5) as g:
            a = g.query()
            time.sleep(0.1)
            b = g.query()
        return (a["status"] == b["status"] == "running" and b["cpu-throttle-percentage"] == 0
                and b["pages-written"] > a["pages-written"])
    except MfdError:
        return False


def quit_guest(name: str) -> None:
    """``mfd guest --name NAME --quit``, if it runs; its block files go with it."""
    if os.path.exists(control.socket_path(name)):
        run_mfd("guest", "--name", name, "--quit", timeout=30)
    control.release(name)
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"mfd-{name}-")]
    assert left == [], left


K = 200  # exits a KVM guest runs after the switchover, in the determinism checks


def guest_state(g: control.GuestClient) -> dict:
    """What decides a KVM guest's future: its RAM (blake3), counter, exits and registers."""
    st = g.query()
    ram = Path(st["blocks"][0]["path"]).read_bytes()
    w = st["workload"]
    return {"ram": blake3.blake3(ram).hexdigest(), "counter": st["pages-written"],
            "exits": w["exits"], "regs": w["regs"], "sregs": w["sregs"]}


def parked_state(g: control.GuestClient) -> dict:
    """The state once the vCPU parked after its run-exits."""
    until(lambda: g.query()["status"] == "paused", "the vCPU did not park", 60)
    return guest_state(g)


def run_exits(g: control.GuestClient, count: int) -> dict:
    g.execute("run-exits", count=count)
    return parked_state(g)


# A live save over many rounds: throttled hard until it converges.
MANY_ROUNDS = MigrationParameters(downtime_limit=5, auto_converge=True, cpu_throttle_initial=90,
                                  cpu_throttle_increment=9)


def live_save_matches(tmp_path: Path, guests: Guests, guest_args: list[str],
                      params: MigrationParameters, options: SaveOptions, min_rounds: int = 2,
                      ram: str = "32M") -> bool:
    """Live-save a writing guest; True when the file restores to its final RAM exactly."""
    name, g = guests.start(ram, *guest_args)
    tmp_path.mkdir(exist_ok=True)
    mig = tmp_path / "live.mig"
    res = mfd.save(str(mig), guest=name, params=params, options=options)
    assert res.status == "completed" and res.rounds >= min_rounds
    status = g.query()
    assert status["status"] == "paused"  # stopped for switchover, like QEMU's postmigrate
    (block,) = status["blocks"]
    out = tmp_path / "out.bin"
    try:
        mfd.restore(str(mig), images={"mem": str(out)})
    except mfd.MfdError as e:  # the trailer's digest may already catch it
        assert "does not match the digest" in str(e)
        return False
    final = Path(block["path"]).read_bytes()
    g.quit()
    return out.read_bytes() == final


# ---------------------------------------------------------------------------- postcopy

POSTCOPY_DIRTY = ("--dirty-rate", "200M")  # 4x the link below
POSTCOPY_LINK = ("--max-bandwidth", "50M")


def postcopy_pair(guests: Guests, *incoming_args: str
                  ) -> tuple[str, str, int, subprocess.Popen]:
    """A guest writing faster than POSTCOPY_LINK, and ``mfd incoming --postcopy-ram``
    listening for it: source name, destination name, port, the incoming process."""
    src, _ = guests.start("64M", *POSTCOPY_DIRTY)
    dst = f"{src}d"
    guests.adopt(dst)
    port = free_ports(1)
    inc = start_incoming(port, "--guest", dst, "--postcopy-ram", "--timeout", "60",
                         *incoming_args)
    return src, dst, port, inc


def resumed_to_the_end(src_qmp: str, port: int, mig: subprocess.Popen,
                       inc: subprocess.Popen, dst: str) -> str:
    """QMP migrate with resume on the paused source (the push's cap lifted, as
    migrate-set-parameters can while migrating): both ends complete, RAM verified, the
    guest running at the destination. Both ends' stderr, the source's first."""
    assert monitor_command(src_qmp, "migrate-set-parameters",
                           {"max-postcopy-bandwidth": 0}, 5.0) == {"return": {}}
    assert monitor_command(src_qmp, "migrate", {"uri": f"tcp:127.0.0.1:{port}",
                                                "resume": True}, 5.0) == {"return": {}}
    rc, _, src_err = finish(mig)
    assert rc == 0 and "postcopy paused" in src_err, src_err
    rc, out, err = finish(inc)
    assert rc == 0 and "RAM verified equal" in out, err
    assert running(dst)
    return src_err + err


def hostile_source(action: Callable, expect: str, channels: int = 1,
                   compression: str = "none", tmp_path: Path | None = None) -> None:
    """A destination expecting ``channels`` channels; ``action(src)`` (a
    ``netutil.FakeSource``) says something wrong on its port; it fails within seconds with
    one line holding ``expect``, leaving nothing."""
    from netutil import FakeSource

    before = shm_entries()
    port = free_ports(1)
    out = (tmp_path or Path("/tmp")) / f"hostile-{port}.bin"
    inc = start_incoming(port, "--image", f"mem={out}", "--multifd-channels", str(channels),
                         "--multifd-compression", compression)
    src = FakeSource(port)
    try:
        action(src)
        rc, _, err = finish(inc, 30)
    finally:
        src.close()
        if inc.poll() is None:
            inc.kill()
    assert rc == 1
    line = one_line(err)
    assert line.startswith("mfd: incoming migration failed:") and expect in line, line
    assert not out.exists()
    assert shm_entries() == before
