"""The machine a benchmark ran on, recorded with every result, and the room it needs.

CPU count and model, kernel, Python and library versions, QEMU, loopback TCP settings, the
git state, and a digest of mfd's sources taken at the start and the end of the run (others
editing the tree mid-run would mix two programs' figures).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from typing import Any

import blake3
import numpy as np

from mfd.errors import UsageError
from mfd.units import human

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def fs_of(path: str) -> dict[str, str]:
    """Mount point, device and type of the filesystem holding ``path`` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best = {"mount": "", "device": "?", "fstype": "?"}
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best["mount"]):
                best = {"mount": mnt, "device": dev, "fstype": fstype}
    return best


def git_state() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--", ".."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head or None, "mfd_dirty": bool(dirty) if head else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "mfd_dirty": None}


def mfd_sources_digest() -> str:
    """blake3 over mfd's Python sources."""
    root = os.path.dirname(HERE)
    h = blake3.blake3()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(d, name)
                h.update(os.path.relpath(path, root).encode() + b"\0")
                with contextlib.suppress(OSError), open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def qemu_info() -> dict[str, Any]:
    """The qemu-system-x86_64 on PATH: binary, version, usable (>= 9.0, see mfd.bench.qemu)."""
    from mfd.bench.qemu import qemu_binary, qemu_version

    ver = qemu_version()
    return {"binary": shutil.which("qemu-system-x86_64"),
            "version": ".".join(map(str, ver)) if ver else None,
            "usable": qemu_binary() is not None}


def net_settings() -> dict[str, str]:
    out = {}
    for name in ("net/ipv4/tcp_rmem", "net/ipv4/tcp_wmem", "net/core/rmem_max",
                 "net/core/wmem_max", "net/ipv4/tcp_congestion_control",
                 "net/ipv4/tcp_available_ulp"):  # "tls" there: the kernel can do TLS
        with contextlib.suppress(OSError), open(f"/proc/sys/{name}") as f:
            out[name.replace("/", ".")] = f.read().strip()
    with contextlib.suppress(OSError), open("/sys/class/net/lo/mtu") as f:
        out["lo.mtu"] = f.read().strip()
    return out


def environment(qemu: dict[str, Any]) -> dict[str, Any]:
    import mfd

    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "mfd": mfd.__version__}
    for mod, name in (("zmq", "pyzmq"), ("blake3", "blake3"), ("zstandard", "zstandard"),
                      ("orjson", "orjson"), ("matplotlib", "matplotlib")):
        try:
            versions[name] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[name] = None
    import ssl

    versions["openssl"] = ssl.OPENSSL_VERSION
    with contextlib.suppress(ImportError, AttributeError):
        import zmq

        versions["libzmq"] = zmq.zmq_version()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "machine": platform.machine(),
        "mem_total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "versions": versions,
        "qemu": qemu,
        "net": net_settings(),
        "git": git_state(),
        "mfd_sources_blake3": mfd_sources_digest(),
    }


def mem_available() -> int:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def require_room(checks: list[tuple[str, int, int, str]], hint: str) -> None:
    """Stop before starting when a place lacks room: ``checks`` are (place, free bytes, bytes
    needed, what for); a free figure of 0 means unknown and is not checked."""
    problems = [f"{place} has {human(free)} free, the benchmark needs about {human(need)} "
                f"({why})" for place, free, need, why in checks if free and free < need]
    if problems:
        raise UsageError("mfd bench: not enough room: " + "; ".join(problems) + f". {hint}")
