"""From raw runs to what a report shows: per-config statistics, ratios, tables, targets.

Every config's figure is the median of its counted runs (min and max beside it). An mfd
config is compared with the QEMU config of the same mode and parameters (``mfd/QEMU``,
time over time: below 1 mfd is faster; a migration between mfd and QEMU, either way, with
QEMU -> QEMU), and every config with its physical limit measured in the same run (``of
limit``: the share of the limit's throughput it reached). A migration also shows each end's
CPU seconds per GiB of RAM (medians).
"""

from __future__ import annotations

import statistics
from typing import Any

from mfd.bench.runs import Config
from mfd.units import human

MiB = 1 << 20
MODE_ORDER = ("save", "restore warm", "restore cold", "migrate", "live", "kvm throttle",
              "kvm stop", "postcopy migrate", "postcopy sweep", "postcopy restore")
# a postcopy run's figures of its pages asked for (medians over the runs)
POSTCOPY_FIGURES = ("run_at_s", "postcopy_requests", "faults", "latency_median_ms",
                    "latency_p99_ms", "vcpu_blocked_ms", "blocktime_ms", "vcpu_blocktime_ms")

# (mode, which runs are the same input, what, target of mfd's best / QEMU's best)
TARGETS = [
    ("save", {"ram": "sparse"}, "save, RAM with never-touched zero pages", 0.5),
    ("save", {"ram": "allocated"}, "save, every page allocated", 0.5),
    ("restore warm", {"source": "qemu"}, "restore warm, QEMU's file", 1.0),
    ("restore warm", {"source": "mfd"}, "restore warm, mfd's file (mfd verifies)", 1.0),
    ("restore cold", {"source": "qemu"}, "restore cold, QEMU's file", 1.0),
    ("restore cold", {"source": "mfd"}, "restore cold, mfd's file (mfd verifies)", 1.0),
]


# migrate configs: tool -> who sends -> who receives
ROUTES = {"mfd": "mfd->mfd", "qemu": "QEMU->QEMU", "qemu->mfd": "QEMU->mfd",
          "mfd->qemu": "mfd->QEMU"}
WITH_MFD = ("mfd", "qemu->mfd", "mfd->qemu")  # the tools held against QEMU's own

# issue 23's migrate targets, each against QEMU->QEMU in the same view (channels,
# compression, prealloc, pinned, TLS): route, verified, figure, target (fresh RAM, RAM
# allocated ahead, over TLS; None: no target, shown beside)
MIGRATE_TARGETS = [
    ("qemu->mfd", True, "time", (1.0, 1.0, None)),
    ("mfd", True, "time", (1.0, 1.0, 1.2)),
    ("mfd", False, "time", (None, None, None)),
    ("qemu->mfd", True, "destination CPU", (1.5, 1.0, None)),
    ("mfd", True, "CPU of both ends", (1.2, 1.2, None)),
    ("mfd->qemu", True, "time", (1.0, 1.0, None)),
]


def _med(values: list[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, int | float)]
    return statistics.median(vals) if vals else None


def stats(c: Config, size: int) -> dict[str, Any]:
    secs = [r["seconds"] for r in c.counted() if r.get("converged", True)]
    if not secs:
        return {"n": 0}
    med = statistics.median(secs)
    return {"n": len(secs), "median": med, "min": min(secs), "max": max(secs),
            "mib_s": size / MiB / med if med > 0 else None}


def twin(c: Config, configs: list[Config]) -> Config | None:
    """The QEMU config measured on the same input with the same parameters as ``c`` (QEMU
    has no verification: an mfd config without it is held against the same one)."""
    for q in configs:
        if q.tool == "qemu" and q.mode == c.mode and _view(q.params) == _view(c.params):
            return q
    return None


