"""``mfd bench migrate``: a stopped guest over TCP loopback, mfd beside QEMU multifd.

For every channel count and compression (zstd and zlib at level 1), the source RAM a fresh
copy of the image in /dev/shm per run (untimed):

* mfd -> mfd: ``mfd incoming --listen tcp://127.0.0.1:PORT --image mem=DEST --json`` as a
  process (its start not timed), then :func:`mfd.api.migrate` in this process, timed as the
  wall time of that call (it starts the channel processes);
* QEMU 10 -> QEMU 10 multifd (``-machine none``, RAM a memory-backend-file): the destination
  ``-incoming defer`` on a fresh zeroed /dev/shm file; timed from the paused source's QMP
  ``migrate`` until ``completed`` (polled every 2 ms), QEMU's start not timed;
* the limit: TCP loopback moving the same bytes over as many connections.

Each destination RAM is checked against the image outside the timed region.
:class:`Incoming` is also what ``mfd bench live`` runs as its destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from mfd.bench import baselines
from mfd.bench.runs import Config, one_line, unlink
from mfd.bench.workspace import Workspace
from mfd.workers.tcp import free_ports

MIGRATE_TIMEOUT = 600.0  # an mfd migration taking longer: the destination is killed
LISTEN_TIMEOUT = 60.0  # for `mfd incoming` to listen
EXIT_TIMEOUT = 60.0  # for `mfd incoming` to exit after the source returned
LEVEL = 1  # zstd / zlib level, both tools

NOTES = [
    "migrate: a stopped guest. mfd is the wall time of mfd.api.migrate() in this process "
    "after `mfd incoming` listens (it starts the channel processes); QEMU is QMP migrate on "
    "the paused source until completed (polled every 2 ms), same multifd-channels, "
    "compression and level on both sides, max-bandwidth unlimited. Neither start is timed. "
    "Every destination RAM is checked against the image outside the timed region. The "
    "limit is TCP loopback moving as many bytes over as many connections (Python threads, "
    "4 MiB sendall/recv_into).",
]


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


class Incoming:
    """``mfd incoming ...`` as a process, its output in files (no pipe to fill up)."""

    def __init__(self, ws: Workspace, args: list[str], port: int) -> None:
        self.port = port
        self.stdout_path = ws.shm("incoming.out")
        self.stderr_path = ws.shm("incoming.err")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "mfd", "incoming", *args],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         close_fds=True)
        self.cleanup = ws.cleanup
        self.token = ws.cleanup.add_process(self.proc, "mfd incoming")

    def __enter__(self) -> Incoming:
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while not listening(self.port):
            if self.proc.poll() is not None:
                raise self.error(f"exited {self.proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise self.error(f"did not listen on port {self.port} within "
                                 f"{LISTEN_TIMEOUT:g} s")
            time.sleep(0.005)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup.done(self.token)

    def error(self, what: str) -> RuntimeError:
        return RuntimeError(f"mfd incoming {what}: {tail(self.stderr_path) or '(no stderr)'}")

    def migrate(self, uri: str, **kwargs: Any) -> tuple[Any, float]:
        """:func:`mfd.api.migrate` to this destination, timed, under a watchdog that kills
        the destination (so the source fails) when it hangs."""
        from mfd import api

        watchdog = threading.Timer(MIGRATE_TIMEOUT, self.proc.kill)
        watchdog.start()
        try:
            t0 = time.perf_counter()
            r = api.migrate(uri, **kwargs)
            return r, time.perf_counter() - t0
        finally:
            watchdog.cancel()

    def explain(self, e: BaseException) -> RuntimeError:
        """The source failed with ``e``: add what the destination said (the cause is often
        there), after giving it a moment to exit."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=3)
        rc = self.proc.poll()
        state = "still running" if rc is None else f"exited {rc}"
        return RuntimeError(f"{one_line(e)} [mfd incoming {state}: "
                            f"{tail(self.stderr_path) or 'no stderr'}]")

    def result(self) -> dict[str, Any]:
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
            return json.loads(lines[-1])
        except (IndexError, ValueError):
            raise self.error(f"printed no JSON line (stdout {lines[-1:]!r})") from None


def figures(r: Any) -> dict[str, Any]:
    """What a run keeps of an mfd migration's result (QEMU's names)."""
    qm = r.query_migrate
    return {"total_time_ms": r.total_time_ms, "downtime_ms": r.downtime_ms,
            "setup_time_ms": r.setup_time_ms, "transferred": r.transferred,
            "normal_pages": r.normal_pages, "zero_pages": r.zero_pages, "rounds": r.rounds,
            "cpu_throttle_percentage": r.cpu_throttle_percentage,
            "verify_time_ms": qm.get("x-verify-time"), "query_migrate": qm}


