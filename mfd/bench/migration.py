"""``mfd bench migrate``: a stopped guest over TCP loopback, mfd beside QEMU multifd.

For every channel count and compression (zstd and zlib at level 1), the source RAM a fresh
copy of the image in /dev/shm per run (untimed), all on one port (QEMU's wire):

* mfd -> mfd: ``mfd incoming --listen tcp:127.0.0.1:PORT --image mem=DEST --json`` as a
  process (its start not timed), then :func:`mfd.api.migrate` in this process, timed as the
  wall time of that call (it starts the channel processes);
* QEMU 10 -> QEMU 10 multifd (``-machine none``, RAM a memory-backend-file): the destination
  ``-incoming defer`` on a fresh zeroed /dev/shm file; timed from the paused source's QMP
  ``migrate`` until ``completed`` (polled every 2 ms), QEMU's start not timed;
* with ``--against qemu`` also the cross pairs: QEMU -> mfd (QEMU's source to
  ``mfd incoming ... --multifd-channels N --multifd-compression C``, timed as QEMU -> QEMU)
  and mfd -> QEMU (:func:`mfd.api.migrate` to QEMU's ``-incoming defer`` destination, timed
  as mfd -> mfd; QEMU's ``completed`` awaited after, untimed);
* the limit: TCP loopback moving the same bytes over as many connections.

Each pair in each :class:`View` asked for: the destination's RAM fresh (filled as the pages
arrive) or allocated and zeroed ahead (QEMU's ``prealloc=on``, ``mfd incoming --prealloc``;
before the timed part, in the destination's start), and both ends on the machine's shared
CPUs or each pinned to a CPU of its own (``--pin``: the source on one, the destination and
every thread and process it starts on another, as two hosts would give). mfd -> mfd also
without verification (``--verify``).

Each destination RAM is checked against the image outside the timed region. Each end's CPU
time over the run (:mod:`mfd.bench.cpu`) is recorded per GiB of RAM.
:class:`Incoming` is also what ``mfd bench live`` runs as its destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mfd.bench import baselines
from mfd.bench.cpu import SelfCpu, delta, per_gib, proc_cpu, wait_cpu
from mfd.bench.runs import Config, one_line, unlink
from mfd.bench.workspace import Workspace
from mfd.sysutil import python_m
from mfd.workers.tcp import free_ports

MIGRATE_TIMEOUT = 600.0  # an mfd migration taking longer: the destination is killed
LISTEN_TIMEOUT = 60.0  # for `mfd incoming` to listen
EXIT_TIMEOUT = 60.0  # for `mfd incoming` to exit after the source returned
LEVEL = 1  # zstd / zlib level, both tools

NOTES = [
    "migrate: a stopped guest, one TCP port per migration (QEMU's wire). An mfd source is "
    "timed as the wall time of mfd.api.migrate() in this process once the destination "
    "listens (it starts the channel processes); a QEMU source as QMP migrate on the paused "
    "source until completed (polled every 2 ms). mfd->mfd, QEMU->QEMU and (with --against "
    "qemu) the cross pairs QEMU->mfd and mfd->QEMU: same multifd-channels, compression and "
    "level on both sides (given to `mfd incoming` for a QEMU source), max-bandwidth "
    "unlimited. Neither start is timed. Every destination RAM is checked against the image "
    "outside the timed region. The limit is TCP loopback moving as many bytes over as many "
    "connections (Python threads, 4 MiB sendall/recv_into).",
    "migrate CPU: src-cpu and dst-cpu are each end's CPU seconds (user + system, every "
    "thread and child process) per GiB of RAM, medians. QEMU: /proc/PID/stat utime+stime "
    "from just before the migration starts until that end completed (10 ms ticks). "
    "`mfd incoming`: /proc/PID/stat once it listens until its exit (wait4 rusage, its "
    "channel processes included; what it does after the source returned, e.g. verifying, "
    "counts). mfd's source in this process: getrusage RUSAGE_SELF plus RUSAGE_CHILDREN (its "
    "forked channels, reaped when it returns) over the mfd.api.migrate() call.",
    "migrate views: 'prealloc' is the destination's RAM allocated and zeroed before the "
    "migration (QEMU: memory-backend-file prealloc=on, during its start; mfd: `mfd incoming "
    "--prealloc mem=SIZE`, before it listens); neither is timed nor counted in dst-cpu "
    "(dst_cpu_startup_s in results.json has it). Without it the destination's RAM is a "
    "fresh sparse file that fills as pages arrive. 'pinned' (--pin): the source (QEMU and "
    "its threads, or mfd's source in the bench process and its channels) on one CPU and the "
    "destination (QEMU, or `mfd incoming` and its channels) on another, with taskset and "
    "sched_setaffinity: the view two hosts would give; otherwise both share every CPU.",
]


@dataclass(frozen=True)
class View:
    """How a pair runs besides its channels and compression."""

    prealloc: bool = False  # the destination's RAM allocated and zeroed ahead (untimed)
    pinned: bool = False  # the source on one CPU, the destination on another

    @property
    def key(self) -> str:
        return ("-prealloc" if self.prealloc else "") + ("-pinned" if self.pinned else "")

    @property
    def label(self) -> str:
        return (", prealloc" if self.prealloc else "") + (", pinned" if self.pinned else "")

    @property
    def params(self) -> dict[str, bool]:
        return {k: True for k in ("prealloc", "pinned") if getattr(self, k)}

    def cpu(self, end: str) -> int | None:
        """The CPU ``end`` ("src" or "dst") is pinned to: the first and the second this
        process may use."""
        if not self.pinned:
            return None
        return sorted(os.sched_getaffinity(0))[0 if end == "src" else 1]

    def incoming_args(self, size: int) -> list[str]:
        return ["--prealloc", f"mem={size}"] if self.prealloc else []


@contextlib.contextmanager
def on_cpu(cpu: int | None) -> Iterator[None]:
    """This thread, and every thread and process it starts meanwhile (mfd's source and its
    channels), on ``cpu`` only (None: as it was)."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cpus(pid: int = 0) -> list[int]:
    """The CPUs ``pid`` (0: this thread) may run on, recorded with each run."""
    return sorted(os.sched_getaffinity(pid))


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """``command`` with itself and all it starts on ``cpu`` (None: as it is)."""
    return ["taskset", "-c", str(cpu), *command] if cpu is not None else command


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

    def __init__(self, ws: Workspace, args: list[str], port: int,
                 cpu: int | None = None) -> None:
        """``cpu``: the one CPU it and its channels run on (None: any)."""
        self.port = port
        self.stdout_path = ws.shm("incoming.out")
        self.stderr_path = ws.shm("incoming.err")
        command, env = python_m("mfd", "incoming", *args)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(pinned(command, cpu), env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, close_fds=True)
        self.cleanup = ws.cleanup
        self.token = ws.cleanup.add_process(self.proc, "mfd incoming")
        self.cpu0: float | None = None  # its CPU seconds when the migration started
        self.src_cpu: SelfCpu | None = None  # this process's, over :meth:`migrate`
        self.src_cpus: list[int] | None = None  # where :meth:`migrate` ran
        self.dst_cpus: list[int] | None = None  # where it runs (from :meth:`mark`)
        self.dst_cpu: float | None = None  # its own from cpu0 to its exit (:meth:`result`)

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

    def mark(self) -> None:
        """The migration starts now: its CPU time so far (the start-up) is not counted."""
        self.cpu0 = proc_cpu(self.proc.pid)
        self.dst_cpus = cpus(self.proc.pid)

    def migrate(self, uri: str, cpu: int | None = None, **kwargs: Any) -> tuple[Any, float]:
        """:func:`mfd.api.migrate` to this destination (on ``cpu`` only, if given), timed,
        under a watchdog that kills the destination (so the source fails) when it hangs."""
        from mfd import api

        watchdog = threading.Timer(MIGRATE_TIMEOUT, self.proc.kill)
        watchdog.start()
        self.mark()
        try:
            with on_cpu(cpu), SelfCpu() as used:
                self.src_cpus = cpus()
                t0 = time.perf_counter()
                r = api.migrate(uri, **kwargs)
                dt = time.perf_counter() - t0
            self.src_cpu = used
            return r, dt
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

    def cpu_figures(self) -> dict[str, Any]:
        """Its CPU seconds before the migration (start-up, not counted) and, when the source
        was :meth:`migrate`, this process's split into its own and its channels'."""
        out: dict[str, Any] = {"dst_cpu_startup_s": self.cpu0, "dst_cpus": self.dst_cpus}
        if self.src_cpu is not None:
            out.update(src_cpu_own_s=self.src_cpu.own, src_cpu_channels_s=self.src_cpu.children,
                       src_cpus=self.src_cpus)
        return out

    def result(self) -> dict[str, Any]:
        """Wait for the exit (its CPU time in :attr:`dst_cpu`); return its JSON line; raise
        on failure."""
        try:
            self.dst_cpu = delta(self.cpu0, wait_cpu(self.proc, EXIT_TIMEOUT))
        except subprocess.TimeoutExpired:
            raise self.error(f"still running {EXIT_TIMEOUT:g} s after the source "
                             "returned") from None
        rc = self.proc.returncode
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


