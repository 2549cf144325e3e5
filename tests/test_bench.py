"""``mfd bench``: the quick mode end to end, Ctrl-C, bad options, and the report's pairing.

No test asserts a timing: the figures are whatever this machine gives; what is checked is
that every mode ran for real (every destination was verified by the benchmark itself), that
the outputs are there, and that nothing the run created is left behind.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_mfd, start_mfd

from mfd.bench import report
from mfd.bench.qemu import qemu_binary
from mfd.bench.runs import Config


def bench_leftovers(workdir: Path) -> set[str]:
    """What a benchmark run may create: its /dev/shm directory and guests' RAM (mfd-bench*),
    its disk work directory, and guest control sockets."""
    shm = {n for n in os.listdir("/dev/shm") if n.startswith("mfd-bench")}
    disk = {n for n in os.listdir(workdir) if n.startswith("mfd-bench-")}
    run = {n for n in os.listdir(os.environ["MFD_RUN_DIR"]) if n.startswith("bench-")}
    return shm | disk | run


def left_behind(workdir: Path, before: set[str]) -> set[str]:
    """What the run left of what a benchmark creates (a benchmark running beside this suite,
    whose files were there before, may have removed its own meanwhile)."""
    return bench_leftovers(workdir) - before


@pytest.mark.slow
def test_quick_all_runs_every_mode_and_writes_the_report(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    before = bench_leftovers(work)
    p = run_mfd("bench", "all", "--quick", "--against", "qemu", "--out", str(out), "--dir",
                str(work), "--json", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout)
    assert left_behind(work, before) == set()

    configs = result["configs"]
    assert configs and all(c["error"] is None for c in configs), \
        [(c["key"], c["error"]) for c in configs if c["error"]]
    modes = {c["mode"] for c in configs}
    assert modes == {"save", "restore warm", "restore cold", "migrate", "live"}
    for c in configs:  # --quick: one counted run, no warm-up, each one real and checked
        (run,) = c["runs"]
        assert run["ok"] and not run["warmup"] and run["seconds"] > 0
        if c["tool"] in report.ROUTES and c["mode"] != "save" and c["mode"] != "live":
            assert run["verified"] is True
        if c["mode"] == "migrate" and c["tool"] in report.ROUTES:  # each end's CPU time
            assert run["src_cpu_s"] >= 0 and run["dst_cpu_s"] >= 0, run
            assert run["src_cpu_s_per_gib"] == pytest.approx(run["src_cpu_s"] * 16)  # 64 MiB
        if c["mode"] == "migrate" and c["tool"] == "mfd":  # measured here / by wait4: > 0
            assert run["src_cpu_s"] > 0 and run["dst_cpu_s"] > 0
    live = [c for c in configs if c["mode"] == "live"]
    assert {(c["params"]["dirty_rate"], c["params"]["auto_converge"]) for c in live} == \
        {(0, False), (0, True), (16 << 20, False), (16 << 20, True)}
    for c in live:
        (run,) = c["runs"]
        assert run["converged"] and run["digests_equal"] and run["rounds"] >= 2
    # a 64 MiB migration is active for a few tenths of a second: not every run is sampled
    assert any(c["runs"][0]["series"] for c in live), "query-migrate was never sampled"

    rows = {r["key"]: r for r in result["summary"]}
    assert rows["mfd-2-none"]["limit"] == "tcp-2" and rows["mfd-2-none"]["of_limit"] > 0
    assert rows["mfd-save-2-buffered-sparse"]["limit"] == "dd-write"
    if qemu_binary() is not None:
        assert rows["mfd-2-none"]["qemu"] == "qemu-2-none"
        # the cross pairs, for every channel count and compression, held against QEMU's
        for ch in (1, 2):
            for comp in ("none", "zstd"):
                for key, tool in ((f"qemu-mfd-{ch}-{comp}", "qemu->mfd"),
                                  (f"mfd-qemu-{ch}-{comp}", "mfd->qemu")):
                    r = rows[key]
                    assert (r["tool"], r["n"], r["qemu"]) == (tool, 1, f"qemu-{ch}-{comp}")
                    assert r["params"] == {"channels": ch, "compression": comp}
                    assert r["src_cpu_s_per_gib"] is not None
                    assert r["dst_cpu_s_per_gib"] is not None
        assert rows["mfd-2-zstd"]["vs_qemu"] > 0
        whats = {t["what"] for t in result["targets"]}
        assert "save, RAM with never-touched zero pages" in whats
        assert "mfd->mfd time, 2 ch zstd level 1" in whats
        assert "QEMU->mfd time, 2 ch zstd level 1, prealloc" in whats
    else:
        assert any("QEMU not compared" in n for n in result["notes"])

    env = result["environment"]
    assert env["cpu_count"] and env["kernel"] and env["versions"]["python"]
    for name in ("throughput.png", "migrate-cpu.png", "live-remaining.png",
                 "live-downtime.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert json.loads((out / "results.json").read_bytes())["summary"] == result["summary"]
    table = (out / "table.txt").read_text()
    for heading in ("save:", "restore warm:", "restore cold:", "migrate:", "live:"):
        assert heading in table
    migrate = table.split("\nmigrate:\n")[1].split("\n\n")[0].splitlines()
    assert "src-cpu s/GiB" in migrate[0] and "dst-cpu s/GiB" in migrate[0]
    routes = {line.split()[0] for line in migrate[2:]}
    assert routes >= {"tcp", "mfd->mfd"}
    if qemu_binary() is not None:
        assert routes == {"tcp", "mfd->mfd", "QEMU->QEMU", "QEMU->mfd", "mfd->QEMU"}


@pytest.mark.slow
def test_quick_migrate_over_tls_beside_clear(tmp_path):
    """``--tls``: each tool also over TLS (mfd's relays, QEMU's tls-creds-x509 with the same
    certificates), the cost of TLS per tool and the 1.2x target over TLS in the report."""
    out = tmp_path / "out"
    p = run_mfd("bench", "migrate", "--quick", "--against", "qemu", "--tls",
                "--multifd-channels", "2", "--multifd-compression", "none", "--prealloc", "off",
                "--out", str(out), "--json", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout)
    rows = {r["key"]: r for r in result["summary"]}
    tools = ["mfd", "qemu"] if qemu_binary() is not None else ["mfd"]
    for tool in tools:
        r = rows[f"{tool}-tls-2-none"]
        assert r["error"] is None and r["n"] == 1 and r["params"]["tls"] is True, r
    table = (out / "table.txt").read_text()
    assert "the cost of TLS" in table and "mfd->mfd 2 ch none, TLS:" in table, table
    assert any("kernel TLS" in n for n in result["notes"])
    if qemu_binary() is not None:
        assert rows["mfd-tls-2-none"]["qemu"] == "qemu-tls-2-none"
        (t,) = [t for t in result["targets"] if t["what"] == "mfd->mfd time, 2 ch none, TLS"]
        assert t["target"] == 1.2


@pytest.mark.slow
def test_quick_migrate_pinned_and_preallocated(tmp_path):
    """``--pin --prealloc on --verify both``: each pair with the destination's RAM allocated
    ahead, on the shared CPUs and pinned (the source on the first CPU, the destination on
    the second, each end recorded where it ran), mfd->mfd also unverified; the issue's
    target lines for each view under the table."""
    out = tmp_path / "out"
    p = run_mfd("bench", "migrate", "--quick", "--against", "qemu", "--pin", "--prealloc",
                "on", "--verify", "both", "--multifd-channels", "2", "--multifd-compression",
                "none", "--out", str(out), "--json", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout)
    configs = {c["key"]: c for c in result["configs"]}
    qemu = qemu_binary() is not None
    prefixes = ["mfd", "mfd-noverify"] + (["qemu", "qemu-mfd", "mfd-qemu"] if qemu else [])
    views = ("-prealloc", "-prealloc-pinned")
    assert set(configs) == {"tcp-2"} | {f"{pre}-2-none{v}" for pre in prefixes for v in views}
    src_cpu, dst_cpu = sorted(os.sched_getaffinity(0))[:2]
    for key, c in configs.items():
        if key == "tcp-2":
            continue
        assert c["error"] is None and c["params"]["prealloc"] is True, (key, c["error"])
        (run,) = c["runs"]
        assert run["verified"] and run["dst_cpu_startup_s"] is not None
        if key.endswith("-pinned"):
            assert (run["src_cpus"], run["dst_cpus"]) == ([src_cpu], [dst_cpu]), key
        else:  # the shared view: each end may run anywhere
            assert len(run["src_cpus"]) > 1 and len(run["dst_cpus"]) > 1, key
    rows = {r["key"]: r for r in result["summary"]}
    assert rows["mfd-noverify-2-none-prealloc"]["params"]["verify"] is False
    whats = {t["what"]: t for t in result["targets"]}
    if qemu:
        assert rows["mfd-noverify-2-none-prealloc-pinned"]["qemu"] == \
            "qemu-2-none-prealloc-pinned"
        for what in ("QEMU->mfd time", "mfd->mfd time", "mfd->QEMU time"):
            assert whats[f"{what}, 2 ch none, prealloc, pinned"]["target"] == 1.0
        beside = whats["mfd->mfd --no-verify time, 2 ch none, prealloc"]
        assert beside["target"] is None and beside["met"] is None
    table = (out / "table.txt").read_text()
    assert "2 ch none, prealloc, pinned, --no-verify" in table


def test_pin_needs_two_cpus(tmp_path):
    p = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "mfd", "bench", "migrate",
                        "--pin", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip() == ("mfd bench: --pin puts each end on a CPU of its own: this "
                                "process may use 1 CPU"), p.stderr


@pytest.mark.slow
def test_ctrl_c_stops_and_removes_what_it_created(tmp_path):
    """Interrupted in the middle of a live run (a guest, `mfd incoming`, a migration in
    flight): exit 130, one line, partial results written, nothing left behind."""
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    before = bench_leftovers(work)
    # a guest dirtying far faster than any link, and too big for its rest to fit in the
    # downtime limit: the migration cannot converge, so the signal lands while it is in
    # flight (its monitor socket exists only then)
    proc = start_mfd("bench", "live", "--quick", "--size", "512M", "--dirty-rate", "4G",
                     "--no-auto-converge", "--live-timeout", "120", "--out", str(out), "--dir",
                     str(work))
    try:
        deadline = time.monotonic() + 120
        while not {os.path.dirname(p) for p in glob.glob("/dev/shm/mfd-bench-*/source.qmp")
                   if os.path.basename(os.path.dirname(p)) not in before}:
            assert proc.poll() is None and time.monotonic() < deadline, "no migration started"
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the test failed: still let it clean up (SIGTERM)
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("mfd: bench interrupted")
    assert "Traceback" not in stderr
    assert "(INTERRUPTED: partial results)" in stdout
    assert json.loads((out / "results.json").read_bytes())["interrupted"] is True
    assert left_behind(work, before) == set()


@pytest.mark.parametrize("argv, says", [
    (["save", "--size", "3"], "not a positive multiple of 4096"),
    (["live", "--dirty-rate", "fast"], "bad dirty rate list"),
    (["migrate", "--multifd-compression", "lz4"], "compression must be among"),
    (["save", "--image", "/nonexistent/ram.img"], "not a file"),
    (["save", "--repeat", "0"], "--repeat must be at least 1"),
    (["save", "--zero", "0.8", "--random", "0.5"], "must not exceed 1"),
    (["fly"], "invalid choice"),
    (["save", "--dir", "/proc/no/such/dir"], "--dir /proc/no/such/dir"),
    (["migrate", "--prealloc", "sometimes"], "invalid choice: 'sometimes'"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, argv, says):
    p = run_mfd("bench", *argv, "--out", str(tmp_path / "o"), timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], p.stderr


def test_report_pairs_mfd_with_qemus_same_config_and_its_limit():
    def cfg(key, mode, tool, params, secs, limit=None, error=None, cpu=(None, None)):
        c = Config(key, mode, tool, key, params, lambda: {}, limit=limit, error=error)
        c.runs = [{"ok": True, "warmup": True, "seconds": 99.0}] + \
            [{"ok": True, "warmup": False, "seconds": s, "src_cpu_s_per_gib": cpu[0],
              "dst_cpu_s_per_gib": cpu[1]} for s in secs]
        return c

    size = 1 << 30
    configs = [
        cfg("tcp-2", "migrate", "tcp", {"channels": 2}, [0.25, 0.5, 0.3]),
        cfg("mfd-2-none", "migrate", "mfd", {"channels": 2, "compression": "none"},
            [3.0, 2.0, 4.0], limit="tcp-2"),
        cfg("qemu-2-none", "migrate", "qemu", {"channels": 2, "compression": "none"},
            [1.0, 1.2, 0.9], limit="tcp-2"),
        cfg("qemu-2-zstd", "migrate", "qemu", {"channels": 2, "compression": "zstd"},
            [0.1, 0.1, 0.1], limit="tcp-2"),
        cfg("mfd-1-none", "migrate", "mfd", {"channels": 1, "compression": "none"}, [],
            error="boom"),
        cfg("qemu-mfd-2-none", "migrate", "qemu->mfd", {"channels": 2, "compression": "none"},
            [2.0], limit="tcp-2", cpu=(1.25, 3.5)),
        cfg("mfd-qemu-2-none", "migrate", "mfd->qemu", {"channels": 2, "compression": "none"},
            [], error="cross boom"),
    ]
    rows = {r["key"]: r for r in report.summarize(configs, size)}
    m = rows["mfd-2-none"]
    assert (m["n"], m["median"], m["min"], m["max"]) == (3, 3.0, 2.0, 4.0)  # warm-up not counted
    assert m["qemu"] == "qemu-2-none" and m["vs_qemu"] == pytest.approx(3.0 / 1.0)
    assert m["of_limit"] == pytest.approx(0.3 / 3.0)
    assert m["mib_s"] == pytest.approx(1024 / 3.0)
    x = rows["qemu-mfd-2-none"]  # a cross pair: against QEMU -> QEMU, no target of its own
    assert x["qemu"] == "qemu-2-none" and x["vs_qemu"] == pytest.approx(2.0 / 1.0)
    assert (x["src_cpu_s_per_gib"], x["dst_cpu_s_per_gib"]) == (1.25, 3.5)
    tgts = {t["what"]: t for t in report.targets(list(rows.values()))}
    assert set(tgts) == {"QEMU->mfd time, 2 ch none", "mfd->mfd time, 2 ch none"}
    t = tgts["mfd->mfd time, 2 ch none"]
    assert t["ratio"] == pytest.approx(3.0) and t["target"] == 1.0 and not t["met"]
    table = report.mode_table(list(rows.values()))
    assert "FAILED: boom" in table
    table = report.migrate_table(list(rows.values())).splitlines()
    assert table[0].split()[-4:] == ["src-cpu", "s/GiB", "dst-cpu", "s/GiB"]
    (line,) = [ln for ln in table if ln.startswith("QEMU->mfd")]
    assert line.split()[-2:] == ["1.25", "3.50"]
    assert any(ln.startswith("mfd->QEMU") and "FAILED: cross boom" in ln for ln in table)


def test_the_issue_targets_per_view():
    """Each pair against QEMU->QEMU in the same view: time, the destination's CPU (1.5x with
    fresh RAM, 1.0x with RAM allocated ahead), both ends' CPU (1.2x); --no-verify beside,
    without a target."""
    def row(key, tool, params, median, src=None, dst=None):
        return {"key": key, "mode": "migrate", "tool": tool, "label": key, "params": params,
                "error": None, "n": 3, "median": median, "src_cpu_s_per_gib": src,
                "dst_cpu_s_per_gib": dst}

    fresh = {"channels": 4, "compression": "zstd"}
    ahead = {**fresh, "prealloc": True}
    rows = [row("q", "qemu", fresh, 1.0, 0.5, 0.4), row("qp", "qemu", ahead, 0.8, 0.5, 0.2),
            row("qm", "qemu->mfd", fresh, 0.9, 0.5, 0.5),
            row("qmp", "qemu->mfd", ahead, 0.9, 0.5, 0.3),
            row("m", "mfd", fresh, 1.1, 0.6, 0.4),
            row("mn", "mfd", {**fresh, "verify": False}, 0.95, 0.5, 0.4)]
    tgts = {t["what"]: t for t in report.targets(rows)}
    dst = tgts["QEMU->mfd destination CPU, 4 ch zstd level 1"]
    assert (dst["ratio"], dst["target"], dst["met"]) == (pytest.approx(1.25), 1.5, True)
    dst = tgts["QEMU->mfd destination CPU, 4 ch zstd level 1, prealloc"]
    assert (dst["ratio"], dst["target"], dst["met"]) == (pytest.approx(1.5), 1.0, False)
    both = tgts["mfd->mfd CPU of both ends, 4 ch zstd level 1"]
    assert (both["ratio"], both["target"], both["met"]) == (pytest.approx(1 / 0.9), 1.2, True)
    beside = tgts["mfd->mfd --no-verify time, 4 ch zstd level 1"]
    assert (beside["ratio"], beside["target"]) == (pytest.approx(0.95), None)
    assert list(tgts) == [  # in the issue's order, then the configs'
        "QEMU->mfd time, 4 ch zstd level 1", "QEMU->mfd time, 4 ch zstd level 1, prealloc",
        "mfd->mfd time, 4 ch zstd level 1", "mfd->mfd --no-verify time, 4 ch zstd level 1",
        "QEMU->mfd destination CPU, 4 ch zstd level 1",
        "QEMU->mfd destination CPU, 4 ch zstd level 1, prealloc",
        "mfd->mfd CPU of both ends, 4 ch zstd level 1"]
    lines = report.target_lines(list(tgts.values()))
    assert lines[4] == ("QEMU->mfd destination CPU, 4 ch zstd level 1: 0.50 CPU-s/GiB vs "
                        "QEMU->QEMU 0.40 CPU-s/GiB -> 1.25 (target <= 1.5) met")
    assert lines[3].endswith("-> 0.95 (no target: beside the verified run)")


@pytest.mark.slow
def test_a_real_ram_dump_is_the_image_and_is_left_as_it_was(tmp_path, reference):
    """``--image``: QEMU's own RAM image of the reference set, saved and restored by mfd
    (and QEMU where installed); the dump's size is the RAM size, and the dump is only read."""
    dump = reference["ram_16M_seed1.bin"]
    before = (dump.stat().st_size, dump.stat().st_mtime_ns, dump.read_bytes())
    work = tmp_path / "work"
    work.mkdir()
    p = run_mfd("bench", "restore", "--quick", "--image", str(dump), "--against", "qemu",
                "--out", str(tmp_path / "o"), "--dir", str(work), "--json", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout)
    image = result["setup"]["image"]
    assert image["source"] == "dump" and image["size"] == 16 << 20
    assert image["pages"]["zero"] + image["pages"]["nonzero"] == 4096
    restores = [c for c in result["configs"] if c["tool"] == "mfd"]
    assert restores and all(c["runs"][0]["verified"] for c in restores)
    assert (dump.stat().st_size, dump.stat().st_mtime_ns, dump.read_bytes()) == before


