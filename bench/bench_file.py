#!/usr/bin/env python3
"""mfd's mapped-ram file save/restore against QEMU 10 and the disk's own speed, in one run.

::

    python bench/bench_file.py [--size 2G] [--repeat 3] [--channels 1,2,4] [--dir DIR]
                               [--out results.json] [--no-qemu] [--no-direct-io]

The RAM image (4 KiB pages in runs of 16: 50% zero, 25% random, 25% compressible text, seed 1,
see :mod:`mfd.ramimage`) is generated once into a fresh work directory on the real disk
(default under /var/tmp). Then, for every configuration, one warm-up run (not counted) and
``--repeat`` counted runs, interleaved: config A rep 1, B rep 1, ..., then A rep 2, ...

* mfd save / restore with each channel count, buffered and direct-io, timed in this process
  as the wall time of the ``mfd.save()`` / ``mfd.restore()`` call (it includes spawning the
  channel processes, like QEMU's time includes starting its threads);
* QEMU mapped-ram save / restore with no multifd, multifd 1, 2, 4 and 4 + direct-io, timed as
  :mod:`mfd.qemu` does (QMP ``migrate`` / ``migrate-incoming`` until ``completed``, polled
  every 2 ms; QEMU's start is not included). mfd's save ends with fdatasync, QEMU's does not,
  so a second row adds the time to fdatasync QEMU's file right after its save;
* yardsticks: ``dd bs=1M conv=fsync`` of the image to the same disk, a cold ``dd`` read of
  the image, ``cp`` of the image into /dev/shm.

Restores go to fresh files in /dev/shm (like QEMU's memory-backend-file there) and every one
is checked against the image (blake3, outside the timed region). "cold" evicts the .mig file
from the page cache first (fsync + POSIX_FADV_DONTNEED); "warm" reads it once first.

Prints a plain-text table and the target checks (save <= 0.5 x QEMU's best median save,
restore <= 1.0 x QEMU's best median restore, warm and cold), and writes every raw run with
the environment to JSON (default bench/results/bench_file.json). A failing configuration is
reported as FAILED with its error and the benchmark goes on. Everything it created (work
directory, /dev/shm files) is removed at the end, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from common import (
    RESULTS,
    Cleanup,
    Config,
    MiB,
    Row,
    allocated,
    best,
    check_same,
    copy_image,
    environment,
    fdatasync_path,
    free_bytes,
    fs_of,
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
    sh,
    standard_args,
    stats_table,
    unlink,
    write_json,
)

QEMU_TIMEOUT = 600.0  # per QMP wait; direct-io saves of 2 GiB take ~10 s on the reference VM
DEFAULT_OUT = os.path.join(RESULTS, "bench_file.json")


# --------------------------------------------------------------------------- small helpers



def evict(path: str) -> None:
    """Drop ``path`` from the page cache: fsync (only clean pages can go), then DONTNEED."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str) -> None:
    """Read ``path`` once so it is in the page cache."""
    buf = bytearray(8 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace, cleanup: Cleanup) -> None:
        self.args = args
        self.cleanup = cleanup
        self.size: int = args.size
        self.workdir = ""
        self.shmdir = ""
        self.notes: list[str] = []
        self.setup: dict[str, Any] = {}
        self.qemu_ok = False

    # ------------------------------------------------------------------ paths

    def p(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def s(self, name: str) -> str:
        return os.path.join(self.shmdir, name)

    # ------------------------------------------------------------------ space

    def check_space(self, parent: str) -> None:
        """Disk: image + 2 restore sources + 1 save target (nonzero pages each) + the dd copy
        (all of it). /dev/shm: one RAM copy at a time (QEMU's RAM, a restore target, cp)."""
        a = self.args
        nonzero = 1.0 - a.zero
        disk_need = int(self.size * (1 + 4 * nonzero) + 512 * MiB)
        disk_free = free_bytes(parent)
        shm_free = free_bytes("/dev/shm")
        shm_need = int(self.size * 1.1 + 64 * MiB)
        require_room("bench_file", [
            (parent, disk_free, disk_need, f"a {human(self.size)} image, two restore sources, "
             "one save target and the dd copy"),
            ("/dev/shm", shm_free, shm_need, "one RAM-sized file at a time")],
            "Use --dir on a larger disk or a smaller --size.")
        self.setup["space"] = {"disk_free": disk_free, "disk_need": disk_need,
                               "shm_free": shm_free, "shm_need": shm_need}

    # ------------------------------------------------------------------ setup

    def prepare(self) -> None:
        a = self.args
        parent = os.path.abspath(a.dir or "/var/tmp")
        os.makedirs(parent, exist_ok=True)
        self.check_space(parent)
        self.workdir = tempfile.mkdtemp(prefix="mfd-bench-", dir=parent)
        self.cleanup.add_path(self.workdir)
        self.shmdir = tempfile.mkdtemp(prefix="mfd-bench-", dir="/dev/shm")
        self.cleanup.add_path(self.shmdir)
        if "," in self.workdir or "," in self.shmdir:
            raise SystemExit(f"bench_file: QEMU file: URIs cannot contain ',': {self.workdir}")
        fs = fs_of(self.workdir)
        self.setup["workdir"] = self.workdir
        self.setup["workdir_fs"] = fs
        self.setup["shmdir"] = self.shmdir
        if fs["fstype"] in ("tmpfs", "ramfs"):
            self.notes.append(f"WARNING: the work dir {self.workdir} is on {fs['fstype']}, "
                              "not a disk: the disk is not being measured")
        log(f"work dir {self.workdir} ({fs['fstype']} on {fs['device']}), shm dir "
            f"{self.shmdir}")

        self.img = self.p("image.ram")
        img = make_image(self.img, self.size, zero=a.zero, random=a.random, seed=1, run=16,
                         sync=True)
        self.img_digest = img["blake3"]
        self.setup["image"] = img
        log(f"image {human(self.size)}: {img['pages']} pages, {human(img['allocated'])} "
            f"allocated (zero pages are holes), generated in {img['generate_seconds']:.1f} s")

        # restore sources: one file written by mfd, one by QEMU, flushed so "cold" can evict
        self.mfd_src = self.p("mfd-src.mig")
        self.qemu_src = self.p("qemu-src.mig")
        self.src_error: dict[str, str] = {}
        try:
            self.mfd_save_into(self.mfd_src, 2, False)
            fdatasync_path(self.mfd_src)
            self.setup["mfd_src"] = self.file_info(self.mfd_src, "mfd save, 2 channels")
        except Exception as e:
            self.src_error["mfd"] = f"could not create mfd's restore source: {one_line(e)}"
            log(self.src_error["mfd"])
        if self.qemu_ok:
            try:
                self.qemu_save_into(self.qemu_src, 4, False)
                fdatasync_path(self.qemu_src)
                self.setup["qemu_src"] = self.file_info(self.qemu_src,
                                                        "QEMU mapped-ram save, multifd 4")
            except Exception as e:
                self.src_error["qemu"] = f"could not create QEMU's restore source: {one_line(e)}"
                log(self.src_error["qemu"])
        for k in ("mfd_src", "qemu_src"):
            if k in self.setup:
                i = self.setup[k]
                log(f"{k}: {i['made_by']}: {human(i['size'])} apparent, "
                    f"{human(i['allocated'])} allocated")

    def file_info(self, path: str, made_by: str) -> dict[str, Any]:
        return {"path": path, "made_by": made_by, "size": os.path.getsize(path),
                "allocated": allocated(path)}

    # ------------------------------------------------------------------ mfd

    def guest_ram(self, ram: str) -> str:
        """A fresh copy of the image in /dev/shm, as guest RAM for one save (untimed).

        "sparse": the image's zero pages are holes, as RAM a guest never touched;
        "allocated": every page is in memory, zero pages written as zeros (freed memory).
        """
        return copy_image(self.img, self.s("guest.ram"), self.size, ram=ram)

    def mfd_save_into(self, target: str, channels: int, direct_io: bool,
                      ram: str = "sparse") -> dict[str, Any]:
        import mfd

        params = mfd.MigrationParameters(multifd_channels=channels, direct_io=direct_io)
        source = self.guest_ram(ram)
        try:
            t0 = time.perf_counter()
            r = mfd.save(target, images={"mem": source}, params=params)
            dt = time.perf_counter() - t0
        finally:
            unlink(source)
        if r.status != "completed":
            raise RuntimeError(f"mfd.save returned status {r.status!r}")
        return {"seconds": dt, "mfd_total_time_ms": r.total_time_ms,
                "mfd_setup_time_ms": r.setup_time_ms, "normal_pages": r.normal_pages,
                "zero_pages": r.zero_pages, "transferred": r.transferred}

    def timed_save(self, save_into: Callable[..., dict[str, Any]], channels: int,
                   direct_io: bool, ram: str) -> dict[str, Any]:
        """One counted save (mfd's or QEMU's) into a fresh file on the disk, removed after."""
        target = self.p("save.mig")
        unlink(target)
        os.sync()
        try:
            out = save_into(target, channels, direct_io, ram)
            out["file_size"] = os.path.getsize(target)
            out["file_allocated"] = allocated(target)
        finally:
            unlink(target)
        return out

    def source(self, src: str) -> str:
        """The restore source written by ``src`` ("mfd" or "qemu")."""
        if src in self.src_error:
            raise RuntimeError(self.src_error[src])
        return self.mfd_src if src == "mfd" else self.qemu_src

    def timed_restore(self, restore_into: Callable[[str, str, int, bool], dict[str, Any]],
                      src: str, channels: int, direct_io: bool, cold: bool) -> dict[str, Any]:
        """One counted restore (mfd's or QEMU's) of ``src``'s file into a fresh /dev/shm
        file, checked against the image outside the timed region, removed after."""
        path = self.source(src)
        out = self.s("restore.ram")
        unlink(out)
        os.sync()
        (evict if cold else warm)(path)
        try:
            res = restore_into(path, out, channels, direct_io)
            self.verify(out)
        finally:
            unlink(out)
        return {**res, "verified": True}

    def mfd_restore_into(self, path: str, out: str, channels: int,
                         direct_io: bool) -> dict[str, Any]:
        import mfd

        t0 = time.perf_counter()
        r = mfd.restore(path, images={"mem": out}, channels=channels, direct_io=direct_io)
        dt = time.perf_counter() - t0
        return {"seconds": dt, "mfd_seconds": r.seconds, "bytes_read": r.bytes_read,
                "mfd_trailer_verified": r.verified}

    # ------------------------------------------------------------------ QEMU

    def qemu_save_into(self, target: str, multifd: int, direct_io: bool,
                       ram: str = "sparse") -> dict[str, Any]:
        """As mfd.qemu.qemu_save (the guest RAM a tmpfs file, made untimed; QMP migrate until
        completed, timed), plus an fdatasync of the file right after the migration."""
        from mfd.qemu import QemuMachine

        source = self.guest_ram(ram)
        try:
            with QemuMachine(source, self.size, timeout=QEMU_TIMEOUT) as m:
                m.set_migration(mapped_ram=True, multifd_channels=multifd, direct_io=direct_io)
                t0 = time.perf_counter()
                info = m.migrate(f"file:{target}")
                dt = time.perf_counter() - t0
                t1 = time.perf_counter()
                fdatasync_path(target)
                sync_s = time.perf_counter() - t1
        finally:
            unlink(source)
        ram_info = info.get("ram", {})
        return {"seconds": dt, "fdatasync_seconds": sync_s,
                "qemu_total_time_ms": info.get("total-time"),
                "qemu_setup_time_ms": info.get("setup-time"),
                "normal_pages": ram_info.get("normal"), "zero_pages": ram_info.get("duplicate")}

    def qemu_restore_into(self, path: str, out: str, multifd: int,
                          direct_io: bool) -> dict[str, Any]:
        """As mfd.qemu.qemu_restore (fresh zeroed tmpfs RAM file, QMP migrate-incoming until
        completed), with direct-io settable."""
        from mfd.qemu import QemuMachine

        with open(out, "wb") as f:
            os.ftruncate(f.fileno(), self.size)
        with QemuMachine(out, self.size, incoming=True, timeout=QEMU_TIMEOUT) as m:
            m.set_migration(mapped_ram=True, multifd_channels=multifd, direct_io=direct_io)
            t0 = time.perf_counter()
            m.migrate_incoming(f"file:{path}")
            return {"seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ yardsticks

    def dd_write(self) -> dict[str, Any]:
        target = self.p("dd.ram")
        unlink(target)
        os.sync()
        try:
            dt = sh(["dd", f"if={self.img}", f"of={target}", "bs=1M", "conv=fsync",
                     "status=none"])
        finally:
            unlink(target)
        return {"seconds": dt}

    def dd_read_cold(self) -> dict[str, Any]:
        os.sync()
        evict(self.img)
        dt = sh(["dd", f"if={self.img}", "of=/dev/null", "bs=1M", "status=none"])
        return {"seconds": dt}

    def cp_shm(self) -> dict[str, Any]:
        target = self.s("cp.ram")
        unlink(target)
        os.sync()
        try:
            dt = sh(["cp", self.img, target])
        finally:
            unlink(target)
        return {"seconds": dt}

    # ------------------------------------------------------------------ checks

    def verify(self, out: str) -> None:
        check_same(out, self.size, self.img_digest, self.img)

    # ------------------------------------------------------------------ configs

    def configs(self) -> list[Config]:
        a = self.args
        dios = [False] if a.no_direct_io else [False, True]
        out: list[Config] = []

        def dio_name(d: bool) -> str:
            return "direct-io" if d else "buffered"

        out.append(Config("dd-write", "yardstick", "dd", "dd bs=1M conv=fsync -> disk", {},
                          self.dd_write))
        out.append(Config("dd-read-cold", "yardstick", "dd", "dd read of image, cold", {},
                          self.dd_read_cold))
        out.append(Config("cp-shm", "yardstick", "cp", "cp image -> /dev/shm", {}, self.cp_shm))
        qemu_mf = [(0, False), (1, False), (2, False), (4, False)]
        if not a.no_direct_io:
            qemu_mf.append((4, True))

        def qname(mf: int, d: bool) -> str:
            return ("mapped-ram" + (f" multifd {mf}" if mf else " (no multifd)")
                    + (" direct-io" if d else ""))

        # The guest RAM both tools save: sparse (zero pages never touched, the image)
        # for every config; allocated (zero pages written) for the buffered ones.
        for ram in ("sparse", "allocated"):
            tag = "" if ram == "sparse" else ", allocated RAM"
            for ch in a.channels:
                for d in dios if ram == "sparse" else [False]:
                    out.append(Config(
                        f"mfd-save-{ch}-{dio_name(d)}-ram-{ram}", "save", "mfd",
                        f"{ch} ch {dio_name(d)}{tag}",
                        {"channels": ch, "direct_io": d, "ram": ram},
                        lambda ch=ch, d=d, ram=ram:
                            self.timed_save(self.mfd_save_into, ch, d, ram)))
            if self.qemu_ok:
                for mf, d in qemu_mf if ram == "sparse" else qemu_mf[:4]:
                    out.append(Config(
                        f"qemu-save-{mf}{'-dio' if d else ''}-ram-{ram}", "save", "qemu",
                        qname(mf, d) + tag, {"multifd_channels": mf, "direct_io": d, "ram": ram},
                        lambda mf=mf, d=d, ram=ram:
                            self.timed_save(self.qemu_save_into, mf, d, ram)))
        # Both tools restore the same files: which file (where its blocks lie on the disk)
        # matters as much as which tool, and only mfd's file has digests to verify.
        sources = ["mfd", "qemu"] if self.qemu_ok else ["mfd"]
        for cold in (False, True):
            kind = "restore cold" if cold else "restore warm"
            temp = "cold" if cold else "warm"
            for src in sources:
                for ch in a.channels:
                    for d in dios:
                        out.append(Config(
                            f"mfd-restore-{temp}-{ch}-{dio_name(d)}-src-{src}", kind, "mfd",
                            f"{ch} ch {dio_name(d)}, {SOURCE_NAME[src]}",
                            {"channels": ch, "direct_io": d, "cold": cold, "source": src},
                            lambda src=src, ch=ch, d=d, cold=cold: self.timed_restore(
                                self.mfd_restore_into, src, ch, d, cold)))
            if self.qemu_ok:
                for src in sources:
                    for mf, d in qemu_mf if src == "qemu" else qemu_mf[3:]:
                        out.append(Config(
                            f"qemu-restore-{temp}-{mf}{'-dio' if d else ''}-src-{src}", kind,
                            "qemu", f"{qname(mf, d)}, {SOURCE_NAME[src]}",
                            {"multifd_channels": mf, "direct_io": d, "cold": cold,
                             "source": src},
                            lambda src=src, mf=mf, d=d, cold=cold: self.timed_restore(
                                self.qemu_restore_into, src, mf, d, cold)))
        return out

    # ------------------------------------------------------------------ the run

    def run(self, configs: list[Config]) -> None:
        def extra(res: dict[str, Any]) -> str:
            if "fdatasync_seconds" in res:
                return f" (+fdatasync {res['fdatasync_seconds']:.3f} s)"
            return ""

        run_interleaved(configs, self.args.repeat, extra)


# --------------------------------------------------------------------------- reporting


def targets(rows: list[Row], size: int) -> tuple[list[str], dict[str, Any]]:
    """mfd's best median against QEMU's best median on the same input: saves of the same
    guest RAM (target: at most half), restores of the same file (target: no slower)."""
    lines: list[str] = []
    out: dict[str, Any] = {}
    checks = [("save", f"-ram-{ram}", f"save, {ram} RAM", f"save {ram}", 0.5)
              for ram in ("sparse", "allocated")]
    checks += [(f"restore {temp}", f"-src-{src}", f"restore {temp}, {SOURCE_NAME[src]}",
                f"restore {temp} {src} file", 1.0)
               for temp in ("warm", "cold") for src in ("qemu", "mfd")]
    for kind, suffix, what, key, target in checks:
        def same_input(r: Row, suffix: str = suffix) -> bool:
            return r.key.endswith(suffix)

        m = best(rows, kind, "mfd", size, same_input)
        q = best(rows, kind, "qemu", size, same_input)
        if not (m and q):
            lines.append(f"{what}: no comparison (mfd or QEMU has no successful run)")
            continue
        mm, qm = m.stats(size)["median"], q.stats(size)["median"]
        ratio = mm / qm
        ok = ratio <= target
        lines.append(f"{what}: mfd best median {mm:.3f} s ({m.label}) vs QEMU best median "
                     f"{qm:.3f} s ({q.label}) -> ratio {ratio:.2f} (target <= {target:g}) "
                     f"{'PASS' if ok else 'MISS'}")
        out[key] = {"mfd": mm, "mfd_config": m.key, "qemu": qm, "qemu_config": q.key,
                    "ratio": ratio, "target": target, "pass": ok}
    return lines, out


SOURCE_NAME = {"mfd": "mfd's file", "qemu": "QEMU's file"}

NOTES = [
    "mfd: wall time of the mfd.save()/mfd.restore() call in this process. It includes "
    "starting the channel processes, like QEMU's figure includes starting its threads; "
    "restore also includes parsing the file and mfd's own blake3 check of the restored RAM "
    "against the file's trailer.",
    "mfd's save ends with fdatasync (its trailer promises durability); QEMU's save calls no "
    "fsync. An fdatasync of QEMU's file right after it reports completed takes a few ms (see "
    "below; ext4 starts writeback when QEMU closes a file it truncated at open, "
    "auto_da_alloc), so the figures compare durable saves.",
    "Both tools save the same guest RAM: a fresh copy of the image in /dev/shm per run "
    "(untimed). 'sparse': the image's zero pages are holes, as in RAM a guest never touched; "
    "mfd's zero-page detection skips holes without reading them, QEMU reads every page (and "
    "so allocates the holes in tmpfs). 'allocated RAM': zero pages are written zeros, so "
    "both tools must read every page.",
    "QEMU: QMP migrate / migrate-incoming until query-migrate says completed (polled every "
    "2 ms), as mfd/qemu.py measures; QEMU's start (~0.04 s) is not included.",
    "Restores go to a fresh file in /dev/shm, removed after each run, and every restore is "
    "checked against the image with blake3 outside the timed region. warm: the .mig was read "
    "once before; cold: evicted first (fsync + POSIX_FADV_DONTNEED). Restore sources: a file "
    "saved by mfd (2 channels) and one saved by QEMU (multifd 4), restored by both tools. "
    "Restoring mfd's file, mfd also checks every chunk against its trailer's digests "
    "(QEMU checks nothing); QEMU's file has no digests, so there neither tool verifies.",
    "MiB/s is RAM size / median. Each config had one uncounted warm-up run; the counted runs "
    "were interleaved across configs. The image is sparse (zero pages are holes), so cp and "
    "dd read only its data; dd writes all of it.",
]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    standard_args(ap, "mfd channel counts (default 1,2,4)", DEFAULT_OUT,
                  "skip QEMU's save/restore")
    ap.add_argument("--dir", default=None,
                    help="parent of the work directory (default /var/tmp); a fresh "
                         "subdirectory is created there and removed at the end")
    ap.add_argument("--no-direct-io", action="store_true", help="skip the direct-io configs")
    args = parse_standard(ap, argv)

    cleanup = Cleanup()
    bench = Bench(args, cleanup)
    qemu = qemu_info()
    if args.no_qemu:
        bench.notes.append("QEMU skipped (--no-qemu).")
    elif not qemu["usable"]:
        bench.notes.append("QEMU not compared: qemu-system-x86_64 >= 9.0 not found "
                           f"(found {qemu['version']}).")
    else:
        bench.qemu_ok = True
    env = environment(qemu)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    Cleanup.install_signals()
    configs: list[Config] = []
    interrupted = False
    try:
        bench.prepare()
        configs = bench.configs()
        log(f"{len(configs)} configs x (1 warm-up + {args.repeat}) runs")
        bench.run(configs)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up, reporting what was measured")
    finally:
        cleanup.run()

    size = args.size
    rows = rows_of(configs)
    tgt_lines, tgt = targets(rows, size)
    fs = bench.setup.get("workdir_fs", {})
    img = bench.setup.get("image", {})
    header = [
        f"mfd bench_file: {human(size)} RAM image, pages {img.get('pages')}, runs of 16, "
        f"seed 1; {args.repeat} counted runs/config (+1 warm-up), interleaved",
        f"disk: {bench.setup.get('workdir', '?')} ({fs.get('fstype', '?')} on "
        f"{fs.get('device', '?')}); CPU: {env['cpu_count']} x {env['cpu_model']}; kernel "
        f"{env['kernel']}; Python {env['versions']['python']}; QEMU {qemu['version']}",
    ]
    for k in ("mfd_src", "qemu_src"):
        if k in bench.setup:
            i = bench.setup[k]
            header.append(f"restore source {i['made_by']}: {human(i['size'])} apparent, "
                          f"{human(i['allocated'])} allocated")
    bench.notes += run_notes(env, configs)
    syncs = [r["fdatasync_seconds"] for c in configs for r in c.runs
             if r.get("ok") and "fdatasync_seconds" in r and not c.params.get("direct_io")]
    if syncs:
        bench.notes.append(f"fdatasync of QEMU's buffered save files right after completion: "
                           f"median {statistics.median(syncs) * 1000:.1f} ms, max "
                           f"{max(syncs) * 1000:.1f} ms.")
    text = "\n".join([*header, "", stats_table(rows, size), "", *tgt_lines, "", "Notes:",
                      *(f"- {n}" for n in [*NOTES, *bench.notes])])
    if interrupted:
        text += "\n(INTERRUPTED: partial results)"
    print(text, flush=True)

    result = {
        "benchmark": "bench_file",
        "started": started,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "args": {k: v for k, v in vars(args).items()},
        "environment": env,
        "setup": bench.setup,
        "configs": [c.as_json() for c in configs],
        "summary": [r.as_json(size) for r in rows],
        "targets": tgt,
        "notes": [*NOTES, *bench.notes],
        "table": text,
    }
    write_json(args.out, result)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