class MigrateBench:
    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    @contextlib.contextmanager
    def ends(self, dst_exists: bool) -> Iterator[tuple[str, str]]:
        """A fresh copy of the image as the source RAM and the destination's RAM file (made
        zeroed, or left for `mfd incoming` to create); after the migration the destination
        is checked against the image (the source freed first), and both are removed."""
        src = self.ws.guest_ram("src.ram")
        dst = self.ws.fresh_ram("dst.ram") if dst_exists else self.ws.shm("dst.ram")
        try:
            yield src, dst
            unlink(src)
            assert self.ws.image is not None
            self.ws.image.check(dst, "destination RAM")
        finally:
            unlink(src)
            unlink(dst)

    def mfd(self, channels: int, comp: str) -> dict[str, Any]:
        from mfd.options import MigrationParameters

        port = free_ports(channels + 1)
        uri = f"tcp://127.0.0.1:{port}"
        params = MigrationParameters(multifd_channels=channels, multifd_compression=comp,
                                     multifd_zstd_level=LEVEL, multifd_zlib_level=LEVEL)
        with self.ends(dst_exists=False) as (src, dst), \
                Incoming(self.ws, ["--listen", uri, "--image", f"mem={dst}", "--json"],
                         port) as inc:
            try:
                r, dt = inc.migrate(uri, images={"mem": src}, params=params)
            except Exception as e:
                raise inc.explain(e) from e
            inc.result()
        return {"seconds": dt, **figures(r), "verified": True}

    def qemu(self, channels: int, comp: str) -> dict[str, Any]:
        from mfd.qemu import QemuError, QemuMachine

        uri = f"tcp:127.0.0.1:{free_ports(1)}"
        level = {"zstd": {"zstd_level": LEVEL}, "zlib": {"zlib_level": LEVEL}}.get(comp, {})
        with self.ends(dst_exists=True) as (src, dst), \
                QemuMachine(dst, self.ws.size, incoming=True, timeout=self.ws.qemu_timeout) as d, \
                QemuMachine(src, self.ws.size, timeout=self.ws.qemu_timeout) as s:
            for m in (d, s):
                m.set_migration(mapped_ram=False, multifd_channels=channels,
                                multifd_compression=comp, **level)
            d.qmp("migrate-incoming", uri=uri, **{"exit-on-error": False})
            t0 = time.perf_counter()
            info = s.migrate(uri)
            dt = time.perf_counter() - t0
            deadline = time.monotonic() + self.ws.qemu_timeout  # the destination may still load
            while (status := d.qmp("query-migrate").get("status")) != "completed":
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise QemuError(f"destination {status}: {d.stderr_tail()[-200:]}")
                time.sleep(0.002)
        ram = info.get("ram", {})
        return {"seconds": dt, "total_time_ms": info.get("total-time"),
                "downtime_ms": info.get("downtime"), "setup_time_ms": info.get("setup-time"),
                "transferred": ram.get("transferred"), "normal_pages": ram.get("normal"),
                "zero_pages": ram.get("duplicate"), "query_migrate": info, "verified": True}

    def configs(self) -> list[Config]:
        s = self.ws.settings
        out = [Config(f"tcp-{n}", "migrate", "tcp",
                      f"TCP loopback, {n} connection{'s' if n > 1 else ''}",
                      {"channels": n}, lambda n=n: baselines.tcp(self.ws.size, n))
               for n in s.channels]
        for ch in s.channels:
            for comp in s.compressions:
                lvl = f" level {LEVEL}" if comp != "none" else ""
                params = {"channels": ch, "compression": comp}
                out.append(Config(f"mfd-{ch}-{comp}", "migrate", "mfd", f"{ch} ch {comp}{lvl}",
                                  params, lambda ch=ch, comp=comp: self.mfd(ch, comp),
                                  limit=f"tcp-{ch}"))
                if self.ws.qemu_ok:
                    out.append(Config(f"qemu-{ch}-{comp}", "migrate", "qemu",
                                      f"multifd {ch} {comp}{lvl}", params,
                                      lambda ch=ch, comp=comp: self.qemu(ch, comp),
                                      limit=f"tcp-{ch}"))
        return out
