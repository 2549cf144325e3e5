#!/usr/bin/env python3
"""mfd's mapped-ram file save/restore against QEMU 10 and the disk's own speed, in one run.

::

    python bench/bench_file.py [--size 2G] [--repeat 3] [--channels 1,2,4] [--dir DIR]
                               [--out results.json] [--no-qemu] [--no-direct-io]

The RAM image (4 KiB pages in runs of 16: 50% zero, 25% random, 25% compressible text, seed 1,
see :mod:`mfd.ramimage`) is generated once into a fresh work directory on the real disk
(default under /var/tmp). Then, for every configuration, one warm-up run (not counted) and
``--repeat`` counted runs, interleaved: config A rep 1, B rep 1, ..., then A rep 2, ...

* mfd save / restore with each channel count, buffered and direct-io, timed in this process
  as the wall time of the ``mfd.save()`` / ``mfd.restore()`` call (it includes spawning the
  channel processes, like QEMU's time includes starting its threads);
* QEMU mapped-ram save / restore with no multifd, multifd 1, 2, 4 and 4 + direct-io, timed as
  :mod:`mfd.qemu` does (QMP ``migrate`` / ``migrate-incoming`` until ``completed``, polled
  every 2 ms; QEMU's start is not included). mfd's save ends with fdatasync, QEMU's does not,
  so a second row adds the time to fdatasync QEMU's file right after its save;
* yardsticks: ``dd bs=1M conv=fsync`` of the image to the same disk, a cold ``dd`` read of
  the image, ``cp`` of the image into /dev/shm.

Restores go to fresh files in /dev/shm (like QEMU's memory-backend-file there) and every one
is checked against the image (blake3, outside the timed region). "cold" evicts the .mig file
from the page cache first (fsync + POSIX_FADV_DONTNEED); "warm" reads it once first.

Prints a plain-text table and the target checks (save <= 0.5 x QEMU's best median save,
restore <= 1.0 x QEMU's best median restore, warm and cold), and writes every raw run with
the environment to JSON (default bench/results/bench_file.json). A failing configuration is
reported as FAILED with its error and the benchmark goes on. Everything it created (work
directory, /dev/shm files) is removed at the end, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
QEMU_TIMEOUT = 600.0  # per QMP wait; direct-io saves of 2 GiB take ~10 s on the reference VM
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "bench_file.json")


# --------------------------------------------------------------------------- small helpers


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 256M, 2G)")
    mult = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[m[2].upper()]
    size = int(m[1]) * mult
    if size <= 0 or size % PAGE:
        raise argparse.ArgumentTypeError(f"size {size} is not a positive multiple of {PAGE}")
    return size


def parse_channels(text: str) -> list[int]:
    try:
        chans = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad channel list {text!r} (e.g. 1,2,4)") from None
    if not chans or any(not 1 <= c <= 255 for c in chans):
        raise argparse.ArgumentTypeError(f"channels must be in 1..255, got {text!r}")
    return chans


def human(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


def unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def evict(path: str) -> None:
    """Drop ``path`` from the page cache: fsync (only clean pages can go), then DONTNEED."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str) -> None:
    """Read ``path`` once so it is in the page cache."""
    buf = bytearray(8 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def fdatasync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def digest(path: str) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if hasattr(h, "update_mmap"):
        h.update_mmap(path)
    else:  # older blake3-py
        with open(path, "rb") as f:
            while chunk := f.read(16 * MiB):
                h.update(chunk)
    return h.hexdigest()


def differing_pages(a: str, b: str, size: int) -> int:
    """Number of 4 KiB pages that differ (only for the error message of a failed check)."""
    x = np.memmap(a, dtype=np.uint64, mode="r", shape=(size // 8,))
    y = np.memmap(b, dtype=np.uint64, mode="r", shape=(size // 8,))
    step = 64 * MiB // 8
    bad = 0
    for i in range(0, size // 8, step):
        d = (x[i : i + step] != y[i : i + step]).reshape(-1, PAGE // 8).any(axis=1)
        bad += int(d.sum())
    return bad


def sh(argv: list[str]) -> float:
    """Run a command, return its wall time; raise with its stderr tail if it fails."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode:
        tail = p.stderr.strip().splitlines()
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: "
                           f"{tail[-1] if tail else ''}")
    return dt


# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def fs_of(path: str) -> dict[str, str]:
    """Mount point, device and type of the filesystem holding ``path`` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best = {"mount": "?", "device": "?", "fstype": "?"}
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best["mount"].replace("?", "")):
                best = {"mount": mnt, "device": dev, "fstype": fstype}
    return best


def git_state() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--", "mfd"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head or None, "mfd_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "mfd_dirty": None}


def mfd_sources_digest() -> str:
    """blake3 over mfd's Python sources: a change during the run (others editing the tree)
    makes the figures of the two halves incomparable, so the report warns about it."""
    import mfd

    root = os.path.dirname(os.path.abspath(mfd.__file__))
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


def environment(qemu: dict[str, Any]) -> dict[str, Any]:
    import mfd

    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "mfd": mfd.__version__}
    for mod in ("zmq", "blake3", "zstandard", "orjson"):
        try:
            versions[mod if mod != "zmq" else "pyzmq"] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = None
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
        "git": git_state(),
        "mfd_sources_blake3": mfd_sources_digest(),
    }


# --------------------------------------------------------------------------- configurations


@dataclass
class Config:
    key: str
    kind: str  # "save", "restore warm", "restore cold", "yardstick"
    tool: str  # "mfd", "qemu", "dd", "cp"
    label: str
    params: dict[str, Any]
    fn: Callable[[], dict[str, Any]]
    runs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class Row:
    kind: str
    tool: str
    label: str
    key: str
    seconds: list[float]
    error: str | None = None
    note: str = ""

    def stats(self, size: int) -> dict[str, Any]:
        if not self.seconds:
            return {"n": 0}
        med = statistics.median(self.seconds)
        return {"n": len(self.seconds), "min": min(self.seconds), "median": med,
                "max": max(self.seconds), "mib_s": size / MiB / med if med > 0 else None}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size: int = args.size
        self.workdir = ""
        self.shmdir = ""
        self.notes: list[str] = []
        self.setup: dict[str, Any] = {}
        self.qemu_ok = False

    # ------------------------------------------------------------------ paths

    def p(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def s(self, name: str) -> str:
        return os.path.join(self.shmdir, name)

    # ------------------------------------------------------------------ space

    def check_space(self, parent: str) -> None:
        """Disk: image + 2 restore sources + 1 save target (nonzero pages each) + the dd copy
        (all of it). /dev/shm: one RAM copy at a time (QEMU's RAM, a restore target, cp)."""
        a = self.args
        nonzero = 1.0 - a.zero
        disk_need = int(self.size * (1 + 4 * nonzero) + 512 * MiB)
        st = os.statvfs(parent)
        disk_free = st.f_bavail * st.f_frsize
        shm = os.statvfs("/dev/shm")
        shm_free = shm.f_bavail * shm.f_frsize
        shm_need = int(self.size * 1.1 + 64 * MiB)
        problems = []
        if disk_free < disk_need:
            problems.append(f"{parent} has {human(disk_free)} free, the benchmark needs about "
                            f"{human(disk_need)} for a {human(self.size)} image (image, two "
                            f"restore sources, one save target and the dd copy)")
        if shm_free < shm_need:
            problems.append(f"/dev/shm has {human(shm_free)} free, the benchmark needs about "
                            f"{human(shm_need)} (one RAM-sized file at a time)")
        if problems:
            raise SystemExit("bench_file: not enough space:\n  " + "\n  ".join(problems)
                             + "\nUse --dir on a larger disk or a smaller --size.")
        self.setup["space"] = {"disk_free": disk_free, "disk_need": disk_need,
                               "shm_free": shm_free, "shm_need": shm_need}

    # ------------------------------------------------------------------ setup

    def prepare(self) -> None:
        from mfd.ramimage import generate

        a = self.args
        parent = os.path.abspath(a.dir or "/var/tmp")
        os.makedirs(parent, exist_ok=True)
        self.check_space(parent)
        self.workdir = tempfile.mkdtemp(prefix="mfd-bench-", dir=parent)
        self.shmdir = tempfile.mkdtemp(prefix="mfd-bench-", dir="/dev/shm")
        if "," in self.workdir or "," in self.shmdir:
            raise SystemExit(f"bench_file: QEMU file: URIs cannot contain ',': {self.workdir}")
        fs = fs_of(self.workdir)
        self.setup["workdir"] = self.workdir
        self.setup["workdir_fs"] = fs
        self.setup["shmdir"] = self.shmdir
        if fs["fstype"] in ("tmpfs", "ramfs"):
            self.notes.append(f"WARNING: the work dir {self.workdir} is on {fs['fstype']}, "
                              "not a disk: the disk is not being measured")
        log(f"work dir {self.workdir} ({fs['fstype']} on {fs['device']}), shm dir "
            f"{self.shmdir}")

        self.img = self.p("image.ram")
        t0 = time.perf_counter()
        kinds = generate(self.img, self.size, seed=1, zero=a.zero, random=a.random, run=16)
        fdatasync_path(self.img)
        gen_s = time.perf_counter() - t0
        self.img_digest = digest(self.img)
        self.setup["image"] = {"path": self.img, "size": self.size, "pages": kinds,
                               "seed": 1, "run": 16, "zero": a.zero, "random": a.random,
                               "allocated": allocated(self.img), "blake3": self.img_digest,
                               "generate_seconds": gen_s}
        log(f"image {human(self.size)}: {kinds} pages, {human(allocated(self.img))} allocated "
            f"(zero pages are holes), generated in {gen_s:.1f} s")

        # restore sources: one file written by mfd, one by QEMU, flushed so "cold" can evict
        self.mfd_src = self.p("mfd-src.mig")
        self.qemu_src = self.p("qemu-src.mig")
        self.src_error: dict[str, str] = {}
        try:
            self.mfd_save_into(self.mfd_src, 2, False)
            fdatasync_path(self.mfd_src)
            self.setup["mfd_src"] = self.file_info(self.mfd_src, "mfd save, 2 channels")
        except Exception as e:
            self.src_error["mfd"] = f"could not create mfd's restore source: {one_line(e)}"
            log(self.src_error["mfd"])
        if self.qemu_ok:
            try:
                self.qemu_save_into(self.qemu_src, 4, False)
                fdatasync_path(self.qemu_src)
                self.setup["qemu_src"] = self.file_info(self.qemu_src,
                                                        "QEMU mapped-ram save, multifd 4")
            except Exception as e:
                self.src_error["qemu"] = f"could not create QEMU's restore source: {one_line(e)}"
                log(self.src_error["qemu"])
        for k in ("mfd_src", "qemu_src"):
            if k in self.setup:
                i = self.setup[k]
                log(f"{k}: {i['made_by']}: {human(i['size'])} apparent, "
                    f"{human(i['allocated'])} allocated")

    def file_info(self, path: str, made_by: str) -> dict[str, Any]:
        return {"path": path, "made_by": made_by, "size": os.path.getsize(path),
                "allocated": allocated(path)}

    def cleanup(self) -> None:
        for d in (self.workdir, self.shmdir):
            if d:
                shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------ mfd

    def guest_ram(self, ram: str) -> str:
        """A fresh copy of the image in /dev/shm, as guest RAM for one save (untimed).

        "sparse": the image's zero pages are holes, as RAM a guest never touched;
        "allocated": every page is in memory, zero pages written as zeros (freed memory).
        """
        path = self.s("guest.ram")
        unlink(path)
        fi = os.open(self.img, os.O_RDONLY)
        fo = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if ram == "allocated":
                os.posix_fallocate(fo, 0, self.size)
            else:
                os.ftruncate(fo, self.size)
            pos = 0
            while pos < self.size:  # copy only the image's data extents
                try:
                    start = os.lseek(fi, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(fi, start, os.SEEK_HOLE)
                while start < end:
                    buf = os.pread(fi, min(8 * MiB, end - start), start)
                    os.pwrite(fo, buf, start)
                    start += len(buf)
                pos = end
        finally:
            os.close(fi)
            os.close(fo)
        return path

    def mfd_save_into(self, target: str, channels: int, direct_io: bool,
                      ram: str = "sparse") -> dict[str, Any]:
        import mfd

        params = mfd.MigrationParameters(multifd_channels=channels, direct_io=direct_io)
        source = self.guest_ram(ram)
        try:
            t0 = time.perf_counter()
            r = mfd.save(target, images={"mem": source}, params=params)
            dt = time.perf_counter() - t0
        finally:
            unlink(source)
        if r.status != "completed":
            raise RuntimeError(f"mfd.save returned status {r.status!r}")
        return {"seconds": dt, "mfd_total_time_ms": r.total_time_ms,
                "mfd_setup_time_ms": r.setup_time_ms, "normal_pages": r.normal_pages,
                "zero_pages": r.zero_pages, "transferred": r.transferred}

    def timed_save(self, save_into: Callable[..., dict[str, Any]], channels: int,
                   direct_io: bool, ram: str) -> dict[str, Any]:
        """One counted save (mfd's or QEMU's) into a fresh file on the disk, removed after."""
        target = self.p("save.mig")
        unlink(target)
        os.sync()
        try:
            out = save_into(target, channels, direct_io, ram)
            out["file_size"] = os.path.getsize(target)
            out["file_allocated"] = allocated(target)
        finally:
            unlink(target)
        return out

    def source(self, src: str) -> str:
        """The restore source written by ``src`` ("mfd" or "qemu")."""
        if src in self.src_error:
            raise RuntimeError(self.src_error[src])
        return self.mfd_src if src == "mfd" else self.qemu_src

    def timed_restore(self, restore_into: Callable[[str, str, int, bool], dict[str, Any]],
                      src: str, channels: int, direct_io: bool, cold: bool) -> dict[str, Any]:
        """One counted restore (mfd's or QEMU's) of ``src``'s file into a fresh /dev/shm
        file, checked against the image outside the timed region, removed after."""
        path = self.source(src)
        out = self.s("restore.ram")
        unlink(out)
        os.sync()
        (evict if cold else warm)(path)
        try:
            res = restore_into(path, out, channels, direct_io)
            self.verify(out)
        finally:
            unlink(out)
        return {**res, "verified": True}

    def mfd_restore_into(self, path: str, out: str, channels: int,
                         direct_io: bool) -> dict[str, Any]:
        import mfd

        t0 = time.perf_counter()
        r = mfd.restore(path, images={"mem": out}, channels=channels, direct_io=direct_io)
        dt = time.perf_counter() - t0
        return {"seconds": dt, "mfd_seconds": r.seconds, "bytes_read": r.bytes_read,
                "mfd_trailer_verified": r.verified}

    # ------------------------------------------------------------------ QEMU

    def qemu_save_into(self, target: str, multifd: int, direct_io: bool,
                       ram: str = "sparse") -> dict[str, Any]:
        """As mfd.qemu.qemu_save (the guest RAM a tmpfs file, made untimed; QMP migrate until
        completed, timed), plus an fdatasync of the file right after the migration."""
        from mfd.qemu import QemuMachine

        source = self.guest_ram(ram)
        try:
            with QemuMachine(source, self.size, timeout=QEMU_TIMEOUT) as m:
                m.set_migration(mapped_ram=True, multifd_channels=multifd, direct_io=direct_io)
                t0 = time.perf_counter()
                info = m.migrate(f"file:{target}")
                dt = time.perf_counter() - t0
                t1 = time.perf_counter()
                fdatasync_path(target)
                sync_s = time.perf_counter() - t1
        finally:
            unlink(source)
        ram_info = info.get("ram", {})
        return {"seconds": dt, "fdatasync_seconds": sync_s,
                "qemu_total_time_ms": info.get("total-time"),
                "qemu_setup_time_ms": info.get("setup-time"),
                "normal_pages": ram_info.get("normal"), "zero_pages": ram_info.get("duplicate")}

    def qemu_restore_into(self, path: str, out: str, multifd: int,
                          direct_io: bool) -> dict[str, Any]:
        """As mfd.qemu.qemu_restore (fresh zeroed tmpfs RAM file, QMP migrate-incoming until
        completed), with direct-io settable."""
        from mfd.qemu import QemuMachine

        with open(out, "wb") as f:
            os.ftruncate(f.fileno(), self.size)
        with QemuMachine(out, self.size, incoming=True, timeout=QEMU_TIMEOUT) as m:
            m.set_migration(mapped_ram=True, multifd_channels=multifd, direct_io=direct_io)
            t0 = time.perf_counter()
            m.migrate_incoming(f"file:{path}")
            return {"seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ yardsticks

    def dd_write(self) -> dict[str, Any]:
        target = self.p("dd.ram")
        unlink(target)
        os.sync()
        try:
            dt = sh(["dd", f"if={self.img}", f"of={target}", "bs=1M", "conv=fsync",
                     "status=none"])
        finally:
            unlink(target)
        return {"seconds": dt}

    def dd_read_cold(self) -> dict[str, Any]:
        os.sync()
        evict(self.img)
        dt = sh(["dd", f"if={self.img}", "of=/dev/null", "bs=1M", "status=none"])
        return {"seconds": dt}

    def cp_shm(self) -> dict[str, Any]:
        target = self.s("cp.ram")
        unlink(target)
        os.sync()
        try:
            dt = sh(["cp", self.img, target])
        finally:
            unlink(target)
        return {"seconds": dt}

    # ------------------------------------------------------------------ checks

    def verify(self, out: str) -> None:
        if os.path.getsize(out) != self.size:
            raise RuntimeError(f"restored RAM has {os.path.getsize(out)} bytes, expected "
                               f"{self.size}")
        if digest(out) != self.img_digest:
            bad = differing_pages(self.img, out, self.size)
            raise RuntimeError(f"restored RAM differs from the image in {bad} pages")

    # ------------------------------------------------------------------ configs

    def configs(self) -> list[Config]:
        a = self.args
        dios = [False] if a.no_direct_io else [False, True]
        out: list[Config] = []

        def dio_name(d: bool) -> str:
            return "direct-io" if d else "buffered"

        out.append(Config("dd-write", "yardstick", "dd", "dd bs=1M conv=fsync -> disk", {},
                          self.dd_write))
        out.append(Config("dd-read-cold", "yardstick", "dd", "dd read of image, cold", {},
                          self.dd_read_cold))
        out.append(Config("cp-shm", "yardstick", "cp", "cp image -> /dev/shm", {}, self.cp_shm))
        qemu_mf = [(0, False), (1, False), (2, False), (4, False)]
        if not a.no_direct_io:
            qemu_mf.append((4, True))

        def qname(mf: int, d: bool) -> str:
            return ("mapped-ram" + (f" multifd {mf}" if mf else " (no multifd)")
                    + (" direct-io" if d else ""))

        # The guest RAM both tools save: sparse (zero pages never touched, the image)
        # for every config; allocated (zero pages written) for the buffered ones.
        for ram in ("sparse", "allocated"):
            tag = "" if ram == "sparse" else ", allocated RAM"
            for ch in a.channels:
                for d in dios if ram == "sparse" else [False]:
                    out.append(Config(
                        f"mfd-save-{ch}-{dio_name(d)}-ram-{ram}", "save", "mfd",
                        f"{ch} ch {dio_name(d)}{tag}",
                        {"channels": ch, "direct_io": d, "ram": ram},
                        lambda ch=ch, d=d, ram=ram:
                            self.timed_save(self.mfd_save_into, ch, d, ram)))
            if self.qemu_ok:
                for mf, d in qemu_mf if ram == "sparse" else qemu_mf[:4]:
                    out.append(Config(
                        f"qemu-save-{mf}{'-dio' if d else ''}-ram-{ram}", "save", "qemu",
                        qname(mf, d) + tag, {"multifd_channels": mf, "direct_io": d, "ram": ram},
                        lambda mf=mf, d=d, ram=ram:
                            self.timed_save(self.qemu_save_into, mf, d, ram)))
        # Both tools restore the same files: which file (where its blocks lie on the disk)
        # matters as much as which tool, and only mfd's file has digests to verify.
        sources = ["mfd", "qemu"] if self.qemu_ok else ["mfd"]
        for cold in (False, True):
            kind = "restore cold" if cold else "restore warm"
            temp = "cold" if cold else "warm"
            for src in sources:
                for ch in a.channels:
                    for d in dios:
                        out.append(Config(
                            f"mfd-restore-{temp}-{ch}-{dio_name(d)}-src-{src}", kind, "mfd",
                            f"{ch} ch {dio_name(d)}, {SOURCE_NAME[src]}",
                            {"channels": ch, "direct_io": d, "cold": cold, "source": src},
                            lambda src=src, ch=ch, d=d, cold=cold: self.timed_restore(
                                self.mfd_restore_into, src, ch, d, cold)))
            if self.qemu_ok:
                for src in sources:
                    for mf, d in qemu_mf if src == "qemu" else qemu_mf[3:]:
                        out.append(Config(
                            f"qemu-restore-{temp}-{mf}{'-dio' if d else ''}-src-{src}", kind,
                            "qemu", f"{qname(mf, d)}, {SOURCE_NAME[src]}",
                            {"multifd_channels": mf, "direct_io": d, "cold": cold,
                             "source": src},
                            lambda src=src, mf=mf, d=d, cold=cold: self.timed_restore(
                                self.qemu_restore_into, src, mf, d, cold)))
        return out

    # ------------------------------------------------------------------ the run

    def run(self, configs: list[Config]) -> None:
        reps = self.args.repeat
        for rep in range(reps + 1):
            tag = "warm-up" if rep == 0 else f"rep {rep}/{reps}"
            for c in configs:
                if c.error is not None:
                    continue  # failed before: reported as FAILED, not retried
                t0 = time.time()
                load = os.getloadavg()[0]  # other work on the machine skews the figures
                try:
                    res = c.fn()
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    c.error = one_line(e)
                    c.runs.append({"rep": rep, "warmup": rep == 0, "ok": False,
                                   "error": c.error, "traceback": traceback.format_exc(),
                                   "started": t0, "loadavg1": load})
                    log(f"[{tag}] {c.key}: FAILED: {c.error}")
                    continue
                c.runs.append({"rep": rep, "warmup": rep == 0, "ok": True, "started": t0,
                               "loadavg1": load, **res})
                extra = (f" (+fdatasync {res['fdatasync_seconds']:.3f} s)"
                         if "fdatasync_seconds" in res else "")
                log(f"[{tag}] {c.key}: {res['seconds']:.3f} s{extra}")


# --------------------------------------------------------------------------- reporting


def rows_of(configs: list[Config]) -> list[Row]:
    rows: list[Row] = []
    for c in configs:
        counted = [r for r in c.runs if r["ok"] and not r["warmup"]]
        rows.append(Row(c.kind, c.tool, c.label, c.key, [r["seconds"] for r in counted],
                        c.error))
    return rows


def best(rows: list[Row], kind: str, tool: str, size: int,
         pred: Callable[[Row], bool] = lambda r: True) -> Row | None:
    ok = [r for r in rows if r.kind == kind and r.tool == tool and r.error is None
          and r.seconds and pred(r)]
    return min(ok, key=lambda r: r.stats(size)["median"], default=None)


def table(rows: list[Row], size: int) -> str:
    head = ["kind", "tool", "config", "n", "min s", "median s", "max s", "MiB/s"]
    body = []
    for r in rows:
        st = r.stats(size)
        if r.error is not None:
            body.append([r.kind, r.tool, r.label, str(st["n"]), "FAILED: " + r.error])
        elif not st["n"]:
            body.append([r.kind, r.tool, r.label, "0", "no runs"])
        else:
            body.append([r.kind, r.tool, r.label, str(st["n"]), f"{st['min']:.3f}",
                         f"{st['median']:.3f}", f"{st['max']:.3f}", f"{st['mib_s']:.0f}"])
    widths = [len(h) for h in head]
    for b in body:
        for i, cell in enumerate(b[: 4 if len(b) == 5 else 8]):
            widths[i] = max(widths[i], len(cell))
    right = {3, 4, 5, 6, 7}

    def fmt(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if len(cells) == 5 and i == 4:
                out.append(cell)
            else:
                out.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(head), "  ".join("-" * w for w in widths)]
    prev = None
    for r, b in zip(rows, body, strict=True):
        if prev is not None and r.kind != prev:
            lines.append("")
        prev = r.kind
        lines.append(fmt(b))
    return "\n".join(lines)


def targets(rows: list[Row], size: int) -> tuple[list[str], dict[str, Any]]:
    """mfd's best median against QEMU's best median on the same input: saves of the same
    guest RAM (target: at most half), restores of the same file (target: no slower)."""
    lines: list[str] = []
    out: dict[str, Any] = {}
    checks = [("save", f"-ram-{ram}", f"save, {ram} RAM", f"save {ram}", 0.5)
              for ram in ("sparse", "allocated")]
    checks += [(f"restore {temp}", f"-src-{src}", f"restore {temp}, {SOURCE_NAME[src]}",
                f"restore {temp} {src} file", 1.0)
               for temp in ("warm", "cold") for src in ("qemu", "mfd")]
    for kind, suffix, what, key, target in checks:
        def same_input(r: Row, suffix: str = suffix) -> bool:
            return r.key.endswith(suffix)

        m = best(rows, kind, "mfd", size, same_input)
        q = best(rows, kind, "qemu", size, same_input)
        if not (m and q):
            lines.append(f"{what}: no comparison (mfd or QEMU has no successful run)")
            continue
        mm, qm = m.stats(size)["median"], q.stats(size)["median"]
        ratio = mm / qm
        ok = ratio <= target
        lines.append(f"{what}: mfd best median {mm:.3f} s ({m.label}) vs QEMU best median "
                     f"{qm:.3f} s ({q.label}) -> ratio {ratio:.2f} (target <= {target:g}) "
                     f"{'PASS' if ok else 'MISS'}")
        out[key] = {"mfd": mm, "mfd_config": m.key, "qemu": qm, "qemu_config": q.key,
                    "ratio": ratio, "target": target, "pass": ok}
    return lines, out


SOURCE_NAME = {"mfd": "mfd's file", "qemu": "QEMU's file"}

NOTES = [
    "mfd: wall time of the mfd.save()/mfd.restore() call in this process. It includes "
    "starting the channel processes, like QEMU's figure includes starting its threads; "
    "restore also includes parsing the file and mfd's own blake3 check of the restored RAM "
    "against the file's trailer.",
    "mfd's save ends with fdatasync (its trailer promises durability); QEMU's save calls no "
    "fsync. An fdatasync of QEMU's file right after it reports completed takes a few ms (see "
    "below; ext4 starts writeback when QEMU closes a file it truncated at open, "
    "auto_da_alloc), so the figures compare durable saves.",
    "Both tools save the same guest RAM: a fresh copy of the image in /dev/shm per run "
    "(untimed). 'sparse': the image's zero pages are holes, as in RAM a guest never touched; "
    "mfd's zero-page detection skips holes without reading them, QEMU reads every page (and "
    "so allocates the holes in tmpfs). 'allocated RAM': zero pages are written zeros, so "
    "both tools must read every page.",
    "QEMU: QMP migrate / migrate-incoming until query-migrate says completed (polled every "
    "2 ms), as mfd/qemu.py measures; QEMU's start (~0.04 s) is not included.",
    "Restores go to a fresh file in /dev/shm, removed after each run, and every restore is "
    "checked against the image with blake3 outside the timed region. warm: the .mig was read "
    "once before; cold: evicted first (fsync + POSIX_FADV_DONTNEED). Restore sources: a file "
    "saved by mfd (2 channels) and one saved by QEMU (multifd 4), restored by both tools. "
    "Restoring mfd's file, mfd also checks every chunk against its trailer's digests "
    "(QEMU checks nothing); QEMU's file has no digests, so there neither tool verifies.",
    "MiB/s is RAM size / median. Each config had one uncounted warm-up run; the counted runs "
    "were interleaved across configs. The image is sparse (zero pages are holes), so cp and "
    "dd read only its data; dd writes all of it.",
]


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"),
                    help="RAM image size (default 2G)")
    ap.add_argument("--repeat", type=int, default=3, help="counted runs per config (default 3)")
    ap.add_argument("--channels", type=parse_channels, default=[1, 2, 4],
                    help="mfd channel counts (default 1,2,4)")
    ap.add_argument("--dir", default=None,
                    help="parent of the work directory (default /var/tmp); a fresh "
                         "subdirectory is created there and removed at the end")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    ap.add_argument("--no-qemu", action="store_true", help="skip QEMU's save/restore")
    ap.add_argument("--no-direct-io", action="store_true", help="skip the direct-io configs")
    ap.add_argument("--zero", type=float, default=0.5, help=argparse.SUPPRESS)
    ap.add_argument("--random", type=float, default=0.25, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    from mfd.qemu import qemu_binary, qemu_version

    bench = Bench(args)
    ver = qemu_version()
    qemu = {"binary": shutil.which("qemu-system-x86_64"),
            "version": ".".join(map(str, ver)) if ver else None,
            "usable": qemu_binary() is not None}
    if args.no_qemu:
        bench.notes.append("QEMU skipped (--no-qemu).")
    elif qemu_binary() is None:
        bench.notes.append("QEMU not compared: qemu-system-x86_64 >= 9.0 not found "
                           f"(found {qemu['version']}).")
    else:
        bench.qemu_ok = True
    env = environment(qemu)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    configs: list[Config] = []
    interrupted = False
    try:
        bench.prepare()
        configs = bench.configs()
        log(f"{len(configs)} configs x (1 warm-up + {args.repeat}) runs")
        bench.run(configs)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up, reporting what was measured")
    finally:
        bench.cleanup()

    size = args.size
    rows = rows_of(configs)
    tgt_lines, tgt = targets(rows, size)
    fs = bench.setup.get("workdir_fs", {})
    img = bench.setup.get("image", {})
    header = [
        f"mfd bench_file: {human(size)} RAM image, pages {img.get('pages')}, runs of 16, "
        f"seed 1; {args.repeat} counted runs/config (+1 warm-up), interleaved",
        f"disk: {bench.setup.get('workdir', '?')} ({fs.get('fstype', '?')} on "
        f"{fs.get('device', '?')}); CPU: {env['cpu_count']} x {env['cpu_model']}; kernel "
        f"{env['kernel']}; Python {env['versions']['python']}; QEMU {qemu['version']}",
    ]
    for k in ("mfd_src", "qemu_src"):
        if k in bench.setup:
            i = bench.setup[k]
            header.append(f"restore source {i['made_by']}: {human(i['size'])} apparent, "
                          f"{human(i['allocated'])} allocated")
    env["mfd_sources_blake3_at_end"] = mfd_sources_digest()
    if env["mfd_sources_blake3_at_end"] != env["mfd_sources_blake3"]:
        bench.notes.append("WARNING: mfd's sources changed while the benchmark ran (someone "
                           "edited the tree): runs before and after the change are mixed.")
    loads = [r["loadavg1"] for c in configs for r in c.runs if "loadavg1" in r]
    if loads:
        bench.notes.append(f"1-minute load average at the start of the runs: {min(loads):.2f} "
                           f"to {max(loads):.2f} (this machine has {env['cpu_count']} CPUs; "
                           "anything else running skews the figures).")
    syncs = [r["fdatasync_seconds"] for c in configs for r in c.runs
             if r.get("ok") and "fdatasync_seconds" in r and not c.params.get("direct_io")]
    if syncs:
        bench.notes.append(f"fdatasync of QEMU's buffered save files right after completion: "
                           f"median {statistics.median(syncs) * 1000:.1f} ms, max "
                           f"{max(syncs) * 1000:.1f} ms.")
    text = "\n".join([*header, "", table(rows, size), "", *tgt_lines, "", "Notes:",
                      *(f"- {n}" for n in [*NOTES, *bench.notes])])
    if interrupted:
        text += "\n(INTERRUPTED: partial results)"
    print(text, flush=True)

    result = {
        "benchmark": "bench_file",
        "started": started,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "args": {k: v for k, v in vars(args).items()},
        "environment": env,
        "setup": bench.setup,
        "configs": [{"key": c.key, "kind": c.kind, "tool": c.tool, "label": c.label,
                     "params": c.params, "error": c.error, "runs": c.runs} for c in configs],
        "summary": [{"key": r.key, "kind": r.kind, "tool": r.tool, "label": r.label,
                     "error": r.error, "note": r.note, "seconds": r.seconds,
                     **r.stats(size)} for r in rows],
        "targets": tgt,
        "notes": [*NOTES, *bench.notes],
        "table": text,
    }
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    log(f"wrote {out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
