"""``mfd bench save|restore|migrate|live|kvm|postcopy|all``: one run, every mode asked for,
one report.

The modes run in order (save, restore, migrate, live), each one's configs interleaved with
QEMU's and with its physical limit. At the end, whatever happened (Ctrl-C included, after
removing everything the run created): a table on stdout (or the JSON with ``--json``), and
in ``--out``: results.json (every raw run, the environment, the summary, the targets),
table.txt and the PNG plots.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
from typing import Any

import orjson

from mfd.bench import files, kvm, live, migration, plots, postcopy, report
from mfd.bench.env import environment, mfd_sources_digest, qemu_info
from mfd.bench.options import Settings, settings
from mfd.bench.runs import Cleanup, Config, RunProgress, log, run_interleaved
from mfd.bench.workspace import Workspace
from mfd.errors import MfdError, UsageError
from mfd.shm.kvm import unavailable
from mfd.units import human


def _extra(res: dict[str, Any]) -> str:
    """What a finished run adds to its progress line."""
    bits = []
    if res.get("converged") is False:
        bits.append("not converged")
    shown = [("downtime_ms", "ms downtime"), ("cpu_throttle_percentage", "% throttle")]
    if "converged" in res:  # a live run: how many rounds it took
        shown.insert(1, ("rounds", "rounds"))
    for key, unit in shown:
        if res.get(key) is not None:
            bits.append(f"{res[key]:.0f} {unit}")
    if "fdatasync_seconds" in res:
        bits.append(f"+fdatasync {res['fdatasync_seconds']:.3f} s")
    return f" ({', '.join(bits)})" if bits else ""


def _groups(ws: Workspace) -> list[tuple[str, Any]]:
    """(title, function building the configs) per mode asked for; a mode's setup (the
    restore sources) runs only when its turn comes."""
    fb = files.FileBench(ws)
    out: list[tuple[str, Any]] = []
    for mode in ws.settings.modes:
        if mode == "save":
            out.append(("save", fb.save_configs))
        elif mode == "restore":
            def restore() -> list[Config]:
                fb.prepare_sources()
                return fb.restore_configs()
            out.append(("restore", restore))
        elif mode == "migrate":
            out.append(("migrate", migration.MigrateBench(ws).configs))
        elif mode == "kvm":
            out.append(("kvm", kvm.KvmBench(ws).configs))
        elif mode == "postcopy":
            out.append(("postcopy", postcopy.PostcopyBench(ws).configs))
        else:
            out.append(("live", live.LiveBench(ws).configs))
    return out


def _notes(s: Settings, ws: Workspace, configs: list[Config], env: dict[str, Any]) -> list[str]:
    notes = []
    for mode in s.modes:
        notes += {"save": files.NOTES["save"], "restore": files.NOTES["restore"],
                  "migrate": migration.NOTES, "live": live.NOTES, "kvm": kvm.NOTES,
                  "postcopy": postcopy.NOTES}[mode]
    if "postcopy" in s.modes:
        notes += postcopy.summary([c for c in configs if c.mode == "postcopy restore"])
    notes.append(f"Each config: {s.warmup} uncounted warm-up run(s), then {s.repeat} counted "
                 "runs, interleaved across the configs of its mode. MiB/s is RAM size / "
                 "median. mfd/QEMU is mfd's median time over QEMU's with the same parameters "
                 "(below 1: mfd is faster; for QEMU->mfd and mfd->QEMU, over QEMU->QEMU's); "
                 "'of limit' is the share of the limit's throughput reached.")
    notes += ws.notes
    if s.xbzrle and "live" in s.modes:
        notes.append("live --xbzrle: each config without multifd (QEMU refuses XBZRLE with "
                     "multifd), without and with XBZRLE, max-bandwidth "
                     f"{human(s.max_bandwidth) + '/s' if s.max_bandwidth else 'unlimited'}, "
                     "QEMU's 64 MiB cache; 'XBZRLE rate' is a page's 4096 bytes over what "
                     "its record took, over the whole migration (QEMU's encoding-rate is "
                     "the last period's)")
    if s.tls and "migrate" in s.modes:
        ulp = env.get("net", {}).get("net.ipv4.tcp_available_ulp", "?")
        notes.append("TLS: mfd runs each connection's TLS 1.3 in a relay process "
                     f"({env.get('versions', {}).get('openssl')}, userspace AES-GCM); kernel "
                     "TLS " + ("could be used here (tls in tcp_available_ulp) but is not "
                               "measured" if "tls" in ulp.split() else
                               f"is not available on this kernel (tcp_available_ulp: {ulp})"))
    env["mfd_sources_blake3_at_end"] = mfd_sources_digest()
    if env["mfd_sources_blake3_at_end"] != env["mfd_sources_blake3"]:
        notes.append("WARNING: mfd's sources changed while the benchmark ran: runs before "
                     "and after the change are mixed.")
    loads = [r["loadavg1"] for c in configs for r in c.runs if "loadavg1" in r]
    if loads:
        notes.append(f"1-minute load average at the start of the runs: {min(loads):.2f} to "
                     f"{max(loads):.2f} on {env['cpu_count']} CPUs (anything else running "
                     "skews the figures).")
    syncs = [r["fdatasync_seconds"] for c in configs for r in c.counted()
             if "fdatasync_seconds" in r and not c.params.get("direct_io")]
    if syncs:
        notes.append(f"fdatasync of QEMU's buffered save files right after completion: "
                     f"median {statistics.median(syncs) * 1000:.1f} ms.")
    return notes


def _open_out(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".mfd-bench-probe")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"mfd bench: --out {path}: {e.strerror}") from None
    return os.path.abspath(path)


def _measure(s: Settings, qemu: dict[str, Any], qemu_ok: bool
             ) -> tuple[Workspace, list[Config], bool]:
    """Every mode's configs, run; then everything the run created removed, also on Ctrl-C
    (returns whether it was interrupted)."""
    cleanup = Cleanup()
    configs: list[Config] = []
    with RunProgress() as progress:
        ws = Workspace(s, cleanup, progress, qemu_ok)
        if s.against_qemu and not qemu_ok:
            ws.notes.append(f"QEMU not compared: qemu-system-x86_64 >= 9.0 not found (found "
                            f"{qemu['version']}).")
            log(ws.notes[-1])
        try:
            ws.prepare()
            for title, build in _groups(ws):
                group = build()
                configs += group
                run_interleaved(title, group, s.repeat, s.warmup, progress, _extra)
        except KeyboardInterrupt:
            log("interrupted: removing what the run created, reporting what was measured")
            return ws, configs, True
        finally:
            cleanup.run()
    return ws, configs, False


def _write(outdir: str, result: dict[str, Any], text: str, as_json: bool) -> None:
    """results.json and table.txt in ``outdir``; the table (or the JSON) on stdout."""
    blob = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
                        default=str)
    with open(os.path.join(outdir, "results.json"), "wb") as f:
        f.write(blob)
    with open(os.path.join(outdir, "table.txt"), "w") as f:
        f.write(text + "\n")
    if as_json:
        sys.stdout.buffer.write(blob + b"\n")
    else:
        print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    s = settings(args)
    outdir = _open_out(s.out)
    if s.image is not None and not os.path.isfile(s.image):
        raise UsageError(f"mfd bench: --image {s.image}: not a file")
    if "kvm" in s.modes and (why := unavailable()):
        raise MfdError(f"bench kvm: no KVM here: {why}")
    qemu = qemu_info()
    qemu_ok = s.against_qemu and qemu["usable"]
    env = environment(qemu)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    ws, configs, interrupted = _measure(s, qemu, qemu_ok)

    size = ws.image.size if ws.image is not None else (s.size or 0)
    rows = report.summarize(configs, size)
    tgts = report.targets(rows)
    notes = _notes(s, ws, configs, env)
    command = "mfd bench " + shlex.join(sys.argv[sys.argv.index("bench") + 1:]) \
        if "bench" in sys.argv else "mfd bench"
    fs = ws.setup.get("disk_fs", {})
    header = [
        f"{command}",
        f"image: {human(size)}, pages {ws.setup.get('image', {}).get('pages')}; "
        f"{s.repeat} counted run(s) per config after {s.warmup} warm-up, interleaved",
        f"machine: {env['cpu_count']} x {env['cpu_model']}; kernel {env['kernel']}; Python "
        f"{env['versions']['python']}; QEMU {qemu['version'] if qemu_ok else 'not compared'}"
        f"; disk {fs.get('fstype', '?')} on {fs.get('device', '?')}; started {started}",
    ]
    text = report.text(header, rows, tgts, notes)
    if interrupted:
        text += "\n(INTERRUPTED: partial results)"
    made = plots.write_all(rows, configs, outdir, f"{command} ({human(size)}, {started})")
    _write(outdir, {
        "command": command, "started": started,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "interrupted": interrupted, "settings": s.as_json(), "environment": env,
        "setup": ws.setup, "configs": [c.as_json() for c in configs], "summary": rows,
        "targets": tgts, "notes": notes, "plots": made, "table": text,
    }, text, s.json)
    log(f"results in {outdir}: results.json, table.txt"
        + "".join(f", {os.path.basename(p)}" for p in made))
    if interrupted:
        print(f"mfd: bench interrupted; partial results in {outdir}", file=sys.stderr)
        return 130
    failed = [c for c in configs if c.error is not None]
    if failed:
        print(f"mfd: bench: {len(failed)} config(s) failed, first {failed[0].key}: "
              f"{failed[0].error}", file=sys.stderr)
        return 1
    return 0
