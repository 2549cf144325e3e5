"""``mfd bench postcopy``: postcopy against precopy with auto-converge, lazy restore against a
full one.

* **migrate:** a guest of ``--size`` (the image's data, a KVM vCPU where /dev/kvm works,
  else the built-in workload) dirtying pages at twice the link's rate, the link capped with
  max-bandwidth (LINK). Precopy (the largest channel count, auto-converge) against postcopy
  (the main channel, as QEMU: no multifd with postcopy; the switch after POSTCOPY_AFTER s of
  precopy; the push at the same cap; with and without postcopy-preempt). Recorded: total
  time, downtime, when the destination's guest ran (precopy: at completion), pages it asked
  for, the fault latency (from the fault to the page placed) median and p99.
* **restore:** the writing guest (the image's data) saved to a mapped-ram file on the disk
  (mfd's, with its trailer: restored, the guest goes on writing);
  a full ``mfd restore --guest`` (the guest may run once it returns) against ``--lazy`` (the
  guest runs at once; the channels load the rest): when the guest could run, when all RAM
  was in.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from mfd.bench.migration import Incoming, figures
from mfd.bench.runs import Config
from mfd.bench.workspace import Workspace
from mfd.shm import control, kvm
from mfd.shm.kvmguest import DATA
from mfd.units import human
from mfd.workers.tcp import free_ports

LINK = 128 << 20  # bytes per second: the capped link
POSTCOPY_AFTER = 1.0  # seconds of precopy before the switch
SETTLE = 1.0  # seconds the guest writes before the migration starts

NOTES = [
    f"postcopy migrate: the guest dirties {human(2 * LINK)}/s (twice the link: precopy alone "
    f"cannot converge) for {SETTLE:g} s first; max-bandwidth {human(LINK)}/s for precopy and "
    "for the postcopy push alike; precopy over the largest channel count with auto-converge, "
    f"postcopy on the main channel (QEMU allows no multifd with it), switching after "
    f"{POSTCOPY_AFTER:g} s. 'seconds' is the total time; run_at_s when the destination's guest "
    "ran; latency from a fault to its page placed, at the destination.",
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


class PostcopyBench:
    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.channels = max(ws.settings.channels)
        self.kvm = kvm.unavailable() is None
        self.file: str | None = None

    def _guest(self, name: str) -> None:
        argv = ["--name", name, "--ram", str(self.ws.size), "--dirty-rate", str(2 * LINK),
                "--pattern", "random", "--stopped"] + (["--kvm"] if self.kvm else [])
        with control.start_guest_daemon(argv, name) as g:
            (block,) = g.query()["blocks"]
            assert self.ws.image is not None
            self.ws.image.copy(block["path"], fresh=False, start=DATA if self.kvm else 0)
            g.cont()

    def migrate(self, postcopy: bool, preempt: bool = False) -> dict[str, Any]:
        from mfd.main_thread.migrate import Cancelled
        from mfd.options import MigrateOptions, MigrationParameters

        src, dst = f"bench-pc-src-{os.getpid()}", f"bench-pc-dst-{os.getpid()}"
        tokens = [self.ws.cleanup.add(f"quit guest {n}", lambda n=n: control.release(n))
                  for n in (src, dst)]
        try:
            self._guest(src)
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
                    "latency_median_ms": _percentile(lat, 0.5),
                    "latency_p99_ms": _percentile(lat, 0.99),
                    "latency_dist": pc.get("postcopy-latency-dist")}
        finally:
            for t in reversed(tokens):
                self.ws.cleanup.done(t)

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
        for lazy in (False, True):
            out.append(Config(f"postcopy-restore-{'lazy' if lazy else 'full'}",
                              "postcopy restore", "mfd",
                              f"{'lazy' if lazy else 'full'} restore, {self.channels} ch",
                              {"lazy": lazy, "channels": self.channels},
                              lambda lazy=lazy: self.restore(lazy)))
        return out


def summary(configs: list[Config]) -> list[str]:
    """One line per config: the medians the table has no column for."""
    lines = []
    for c in configs:
        runs = c.counted()
        if not runs:
            continue

        def med(key: str, runs: list = runs) -> float | None:
            xs = [r[key] for r in runs if r.get(key) is not None]
            return statistics.median(xs) if xs else None

        bits = [f"{key} {med(key):.3f}" for key in ("run_at_s", "downtime_ms",
                                                      "postcopy_requests",
                                                      "latency_median_ms", "latency_p99_ms",
                                                      "faults")
                if med(key) is not None]
        lines.append(f"{c.label}: median {', '.join(bits)}")
    return lines
