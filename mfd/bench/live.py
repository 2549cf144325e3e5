"""``mfd bench live``: a running guest migrated live at each dirty rate and write pattern,
with and without auto-converge.

Each run starts a guest (``mfd guest``, RAM the size of the image, holding the image's data)
that dirties pages at the given rate (random: anywhere; hotset: 90% of the writes to 10% of
RAM), lets it run for a second, then migrates it
over the largest channel count to an ``mfd incoming --guest`` process, bounded by
``--live-timeout`` (a migration cancelled by it counts as not converged; the guest keeps
running at the source, as after any failed migration). While it runs, QMP ``query-migrate``
on the source's monitor every 50 ms gives the remaining dirty bytes and the throttle
against time. Recorded: total time, downtime and the part of it spent verifying RAM, what
the final round (guest stopped) moved, rounds, final throttle, converged or not, and the
RAM digests of both ends at switchover (equal, or the run fails).

QEMU is not run here: with ``-machine none`` no vCPU writes its RAM, and writes from
outside QEMU are not in its dirty log, so there is nothing live to compare.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from mfd.bench.migration import Incoming, figures
from mfd.bench.runs import Config
from mfd.bench.workspace import Workspace
from mfd.shm import control
from mfd.shm.kvmguest import DATA
from mfd.units import human
from mfd.workers.tcp import free_ports

SETTLE = 1.0  # seconds the guest writes before the migration starts
POLL = 0.05  # seconds between query-migrate samples

NOTES = [
    f"live: the guest holds the image's data and dirties pages at the given rate for "
    f"{SETTLE:g} s before the migration starts; the migration uses the largest channel count, "
    "no compression, QEMU's default downtime-limit (300 ms) and auto-converge settings "
    "(20% then +10% per period). A run not done within --live-timeout is cancelled and "
    "counts as not converged; times and downtimes are medians of the converged runs. "
    "Downtime includes mfd's RAM verification on both ends (x-verify-time: each end's "
    "hashing of the final round's pages, spread over its channels, plus sending and comparing "
    "the page hash tables); 'verify ms/100 MiB' is that per 100 MiB the final round moved. "
    "With --verify both each config also runs with mfd migrate --no-verify: 'A/B ms' is the "
    "difference of the two median downtimes, measured rather than estimated.",
    "live: QEMU is not compared. With -machine none no vCPU writes its RAM, and writes from "
    "outside QEMU are not in its dirty log.",
]


class Sampler:
    """query-migrate on the source's monitor every POLL seconds, from a thread: (seconds
    since start, remaining bytes, throttle %, round) while the migration runs."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.series: list[list[float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="bench-sampler", daemon=True)

    def run(self) -> None:
        from mfd.errors import MfdError
        from mfd.qmp import monitor_command

        t0 = time.monotonic()
        while not self.stop.wait(POLL):
            if not os.path.exists(self.monitor):
                continue
            try:
                q = monitor_command(self.monitor, "query-migrate", timeout=1.0)["return"]
            except (MfdError, KeyError):
                continue
            ram = q.get("ram")
            if q.get("status") == "active" and ram:
                self.series.append([round(time.monotonic() - t0, 3), ram["remaining"],
                                    q.get("cpu-throttle-percentage", 0),
                                    ram["dirty-sync-count"]])

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