def _qemu_figures(info: dict[str, Any]) -> dict[str, Any]:
    """What a run keeps of a QEMU source's final query-migrate."""
    ram = info.get("ram", {})
    return {"total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "setup_time_ms": info.get("setup-time"), "transferred": ram.get("transferred"),
            "normal_pages": ram.get("normal"), "zero_pages": ram.get("duplicate"),
            "query_migrate": info}


def _level(comp: str) -> dict[str, int]:
    return {"zstd": {"zstd_level": LEVEL}, "zlib": {"zlib_level": LEVEL}}.get(comp, {})


def _qemu_tail(m: Any) -> str:
    """The last line QEMU wrote on stderr (where it says why a load failed)."""
    lines = m.stderr_tail().splitlines()
    return lines[-1].strip() if lines else "no stderr"


class MigrateBench:
    """Each pair of ends, for one channel count and compression: one run each."""

    # config key prefix, tool (what report and plots go by), label
    PAIRS = (("mfd", "mfd", "{ch} ch {comp}"), ("qemu", "qemu", "multifd {ch} {comp}"),
             ("qemu-mfd", "qemu->mfd", "{ch} ch {comp}"),
             ("mfd-qemu", "mfd->qemu", "{ch} ch {comp}"))

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.creds: str | None = None  # --tls: made once, in the work directory

    def _tls_creds(self) -> str:
        if self.creds is None:
            from mfd import tlscerts

            self.creds = self.ws.disk("tls")
            tlscerts.make(self.creds, ["127.0.0.1"])
        return self.creds

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

    def _params(self, channels: int, comp: str) -> Any:
        from mfd.options import MigrationParameters

        return MigrationParameters(multifd_channels=channels, multifd_compression=comp,
                                   multifd_zstd_level=LEVEL, multifd_zlib_level=LEVEL)

    def mfd(self, channels: int, comp: str, view: View, verify: bool = True,
            tls: bool = False) -> dict[str, Any]:
        """mfd -> mfd (``verify=False``: mfd migrate --no-verify; the image is compared
        with its copy all the same, untimed; ``tls``: --tls-creds on both ends)."""
        from mfd.options import MigrateOptions
        from mfd.workers.tls import TLSOptions

        port = free_ports(1)
        uri = f"tcp:127.0.0.1:{port}"
        creds = self._tls_creds() if tls else None
        with self.ends(dst_exists=False) as (src, dst), \
                Incoming(self.ws, ["--listen", uri, "--image", f"mem={dst}", "--json",
                                   *view.incoming_args(self.ws.size),
                                   *(["--tls-creds", creds] if creds else [])], port,
                         cpu=view.cpu("dst")) as inc:
            try:
                r, dt = inc.migrate(uri, cpu=view.cpu("src"), images={"mem": src},
                                    params=self._params(channels, comp),
                                    options=MigrateOptions(verify=verify, tls=TLSOptions(
                                        creds, hostname="127.0.0.1") if creds else None))
            except Exception as e:
                raise inc.explain(e) from e
            inc.result()
        assert inc.src_cpu is not None
        return {"seconds": dt, **figures(r),
                **per_gib(inc.src_cpu.total, inc.dst_cpu, self.ws.size), **inc.cpu_figures(),
                "verified": True}

    def qemu(self, channels: int, comp: str, view: View, tls: bool = False) -> dict[str, Any]:
        """QEMU -> QEMU (``tls``: tls-creds-x509 on both)."""
        from mfd.bench.qemu import QemuError

        uri = f"tcp:127.0.0.1:{free_ports(1)}"
        with self.ends(dst_exists=True) as (src, dst), \
                self._qemu_dst(dst, view) as d, self._qemu_src(src, view) as s:
            for m in (d, s):
                m.set_migration(mapped_ram=False, multifd_channels=channels,
                                multifd_compression=comp, **_level(comp))
                if tls:
                    m.set_tls(self._tls_creds(), server=m is d)
            d.start_migrate_incoming(uri)
            s0, d0 = proc_cpu(s.pid), proc_cpu(d.pid)
            where = cpus(s.pid), cpus(d.pid)
            t0 = time.perf_counter()
            s.start_migrate(uri)
            info = s.wait_migration()
            dt = time.perf_counter() - t0
            s1 = proc_cpu(s.pid)
            deadline = time.monotonic() + self.ws.qemu_timeout  # the destination may still load
            while (status := d.qmp("query-migrate").get("status")) != "completed":
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise QemuError(f"destination {status}: {d.stderr_tail()[-200:]}")
                time.sleep(0.002)
            d1 = proc_cpu(d.pid)
        return {"seconds": dt, **_qemu_figures(info),
                **per_gib(delta(s0, s1), delta(d0, d1), self.ws.size),
                "dst_cpu_startup_s": d0, "src_cpus": where[0], "dst_cpus": where[1],
                "verified": True}

    def _qemu_dst(self, ram: str, view: View) -> Any:
        """QEMU's destination, -incoming defer on ``ram`` (``prealloc=on`` in the
        prealloc view: every page allocated during its start, before QMP answers)."""
        from mfd.bench.qemu import QemuMachine

        return QemuMachine(ram, self.ws.size, incoming=True, timeout=self.ws.qemu_timeout,
                           prealloc=view.prealloc, cpu=view.cpu("dst"))

    def _qemu_src(self, ram: str, view: View) -> Any:
        from mfd.bench.qemu import QemuMachine

        return QemuMachine(ram, self.ws.size, timeout=self.ws.qemu_timeout,
                           cpu=view.cpu("src"))

    def qemu_to_mfd(self, channels: int, comp: str, view: View) -> dict[str, Any]:
        """QEMU -> mfd: QEMU's source to `mfd incoming`, timed as QEMU -> QEMU."""
        port = free_ports(1)
        uri = f"tcp:127.0.0.1:{port}"
        with self.ends(dst_exists=False) as (src, dst), self._qemu_src(src, view) as s, \
                Incoming(self.ws, ["--listen", uri, "--image", f"mem={dst}",
                                   "--multifd-channels", str(channels),
                                   "--multifd-compression", comp, "--json",
                                   *view.incoming_args(self.ws.size)], port,
                         cpu=view.cpu("dst")) as inc:
            s.set_migration(mapped_ram=False, multifd_channels=channels,
                            multifd_compression=comp, **_level(comp))
            inc.mark()
            s0, src_cpus = proc_cpu(s.pid), cpus(s.pid)
            t0 = time.perf_counter()
            try:
                s.start_migrate(uri)
                info = s.wait_migration()
            except Exception as e:
                raise inc.explain(e) from e
            dt = time.perf_counter() - t0
            s1 = proc_cpu(s.pid)
            dest = inc.result()
        return {"seconds": dt, **_qemu_figures(info),
                **per_gib(delta(s0, s1), inc.dst_cpu, self.ws.size), **inc.cpu_figures(),
                "src_cpus": src_cpus,
                "destination": {k: v for k, v in dest.items() if k != "blocks"},
                "verified": True}

    def mfd_to_qemu(self, channels: int, comp: str, view: View) -> dict[str, Any]:
        """mfd -> QEMU: mfd.api.migrate() to QEMU's -incoming defer, timed as mfd -> mfd;
        QEMU's completion awaited after (untimed)."""
        from mfd import api
        from mfd.bench.qemu import QemuError

        uri = f"tcp:127.0.0.1:{free_ports(1)}"
        warnings: list[str] = []
        with self.ends(dst_exists=True) as (src, dst), self._qemu_dst(dst, view) as d:
            d.set_migration(mapped_ram=False, multifd_channels=channels,
                            multifd_compression=comp, **_level(comp))
            d.start_migrate_incoming(uri)
            pid = d.pid
            assert pid is not None
            # a hanging migration: QEMU killed, so the source fails (the bound QEMU's own
            # waits have: a migration slower than 10 MiB/s is stuck)
            limit = min(MIGRATE_TIMEOUT, self.ws.qemu_timeout)
            killed = threading.Event()

            def kill() -> None:
                killed.set()
                os.kill(pid, signal.SIGKILL)

            watchdog = threading.Timer(limit, kill)
            watchdog.start()
            d0, dst_cpus = proc_cpu(pid), cpus(pid)
            try:
                with on_cpu(view.cpu("src")), SelfCpu() as cpu:
                    src_cpus = cpus()
                    t0 = time.perf_counter()
                    r = api.migrate(uri, images={"mem": src},
                                    params=self._params(channels, comp), warn=warnings.append)
                    dt = time.perf_counter() - t0
            except Exception as e:
                watchdog.cancel()
                if killed.is_set():
                    raise RuntimeError(f"not done within {limit:g} s: QEMU's destination "
                                       f"killed; mfd then said: {one_line(e)}") from e
                with contextlib.suppress(Exception):  # QEMU may have said why by now
                    d.wait_migration(timeout=2.0)
                raise RuntimeError(f"{one_line(e)} [QEMU destination: {_qemu_tail(d)}]") from e
            finally:
                watchdog.cancel()
            t1 = time.perf_counter()
            try:
                d.wait_migration()
            except QemuError as e:
                raise RuntimeError(f"{one_line(e)} [QEMU: {_qemu_tail(d)}]") from e
            done = time.perf_counter() - t1
            d1 = proc_cpu(pid)
        return {"seconds": dt, **figures(r), **per_gib(cpu.total, delta(d0, d1), self.ws.size),
                "src_cpu_own_s": cpu.own, "src_cpu_channels_s": cpu.children,
                "dst_cpu_startup_s": d0, "src_cpus": src_cpus, "dst_cpus": dst_cpus,
                "destination_completed_after_s": done, "warnings": warnings,
                "verified": True}

    def configs(self) -> list[Config]:
        s = self.ws.settings
        out = [Config(f"tcp-{n}", "migrate", "tcp",
                      f"TCP loopback, {n} connection{'s' if n > 1 else ''}",
                      {"channels": n}, lambda n=n: baselines.tcp(self.ws.size, n))
               for n in s.channels]
        views = [View(prealloc, pin) for pin in s.pinned for prealloc in s.prealloc]
        for ch in s.channels:
            for comp in s.compressions:
                for view in views:
                    out += self._view_configs(ch, comp, view)
                if s.tls:  # each tool over TLS, beside itself in clear
                    out += self._tls_configs(ch, comp, views[0])
        return out

    def _config(self, key: str, tool: str, label: str, params: dict[str, Any], fn: Any,
                ch: int) -> Config:
        return Config(key, "migrate", tool, label, params, fn, limit=f"tcp-{ch}")

    def _view_configs(self, ch: int, comp: str, view: View) -> list[Config]:
        """Each pair in one view; mfd -> mfd verified and not, as --verify asks."""
        verify = self.ws.settings.migrate_verify
        run = {"mfd": self.mfd, "qemu": self.qemu, "qemu->mfd": self.qemu_to_mfd,
               "mfd->qemu": self.mfd_to_qemu}
        lvl = f" level {LEVEL}" if comp != "none" else ""
        params = {"channels": ch, "compression": comp, **view.params}
        out = []
        for prefix, tool, label in self.PAIRS:
            if (tool != "mfd" and not self.ws.qemu_ok) or (tool == "mfd" and True not in verify):
                continue
            out.append(self._config(f"{prefix}-{ch}-{comp}{view.key}", tool,
                                    label.format(ch=ch, comp=comp) + lvl + view.label, params,
                                    lambda f=run[tool]: f(ch, comp, view), ch))
        if False in verify:  # what the verification costs, beside it
            out.append(self._config(f"mfd-noverify-{ch}-{comp}{view.key}", "mfd",
                                    f"{ch} ch {comp}{lvl}{view.label}, --no-verify",
                                    {**params, "verify": False},
                                    lambda: self.mfd(ch, comp, view, False), ch))
        return out

    def _tls_configs(self, ch: int, comp: str, view: View) -> list[Config]:
        lvl = f" level {LEVEL}" if comp != "none" else ""
        labels = {t: lb for _, t, lb in self.PAIRS}
        return [self._config(f"{tool}-tls-{ch}-{comp}{view.key}", tool,
                             labels[tool].format(ch=ch, comp=comp) + lvl + view.label + ", TLS",
                             {"channels": ch, "compression": comp, **view.params, "tls": True},
                             lambda f=f: f(ch, comp, view, tls=True), ch)
                for tool, f in (("mfd", self.mfd), ("qemu", self.qemu))
                if tool == "mfd" or self.ws.qemu_ok]
