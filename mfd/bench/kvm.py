"""``mfd bench kvm``: the KVM guest's figures (``mfd guest --kvm``).

* **throttle:** a KVM guest of ``--size`` (no migration) at each cpu throttle level, its
  vCPU paced at 400 MiB/s of page writes or at full speed. Over one second, the log is
  harvested and cleared every 100 ms, as a migration round does: iterations per second and
  distinct dirty pages per second (MiB/s).
* **stop:** how long ``stop`` takes, the kick (immediate_exit + SIGUSR1) against waiting for
  the vCPU's next exit, with the full-speed vCPU right after a harvest and clear (its pages
  write-protected again, the worst case for the next exit). The command's round trip is in
  both.
* **live:** live migrations of a KVM guest of ``--size`` at each dirty rate, with and without
  auto-converge (the live mode's table), and a full-speed vCPU with auto-converge, stopped
  with the kick and without it.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from mfd.bench.live import LiveBench
from mfd.bench.runs import Config
from mfd.bench.workspace import Workspace
from mfd.main_thread.scanner import popcount
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.shm import control

MiB = 1 << 20
PACED = 400 << 20
FULL_SPEED = 100 << 30  # no pacing: the vCPU runs as fast as it can
THROTTLES = (0, 20, 50, 80, 99)
HARVESTS = 10  # per throttle run, 100 ms apart
STOPS = 20  # per stop run

NOTES = [
    "kvm throttle: a KVM guest of the image's size, its vCPU paced at "
    f"{PACED >> 20} MiB/s of page writes or at full speed, for 1 s per level after 0.5 s "
    "at it; the log is harvested and cleared every 100 ms. Dirty MiB/s counts distinct pages "
    "per harvest.",
    f"kvm stop: {STOPS} stops of a full-speed vCPU, each right after a harvest and clear; "
    "'seconds' is the median stop (the control command's round trip included).",
    "live (KVM): the guest's data area holds the image's data. The full-speed vCPUs write "
    "hotset (an eighth of the data area), so that the stop, not convergence, is what "
    "differs between them.",
]


class KvmBench:
    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    def _guest(self, rate: int, *extra: str) -> tuple[str, control.GuestClient, int]:
        name = f"bench-kvm-{os.getpid()}"
        token = self.ws.cleanup.add(f"quit guest {name}", lambda: control.release(name))
        g = control.start_guest_daemon(["--name", name, "--ram", str(self.ws.size), "--kvm",
                                        "--dirty-rate", str(rate), "--pattern", "random",
                                        *extra], name)
        return name, g, token

    @staticmethod
    def _harvest_and_clear(g: control.GuestClient) -> int:
        """What a migration round does to the log: harvest, then clear what it found."""
        _, logs = g.harvest()
        for i, words in enumerate(logs):
            if words.any():
                g.clear_log(i, 0, words)
        return sum(popcount(w) for w in logs)

    def throttle(self, rate: int, pct: int) -> dict[str, Any]:
        _, g, token = self._guest(rate)
        try:
            with g:
                g.set_throttle(pct)
                time.sleep(0.5)
                self._harvest_and_clear(g)
                c0, t0, pages = g.query()["pages-written"], time.monotonic(), 0
                for _ in range(HARVESTS):
                    time.sleep(0.1)
                    pages += self._harvest_and_clear(g)
                dt = time.monotonic() - t0
                iterations = g.query()["pages-written"] - c0
        finally:
            self.ws.cleanup.done(token)
        return {"seconds": dt, "iterations_per_s": iterations / dt,
                "dirty_pages_per_s": pages / dt,
                "dirty_mib_s": pages * TARGET_PAGE_SIZE / dt / MiB}

    def stop(self, kick: bool) -> dict[str, Any]:
        _, g, token = self._guest(FULL_SPEED, *([] if kick else ["--x-no-kick"]))
        lat = []
        try:
            with g:
                time.sleep(0.3)
                for _ in range(STOPS):
                    time.sleep(0.05)
                    self._harvest_and_clear(g)
                    t0 = time.perf_counter()
                    g.stop()
                    lat.append(time.perf_counter() - t0)
                    g.cont()
        finally:
            self.ws.cleanup.done(token)
        return {"seconds": statistics.median(lat), "stop_ms": [x * 1000 for x in lat]}

    def configs(self) -> list[Config]:
        out = []
        for rate, writer in ((PACED, f"paced {PACED >> 20} MiB/s"), (FULL_SPEED, "full speed")):
            for pct in THROTTLES:
                out.append(Config(f"kvm-throttle-{'paced' if rate == PACED else 'full'}-{pct}",
                                  "kvm throttle", "mfd", f"{writer}, throttle {pct}%",
                                  {"writer": writer, "throttle": pct},
                                  lambda rate=rate, pct=pct: self.throttle(rate, pct)))
        for kick in (True, False):
            what = "kick (immediate_exit + SIGUSR1)" if kick else "wait for the next exit"
            out.append(Config(f"kvm-stop-{'kick' if kick else 'exit'}", "kvm stop", "mfd",
                              what, {"kick": kick}, lambda kick=kick: self.stop(kick)))
        live = LiveBench(self.ws, kvm=True)
        out += live.configs()
        for kick in (True, False):
            label = (f"full speed hotset, {live.channels} ch, auto-converge, KVM, stop "
                     + ("kick" if kick else "at the next exit"))
            out.append(Config(f"kvm-live-full-ac-{'kick' if kick else 'exit'}", "live", "mfd",
                              label, {"dirty_rate": FULL_SPEED, "pattern": "hotset",
                                      "auto_converge": True,
                                      "channels": live.channels, "kvm": True, "kick": kick},
                              lambda kick=kick: live.run(FULL_SPEED, True, kick, "hotset")))
        return out