class LiveBench:
    """Live migrations of the built-in guest, or (``kvm``) of a KVM guest whose vCPU writes;
    ``kick=False``: its stop waits for the vCPU's next exit instead of kicking it out."""

    def __init__(self, ws: Workspace, kvm: bool = False) -> None:
        self.ws = ws
        self.channels = max(ws.settings.channels)
        self.kvm = kvm

    def run(self, rate: int, auto_converge: bool, kick: bool = True,
            pattern: str = "random", verify: bool = True,
            xbzrle: bool | None = None) -> dict[str, Any]:
        """``xbzrle``: None, multifd over the largest channel count; False or True, no
        multifd, without or with XBZRLE."""
        from mfd.main_thread.migrate import Cancelled
        from mfd.options import MigrateOptions, MigrationParameters

        s = self.ws.settings
        src, dst = f"bench-src-{os.getpid()}", f"bench-dst-{os.getpid()}"
        tokens = [self.ws.cleanup.add(f"quit guest {n}", lambda n=n: control.release(n))
                  for n in (src, dst)]
        try:
            argv = ["--name", src, "--ram", str(self.ws.size), "--dirty-rate", str(rate),
                    "--pattern", pattern, "--stopped"]
            if self.kvm:
                argv += ["--kvm"] + ([] if kick else ["--x-no-kick"])
            g = control.start_guest_daemon(argv, src)
            with g:
                (block,) = g.query()["blocks"]
                assert self.ws.image is not None
                self.ws.image.copy(block["path"], fresh=False, start=DATA if self.kvm else 0)
                g.cont()
            port = free_ports(1)
            uri = f"tcp:127.0.0.1:{port}"
            monitor = self.ws.shm("source.qmp")
            params = MigrationParameters(multifd_channels=self.channels,
                                         auto_converge=auto_converge,
                                         max_bandwidth=s.max_bandwidth)
            with Incoming(self.ws, ["--listen", uri, "--guest", dst, "--json"], port) as inc:
                time.sleep(SETTLE)
                with Sampler(monitor) as sampler:
                    t0 = time.perf_counter()
                    try:
                        r, dt = inc.migrate(uri, guest=src, params=params, monitor=monitor,
                                            options=MigrateOptions(
                                                timeout=s.live_timeout, verify=verify,
                                                multifd=xbzrle is None, xbzrle=bool(xbzrle)))
                    except Cancelled:
                        if time.perf_counter() - t0 < s.live_timeout:
                            raise
                        return {"seconds": time.perf_counter() - t0, "converged": False,
                                "series": sampler.series}
                    except Exception as e:
                        raise inc.explain(e) from e
                dest = inc.result()
            if dest.get("digests") != r.digests:
                raise RuntimeError("the destination's RAM digests differ from the source's")
            x = r.query_migrate.get("xbzrle-cache")
            return {"seconds": dt, "converged": True, **figures(r),
                    "final_round_bytes": r.round_log[-1]["bytes"],
                    "series": sampler.series, "rounds_log": r.round_log,
                    "digests_equal": verify, "xbzrle": x,
                    # the whole migration's: a page's bytes over what its record took
                    "xbzrle_encoding_rate": x["pages"] * 4096 / x["bytes"]
                    if x and x["bytes"] else None}
        finally:
            for t in reversed(tokens):
                self.ws.cleanup.done(t)

    def configs(self) -> list[Config]:
        """Each pattern, rate, auto-converge and verify setting; with --xbzrle each without
        multifd, without and with XBZRLE (also for the KVM guest where it works)."""
        s = self.ws.settings
        out = []
        for kvm in (self.kvm, *([True] if s.xbzrle and not self.kvm and kvm_works() else [])):
            bench = self if kvm == self.kvm else LiveBench(self.ws, kvm=kvm)
            kind = "kvm-" if kvm else ""
            for pattern in s.patterns:
                for rate in s.dirty_rates:
                    for ac in s.auto_converge:
                        for verify in s.verify:
                            for xb in (False, True) if s.xbzrle else (None,):
                                out.append(bench._config(kind, pattern, rate, ac, verify, xb))
        return out

    def _config(self, kind: str, pattern: str, rate: int, ac: bool, verify: bool,
                xb: bool | None) -> Config:
        how = f"{self.channels} ch" if xb is None else "no multifd" + (", XBZRLE" if xb else "")
        label = (f"dirty {human(rate)}/s {pattern}, {how}" + (", auto-converge" if ac else "")
                 + (", KVM" if self.kvm else "") + ("" if verify else ", --no-verify"))
        key = (f"{kind}live-{pattern}-{rate >> 20}M{'-ac' if ac else ''}"
               f"{'' if verify else '-noverify'}"
               + ("" if xb is None else "-xbzrle" if xb else "-nomultifd"))
        params = {"dirty_rate": rate, "pattern": pattern, "auto_converge": ac,
                  "channels": self.channels if xb is None else 0, "kvm": self.kvm,
                  "verify": verify}
        if xb is not None:
            params["xbzrle"] = xb
        return Config(key, "live", "mfd", label, params,
                      lambda: self.run(rate, ac, pattern=pattern, verify=verify, xbzrle=xb))


def kvm_works() -> bool:
    from mfd.shm import kvm

    return kvm.unavailable() is None
