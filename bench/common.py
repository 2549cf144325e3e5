"""What the benchmark scripts in bench/ share.

* small helpers: sizes, channel lists, human-readable sizes, one-line errors, blake3 of a file;
* the environment every result file records (CPU, kernel, versions, QEMU, git state, a digest
  of mfd's sources taken at the start and the end of the run);
* the RAM image: :func:`make_image` generates it with :func:`mfd.ramimage.generate` into a
  work directory, :func:`copy_image` makes a fresh copy as guest RAM;
* :class:`Cleanup`, a registry of everything a run created (files, directories, processes,
  guests), undone in reverse order at the end, also on Ctrl-C / SIGTERM;
* :class:`Config` / :func:`run_interleaved`: one uncounted warm-up run per config, then
  ``repeat`` counted runs, interleaved (A rep 1, B rep 1, ..., A rep 2, ...), a failing config
  reported as FAILED with its one-line error while the run goes on;
* :class:`Row`, :func:`rows_of`, :func:`stats_table`, :func:`format_table`: median / min / max
  and plain-text tables;
* :func:`run_notes` and :func:`write_json` for the end of a run.

The scripts import it as ``common`` (they run as ``python bench/<script>.py``, so bench/ is on
``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


# --------------------------------------------------------------------------- small helpers


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


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


def check_same(path: str, size: int, want_digest: str, reference: str | None,
               what: str = "restored RAM") -> None:
    """Raise unless ``path`` has ``size`` bytes with blake3 ``want_digest``; the message counts
    the differing pages against ``reference`` when there is one."""
    actual = os.path.getsize(path)
    if actual != size:
        raise RuntimeError(f"{what} has {actual} bytes, expected {size}")
    if digest(path) != want_digest:
        if reference is None:
            raise RuntimeError(f"{what} differs (blake3)")
        bad = differing_pages(reference, path, size)
        raise RuntimeError(f"{what} differs from the image in {bad} pages")


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


def qemu_info() -> dict[str, Any]:
    """The qemu-system-x86_64 on PATH: binary, version, usable (>= 9.0, see mfd.qemu)."""
    from mfd.qemu import qemu_binary, qemu_version

    ver = qemu_version()
    return {"binary": shutil.which("qemu-system-x86_64"),
            "version": ".".join(map(str, ver)) if ver else None,
            "usable": qemu_binary() is not None}


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


# --------------------------------------------------------------------------- the RAM image


def make_image(path: str, size: int, *, zero: float = 0.5, random: float = 0.25,
               seed: int = 1, run: int = 16, sync: bool = False) -> dict[str, Any]:
    """Generate the benchmark image (4 KiB pages in runs of ``run``: ``zero`` zero, ``random``
    random, the rest compressible text) at ``path``; return its description, blake3 included.
    Zero pages are holes. ``sync`` flushes it to the disk (so "cold" reads can evict it)."""
    from mfd.ramimage import generate

    t0 = time.perf_counter()
    kinds = generate(path, size, seed=seed, zero=zero, random=random, run=run)
    if sync:
        fdatasync_path(path)
    gen_s = time.perf_counter() - t0
    return {"path": path, "size": size, "pages": kinds, "seed": seed, "run": run,
            "zero": zero, "random": random, "allocated": allocated(path),
            "blake3": digest(path), "generate_seconds": gen_s}


def copy_image(src: str, dst: str, size: int, *, ram: str = "sparse") -> str:
    """A fresh copy of the image ``src`` at ``dst`` (e.g. in /dev/shm, as guest RAM).

    "sparse": the image's zero pages stay holes, as RAM a guest never touched;
    "allocated": every page is in memory, zero pages written as zeros (freed memory).
    """
    unlink(dst)
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if ram == "allocated":
            os.posix_fallocate(fo, 0, size)
        else:
            os.ftruncate(fo, size)
        pos = 0
        while pos < size:  # copy only the image's data extents
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
    return dst


# --------------------------------------------------------------------------- cleanup


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


class Cleanup:
    """Everything a run created, undone in reverse order by :meth:`run`.

    Each ``add_*`` returns a token; :meth:`done` runs that item now (e.g. a per-run file) and
    :meth:`forget` drops it without running it. :meth:`run` ignores SIGINT / SIGTERM while it
    works, so a second Ctrl-C cannot leave half of it undone; :meth:`install_signals` makes
    SIGTERM and SIGHUP raise KeyboardInterrupt like Ctrl-C, so ``finally`` blocks run.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[str, Callable[[], None]]] = {}
        self._next = 0

    def add(self, what: str, fn: Callable[[], None]) -> int:
        self._next += 1
        self._items[self._next] = (what, fn)
        return self._next

    def add_path(self, path: str) -> int:
        """A file or a directory tree."""
        def rm() -> None:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                unlink(path)
        return self.add(f"remove {path}", rm)

    def add_process(self, proc: subprocess.Popen[Any], what: str) -> int:
        return self.add(f"stop {what} (pid {proc.pid})", lambda: stop_process(proc))

    def forget(self, token: int) -> None:
        self._items.pop(token, None)

    def done(self, token: int) -> None:
        item = self._items.pop(token, None)
        if item is not None:
            item[1]()

    def run(self) -> None:
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for token in sorted(self._items, reverse=True):
                what, fn = self._items.pop(token)
                try:
                    fn()
                except Exception as e:
                    log(f"cleanup: {what}: {one_line(e)}")
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @staticmethod
    def install_signals() -> None:
        def on_term(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGHUP, on_term)


