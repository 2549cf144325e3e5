#!/usr/bin/env python3
"""mfd's multifd migration over TCP loopback against QEMU 10 and the link's own speed, in one run.

::

    python bench/bench_migrate.py [--size 2G] [--repeat 3] [--channels 1,2,4]
                                  [--compression none,zstd] [--out results.json]
                                  [--no-qemu] [--no-live]

The RAM image is bench_file.py's (4 KiB pages in runs of 16: 50% zero, 25% random, 25%
compressible text, seed 1, see :mod:`mfd.ramimage`), generated once into a fresh work
directory in /dev/shm. Then, for every configuration, one warm-up run (not counted) and
``--repeat`` counted runs, interleaved: config A rep 1, B rep 1, ..., then A rep 2, ...

A. stopped guest, migrated over TCP loopback, for every channel count x compression (zstd at
   level 1), the source RAM a fresh copy of the image in /dev/shm per run (untimed):

   * QEMU 10 -> QEMU 10 multifd (``-machine none``, RAM a memory-backend-file): destination
     ``-incoming defer`` on a fresh zeroed /dev/shm file, ``migrate-incoming tcp:...``; the
     source paused (-S); timed from the source's QMP ``migrate`` to its ``completed`` (polled
     every 2 ms as :mod:`mfd.qemu` does), QEMU's own total-time / downtime / transferred kept;
   * mfd -> mfd: ``python -m mfd incoming --listen tcp://127.0.0.1:PORT --image mem=DEST
     --json`` as a subprocess (its start is not timed, like QEMU's), then
     :func:`mfd.api.migrate` in this process, timed as the wall time of that call.

   Each destination RAM is checked against the image (blake3) outside the timed region.
B. yardsticks: TCP loopback moving the same number of bytes over 1, 2, 4 connections (Python
   threads, ``sendall`` / ``recv_into`` of 4 MiB), and a memcpy of the image in memory.
C. a live run (after A and B, since it needs their figures): ``mfd guest --name benchsrc``
   with the same RAM size dirtying random pages at half the transfer rate mfd reached in its
   best stopped-guest uncompressed config, migrated with 4 channels into ``mfd incoming
   --guest benchdst``: total time, downtime, rounds, transferred.

Prints plain-text tables and the target checks (uncompressed: mfd <= QEMU with the same
channels; zstd: mfd <= QEMU zstd level 1 with the same channels), and writes every raw run
with the environment to JSON (default bench/results/bench_migrate.json). A failing
configuration is reported as FAILED with its one-line error and the run goes on. When ``mfd
migrate`` / ``mfd incoming`` do not exist yet, the mfd rows are skipped ("mfd migrate not
available"). Everything the run created (work directory, /dev/shm files, subprocesses,
guests) is removed at the end, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
from common import (
    RESULTS,
    Cleanup,
    Config,
    MiB,
    Row,
    check_same,
    copy_image,
    environment,
    format_table,
    free_bytes,
    human,
    log,
    make_image,
    one_line,
    parse_standard,
    qemu_info,
    require_room,
    rows_of,
    run_interleaved,
    run_notes,
    standard_args,
    stats_table,
    unlink,
    write_json,
)

from mfd.workers.tcp import free_ports

DEFAULT_OUT = os.path.join(RESULTS, "bench_migrate.json")
QEMU_TIMEOUT = 600.0  # per QMP wait
MIGRATE_TIMEOUT = 600.0  # an mfd migration taking longer: the destination is killed
LISTEN_TIMEOUT = 60.0  # for `mfd incoming` to listen
EXIT_TIMEOUT = 60.0  # for `mfd incoming` to exit after the source returned
GUEST_TIMEOUT = 120.0  # for `mfd guest` commands
TCP_CHUNK = 4 * MiB
COMPRESSIONS = ("none", "zstd", "zlib")
ZSTD_LEVEL = 1
LIVE_CHANNELS = 4
LIVE_SETTLE = 1.0  # s the source guest dirties before the migration starts
GUEST_SRC = "benchsrc"
GUEST_DST = "benchdst"
MFD = [sys.executable, "-m", "mfd"]
MFD_INCOMING = [*MFD, "incoming"]


# --------------------------------------------------------------------------- small helpers


def parse_compression(text: str) -> list[str]:
    comps = [x.strip() for x in text.split(",") if x.strip()]
    bad = [c for c in comps if c not in COMPRESSIONS]
    if not comps or bad:
        raise argparse.ArgumentTypeError(f"compression must be among {','.join(COMPRESSIONS)}, "
                                         f"got {text!r}")
    return comps


def tail(path: str, lines: int = 1) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 8192))
        text = f.read().decode("utf-8", "replace").strip().splitlines()
        return " | ".join(text[-lines:])
    return ""


def listening(port: int) -> bool:
    """A socket listens on TCP ``port`` (any address), from /proc/net/tcp{,6}: looking does
    not connect, so the listener does not see a stray connection."""
    want = f":{port:04X}"
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[3] == "0A" and parts[1].endswith(want):
                    return True
    return False


def mfd_migrate_missing() -> str | None:
    """Why mfd's socket migration cannot be measured (None: it can)."""
    for sub in ("migrate", "incoming"):
        try:
            p = subprocess.run([*MFD, sub, "--help"], capture_output=True, text=True,
                               timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            return f"`mfd {sub} --help`: {one_line(e)}"
        if p.returncode:
            err = p.stderr.strip().splitlines()
            return f"`mfd {sub} --help` exited {p.returncode}: {err[-1] if err else ''}"
    try:
        from mfd import api
    except Exception as e:
        return f"import mfd.api: {one_line(e)}"
    if not hasattr(api, "migrate"):
        return "mfd.api has no migrate()"
    return None


def net_settings() -> dict[str, str]:
    out = {}
    for name in ("net/ipv4/tcp_rmem", "net/ipv4/tcp_wmem", "net/core/rmem_max",
                 "net/core/wmem_max", "net/ipv4/tcp_congestion_control"):
        with contextlib.suppress(OSError), open(f"/proc/sys/{name}") as f:
            out[name.replace("/", ".")] = f.read().strip()
    with contextlib.suppress(OSError), open("/sys/class/net/lo/mtu") as f:
        out["lo.mtu"] = f.read().strip()
    return out


def mem_available() -> int:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def med(values: list[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, int | float)]
    return statistics.median(vals) if vals else None


# --------------------------------------------------------------------------- processes


class Incoming:
    """``mfd incoming ...`` as a subprocess, its output in files (no pipe to fill up)."""

    def __init__(self, bench: Bench, args: list[str], port: int) -> None:
        self.port = port
        self.stdout_path = bench.s("incoming.out")
        self.stderr_path = bench.s("incoming.err")
        self.argv = [*MFD_INCOMING, *args]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, close_fds=True)
        self.cleanup = bench.cleanup
        self.token = bench.cleanup.add_process(self.proc, "mfd incoming")

    def error(self, what: str) -> RuntimeError:
        return RuntimeError(f"mfd incoming {what}: {tail(self.stderr_path) or '(no stderr)'}")

    def wait_listening(self) -> None:
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while not listening(self.port):
            if self.proc.poll() is not None:
                raise self.error(f"exited {self.proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise self.error(f"did not listen on port {self.port} within "
                                 f"{LISTEN_TIMEOUT:g} s")
            time.sleep(0.005)

    def timed_migrate(self, uri: str, **kwargs: Any) -> tuple[Any, float, dict[str, Any], float]:
        """:func:`mfd.api.migrate` to this destination, timed, under a watchdog that kills the
        destination (so the source fails) when it hangs; returns (result, seconds, the
        destination's JSON, seconds until the destination exited)."""
        from mfd import api

        watchdog = threading.Timer(MIGRATE_TIMEOUT, self.kill)
        watchdog.start()
        try:
            t0 = time.perf_counter()
            try:
                r = api.migrate(uri, **kwargs)
            except Exception as e:
                raise self.explain(e) from e
            dt = time.perf_counter() - t0
            if r.status != "completed":
                raise RuntimeError(f"mfd.api.migrate returned status {r.status!r}")
            dest = self.finish()
            return r, dt, dest, time.perf_counter() - t0
        finally:
            watchdog.cancel()

    def finish(self) -> dict[str, Any]:
        """Wait for the exit; return its JSON line; raise on failure."""
        try:
            rc = self.proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise self.error(f"still running {EXIT_TIMEOUT:g} s after the source "
                             "returned") from None
        if rc:
            raise self.error(f"exited {rc}")
        with open(self.stdout_path, "rb") as f:
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines()
                     if ln.strip()]
        try:
            out = json.loads(lines[-1])
        except (IndexError, ValueError):
            raise self.error(f"printed no JSON line (stdout {lines[-1:]!r})") from None
        return out if isinstance(out, dict) else {"output": out}

    def explain(self, e: BaseException) -> RuntimeError:
        """The source failed with ``e``: add what the destination said (the cause is often
        there), after giving it a moment to exit."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=3)
        rc = self.proc.poll()
        state = "still running" if rc is None else f"exited {rc}"
        return RuntimeError(f"{one_line(e)} [mfd incoming {state}: "
                            f"{tail(self.stderr_path) or 'no stderr'}]")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def stop(self) -> None:
        self.cleanup.done(self.token)


def guest_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MFD, "guest", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=GUEST_TIMEOUT)


def guest_alive(name: str) -> bool:
    from mfd.shm import control

    return control.is_alive(name)


def quit_guest(name: str) -> None:
    if guest_alive(name):
        p = guest_cmd("--name", name, "--quit")
        if p.returncode:
            err = p.stderr.strip().splitlines()
            raise RuntimeError(f"mfd guest --name {name} --quit exited {p.returncode}: "
                               f"{err[-1] if err else ''}")


def guest_files(name: str) -> set[str]:
    """What a guest leaves behind if it dies: its RAM files in /dev/shm and its log."""
    from mfd.shm import control

    files = set(glob.glob(os.path.join("/dev/shm", f"mfd-{glob.escape(name)}-*")))
    log_path = os.path.join(control.run_dir(), f"{name}.log")
    return files | ({log_path} if os.path.exists(log_path) else set())


def release_guest(name: str, keep: set[str]) -> None:
    """Quit the guest ``name`` if it runs, then remove the files it left that are not in
    ``keep`` (those were there before this run started it)."""
    try:
        quit_guest(name)
    finally:
        if not guest_alive(name):
            for path in guest_files(name) - keep:
                unlink(path)


def guest_query(name: str) -> dict[str, Any]:
    p = guest_cmd("--name", name, "--query")
    if p.returncode:
        err = p.stderr.strip().splitlines()
        raise RuntimeError(f"mfd guest --name {name} --query exited {p.returncode}: "
                           f"{err[-1] if err else ''}")
    return json.loads(p.stdout)


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace, cleanup: Cleanup) -> None:
        self.args = args
        self.cleanup = cleanup
        self.size: int = args.size
        self.shmdir = ""
        self.notes: list[str] = []
        self.setup: dict[str, Any] = {}
        self.qemu_ok = False
        self.mfd_ok = False

    def s(self, name: str) -> str:
        return os.path.join(self.shmdir, name)

    # ------------------------------------------------------------------ setup

    def check_space(self) -> None:
        """/dev/shm: the image (its nonzero pages) + a source copy (all of it once QEMU has
        read it) + a destination; later two guests. Memory: that, or the memcpy's two copies."""
        nonzero = 1.0 - self.args.zero
        shm_need = int(self.size * (2 + nonzero) + 256 * MiB)
        shm_free = free_bytes("/dev/shm")
        mem_need = int(self.size * (2 + nonzero) + 512 * MiB)
        mem_free = mem_available()
        require_room("bench_migrate", [
            ("/dev/shm", shm_free, shm_need, "image, source and destination RAM"),
            ("memory", mem_free, mem_need, "the same, or the memcpy's two copies")],
            "Use a smaller --size.")
        self.setup["space"] = {"shm_free": shm_free, "shm_need": shm_need,
                               "mem_available": mem_free, "mem_need": mem_need}

    def prepare(self) -> None:
        a = self.args
        self.check_space()
        self.shmdir = tempfile.mkdtemp(prefix="mfd-bench-migrate-", dir="/dev/shm")
        self.cleanup.add_path(self.shmdir)
        if "," in self.shmdir:
            raise SystemExit(f"bench_migrate: QEMU options cannot contain ',': {self.shmdir}")
        self.setup["shmdir"] = self.shmdir
        log(f"work dir {self.shmdir}")
        self.img = self.s("image.ram")
        img = make_image(self.img, self.size, zero=a.zero, random=a.random, seed=1, run=16)
        self.img_digest = img["blake3"]
        self.setup["image"] = img
        log(f"image {human(self.size)}: {img['pages']} pages, {human(img['allocated'])} "
            f"allocated (zero pages are holes), generated in {img['generate_seconds']:.1f} s")

    def source_ram(self) -> str:
        """A fresh copy of the image in /dev/shm, the source guest's RAM for one run."""
        return copy_image(self.img, self.s("src.ram"), self.size)

    # ------------------------------------------------------------------ A: QEMU

    def qemu_stopped(self, channels: int, comp: str) -> dict[str, Any]:
        from mfd.qemu import QemuError, QemuMachine

        src = self.source_ram()
        dst = self.s("dst.ram")
        unlink(dst)
        with open(dst, "wb") as f:  # fresh zeroed RAM
            os.ftruncate(f.fileno(), self.size)
        port = free_ports(1)
        uri = f"tcp:127.0.0.1:{port}"
        try:
            with QemuMachine(dst, self.size, incoming=True, timeout=QEMU_TIMEOUT) as d, \
                    QemuMachine(src, self.size, timeout=QEMU_TIMEOUT) as s:
                for m in (d, s):
                    m.set_migration(mapped_ram=False, multifd_channels=channels,
                                    multifd_compression=comp,
                                    zstd_level=ZSTD_LEVEL if comp == "zstd" else None)
                d.qmp("migrate-incoming", uri=uri, **{"exit-on-error": False})
                t0 = time.perf_counter()
                info = s.migrate(uri)
                dt = time.perf_counter() - t0
                # the destination may still be loading the last packets
                deadline = time.monotonic() + QEMU_TIMEOUT
                while True:
                    dinfo = d.qmp("query-migrate")
                    status = dinfo.get("status")
                    if status == "completed":
                        dest_s = time.perf_counter() - t0
                        break
                    if status in ("failed", "cancelled") or time.monotonic() > deadline:
                        desc = dinfo.get("error-desc", f"status {status!r}")
                        raise QemuError(f"destination {status}: {desc} "
                                        f"{d.stderr_tail().splitlines()[-1:]}")
                    time.sleep(0.002)
            unlink(src)
            check_same(dst, self.size, self.img_digest, self.img, "destination RAM")
        finally:
            unlink(src)
            unlink(dst)
        ram = info.get("ram", {})
        return {"seconds": dt, "dest_completed_seconds": dest_s, "port": port,
                "total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
                "setup_time_ms": info.get("setup-time"), "transferred": ram.get("transferred"),
                "normal_pages": ram.get("normal"), "zero_pages": ram.get("duplicate"),
                "query_migrate": info, "dest_query_migrate": dinfo, "verified": True}

    # ------------------------------------------------------------------ A: mfd

    def mfd_stopped(self, channels: int, comp: str) -> dict[str, Any]:
        from mfd.options import MigrationParameters

        src = self.source_ram()
        dst = self.s("dst.ram")
        unlink(dst)  # `mfd incoming` creates it
        port = free_ports(channels + 1)
        uri = f"tcp://127.0.0.1:{port}"
        params = MigrationParameters(multifd_channels=channels, multifd_compression=comp,
                                     multifd_zstd_level=ZSTD_LEVEL)
        inc = Incoming(self, ["--listen", uri, "--image", f"mem={dst}", "--json"], port)
        try:
            inc.wait_listening()
            r, dt, dest, dest_s = inc.timed_migrate(uri, images={"mem": src}, params=params)
            unlink(src)
            check_same(dst, self.size, self.img_digest, self.img, "destination RAM")
        finally:
            inc.stop()
            unlink(src)
            unlink(dst)
        return {"seconds": dt, "dest_exited_seconds": dest_s, "port": port,
                **self.mfd_figures(r), "incoming": dest, "verified": True}

    @staticmethod
    def mfd_figures(r: Any) -> dict[str, Any]:
        qm = getattr(r, "query_migrate", None) or {}
        ram = qm.get("ram", {}) if isinstance(qm, dict) else {}
        transferred = getattr(r, "transferred", None)
        return {"total_time_ms": getattr(r, "total_time_ms", None),
                "downtime_ms": getattr(r, "downtime_ms", None),
                "setup_time_ms": getattr(r, "setup_time_ms", None),
                "transferred": transferred if transferred is not None
                else ram.get("transferred"),
                "normal_pages": getattr(r, "normal_pages", None) or ram.get("normal"),
                "zero_pages": getattr(r, "zero_pages", None) or ram.get("duplicate"),
                "rounds": getattr(r, "rounds", None) or ram.get("dirty-sync-count"),
                "query_migrate": qm}

    # ------------------------------------------------------------------ B: yardsticks

    def tcp(self, conns: int) -> dict[str, Any]:
        """``size`` bytes over ``conns`` loopback connections, one sender and one receiver
        thread each (the GIL is released in the system calls); timed from the moment all
        threads are ready until every byte has arrived."""
        share = [self.size // conns + (i < self.size % conns) for i in range(conns)]
        payload = memoryview(np.random.default_rng(0).integers(0, 256, TCP_CHUNK,
                                                               dtype=np.uint8).tobytes())
        errors: list[BaseException] = []
        socks: list[socket.socket] = []
        with socket.create_server(("127.0.0.1", 0), backlog=conns) as server:
            server.settimeout(30)
            port = server.getsockname()[1]
            for _ in range(conns):
                c = socket.create_connection(("127.0.0.1", port), timeout=30)
                socks.append(c)
                socks.append(server.accept()[0])
        for so in socks:
            so.settimeout(120)
        ready = threading.Barrier(2 * conns + 1, timeout=60)

        def send(sock: socket.socket, n: int) -> None:
            try:
                ready.wait()
                while n > 0:
                    k = min(n, TCP_CHUNK)
                    sock.sendall(payload[:k])
                    n -= k
            except BaseException as e:
                errors.append(e)

        def recv(sock: socket.socket, n: int) -> None:
            buf = bytearray(TCP_CHUNK)
            view = memoryview(buf)
            try:
                ready.wait()
                while n > 0:
                    got = sock.recv_into(view, min(n, TCP_CHUNK))
                    if not got:
                        raise ConnectionError(f"peer closed with {n} bytes to go")
                    n -= got
            except BaseException as e:
                errors.append(e)

        threads = []
        for i in range(conns):
            threads.append(threading.Thread(target=send, args=(socks[2 * i], share[i])))
            threads.append(threading.Thread(target=recv, args=(socks[2 * i + 1], share[i])))
        try:
            for t in threads:
                t.start()
            ready.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            dt = time.perf_counter() - t0
        finally:
            for so in socks:
                so.close()
            for t in threads:
                t.join(timeout=10)
        if errors:
            raise RuntimeError(f"TCP yardstick: {one_line(errors[0])}")
        return {"seconds": dt, "bytes": self.size}

    def memcpy(self) -> dict[str, Any]:
        """The image (read into memory, untimed) copied once into memory already faulted in."""
        src = np.fromfile(self.img, dtype=np.uint8)
        dst = np.ones_like(src)
        t0 = time.perf_counter()
        np.copyto(dst, src)
        dt = time.perf_counter() - t0
        ok = bool(dst[:: 4096 * 97].tobytes() == src[:: 4096 * 97].tobytes())
        del src, dst
        if not ok:
            raise RuntimeError("memcpy copy differs")
        return {"seconds": dt}

    # ------------------------------------------------------------------ C: live

    def live(self, rate: int) -> dict[str, Any]:
        from mfd.options import MigrationParameters

        for name in (GUEST_SRC, GUEST_DST):
            if guest_alive(name):
                raise RuntimeError(f"a guest named {name} already runs (not started by this "
                                   f"run); quit it with `mfd guest --name {name} --quit`")
        keep = guest_files(GUEST_SRC) | guest_files(GUEST_DST)
        src_token = self.cleanup.add(f"quit guest {GUEST_SRC}",
                                     lambda: release_guest(GUEST_SRC, keep))
        dst_token = self.cleanup.add(f"quit guest {GUEST_DST}",
                                     lambda: release_guest(GUEST_DST, keep))
        inc: Incoming | None = None
        try:
            p = guest_cmd("--name", GUEST_SRC, "--ram", str(self.size), "--dirty-rate",
                          str(rate), "--pattern", "random", "--daemonize")
            if p.returncode:
                err = p.stderr.strip().splitlines()
                raise RuntimeError(f"mfd guest --name {GUEST_SRC} exited {p.returncode}: "
                                   f"{err[-1] if err else ''}")
            port = free_ports(LIVE_CHANNELS + 1)
            uri = f"tcp://127.0.0.1:{port}"
            inc = Incoming(self, ["--listen", uri, "--guest", GUEST_DST, "--json"], port)
            inc.wait_listening()
            time.sleep(LIVE_SETTLE)
            before = guest_query(GUEST_SRC)
            r, dt, dest, dest_s = inc.timed_migrate(
                uri, guest=GUEST_SRC, params=MigrationParameters(multifd_channels=LIVE_CHANNELS))
            verified = self.verify_live(r, dest)
        finally:
            if inc is not None:
                inc.stop()
            self.cleanup.done(dst_token)
            self.cleanup.done(src_token)
        return {"seconds": dt, "dest_exited_seconds": dest_s, "port": port,
                "dirty_rate": rate, "pages_written_before": before.get("pages-written"),
                **self.mfd_figures(r), "incoming": dest, "verified": verified}

    @staticmethod
    def verify_live(r: Any, dest: dict[str, Any]) -> bool | str:
        """The guest's RAM cannot be compared after a live migration (the source guest is gone,
        the destination runs and writes), so compare what both ends hashed: the source's
        per-block digests at switchover against the destination's after the load."""
        src_d = getattr(r, "digests", None)
        dst_d = dest.get("digests")
        if not src_d or not dst_d:
            return "not checked: no digests reported"
        if src_d != dst_d:
            bad = sorted(k for k in set(src_d) | set(dst_d) if src_d.get(k) != dst_d.get(k))
            raise RuntimeError(f"destination RAM digests differ from the source's: {bad}")
        if dest.get("verified") is False:
            raise RuntimeError("mfd incoming reports its RAM not verified")
        return True

    # ------------------------------------------------------------------ configs

    def stopped_configs(self) -> list[Config]:
        a = self.args
        out = []
        for ch in a.channels:
            for comp in a.compression:
                lvl = f" level {ZSTD_LEVEL}" if comp == "zstd" else ""
                params = {"channels": ch, "compression": comp}
                if self.mfd_ok:
                    out.append(Config(f"mfd-{ch}-{comp}", "stopped", "mfd",
                                      f"{ch} ch {comp}{lvl}", params,
                                      lambda ch=ch, comp=comp: self.mfd_stopped(ch, comp)))
                if self.qemu_ok:
                    out.append(Config(f"qemu-{ch}-{comp}", "stopped", "qemu",
                                      f"multifd {ch} {comp}{lvl}", params,
                                      lambda ch=ch, comp=comp: self.qemu_stopped(ch, comp)))
        for n in sorted(set(a.channels)):
            out.append(Config(f"tcp-{n}", "yardstick", "tcp",
                              f"TCP loopback, {n} connection{'s' if n > 1 else ''}",
                              {"connections": n}, lambda n=n: self.tcp(n)))
        out.append(Config("memcpy", "yardstick", "memcpy", "memcpy of the image", {},
                          self.memcpy))
        return out

    def live_config(self, rate: int) -> Config:
        return Config(f"mfd-live-{LIVE_CHANNELS}", "live", "mfd",
                      f"live, {LIVE_CHANNELS} ch none, dirty rate {human(rate)}/s",
                      {"channels": LIVE_CHANNELS, "dirty_rate": rate, "pattern": "random"},
                      lambda: self.live(rate))


def progress(res: dict[str, Any]) -> str:
    bits = []
    if res.get("total_time_ms") is not None:
        bits.append(f"total-time {res['total_time_ms']:.0f} ms")
    if res.get("downtime_ms") is not None:
        bits.append(f"downtime {res['downtime_ms']:.0f} ms")
    if res.get("rounds") is not None and "dirty_rate" in res:
        bits.append(f"rounds {res['rounds']}")
    return f" ({', '.join(bits)})" if bits else ""


# --------------------------------------------------------------------------- reporting


def summary(c: Config | None) -> dict[str, Any] | None:
    """median / min / max of the wall time and medians of the reported figures."""
    if c is None:
        return None
    runs = c.counted()
    if c.error is not None:
        return {"error": c.error, "n": len(runs)}
    if not runs:
        return {"n": 0}
    secs = [r["seconds"] for r in runs]
    out = {"n": len(runs), "median": statistics.median(secs), "min": min(secs),
           "max": max(secs)}
    for k in ("transferred", "total_time_ms", "downtime_ms", "setup_time_ms", "rounds",
              "dest_completed_seconds", "dest_exited_seconds"):
        out[k] = med([r.get(k) for r in runs])
    return out


def link_rates(configs: list[Config], size: int) -> dict[int, float]:
    """bytes/s of the TCP yardstick per connection count (median)."""
    out = {}
    for c in configs:
        if c.tool == "tcp" and c.error is None and c.counted():
            out[c.params["connections"]] = size / statistics.median(
                r["seconds"] for r in c.counted())
    return out


def fmt_s(st: dict[str, Any] | None) -> list[str]:
    if st is None:
        return ["n/a", "", ""]
    if "error" in st:
        return ["FAILED", "", ""]
    if not st["n"]:
        return ["no runs", "", ""]
    return [f"{st['median']:.3f}", f"{st['min']:.3f}", f"{st['max']:.3f}"]


def stopped_tables(args: argparse.Namespace, configs: list[Config], missing: dict[str, str]
                   ) -> tuple[list[str], list[str], dict[str, Any]]:
    """(time table + failures, throughput table, JSON summary)."""
    size = args.size
    by_key = {c.key: c for c in configs}
    links = link_rates(configs, size)
    t_body, tp_body, tp_groups, failed = [], [], [], []
    out: dict[str, Any] = {}
    for ch in args.channels:
        for comp in args.compression:
            m = summary(by_key.get(f"mfd-{ch}-{comp}"))
            q = summary(by_key.get(f"qemu-{ch}-{comp}"))
            ratio = (m["median"] / q["median"]
                     if m and q and m.get("median") and q.get("median") else None)
            t_body.append([str(ch), comp, *fmt_s(m), *fmt_s(q),
                           f"{ratio:.2f}" if ratio is not None else "-"])
            out[f"{ch}-{comp}"] = {"mfd": m, "qemu": q, "ratio": ratio}
            for tool, st in (("mfd", m), ("qemu", q)):
                key = f"{tool}-{ch}-{comp}"
                if st is not None and "error" in st:
                    failed.append(f"FAILED {key}: {st['error']}")
                if not st or not st.get("median"):
                    continue
                link = links.get(ch)
                ram_rate = size / st["median"]
                wire = st.get("transferred")
                wire_rate = wire / st["median"] if wire else None
                tp_body.append([
                    str(ch), comp, tool, f"{ram_rate / MiB:.0f}",
                    f"{wire / MiB:.0f}" if wire else "?",
                    f"{wire_rate / MiB:.0f}" if wire_rate else "?",
                    f"{link / MiB:.0f}" if link else "?",
                    f"{wire_rate / link:.2f}" if wire_rate and link else "?",
                    f"{ram_rate / link:.2f}" if link else "?",
                    f"{st['total_time_ms']:.0f}" if st.get("total_time_ms") is not None
                    else "?",
                    f"{st['downtime_ms']:.0f}" if st.get("downtime_ms") is not None else "?",
                ])
                tp_groups.append(ch)
                out[f"{ch}-{comp}"][f"{tool}_rates"] = {
                    "ram_bytes_s": ram_rate, "wire_bytes_s": wire_rate, "link_bytes_s": link}
    head = ["ch", "compression", "mfd med s", "min", "max", "QEMU med s", "min", "max",
            "mfd/QEMU"]
    time_lines = [format_table(head, t_body, {0, 2, 3, 4, 5, 6, 7, 8},
                               [r[0] for r in t_body])]
    for tool, why in missing.items():
        time_lines.append(f"{tool}: n/a ({why})")
    time_lines += failed
    tp_head = ["ch", "compression", "tool", "RAM MiB/s", "wire MiB", "wire MiB/s",
               "link MiB/s", "wire/link", "RAM/link", "total-time ms", "downtime ms"]
    tp = format_table(tp_head, tp_body, {0, 3, 4, 5, 6, 7, 8, 9, 10}, tp_groups)
    return time_lines, [tp], out


def targets(args: argparse.Namespace, stopped: dict[str, Any]) -> tuple[list[str], dict]:
    lines, out = [], {}
    for comp in args.compression:
        for ch in args.channels:
            s = stopped.get(f"{ch}-{comp}", {})
            m, q, ratio = s.get("mfd"), s.get("qemu"), s.get("ratio")
            what = (f"{comp}, {ch} ch: mfd vs QEMU multifd {ch} {comp}"
                    + (f" level {ZSTD_LEVEL}" if comp == "zstd" else ""))
            if ratio is None:
                lines.append(f"{what}: no comparison (mfd or QEMU has no successful run)")
                continue
            ok = ratio <= 1.0
            lines.append(f"{what}: {m['median']:.3f} s vs {q['median']:.3f} s -> ratio "
                         f"{ratio:.2f} (target <= 1) {'PASS' if ok else 'MISS'}")
            out[f"{ch}-{comp}"] = {"mfd": m["median"], "qemu": q["median"], "ratio": ratio,
                                   "target": 1.0, "pass": ok}
    return lines, out


def live_lines(c: Config | None, why_not: str | None) -> tuple[list[str], dict[str, Any]]:
    if c is None:
        return [f"live run: skipped ({why_not})"], {"skipped": why_not}
    runs = c.counted()
    head = [f"live run: {c.label}; source guest {GUEST_SRC} (random pattern), destination "
            f"{GUEST_DST}; {len(runs)} counted run(s)"]
    if c.error is not None:
        return [*head, f"FAILED: {c.error}"], {"error": c.error, "params": c.params}
    if not runs:
        return [*head, "no runs"], {"params": c.params}
    metrics = [("wall time of mfd.api.migrate (s)", "seconds", 1.0, "{:.3f}"),
               ("total-time reported (ms)", "total_time_ms", 1.0, "{:.0f}"),
               ("downtime reported (ms)", "downtime_ms", 1.0, "{:.0f}"),
               ("rounds", "rounds", 1.0, "{:.0f}"),
               ("transferred (MiB)", "transferred", 1 / MiB, "{:.0f}"),
               ("destination exited after (s)", "dest_exited_seconds", 1.0, "{:.3f}")]
    body, out = [], {"params": c.params, "n": len(runs)}
    for label, key, scale, f in metrics:
        vals = [r[key] * scale for r in runs if isinstance(r.get(key), int | float)]
        if not vals:
            body.append([label, "?", "", ""])
            continue
        body.append([label, f.format(statistics.median(vals)), f.format(min(vals)),
                     f.format(max(vals))])
        out[key] = {"median": statistics.median(vals) / scale, "min": min(vals) / scale,
                    "max": max(vals) / scale}
    ver = [r.get("verified") for r in runs]
    tail_ = [f"destination RAM blake3 == source RAM blake3 at switchover (per block, as "
             f"both ends report them): {', '.join(map(str, ver))}"]
    return [*head, format_table(["", "median", "min", "max"], body, {1, 2, 3}), *tail_], out


NOTES = [
    "Stopped guest: both tools migrate the same RAM, a fresh sparse copy of the image in "
    "/dev/shm per run (untimed): zero pages are holes, as RAM a guest never touched. QEMU "
    "reads every page (allocating the holes in tmpfs), mfd's zero-page detection may skip "
    "holes without reading them.",
    "QEMU: QMP migrate on the paused (-S) source until its query-migrate says completed "
    "(polled every 2 ms, as mfd/qemu.py measures), multifd capability and the same "
    "multifd-channels / multifd-compression / zstd level on both sides, max-bandwidth "
    "1 TiB/s; the destination's completion (polled after the source's) is kept in the JSON. "
    "QEMU's start is not timed.",
    "mfd: wall time of mfd.api.migrate() in this process (after `mfd incoming` listens; the "
    "destination's Python start is not timed, like QEMU's). It includes spawning the "
    "channel processes, as QEMU's figure includes starting its threads.",
    "Every destination RAM is checked against the image with blake3, outside the timed "
    "region. RAM MiB/s = RAM size / median; wire MiB = bytes the tool reports transferred "
    "(median); link MiB/s = the TCP yardstick with as many connections as channels "
    "(Python threads moving the RAM size with 4 MiB sendall/recv_into); wire/link = the "
    "share of the link the tool used, RAM/link > 1 where zero pages cost nothing on the wire.",
    "Each config had one uncounted warm-up run; the counted runs were interleaved across "
    "configs (mfd, QEMU, yardsticks). The live run came after them.",
]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    standard_args(ap, "multifd channel counts (default 1,2,4)", DEFAULT_OUT,
                  "skip QEMU -> QEMU")
    ap.add_argument("--compression", type=parse_compression, default=["none", "zstd"],
                    help="multifd compressions (default none,zstd; zstd at level 1)")
    ap.add_argument("--no-live", action="store_true", help="skip the live run")
    args = parse_standard(ap, argv)

    cleanup = Cleanup()
    bench = Bench(args, cleanup)
    missing: dict[str, str] = {}
    qemu = qemu_info()
    if args.no_qemu:
        missing["QEMU"] = "--no-qemu"
    elif not qemu["usable"]:
        missing["QEMU"] = f"qemu-system-x86_64 >= 9.0 not found (found {qemu['version']})"
    else:
        bench.qemu_ok = True
    why = mfd_migrate_missing()
    if why is None:
        bench.mfd_ok = True
    else:
        missing["mfd"] = f"mfd migrate not available: {why}"
        log(f"mfd migrate not available ({why}): skipping the mfd rows and the live run")
    env = environment(qemu)
    env["net"] = net_settings()
    env["mfd_migrate_available"] = bench.mfd_ok
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    Cleanup.install_signals()
    configs: list[Config] = []
    live: Config | None = None
    live_why: str | None = "--no-live" if args.no_live else None
    interrupted = False
    try:
        bench.prepare()
        configs = bench.stopped_configs()
        log(f"{len(configs)} configs x (1 warm-up + {args.repeat}) runs")
        run_interleaved(configs, args.repeat, progress)
        if not args.no_live:
            rate, live_why = live_rate(configs, args.size)
            if rate:
                live = bench.live_config(rate)
                log(f"live run: dirty rate {human(rate)}/s, 1 warm-up + {args.repeat} runs")
                run_interleaved([live], args.repeat, progress)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up, reporting what was measured")
    finally:
        cleanup.run()

    size = args.size
    all_configs = [*configs, *([live] if live else [])]
    time_lines, tp_lines, stopped = stopped_tables(args, configs, missing)
    tgt_lines, tgt = targets(args, stopped)
    yard_rows: list[Row] = [r for r in rows_of(configs) if r.kind == "yardstick"]
    lv_lines, lv = live_lines(live, live_why)
    img = bench.setup.get("image", {})
    header = [
        f"mfd bench_migrate: {human(size)} RAM image, pages {img.get('pages')}, runs of 16, "
        f"seed 1; {args.repeat} counted runs/config (+1 warm-up), interleaved; TCP loopback",
        f"CPU: {env['cpu_count']} x {env['cpu_model']}; kernel {env['kernel']}; Python "
        f"{env['versions']['python']}; QEMU {qemu['version']}",
    ]
    bench.notes += run_notes(env, all_configs)
    qd = [r["dest_completed_seconds"] - r["seconds"] for c in configs if c.tool == "qemu"
          for r in c.counted() if "dest_completed_seconds" in r]
    if qd:
        bench.notes.append(f"QEMU's destination reported completed "
                           f"{statistics.median(qd) * 1000:.1f} ms (median; max "
                           f"{max(qd) * 1000:.1f} ms) after its source did.")
    md = [r["dest_exited_seconds"] - r["seconds"] for c in configs if c.tool == "mfd"
          for r in c.counted() if "dest_exited_seconds" in r]
    if md:
        bench.notes.append(f"`mfd incoming` exited {statistics.median(md) * 1000:.1f} ms "
                           f"(median; max {max(md) * 1000:.1f} ms) after mfd.api.migrate "
                           "returned.")
    if live is not None:
        bench.notes.append(f"Live run: the source guest starts zeroed and dirties random "
                           f"pages for {LIVE_SETTLE:g} s before the migration starts; the "
                           "dirty rate is half the wire rate of mfd's best uncompressed "
                           "stopped-guest config in this run.")
    text = "\n".join([
        *header, "",
        "Stopped guest over TCP loopback, wall seconds (median, min, max):", *time_lines, "",
        "Throughput (medians):", *tp_lines, "",
        "Yardsticks:", stats_table(yard_rows, size), "",
        "Targets:", *tgt_lines, "",
        *lv_lines, "",
        "Notes:", *(f"- {n}" for n in [*NOTES, *bench.notes])])
    if interrupted:
        text += "\n(INTERRUPTED: partial results)"
    print(text, flush=True)

    write_json(args.out, {
        "benchmark": "bench_migrate",
        "started": started,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "args": vars(args),
        "environment": env,
        "setup": bench.setup,
        "configs": [c.as_json() for c in all_configs],
        "summary": {"stopped": stopped, "yardsticks": [r.as_json(size) for r in yard_rows],
                    "live": lv},
        "skipped": missing,
        "targets": tgt,
        "notes": [*NOTES, *bench.notes],
        "table": text,
    })
    return 130 if interrupted else 0


def live_rate(configs: list[Config], size: int) -> tuple[int, str | None]:
    """Half the wire rate (transferred / wall time, medians) of mfd's fastest uncompressed
    stopped-guest config; (0, why) when there is none."""
    best_c, best_med = None, None
    for c in configs:
        if (c.kind == "stopped" and c.tool == "mfd" and c.params["compression"] == "none"
                and c.error is None and c.counted()):
            m = statistics.median(r["seconds"] for r in c.counted())
            if best_med is None or m < best_med:
                best_c, best_med = c, m
    if best_c is None or not best_med:
        return 0, "no successful mfd stopped-guest uncompressed run to set the dirty rate"
    wire = med([r.get("transferred") for r in best_c.counted()]) or size
    return int(wire / best_med / 2), None


if __name__ == "__main__":
    sys.exit(main())
