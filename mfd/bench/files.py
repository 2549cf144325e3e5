"""``mfd bench save`` and ``mfd bench restore``: mapped-ram files on the disk, mfd beside QEMU.

save: the image as guest RAM (a fresh copy in /dev/shm per run, untimed) saved to a fresh
file on the disk measured, with every channel count (and direct-io with ``--direct-io``).
mfd is timed as the wall time of :func:`mfd.api.save` in this process, which includes
starting its channel processes and ends with fdatasync; QEMU (``-machine none``, the RAM a
memory-backend-file) from QMP ``migrate`` until ``completed`` (its start not timed), plus an
fdatasync of its file right after (QEMU does not sync; the figures compare durable saves).
Guest RAM "sparse" keeps the image's zero pages as holes (RAM a guest never touched);
"allocated" writes them as zeros, so both tools must read every page.

restore: a file saved by mfd and one saved by QEMU, each restored by both tools into a
fresh file in /dev/shm, page cache warm (read once first) and cold (fsync +
POSIX_FADV_DONTNEED), every result checked against the image outside the timed region.
Restoring mfd's file, mfd also checks every chunk against the trailer's digests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from mfd.bench import baselines
from mfd.bench.image import allocated, fdatasync_path, zeroed
from mfd.bench.runs import Config, log, one_line, unlink
from mfd.bench.workspace import Workspace

SOURCE_NAME = {"mfd": "mfd's file", "qemu": "QEMU's file"}

NOTES = {
    "save": [
        "save: mfd is the wall time of mfd.save() in this process (it starts the channel "
        "processes and ends with fdatasync); QEMU is QMP migrate until completed (polled every "
        "2 ms, its start not timed) plus an fdatasync of its file right after.",
        "save: both tools save the same guest RAM, a fresh copy of the image in /dev/shm per "
        "run (untimed). 'sparse': zero pages are holes, as in RAM a guest never touched (mfd "
        "skips holes without reading them, QEMU reads every page); 'allocated': zero pages "
        "are written zeros, so both read every page.",
        "save: the limit is `dd bs=1M conv=fsync` of the image to the same disk: all of it, "
        "zeros included, one stream. The tools write only the nonzero pages, in parallel, so "
        "they can beat it ('of limit' above 1).",
    ],
    "restore": [
        "restore: into a fresh /dev/shm file per run, checked against the image with blake3 "
        "outside the timed region. warm: the file was read once before; cold: evicted first "
        "(fsync + POSIX_FADV_DONTNEED). Restoring mfd's file, mfd checks every chunk against "
        "the trailer's digests; QEMU checks nothing, and QEMU's file has no digests.",
    ],
}


def _qname(mf: int, direct_io: bool) -> str:
    return ("mapped-ram" + (f" multifd {mf}" if mf else " (no multifd)")
            + (" direct-io" if direct_io else ""))


def _dio(direct_io: bool) -> str:
    return "direct-io" if direct_io else "buffered"


class FileBench:
    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.sources: dict[str, str] = {}
        self.source_error: dict[str, str] = {}

    # ------------------------------------------------------------------ one save or restore

    def mfd_save(self, target: str, channels: int, direct_io: bool, ram: str) -> dict[str, Any]:
        import mfd

        params = mfd.MigrationParameters(multifd_channels=channels, direct_io=direct_io)
        source = self.ws.guest_ram("guest.ram", ram)
        try:
            t0 = time.perf_counter()
            r = mfd.save(target, images={"mem": source}, params=params)
            dt = time.perf_counter() - t0
        finally:
            unlink(source)
        return {"seconds": dt, "total_time_ms": r.total_time_ms,
                "setup_time_ms": r.setup_time_ms, "normal_pages": r.normal_pages,
                "zero_pages": r.zero_pages, "transferred": r.transferred}

    def qemu_save(self, target: str, multifd: int, direct_io: bool, ram: str) -> dict[str, Any]:
        from mfd.bench.qemu import QemuMachine

        source = self.ws.guest_ram("guest.ram", ram)
        try:
            with QemuMachine(source, self.ws.size, timeout=self.ws.qemu_timeout) as m:
                m.set_migration(mapped_ram=True, multifd_channels=multifd, direct_io=direct_io)
                t0 = time.perf_counter()
                info = m.migrate(f"file:{target}")
                t1 = time.perf_counter()
                fdatasync_path(target)
                t2 = time.perf_counter()
        finally:
            unlink(source)
        ram_info = info.get("ram", {})
        return {"seconds": t2 - t0, "fdatasync_seconds": t2 - t1,
                "total_time_ms": info.get("total-time"),
                "setup_time_ms": info.get("setup-time"),
                "normal_pages": ram_info.get("normal"), "zero_pages": ram_info.get("duplicate"),
                "transferred": ram_info.get("transferred")}

    def timed_save(self, save: Callable[..., dict[str, Any]], channels: int, direct_io: bool,
                   ram: str) -> dict[str, Any]:
        """One counted save into a fresh file on the disk, removed after."""
        target = self.ws.disk("save.mig")
        unlink(target)
        os.sync()
        try:
            out = save(target, channels, direct_io, ram)
            out["file_size"] = os.path.getsize(target)
            out["file_allocated"] = allocated(target)
        finally:
            unlink(target)
        return out

    def mfd_restore(self, path: str, out: str, channels: int, direct_io: bool) -> dict[str, Any]:
        import mfd

        t0 = time.perf_counter()
        r = mfd.restore(path, images={"mem": out},
                        options=mfd.RestoreOptions(multifd_channels=channels,
                                                   direct_io=direct_io))
        return {"seconds": time.perf_counter() - t0, "bytes_read": r.bytes_read,
                "trailer_verified": r.verified}

    def qemu_restore(self, path: str, out: str, multifd: int,
                     direct_io: bool) -> dict[str, Any]:
        from mfd.bench.qemu import QemuMachine

        zeroed(out, self.ws.size)
        with QemuMachine(out, self.ws.size, incoming=True, timeout=self.ws.qemu_timeout) as m:
            m.set_migration(mapped_ram=True, multifd_channels=multifd, direct_io=direct_io)
            t0 = time.perf_counter()
            m.migrate_incoming(f"file:{path}")
            return {"seconds": time.perf_counter() - t0}

    def timed_restore(self, restore: Callable[[str, str, int, bool], dict[str, Any]],
                      src: str, channels: int, direct_io: bool, cold: bool) -> dict[str, Any]:
        """One counted restore of ``src``'s file into a fresh /dev/shm file, checked against
        the image outside the timed region, removed after."""
        if src in self.source_error:
            raise RuntimeError(self.source_error[src])
        path = self.sources[src]
        out = self.ws.shm("restore.ram")
        unlink(out)
        os.sync()
        (baselines.evict if cold else baselines.warm)(path)
        try:
            res = restore(path, out, channels, direct_io)
            assert self.ws.image is not None
            self.ws.image.check(out, "restored RAM")
        finally:
            unlink(out)
        return {**res, "verified": True}

    # ------------------------------------------------------------------ configs

    def qemu_multifd(self) -> list[tuple[int, bool]]:
        """QEMU's configurations: no multifd, then multifd with each channel count, and the
        largest with direct-io when asked."""
        s = self.ws.settings
        out = [(0, False), *((ch, False) for ch in s.channels)]
        if s.direct_io:
            out.append((max(s.channels), True))
        return out

    def save_configs(self) -> list[Config]:
        s = self.ws.settings
        dios = [False, True] if s.direct_io else [False]
        out = [Config("dd-write", "save", "dd", "dd bs=1M conv=fsync -> disk", {},
                      lambda: baselines.dd_write(self.ws.image, self.ws.disk("dd.ram")))]
        rams = ("sparse",) if s.quick else ("sparse", "allocated")
        for ram in rams:
            tag = "" if ram == "sparse" else ", allocated RAM"
            for ch in s.channels:
                for d in dios if ram == "sparse" else [False]:
                    out.append(Config(
                        f"mfd-save-{ch}-{_dio(d)}-{ram}", "save", "mfd",
                        f"{ch} ch {_dio(d)}{tag}", {"channels": ch, "direct_io": d, "ram": ram},
                        lambda ch=ch, d=d, ram=ram: self.timed_save(self.mfd_save, ch, d, ram),
                        limit="dd-write"))
            if self.ws.qemu_ok:
                for mf, d in self.qemu_multifd():
                    if d and ram != "sparse":
                        continue
                    out.append(Config(
                        f"qemu-save-{mf}{'-dio' if d else ''}-{ram}", "save", "qemu",
                        _qname(mf, d) + tag, {"channels": mf, "direct_io": d, "ram": ram},
                        lambda mf=mf, d=d, ram=ram: self.timed_save(self.qemu_save, mf, d, ram),
                        limit="dd-write"))
        return out

    def prepare_sources(self) -> None:
        """The files both tools restore: one saved by mfd, one by QEMU, flushed to the disk
        so that "cold" can evict them."""
        s = self.ws.settings
        makers: list[tuple[str, str, Callable[..., dict[str, Any]], int]] = [
            ("mfd", f"mfd save, {max(s.channels)} channels", self.mfd_save, max(s.channels))]
        if self.ws.qemu_ok:
            makers.append(("qemu", f"QEMU mapped-ram save, multifd {max(s.channels)}",
                           self.qemu_save, max(s.channels)))
        for src, made_by, save, ch in makers:
            path = self.ws.disk(f"{src}-source.mig")
            try:
                save(path, ch, False, "sparse")
                fdatasync_path(path)
            except Exception as e:
                self.source_error[src] = f"could not create {SOURCE_NAME[src]}: {one_line(e)}"
                log(self.source_error[src])
                continue
            self.sources[src] = path
            self.ws.setup[f"{src}_restore_source"] = {
                "path": path, "made_by": made_by, "size": os.path.getsize(path),
                "allocated": allocated(path)}

    def restore_configs(self) -> list[Config]:
        s = self.ws.settings
        dios = [False, True] if s.direct_io else [False]
        assert self.ws.image is not None
        image = self.ws.image.path
        out = [Config("dd-read-cold", "restore cold", "dd", "dd read of the image, cold", {},
                      lambda: baselines.dd_read_cold(image)),
               Config("memcpy", "restore warm", "memcpy", "memcpy of the image", {},
                      lambda: baselines.memcpy(self.ws.image))]
        sources = ["mfd", "qemu"] if self.ws.qemu_ok else ["mfd"]
        for cold in (False, True):
            mode = "restore cold" if cold else "restore warm"
            limit = "dd-read-cold" if cold else "memcpy"
            temp = "cold" if cold else "warm"
            for src in sources:
                for ch in s.channels:
                    for d in dios:
                        out.append(Config(
                            f"mfd-restore-{temp}-{ch}-{_dio(d)}-{src}", mode, "mfd",
                            f"{ch} ch {_dio(d)}, {SOURCE_NAME[src]}",
                            {"channels": ch, "direct_io": d, "source": src},
                            lambda src=src, ch=ch, d=d, cold=cold: self.timed_restore(
                                self.mfd_restore, src, ch, d, cold), limit=limit))
                if self.ws.qemu_ok:
                    # QEMU restores its own file with every configuration, mfd's with the
                    # largest channel count (where their layouts differ, not their tools)
                    qs = self.qemu_multifd() if src == "qemu" else [(max(s.channels), False)]
                    for mf, d in qs:
                        out.append(Config(
                            f"qemu-restore-{temp}-{mf}{'-dio' if d else ''}-{src}", mode,
                            "qemu", f"{_qname(mf, d)}, {SOURCE_NAME[src]}",
                            {"channels": mf, "direct_io": d, "source": src},
                            lambda src=src, mf=mf, d=d, cold=cold: self.timed_restore(
                                self.qemu_restore, src, mf, d, cold), limit=limit))
        return out