# --------------------------------------------------------------------------- configs and runs


@dataclass
class Config:
    key: str
    kind: str  # what is measured, e.g. "save", "restore warm", "stopped", "yardstick"
    tool: str  # "mfd", "qemu", "dd", "cp", "tcp", ...
    label: str
    params: dict[str, Any]
    fn: Callable[[], dict[str, Any]]  # one run; returns at least {"seconds": wall time}
    runs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def counted(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["ok"] and not r["warmup"]]

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "tool": self.tool, "label": self.label,
                "params": self.params, "error": self.error, "runs": self.runs}


def run_interleaved(configs: list[Config], repeat: int,
                    extra: Callable[[dict[str, Any]], str] = lambda res: "") -> None:
    """One warm-up run (not counted), then ``repeat`` counted runs, interleaved across
    ``configs``. A config that fails is not run again and reported as FAILED; Ctrl-C
    (KeyboardInterrupt) propagates. ``extra(result)`` adds to the progress line."""
    for rep in range(repeat + 1):
        tag = "warm-up" if rep == 0 else f"rep {rep}/{repeat}"
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
            log(f"[{tag}] {c.key}: {res['seconds']:.3f} s{extra(res)}")


# --------------------------------------------------------------------------- reporting


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

    def as_json(self, size: int) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "tool": self.tool, "label": self.label,
                "error": self.error, "note": self.note, "seconds": self.seconds,
                **self.stats(size)}


def rows_of(configs: Iterable[Config]) -> list[Row]:
    return [Row(c.kind, c.tool, c.label, c.key, [r["seconds"] for r in c.counted()], c.error)
            for c in configs]


def best(rows: list[Row], kind: str, tool: str, size: int,
         pred: Callable[[Row], bool] = lambda r: True) -> Row | None:
    ok = [r for r in rows if r.kind == kind and r.tool == tool and r.error is None
          and r.seconds and pred(r)]
    return min(ok, key=lambda r: r.stats(size)["median"], default=None)


def format_table(head: list[str], body: list[list[str]], right: set[int],
                 groups: list[Any] | None = None) -> str:
    """Plain-text table. A row shorter than ``head`` ends in one free-text cell (e.g.
    "FAILED: ..."), which does not widen its column. A blank line separates rows whose
    ``groups`` value changes."""
    widths = [len(h) for h in head]
    for b in body:
        fixed = b if len(b) == len(head) else b[:-1]
        for i, cell in enumerate(fixed):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if len(cells) < len(head) and i == len(cells) - 1:
                out.append(cell)
            else:
                out.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(head), "  ".join("-" * w for w in widths)]
    prev = None
    for i, b in enumerate(body):
        g = groups[i] if groups is not None else None
        if i and g != prev:
            lines.append("")
        prev = g
        lines.append(fmt(b))
    return "\n".join(lines)


def stats_table(rows: list[Row], size: int) -> str:
    """kind / tool / config / n / min / median / max / MiB/s (of ``size``), one row per config."""
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
    return format_table(head, body, {3, 4, 5, 6, 7}, [r.kind for r in rows])


def run_notes(env: dict[str, Any], configs: Iterable[Config]) -> list[str]:
    """Notes every benchmark adds at the end: mfd's sources changed during the run; the load
    average the runs started at. Also records the end digest in ``env``."""
    notes = []
    env["mfd_sources_blake3_at_end"] = mfd_sources_digest()
    if env["mfd_sources_blake3_at_end"] != env["mfd_sources_blake3"]:
        notes.append("WARNING: mfd's sources changed while the benchmark ran (someone "
                     "edited the tree): runs before and after the change are mixed.")
    loads = [r["loadavg1"] for c in configs for r in c.runs if "loadavg1" in r]
    if loads:
        notes.append(f"1-minute load average at the start of the runs: {min(loads):.2f} "
                     f"to {max(loads):.2f} (this machine has {env['cpu_count']} CPUs; "
                     "anything else running skews the figures).")
    return notes


def write_json(path: str, result: dict[str, Any]) -> str:
    out = os.path.abspath(path)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    log(f"wrote {out}")
    return out


def standard_args(ap: argparse.ArgumentParser, channels_help: str, out: str,
                  qemu_help: str) -> None:
    """What both benchmarks take: the image size and mix, counted runs, channel counts, the
    JSON output, skipping QEMU."""
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"),
                    help="RAM image size (default 2G)")
    ap.add_argument("--repeat", type=int, default=3, help="counted runs per config (default 3)")
    ap.add_argument("--channels", type=parse_channels, default=[1, 2, 4], help=channels_help)
    ap.add_argument("--out", default=out, help=f"JSON output (default {out})")
    ap.add_argument("--no-qemu", action="store_true", help=qemu_help)
    ap.add_argument("--zero", type=float, default=0.5, help=argparse.SUPPRESS)
    ap.add_argument("--random", type=float, default=0.25, help=argparse.SUPPRESS)


def parse_standard(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    return args


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def require_room(tool: str, checks: list[tuple[str, int, int, str]], hint: str) -> None:
    """Stop before starting when a place lacks room: ``checks`` are (place, free bytes, bytes
    needed, what for); a free figure of 0 means unknown and is not checked."""
    problems = [f"{place} has {human(free)} free, the benchmark needs about {human(need)} "
                f"({why})" for place, free, need, why in checks if free and free < need]
    if problems:
        raise SystemExit(f"{tool}: not enough room:\n  " + "\n  ".join(problems)
                         + f"\n{hint}")