def summarize(configs: list[Config], size: int) -> list[dict[str, Any]]:
    by_key = {c.key: c for c in configs}
    out = []
    for c in configs:
        st = stats(c, size)
        row: dict[str, Any] = {"key": c.key, "mode": c.mode, "tool": c.tool, "label": c.label,
                               "params": c.params, "error": c.error, **st}
        limit = by_key.get(c.limit) if c.limit else None
        lst = stats(limit, size) if limit is not None else {"n": 0}
        if st["n"] and lst["n"]:
            row["limit"] = c.limit
            row["of_limit"] = lst["median"] / st["median"]
        q = twin(c, configs) if c.tool in WITH_MFD else None
        qst = stats(q, size) if q is not None else {"n": 0}
        if st["n"] and qst["n"]:
            row["qemu"] = q.key if q else None
            row["vs_qemu"] = st["median"] / qst["median"]
        if c.mode == "migrate" and c.tool in ROUTES:
            runs = c.counted()
            row.update(src_cpu_s_per_gib=_med([r.get("src_cpu_s_per_gib") for r in runs]),
                       dst_cpu_s_per_gib=_med([r.get("dst_cpu_s_per_gib") for r in runs]))
        if c.mode == "live":
            runs = c.counted()
            ok = [r for r in runs if r.get("converged")]
            row.update(runs=len(runs), converged=len(ok),
                       total_time_ms=_med([r.get("total_time_ms") for r in ok]),
                       downtime_ms=_med([r.get("downtime_ms") for r in ok]),
                       downtime_min_ms=min((r["downtime_ms"] for r in ok), default=None),
                       downtime_max_ms=max((r["downtime_ms"] for r in ok), default=None),
                       rounds=_med([r.get("rounds") for r in ok]),
                       verify_ms=_med([r.get("verify_time_ms") for r in ok]),
                       final_bytes=_med([r.get("final_round_bytes") for r in ok]),
                       verify_per_100mib=_med([_per_100mib(r) for r in ok]),
                       throttle=_med([r.get("cpu_throttle_percentage") for r in ok]),
                       transferred=_med([r.get("transferred") for r in ok]),
                       xbzrle_rate=_med([r.get("xbzrle_encoding_rate") for r in ok]))
        if c.mode in ("postcopy migrate", "postcopy sweep"):
            runs = c.counted()
            row.update({k: _med([r.get(k) for r in runs]) for k in POSTCOPY_FIGURES})
            if q is not None and qst["n"]:
                p99 = _med([r.get("latency_p99_ms") for r in q.counted()])
                if row["latency_p99_ms"] is not None and p99:
                    row["p99_vs_qemu"] = row["latency_p99_ms"] / p99
        if c.mode == "kvm throttle":
            runs = c.counted()
            row.update(iterations_per_s=_med([r.get("iterations_per_s") for r in runs]),
                       dirty_mib_s=_med([r.get("dirty_mib_s") for r in runs]))
        out.append(row)
    _verification_ab(out)
    return out


def _verification_ab(rows: list[dict[str, Any]]) -> None:
    """A live config run both with and without verification (--verify both): what the
    verification cost, as the difference of the median downtimes, also per 100 MiB the
    final round moved."""
    unverified = {_live_twin_key(r["params"]): r for r in rows
                  if r["mode"] == "live" and r["params"].get("verify") is False}
    for r in rows:
        if r["mode"] != "live" or r["params"].get("verify") is not True:
            continue
        twin = unverified.get(_live_twin_key(r["params"]))
        if twin and r.get("downtime_ms") is not None and twin.get("downtime_ms") is not None:
            r["ab_ms"] = r["downtime_ms"] - twin["downtime_ms"]
            if r.get("final_bytes"):
                r["ab_per_100mib"] = r["ab_ms"] / (r["final_bytes"] / (100 * MiB))


def _live_twin_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in params.items() if k != "verify"))


