"""A private libvirtd for tests: started here as root, stopped by its pid.

There is no systemd, and the machine's own /etc/libvirt, /run/libvirt and /var/lib/libvirt
are not the tests' to change: libvirtd runs in a mount namespace of its own
(``unshare --mount``) where those directories are bind mounts of a temporary directory,
with a copy of the installed configuration plus what the tests need in qemu.conf
(``security_driver = "none"``, QEMU as root, its stdio to files rather than virtlogd, no
per-domain mount namespace, file-backed guest RAM under the temporary directory). virsh
reaches it through its socket there. QEMU processes it starts are stopped with ``virsh
destroy``; one still alive at the end is killed by the pid libvirt recorded for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

QEMU_CONF = """
security_driver = "none"
user = "root"
group = "root"
stdio_handler = "file"
namespaces = [ ]
remember_owner = 0
memory_backing_dir = "{ram}"
"""
BINDS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
         "log": "/var/log/libvirt", "cache": "/var/cache/libvirt"}
START_TIMEOUT = 30.0


def missing() -> str | None:
    """Why libvirt cannot run here, or None."""
    if os.geteuid() != 0:
        return "libvirtd needs root"
    for tool in ("libvirtd", "virsh", "unshare"):
        if shutil.which(tool) is None:
            return f"no {tool} (.ci/setup installs libvirt 11 from bookworm-backports)"
    if not Path("/etc/libvirt/qemu.conf").is_file():
        return "libvirt's QEMU driver is not installed"
    return None


class Libvirtd:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mfd-lv-"))
        self.ram = self.root / "ram"
        for name in BINDS:
            (self.root / name).mkdir()
        self.ram.mkdir()
        shutil.copytree("/etc/libvirt", self.root / "etc", dirs_exist_ok=True)
        with open(self.root / "etc" / "qemu.conf", "a") as f:
            f.write(QEMU_CONF.format(ram=self.ram))
        mounts = "; ".join(f"mkdir -p {dst} && mount --bind {self.root / src} {dst}"
                           for src, dst in BINDS.items())
        self.log = open(self.root / "libvirtd.log", "wb")  # noqa: SIM115 (closed in stop)
        # sh execs libvirtd: the pid is libvirtd's
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
             f"{mounts}; exec libvirtd"], stdout=self.log, stderr=self.log,
            stdin=subprocess.DEVNULL, start_new_session=True)
        self.uri = f"qemu:///system?socket={self.root / 'run' / 'libvirt-sock'}"
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited {self.proc.returncode}: {self.log_tail()}")
            if (self.root / "run" / "libvirt-sock").exists() and subprocess.run(
                    ["virsh", "-c", self.uri, "version"], capture_output=True,
                    timeout=10).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"libvirtd not ready in {START_TIMEOUT:g} s: {self.log_tail()}")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "libvirtd.log").read_text(errors="replace")[-2000:]
        return ""

    def virsh(self, *args: str | Path, timeout: float = 60) -> str:
        r = subprocess.run(["virsh", "-c", self.uri, *map(str, args)], capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(map(str, args))}: {r.stderr.strip()}")
        return r.stdout

    def ram_file(self, domain: str, block: str = "pc.ram") -> Path:
        """The running domain's RAM block, a file of its memory backing (share=on)."""
        domid = self.virsh("domid", domain).strip()
        return self.ram / "libvirt" / "qemu" / f"{domid}-{domain}" / block

    def _qemu_pids(self) -> list[int]:
        """QEMUs this libvirtd started and still running (their command line names our
        directory: a stale pid file's pid may be someone else's by now)."""
        pids = []
        for f in (self.root / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(f.read_text().strip())
                if str(self.root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                for name in self.virsh("list", "--name", timeout=10).split():
                    self.virsh("destroy", name, timeout=30)
        for pid in self._qemu_pids():  # a domain destroy could not end
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)
