"""``mfd demo``: a live migration between two ends on this machine, with sensible defaults.

A guest of 1 GiB, half of its pages holding data, keeps writing (100 MiB/s, hotset); ``mfd
incoming`` runs as a separate process (the destination host); the guest migrates over 4
channels on TCP loopback while a live view shows round, transferred, remaining, throughput,
dirty rate, throttle and expected downtime. At the end: total time, downtime, rounds, bytes,
and the verification line (the blake3 of every block at switchover, computed on each end,
equal), and the guest going on writing at the destination.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import orjson

from mfd import api
from mfd.errors import MfdError
from mfd.main_thread.precopy import Progress
from mfd.options import MigrationParameters
from mfd.ramimage import generate
from mfd.shm import control
from mfd.units import human
from mfd.workers.tcp import free_ports


def run(ram: int, dirty_rate: int, params: MigrationParameters, say: Callable[[str], None],
        progress: Progress | None = None) -> dict:
    pid = os.getpid()
    src, dst = f"demo-src-{pid}", f"demo-dst-{pid}"
    incoming = None
    try:
        g = control.start_guest_daemon(["--name", src, "--ram", str(ram), "--dirty-rate",
                                        str(dirty_rate), "--pattern", "hotset", "--stopped"],
                                       src)
        (block,) = g.query()["blocks"]
        generate(block["path"], ram, zero=0.5, random=0.5, create=False)  # it has been busy
        g.cont()
        say(f"guest {src}: {ram >> 20} MiB of RAM (half of it data), dirtying "
            f"{dirty_rate >> 20} MiB/s (hotset)")
        port = free_ports(params.multifd_channels + 1)
        uri = f"tcp://127.0.0.1:{port}"
        incoming = subprocess.Popen(
            [sys.executable, "-m", "mfd", "incoming", "--listen", uri, "--guest", dst,
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        say(f"destination: mfd incoming --listen {uri} --guest {dst} (pid {incoming.pid})")
        say(f"migrating over {params.multifd_channels} channels "
            f"(compression {params.multifd_compression}, downtime limit "
            f"{params.downtime_limit} ms)")
        time.sleep(0.3)  # let the destination bind
        res = api.migrate(uri, guest=src, params=params, progress=progress)
        out, err = incoming.communicate(timeout=60)
        if incoming.returncode != 0:
            raise MfdError(f"destination: {err.strip().splitlines()[-1] if err else '?'}")
        theirs = orjson.loads(out)["digests"]
        secs = res.total_time_ms / 1000
        say(f"completed in {secs:.2f} s: {res.rounds} rounds, {human(res.transferred)} "
            f"transferred ({res.transferred / secs / (1 << 20):.0f} MiB/s), "
            f"{res.normal_pages} pages sent, {res.zero_pages} zero, downtime "
            f"{res.downtime_ms:.0f} ms (of which verifying RAM on both ends "
            f"{res.query_migrate.get('x-verify-time', 0)} ms), final throttle "
            f"{res.cpu_throttle_percentage}%")
        ok = theirs == res.digests
        for idstr, digest in res.digests.items():
            say(f"verification: block {idstr!r} blake3 at switchover: source {digest[:16]}... "
                f"{'==' if theirs.get(idstr) == digest else '!='} destination "
                f"{theirs.get(idstr, '?')[:16]}... {'OK' if ok else 'MISMATCH'}")
        with control.GuestClient(dst) as d:
            before = d.query()["pages-written"]
            time.sleep(0.3)
            status = d.query()
        say(f"guest {dst} is {status['status']} at the destination "
            f"({status['pages-written'] - before} pages written in 0.3 s); the source's is gone")
        if not ok:
            raise MfdError("demo: RAM differs between the two ends")
        return {"migrate": res.query_migrate, "digests": res.digests,
                "destination_digests": theirs, "ok": ok, "guest": dst}
    finally:
        if incoming is not None and incoming.poll() is None:
            incoming.kill()
            incoming.wait()
        for name in (src, dst):
            control.release(name)
