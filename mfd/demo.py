"""``mfd demo``: the whole story on this machine with sensible defaults.

A guest writes its RAM; mfd saves it live, in parallel, to a mapped-ram file while it keeps
writing; the file is restored into a new guest that continues; blake3 of the RAM at
switchover equals blake3 of the restored RAM. (Live migration over sockets builds on the
same pieces.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

import blake3

from mfd import api
from mfd.errors import MfdError
from mfd.options import MigrationParameters
from mfd.shm import control


def _digest(status: dict) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for b in status["blocks"]:
        with open(b["path"], "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def run(ram: int, dirty_rate: int, channels: int, directory: str | None, say,
        progress=None) -> dict:
    src, dst = f"demo-src-{os.getpid()}", f"demo-dst-{os.getpid()}"
    workdir = tempfile.mkdtemp(prefix="mfd-demo-", dir=directory or "/var/tmp")
    mig = os.path.join(workdir, "guest.mig")
    started: list[str] = []
    try:
        g = control.start_guest_daemon(["--name", src, "--ram", str(ram), "--dirty-rate",
                                        str(dirty_rate), "--pattern", "hotset"], src)
        started.append(src)
        say(f"guest {src}: {ram >> 20} MiB of RAM, dirtying {dirty_rate >> 20} MiB/s (hotset)")
        time.sleep(0.5)
        res = api.save(mig, guest=src, params=MigrationParameters(multifd_channels=channels),
                       progress=progress)
        final = g.query()
        source_digest = _digest(final)
        size = os.stat(mig).st_size
        say(f"live save to {mig}: {res.rounds} rounds, {res.normal_pages} pages written, "
            f"{res.zero_pages} zero, {res.total_time_ms / 1000:.2f} s total, downtime "
            f"{res.downtime_ms:.0f} ms, file {size >> 20} MiB (sparse)")
        g.quit()
        started.remove(src)
        r = api.restore(mig, guest=dst, channels=channels)
        started.append(dst)
        restored = control.GuestClient(dst)
        dest_digest = _digest(restored.query())
        say(f"restored into guest {dst} in {r.seconds:.2f} s ({r.bytes_read >> 20} MiB read, "
            f"trailer digests {'verified' if r.verified else 'absent'})")
        before = restored.cont()["pages-written"]
        time.sleep(0.3)
        after = restored.stop()["pages-written"]
        ok = source_digest == dest_digest
        say(f"verification: blake3 at switchover {source_digest[:16]}... "
            f"{'==' if ok else '!='} restored {dest_digest[:16]}... "
            f"{'OK' if ok else 'MISMATCH'}; the restored guest continued "
            f"({after - before} pages written)")
        if not ok:
            raise MfdError("demo: restored RAM differs from the source's")
        return {"save": res.query_migrate, "restore_seconds": r.seconds,
                "source_blake3": source_digest, "restored_blake3": dest_digest, "ok": ok}
    finally:
        for name in started:
            with contextlib.suppress(MfdError), control.GuestClient(name) as c:
                c.quit()
        with contextlib.suppress(OSError):
            os.unlink(mig)
        with contextlib.suppress(OSError):
            os.rmdir(workdir)