def test_qemus_traced_faults_give_each_pages_latency(tmp_path):
    """QEMU's destination trace (``-msg timestamp=on``, the log backend): a fault asked for
    and its page placed, by host address; a page placed without a fault counts nothing."""
    from mfd.bench.postcopy import fault_latencies

    trace = tmp_path / "trace.log"
    trace.write_text(
        "7@100.000100:postcopy_ram_fault_thread_request Request for HVA=0x7f0000001000 "
        "rb=mem offset=0x1000 pid=9\n"
        "7@100.000200:postcopy_place_page host=0x7f0000009000\n"
        "7@100.000150:postcopy_ram_fault_thread_request Request for HVA=0x7f0000002000 "
        "rb=mem offset=0x2000 pid=9\n"
        "7@100.000600:postcopy_place_page host=0x7f0000001000\n"
        "7@100.002150:postcopy_place_page_zero host=0x7f0000002000\n"
        "garbage\n")
    assert fault_latencies(str(trace)) == pytest.approx([0.5, 2.0])


@pytest.mark.slow
def test_quick_postcopy_against_qemu(tmp_path):
    """``mfd bench postcopy --against qemu``: QEMU -> QEMU postcopy of the boot-sector guest
    beside mfd -> mfd on the same loop, plain and preempt, each with its pages' latency
    (QEMU's from its trace, with its postcopy-blocktime); nothing left behind."""
    from mfd.shm.kvm import unavailable

    if qemu_binary() is None or unavailable():
        pytest.skip("needs QEMU and KVM")
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    before = bench_leftovers(work)
    p = run_mfd("bench", "postcopy", "--quick", "--against", "qemu", "--out", str(out),
                "--dir", str(work), "--json", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout)
    assert left_behind(work, before) == set()
    sweep = {c["key"]: c for c in result["configs"] if c["mode"] == "postcopy sweep"}
    assert set(sweep) == {"postcopy-sweep", "postcopy-sweep-qemu", "postcopy-sweep-preempt",
                          "postcopy-sweep-preempt-qemu"}
    for key, c in sweep.items():
        (run,) = c["runs"]
        assert run["ok"], c["error"]
        assert run["faults"] > 0 and run["latency_p99_ms"] >= run["latency_median_ms"] > 0
        if key.endswith("qemu"):
            assert c["tool"] == "qemu" and run["blocktime_ms"] is not None
    rows = {r["key"]: r for r in result["summary"]}
    assert rows["postcopy-sweep-preempt"]["qemu"] == "postcopy-sweep-preempt-qemu"
    assert rows["postcopy-sweep-preempt"]["p99_vs_qemu"] > 0
    assert "postcopy sweep:" in (out / "table.txt").read_text()