def format_table(head: list[str], body: list[list[str]], right: set[int]) -> str:
    """Plain-text table. A row shorter than ``head`` ends in one free-text cell (e.g.
    "FAILED: ..."), which does not widen its column."""
    widths = [len(h) for h in head]
    for b in body:
        for i, cell in enumerate(b if len(b) == len(head) else b[:-1]):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if len(cells) < len(head) and i == len(cells) - 1:
                out.append(cell)
            else:
                out.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def _ratio(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else ""


def _cpu(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else ""


def mode_table(rows: list[dict[str, Any]], cpu: bool = False) -> str:
    """One row per config; ``cpu``: a migration's tools named by route (source->destination)
    and each end's CPU seconds per GiB."""
    head = ["tool", "config", "n", "median s", "min s", "max s", "MiB/s", "mfd/QEMU",
            "of limit"] + (["src-cpu s/GiB", "dst-cpu s/GiB"] if cpu else [])
    body = []
    for r in rows:
        tool = ROUTES.get(r["tool"], r["tool"]) if cpu else r["tool"]
        if r["error"] is not None:
            body.append([tool, r["label"], str(r["n"]), "FAILED: " + r["error"]])
        elif not r["n"]:
            body.append([tool, r["label"], "0", "no runs"])
        else:
            body.append([tool, r["label"], str(r["n"]), f"{r['median']:.3f}",
                         f"{r['min']:.3f}", f"{r['max']:.3f}", f"{r['mib_s']:.0f}",
                         _ratio(r.get("vs_qemu")), _ratio(r.get("of_limit"))]
                        + ([_cpu(r.get("src_cpu_s_per_gib")), _cpu(r.get("dst_cpu_s_per_gib"))]
                           if cpu else []))
    return format_table(head, body, set(range(2, len(head))))


def migrate_table(rows: list[dict[str, Any]]) -> str:
    return mode_table(rows, cpu=True)


def _per_100mib(run: dict[str, Any]) -> float | None:
    """A live run's verification ms per 100 MiB its final round moved."""
    ms, moved = run.get("verify_time_ms"), run.get("final_round_bytes")
    if ms is None or not moved:
        return None
    return ms / (moved / (100 * MiB))


def live_table(rows: list[dict[str, Any]]) -> str:
    xb = any("xbzrle" in r["params"] for r in rows)  # --xbzrle: guest, how pages went, rate
    head = ["dirty rate", "pattern", *(["guest", "pages"] if xb else []), "auto-converge",
            "verify", "converged", "total s", "downtime ms", "(min-max)", "verifying ms",
            "final MiB", "verify ms/100 MiB", "A/B ms", "A/B ms/100 MiB", "rounds",
            "throttle %", "sent MiB", *(["XBZRLE rate"] if xb else [])]
    body = []
    for r in rows:
        p = r["params"]
        first = [f"{human(p['dirty_rate'])}/s", p.get("pattern", "random")]
        if xb:
            first += ["KVM" if p.get("kvm") else "built-in",
                      "XBZRLE" if p.get("xbzrle") else "no multifd" if "xbzrle" in p
                      else f"{p['channels']} ch"]
        verify = "no" if p.get("verify") is False else "yes"
        first += ["yes" if p["auto_converge"] else "no", verify]
        if r["error"] is not None:
            body.append([*first, "FAILED: " + r["error"]])
            continue
        if not r.get("converged"):
            body.append([*first, f"0/{r.get('runs', 0)}", "not converged"])
            continue

        def f(x: float | None, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
            return fmt.format(x * scale) if x is not None else "?"

        unverified = verify == "no"
        body.append([*first, f"{r['converged']}/{r['runs']}",
                     f(r["total_time_ms"], 1e-3, "{:.2f}"), f(r["downtime_ms"]),
                     f"{f(r['downtime_min_ms'])}-{f(r['downtime_max_ms'])}",
                     "-" if unverified else f(r["verify_ms"]),
                     f(r["final_bytes"], 1 / MiB, "{:.1f}"),
                     "-" if unverified else f(r["verify_per_100mib"]),
                     "-" if unverified else f(r.get("ab_ms")),
                     "-" if unverified else f(r.get("ab_per_100mib")),
                     f(r["rounds"]), f(r["throttle"]), f(r["transferred"], 1 / MiB),
                     *([f(r.get("xbzrle_rate")) if p.get("xbzrle") else "-"] if xb else [])])
    return format_table(head, body, {0, *range(len(head) - (13 if xb else 12), len(head))})


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """mfd's best median against QEMU's best median on the same input (save, restore), and
    each migration config against QEMU's with the same channels and compression."""
    out = []

    def ok(r: dict[str, Any]) -> bool:
        return r["error"] is None and r["n"] > 0

    def best(mode: str, same: dict[str, Any], tool: str) -> dict[str, Any] | None:
        return min((r for r in rows if r["mode"] == mode and r["tool"] == tool and ok(r)
                    and all(r["params"].get(k) == v for k, v in same.items())),
                   key=lambda r: r["median"], default=None)

    for mode, same, what, target in TARGETS:
        m, q = best(mode, same, "mfd"), best(mode, same, "qemu")
        if m and q:
            out.append(_target(what, m, q, target))
    return out + migrate_targets([r for r in rows if r["mode"] == "migrate" and ok(r)])


def _target(what: str, m: dict[str, Any], q: dict[str, Any], target: float) -> dict[str, Any]:
    ratio = m["median"] / q["median"]
    return {"what": what, "mfd": m["median"], "mfd_config": m["label"], "qemu": q["median"],
            "qemu_config": q["label"], "ratio": ratio, "target": target,
            "met": ratio <= target}


def _figure(r: dict[str, Any], figure: str) -> float | None:
    if figure == "time":
        return r["median"]
    if figure == "destination CPU":
        return r.get("dst_cpu_s_per_gib")
    src, dst = r.get("src_cpu_s_per_gib"), r.get("dst_cpu_s_per_gib")
    return src + dst if src is not None and dst is not None else None


def _config_name(p: dict[str, Any]) -> str:
    """``2 ch zstd level 1, prealloc, pinned``: a migrate config's parameters."""
    level = " level 1" if p["compression"] != "none" else ""
    return f"{p['channels']} ch {p['compression']}{level}" + "".join(
        f", {name}" for key, name in (("prealloc", "prealloc"), ("pinned", "pinned"),
                                      ("tls", "TLS")) if p.get(key))


def _view(params: dict[str, Any]) -> tuple:
    """What a pair shares with its QEMU->QEMU twin: all parameters but verification."""
    return tuple(sorted((k, v) for k, v in params.items() if k != "verify"))


def migrate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:data:`MIGRATE_TARGETS` for every migrate config that has a QEMU->QEMU twin and the
    figure; ``rows``: the migrate rows that have runs. Ordered by target, then config."""
    qemu = {_view(r["params"]): r for r in rows if r["tool"] == "qemu"}
    out = []
    for tool, verified, figure, targets in MIGRATE_TARGETS:
        for r in rows:
            p = r["params"]
            q = qemu.get(_view(p))
            if r["tool"] != tool or p.get("verify", True) != verified or q is None:
                continue
            m_value, q_value = _figure(r, figure), _figure(q, figure)
            target = targets[2 if p.get("tls") else 1 if p.get("prealloc") else 0]
            if m_value is None or not q_value or (p.get("tls") and target is None):
                continue
            ratio = m_value / q_value
            route = ROUTES[tool] + ("" if verified else " --no-verify")
            out.append({"what": f"{route} {figure}, {_config_name(p)}",
                        "mfd": m_value, "mfd_config": r["label"], "qemu": q_value,
                        "qemu_config": q["label"], "ratio": ratio, "target": target,
                        "met": None if target is None else ratio <= target,
                        "unit": "s" if figure == "time" else "CPU-s/GiB"})
    return out


def tls_costs(rows: list[dict[str, Any]]) -> list[str]:
    """Each migration over TLS against the same tool and parameters in clear."""
    plain = {(r["tool"], tuple(sorted(r["params"].items()))): r for r in rows
             if r["mode"] == "migrate" and not r["params"].get("tls")}
    out = []
    for r in rows:
        if r["mode"] != "migrate" or not r["params"].get("tls") or r["error"] or not r["n"]:
            continue
        key = tuple(sorted((k, v) for k, v in r["params"].items() if k != "tls"))
        p = plain.get((r["tool"], key))
        if p is not None and not p["error"] and p["n"]:
            out.append(f"{ROUTES.get(r['tool'], r['tool'])} {r['label']}: {r['median']:.3f} s "
                       f"vs {p['median']:.3f} s in clear -> x{r['median'] / p['median']:.2f}")
    return out


def target_lines(tgts: list[dict[str, Any]]) -> list[str]:
    return [_target_line(t) for t in tgts]


def _target_line(t: dict[str, Any]) -> str:
    verdict = "(no target: beside the verified run)" if t["target"] is None else \
        f"(target <= {t['target']:g}) {'met' if t['met'] else 'MISSED'}"
    if "unit" not in t:  # save, restore: mfd's best against QEMU's best
        return (f"{t['what']}: mfd {t['mfd']:.3f} s ({t['mfd_config']}) vs QEMU "
                f"{t['qemu']:.3f} s ({t['qemu_config']}) -> {t['ratio']:.2f} {verdict}")
    digits = 3 if t["unit"] == "s" else 2
    return (f"{t['what']}: {t['mfd']:.{digits}f} {t['unit']} vs QEMU->QEMU "
            f"{t['qemu']:.{digits}f} {t['unit']} -> {t['ratio']:.2f} {verdict}")


def kvm_throttle_table(rows: list[dict[str, Any]]) -> str:
    head = ["vCPU", "throttle %", "n", "M iterations/s", "dirty MiB/s"]
    body = []
    for r in rows:
        p = r["params"]
        if r["error"] is not None or not r["n"]:
            body.append([p["writer"], str(p["throttle"]), str(r["n"]),
                         "FAILED: " + (r["error"] or "no runs")])
            continue
        body.append([p["writer"], str(p["throttle"]), str(r["n"]),
                     f"{r['iterations_per_s'] / 1e6:.3f}", f"{r['dirty_mib_s']:.1f}"])
    return format_table(head, body, {1, 2, 3, 4})


def kvm_stop_table(rows: list[dict[str, Any]]) -> str:
    head = ["stop", "n", "median ms", "min ms", "max ms"]
    body = []
    for r in rows:
        if r["error"] is not None or not r["n"]:
            body.append([r["label"], str(r["n"]), "FAILED: " + (r["error"] or "no runs")])
            continue
        body.append([r["label"], str(r["n"]), f"{r['median'] * 1000:.2f}",
                     f"{r['min'] * 1000:.2f}", f"{r['max'] * 1000:.2f}"])
    return format_table(head, body, {1, 2, 3, 4})


def postcopy_table(rows: list[dict[str, Any]]) -> str:
    """Postcopy: each page the destination's guest asked for, from its fault to its place."""
    head = ["tool", "config", "n", "median s", "run at s", "asked", "lat median ms",
            "lat p99 ms", "p99 mfd/QEMU", "vCPU blocked ms", "QEMU blocktime ms"]
    body = []

    def f(x: float | None, fmt: str = "{:.3f}") -> str:
        return fmt.format(x) if x is not None else ""

    for r in rows:
        tool = ROUTES.get(r["tool"], r["tool"])
        if r["error"] is not None:
            body.append([tool, r["label"], str(r["n"]), "FAILED: " + r["error"]])
        elif not r["n"]:
            body.append([tool, r["label"], "0", "no runs"])
        else:
            qemu = r.get("blocktime_ms") is not None
            body.append([tool, r["label"], str(r["n"]), f(r["median"]), f(r.get("run_at_s")),
                         f(r.get("faults"), "{:.0f}"), f(r.get("latency_median_ms")),
                         f(r.get("latency_p99_ms")), _ratio(r.get("p99_vs_qemu")),
                         f(r.get("vcpu_blocked_ms"), "{:.0f}"),
                         f"{r['blocktime_ms']:.0f} (vCPU {r['vcpu_blocktime_ms']:.0f})"
                         if qemu else ""])
    return format_table(head, body, set(range(2, len(head))))


TABLES = {"migrate": migrate_table, "live": live_table, "kvm throttle": kvm_throttle_table,
          "kvm stop": kvm_stop_table, "postcopy migrate": postcopy_table,
          "postcopy sweep": postcopy_table}


def text(header: list[str], rows: list[dict[str, Any]], tgts: list[dict[str, Any]],
         notes: list[str]) -> str:
    parts = [*header]
    for mode in MODE_ORDER:
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        parts += ["", f"{mode}:", TABLES.get(mode, mode_table)(mine)]
    if tgts:
        parts += ["", "targets (same run, medians):", *target_lines(tgts)]
    costs = tls_costs(rows)
    if costs:
        parts += ["", "the cost of TLS (same run, median over TLS / median in clear):",
                  *costs]
    parts += ["", "notes:", *(f"- {n}" for n in notes)]
    return "\n".join(parts)
