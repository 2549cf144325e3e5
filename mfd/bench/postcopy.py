"""``mfd bench postcopy``: postcopy against precopy with auto-converge, lazy restore against a
full one.

* **migrate:** a guest of ``--size`` (the image's data, a KVM vCPU where /dev/kvm works,
  else the built-in workload) dirtying pages at twice the link's rate, the link capped with
  max-bandwidth (LINK). Precopy (the largest channel count, auto-converge) against postcopy
  (the main channel, as QEMU: no multifd with postcopy; the switch after POSTCOPY_AFTER s of
  precopy; the push at the same cap; with and without postcopy-preempt). Recorded: total
  time, downtime, when the destination's guest ran (precopy: at completion), pages it asked
  for, the fault latency (from the fault to the page placed) median and p99.
* **against QEMU** (``--against qemu``): the same postcopy on QEMU's guest program, the
  boot sector of :mod:`mfd.bench.bootsector` (one added to a counter in each page in turn,
  for ever) in a TCG QEMU -> QEMU migration, and mfd -> mfd with mfd's KVM guest running
  the same loop (``--pattern sequential``), with and without preempt. QEMU's destination
  reports ``postcopy-blocktime`` (capability on) and, traced, each fault from its request
  to its page placed: the same measure as mfd's latency.
* **restore:** the writing guest (the image's data) saved to a mapped-ram file on the disk
  (mfd's, with its trailer: restored, the guest goes on writing);
  a full ``mfd restore --guest`` (the guest may run once it returns) against ``--lazy`` (the
  guest runs at once; the channels load the rest): when the guest could run, when all RAM
  was in.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from typing import Any

import numpy as np

from mfd.bench.migration import Incoming, figures
from mfd.bench.runs import Config, unlink
from mfd.bench.workspace import Workspace
from mfd.shm import control, kvm
from mfd.shm.kvmguest import DATA
from mfd.units import human
from mfd.workers.tcp import free_ports

LINK = 128 << 20  # bytes per second: the capped link
POSTCOPY_AFTER = 1.0  # seconds of precopy before the switch
SETTLE = 1.0  # seconds the guest writes before the migration starts
SWEEP_RATE = 64 << 30  # mfd's sweeping KVM guest: never paced (TCG sweeps 4 M pages/s)
# QEMU's destination, traced: a fault read from the uffd and asked for, its page placed
FAULT_TRACE = ("postcopy_ram_fault_thread_request", "postcopy_place_page",
               "postcopy_place_page_zero")

NOTES = [
    f"postcopy migrate: the guest dirties {human(2 * LINK)}/s (twice the link: precopy alone "
    f"cannot converge) for {SETTLE:g} s first; max-bandwidth {human(LINK)}/s for precopy and "
    "for the postcopy push alike; precopy over the largest channel count with auto-converge, "
    f"postcopy on the main channel (QEMU allows no multifd with it), switching after "
    f"{POSTCOPY_AFTER:g} s. 'seconds' is the total time; run_at_s when the destination's guest "
    "ran; latency from a fault to its page placed, at the destination.",
    "postcopy against QEMU: QEMU's guest program on both, each page's counter added to "
    "in turn as fast as the guest runs (QEMU: the boot sector under TCG, -machine pc; mfd: "
    "its KVM guest, --pattern sequential, the same loop; RAM zero but for the counters), "
    "link, switch and push as above. latency: from the fault read at the destination (and "
    "asked for) to its page placed, per page (QEMU: its trace events "
    "postcopy_ram_fault_thread_request -> postcopy_place_page, tracing on); vcpu_blocked_ms: "
    "their sum (one vCPU faults one page at a time); QEMU's own postcopy-vcpu-blocktime is "
    "the time its vCPU was blocked in faults (ms, per vCPU; postcopy-blocktime: all vCPUs at "
    "once), its closest figure to that sum. QEMU 10.0 has no postcopy-latency.",
    "postcopy restore: the writing guest saved by mfd to a mapped-ram file on the disk (page "
    "cache warm), restored into a guest that goes on writing; 'seconds' is until all RAM is "
    "in; run_at_s when the guest could run (a full restore: when it returns); faults: pages "
    "the lazy guest needed before the channels had loaded them.",
]


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _latency(ms: list[float]) -> dict[str, Any]:
    """Per page asked for, from its fault to its place (ms): median, p99, their sum."""
    return {"faults": len(ms), "latency_median_ms": _percentile(ms, 0.5),
            "latency_p99_ms": _percentile(ms, 0.99), "vcpu_blocked_ms": sum(ms)}


_TRACE_LINE = re.compile(r"\d+@(\d+\.\d+):(\w+) .*?(?:HVA|host)=(0x[0-9a-f]+)")


def fault_latencies(trace_path: str) -> list[float]:
    """From a QEMU destination's FAULT_TRACE log (``pid@seconds.us:event ...``): for each
    fault asked for, the ms until its page was placed (the same host address)."""
    asked: dict[str, float] = {}
    out = []
    with open(trace_path) as f:
        for line in f:
            m = _TRACE_LINE.match(line)
            if m is None:
                continue
            at, event, addr = float(m[1]), m[2], m[3]
            if event == FAULT_TRACE[0]:
                asked.setdefault(addr, at)
            elif addr in asked:
                out.append((at - asked.pop(addr)) * 1000)
    return out


class PostcopyBench:
    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.channels = max(ws.settings.channels)
        self.kvm = kvm.unavailable() is None
        self.file: str | None = None

    def _guest(self, name: str, sweep: bool = False) -> None:
        """The writing guest (``sweep``: QEMU's guest program, on RAM as QEMU's: zero but
        for the counters)."""
        rate, pattern = (SWEEP_RATE, "sequential") if sweep else (2 * LINK, "random")
        argv = ["--name", name, "--ram", str(self.ws.size), "--dirty-rate", str(rate),
                "--pattern", pattern, "--stopped"] + (["--kvm"] if self.kvm else [])
        with control.start_guest_daemon(argv, name) as g:
            (block,) = g.query()["blocks"]
            assert self.ws.image is not None
            if sweep:  # as QEMU's guest a moment after boot: every counter swept once
                counters = np.memmap(block["path"], np.uint32, "r+").reshape(-1, 1024)
                counters[DATA // 4096 :, 0] = 1
                counters.flush()
                del counters
            else:
                self.ws.image.copy(block["path"], fresh=False, start=DATA if self.kvm else 0)
            g.cont()

    def migrate(self, postcopy: bool, preempt: bool = False, sweep: bool = False
                ) -> dict[str, Any]:
        from mfd.errors import Cancelled
        from mfd.options import MigrateOptions, MigrationParameters

        src, dst = f"bench-pc-src-{os.getpid()}", f"bench-pc-dst-{os.getpid()}"
        tokens = [self.ws.cleanup.add(f"quit guest {n}", lambda n=n: control.release(n))
                  for n in (src, dst)]
        try:
            self._guest(src, sweep)
            port = free_ports(1)
            uri = f"tcp:127.0.0.1:{port}"
            params = MigrationParameters(multifd_channels=self.channels, max_bandwidth=LINK,
                                         max_postcopy_bandwidth=LINK,
                                         auto_converge=not postcopy)
            options = MigrateOptions(multifd=not postcopy, postcopy=postcopy,
                                     postcopy_after=POSTCOPY_AFTER if postcopy else None,
                                     postcopy_preempt=preempt,
                                     timeout=self.ws.settings.live_timeout)
            args = ["--listen", uri, "--guest", dst, "--json"]
            args += ["--postcopy-ram"] if postcopy else []
            args += ["--postcopy-preempt"] if preempt else []
            with Incoming(self.ws, args, port) as inc:
                time.sleep(SETTLE)
                t0 = time.perf_counter()
                try:
                    r, dt = inc.migrate(uri, guest=src, params=params, options=options)
                except Cancelled:  # --live-timeout: precopy did not converge in time
                    return {"seconds": time.perf_counter() - t0, "converged": False}
                except Exception as e:
                    raise inc.explain(e) from e
                dest = inc.result()
            if dest.get("digests") != r.digests:
                raise RuntimeError("the destination's RAM digests differ from the source's")
            pc = dest.get("postcopy") or {}
            lat = [x / 1000 for x in pc.get("x-latencies-us", [])]
            run_at = r.query_migrate.get("x-postcopy-run-at", r.total_time_ms)
            return {"seconds": dt, "converged": True, **figures(r),
                    "run_at_s": run_at / 1000,
                    "postcopy_requests": pc.get("postcopy-requests", 0),
                    **_latency(lat), "latency_dist": pc.get("postcopy-latency-dist")}
        finally:
            for t in reversed(tokens):
                self.ws.cleanup.done(t)

    def qemu(self, preempt: bool) -> dict[str, Any]:
        """QEMU -> QEMU postcopy of the boot-sector guest (TCG), as :meth:`migrate`'s."""
        from mfd.bench.bootsector import default_range, write_boot_image
        from mfd.bench.qemu import QemuMachine

        size, timeout = self.ws.size, self.ws.settings.live_timeout
        boot, src, dst = (self.ws.shm(n) for n in ("boot.img", "qemu-src.ram", "qemu-dst.ram"))
        write_boot_image(boot, *default_range(size))
        for path in (src, dst):
            with open(path, "wb") as f:
                f.truncate(size)
        uri = f"tcp:127.0.0.1:{free_ports(1)}"
        pc = {"machine": "pc", "accel": "tcg", "boot": boot, "paused": False,
              "timeout": self.ws.qemu_timeout}
        try:
            with QemuMachine(dst, size, incoming=True, trace=FAULT_TRACE, **pc) as d, \
                    QemuMachine(src, size, **pc) as s:
                for m in (d, s):
                    m.set_migration(postcopy=True, preempt=preempt, max_bandwidth=LINK)
                d.qmp("migrate-set-capabilities", capabilities=[
                    {"capability": "postcopy-blocktime", "state": True}])
                s.qmp("migrate-set-parameters", **{"max-postcopy-bandwidth": LINK})
                d.start_migrate_incoming(uri)
                time.sleep(SETTLE)
                t0 = time.perf_counter()
                s.start_migrate(uri)
                time.sleep(POSTCOPY_AFTER)
                s.qmp("migrate-start-postcopy")
                run_at = None
                while (info := s.qmp("query-migrate"))["status"] != "completed":
                    if run_at is None and info["status"] == "postcopy-active":
                        run_at = time.perf_counter() - t0
                    if info["status"] in ("failed", "cancelled") \
                            or time.perf_counter() - t0 > timeout:
                        raise RuntimeError(f"QEMU's postcopy {info['status']}: "
                                           f"{info.get('error-desc', s.stderr_tail()[-200:])}")
                    time.sleep(0.002)
                dt = time.perf_counter() - t0
                dest = d.wait_migration()
                lat = fault_latencies(d.trace_path)
        finally:
            for path in (boot, src, dst):
                unlink(path)
        return {"seconds": dt, "converged": True, "total_time_ms": info.get("total-time"),
                "downtime_ms": info.get("downtime"), "run_at_s": run_at,
                "postcopy_requests": info["ram"]["postcopy-requests"], **_latency(lat),
                "blocktime_ms": dest.get("postcopy-blocktime"),
                "vcpu_blocktime_ms": sum(dest.get("postcopy-vcpu-blocktime", []))}

    def _saved(self) -> str:
        """The writing guest saved to a mapped-ram file (made once): restored, it goes on
        writing, so a lazy restore's guest touches pages not read yet."""
        if self.file is None:
            from mfd import api
            from mfd.options import SaveOptions

            name = f"bench-pc-save-{os.getpid()}"
            token = self.ws.cleanup.add(f"quit guest {name}", lambda: control.release(name))
            try:
                self._guest(name)
                path = self.ws.disk("postcopy.mig")
                self.ws.cleanup.add_path(path)
                api.save(path, guest=name, options=SaveOptions(stop_first=True))
            finally:
                self.ws.cleanup.done(token)
            self.file = path
        return self.file

    def restore(self, lazy: bool) -> dict[str, Any]:
        from mfd import api
        from mfd.options import RestoreOptions

        path = self._saved()
        name = f"bench-lazy-{os.getpid()}"
        token = self.ws.cleanup.add(f"quit guest {name}", lambda: control.release(name))
        try:
            t0 = time.perf_counter()
            res = api.restore(path, guest=name, options=RestoreOptions(
                multifd_channels=self.channels, lazy=lazy))
            dt = time.perf_counter() - t0
        finally:
            self.ws.cleanup.done(token)
        return {"seconds": dt, "run_at_s": res.running_after if lazy else dt,
                "faults": res.faults, "verified": res.verified}

    def configs(self) -> list[Config]:
        who = "KVM guest" if self.kvm else "built-in guest"
        out = [
            Config("postcopy-precopy-ac", "postcopy migrate", "mfd",
                   f"precopy, {self.channels} ch, auto-converge, {who}",
                   {"postcopy": False, "link": LINK, "dirty_rate": 2 * LINK, "kvm": self.kvm},
                   lambda: self.migrate(False)),
            *[Config(f"postcopy-postcopy{'-preempt' if preempt else ''}", "postcopy migrate",
                     "mfd", f"postcopy after {POSTCOPY_AFTER:g} s"
                     + (", preempt" if preempt else "") + f", {who}",
                     {"postcopy": True, "preempt": preempt, "link": LINK,
                      "dirty_rate": 2 * LINK, "kvm": self.kvm},
                     lambda preempt=preempt: self.migrate(True, preempt))
              for preempt in (False, True)],
        ]
        if self.ws.settings.against_qemu and self.ws.qemu_ok:
            for preempt in (False, True):
                tail = ", preempt" if preempt else ""
                params = {"postcopy": True, "preempt": preempt, "link": LINK,
                          "guest": "sweep"}
                out += [Config(f"postcopy-sweep{tail and '-preempt'}", "postcopy sweep",
                               "mfd", f"sweep, postcopy{tail}, {who}", params,
                               lambda preempt=preempt: self.migrate(True, preempt, True)),
                        Config(f"postcopy-sweep{tail and '-preempt'}-qemu", "postcopy sweep",
                               "qemu", f"sweep, postcopy{tail}, QEMU boot sector (TCG)",
                               params, lambda preempt=preempt: self.qemu(preempt))]
        for lazy in (False, True):
            out.append(Config(f"postcopy-restore-{'lazy' if lazy else 'full'}",
                              "postcopy restore", "mfd",
                              f"{'lazy' if lazy else 'full'} restore, {self.channels} ch",
                              {"lazy": lazy, "channels": self.channels},
                              lambda lazy=lazy: self.restore(lazy)))
        return out


def summary(configs: list[Config]) -> list[str]:
    """One line per restore config: the medians its table has no column for."""
    lines = []
    for c in configs:
        runs = c.counted()
        if not runs:
            continue

        def med(key: str, runs: list = runs) -> float | None:
            xs = [r[key] for r in runs if r.get(key) is not None]
            return statistics.median(xs) if xs else None

        bits = [f"{key} {med(key):.3f}" for key in ("run_at_s", "faults")
                if med(key) is not None]
        lines.append(f"{c.label}: median {', '.join(bits)}")
    return lines
