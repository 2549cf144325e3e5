"""PNG plots of a benchmark run, with matplotlib's Agg backend (no display needed).

* ``throughput.png``: RAM MiB/s (median, min-max bars) against channels, one panel per mode
  (save, restore warm, restore cold, migrate per compression), mfd beside QEMU (and the
  cross migrations QEMU->mfd, mfd->QEMU), the physical limit measured in the same run as a
  dashed line;
* ``migrate-cpu.png``: each migration's CPU seconds per GiB, source and destination stacked,
  one group of bars per channel count, one panel per compression (the plainest view run:
  fresh RAM, shared CPUs, verified);
* ``live-remaining.png``: remaining dirty bytes against time, one line per dirty rate and
  auto-converge setting (the counted run with the median time);
* ``live-downtime.png``: downtime against dirty rate, with and without auto-converge, and
  the part of it that is not mfd's RAM verification (QEMU has none).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from mfd.bench.runs import Config

MiB = 1 << 20
PANELS = ("save", "restore warm", "restore cold")
COLORS = {"mfd": "tab:blue", "qemu": "tab:orange", "qemu->mfd": "tab:green",
          "mfd->qemu": "tab:red"}
TOOL_NAME = {"mfd": "mfd", "qemu": "QEMU", "qemu->mfd": "QEMU->mfd", "mfd->qemu": "mfd->QEMU"}
ROUTE_NAME = {"mfd": "mfd->mfd", "qemu": "QEMU->QEMU", "qemu->mfd": "QEMU->mfd",
              "mfd->qemu": "mfd->QEMU"}


def _style(ax: Any, ylabel: str) -> None:
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finish(fig: Any, ax: Any, ylabel: str, title: str, path: str) -> None:
    _style(ax, ylabel)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def _variant(params: dict[str, Any]) -> str:
    """What tells configs with the same channels apart in a panel."""
    bits = []
    if params.get("ram") == "allocated":
        bits.append("allocated RAM")
    if params.get("direct_io"):
        bits.append("direct-io")
    if "source" in params:
        bits.append(f"{'QEMU' if params['source'] == 'qemu' else 'mfd'}'s file")
    bits += [name for key, name in (("prealloc", "prealloc"), ("pinned", "pinned"),
                                    ("tls", "TLS")) if params.get(key)]
    if params.get("verify") is False:
        bits.append("no verify")
    return ", ".join(bits)


def _panels(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    out = [(m, [r for r in rows if r["mode"] == m]) for m in PANELS]
    comps = sorted({r["params"]["compression"] for r in rows
                    if r["mode"] == "migrate" and "compression" in r["params"]})
    for comp in comps:
        out.append((f"migrate, {comp}", [r for r in rows if r["mode"] == "migrate" and
                                         r["params"].get("compression", comp) == comp]))
    return [(t, rs) for t, rs in out if any(r["tool"] in COLORS for r in rs)]


def throughput(rows: list[dict[str, Any]], path: str, title: str) -> bool:
    import matplotlib.pyplot as plt

    panels = _panels(rows)
    if not panels:
        return False
    ncols = min(3, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), squeeze=False)
    for ax, (name, rs) in zip(axes.flat, panels, strict=False):
        lines: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rs:
            if r["n"] and r["tool"] in COLORS:
                lines.setdefault((r["tool"], _variant(r["params"])), []).append(r)
        variants = sorted({v for _, v in lines})
        ticks: set[int] = set()
        for (tool, variant), pts in sorted(lines.items()):
            pts.sort(key=lambda r: r["params"]["channels"])
            x = [r["params"]["channels"] for r in pts]
            y = [r["mib_s"] for r in pts]
            lo = [yy - r["mib_s"] * r["median"] / r["max"] for yy, r in zip(y, pts, strict=True)]
            hi = [r["mib_s"] * r["median"] / r["min"] - yy for yy, r in zip(y, pts, strict=True)]
            ticks.update(x)
            style = ["-", "--", ":", "-."][variants.index(variant) % 4]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, color=COLORS[tool],
                        linestyle=style,
                        label=(ROUTE_NAME if "migrate" in name else TOOL_NAME)[tool]
                        + (f" ({variant})" if variant else ""))
        limits = [r for r in rs if r["tool"] not in COLORS and r["n"]]
        for lim in limits:
            if "channels" in lim["params"]:
                continue
            ax.axhline(lim["mib_s"], color="gray", linestyle="--", linewidth=1)
            ax.annotate(f"limit: {lim['label']}", (0.01, lim["mib_s"]), fontsize=7,
                        xycoords=("axes fraction", "data"), va="bottom", color="gray")
        tcp = sorted((r for r in limits if "channels" in r["params"]),
                     key=lambda r: r["params"]["channels"])
        if tcp:
            ax.plot([r["params"]["channels"] for r in tcp], [r["mib_s"] for r in tcp],
                    color="gray", linestyle="--", linewidth=1, label="limit: TCP loopback")
        ax.set_xticks(sorted(ticks))
        ax.set_title(name)
        ax.set_xlabel("channels (QEMU 0 = no multifd)" if "migrate" not in name
                      else "multifd channels")
        _style(ax, "RAM MiB/s (median, min-max)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return True


def migrate_cpu(rows: list[dict[str, Any]], path: str, title: str) -> bool:
    import matplotlib.pyplot as plt

    mig = [r for r in rows if r["mode"] == "migrate" and r["tool"] in COLORS and r["n"]
           and r.get("src_cpu_s_per_gib") is not None]
    if not mig:
        return False
    # one bar per pair: its plainest view measured (fresh RAM, shared CPUs, verified)
    view = min({_variant(r["params"]) for r in mig}, key=lambda v: (len(v), v))
    mig = [r for r in mig if _variant(r["params"]) == view]
    comps = sorted({r["params"]["compression"] for r in mig})
    tools = [t for t in COLORS if any(r["tool"] == t for r in mig)]
    fig, axes = plt.subplots(1, len(comps), figsize=(5.6 * len(comps), 4.2), squeeze=False)
    width = 0.8 / len(tools)
    top = max(r["src_cpu_s_per_gib"] + (r.get("dst_cpu_s_per_gib") or 0.0) for r in mig)
    for ax, comp in zip(axes.flat, comps, strict=True):
        chans = sorted({r["params"]["channels"] for r in mig
                        if r["params"]["compression"] == comp})
        for k, tool in enumerate(tools):
            pts = {r["params"]["channels"]: r for r in mig
                   if r["tool"] == tool and r["params"]["compression"] == comp}
            x = [i + (k - (len(tools) - 1) / 2) * width
                 for i, ch in enumerate(chans) if ch in pts]
            src = [pts[ch]["src_cpu_s_per_gib"] for ch in chans if ch in pts]
            dst = [pts[ch].get("dst_cpu_s_per_gib") or 0.0 for ch in chans if ch in pts]
            ax.bar(x, src, width, color=COLORS[tool], label=f"{ROUTE_NAME[tool]} source")
            ax.bar(x, dst, width, bottom=src, color=COLORS[tool], alpha=0.45, hatch="//",
                   label=f"{ROUTE_NAME[tool]} destination")
        ax.set_xticks(range(len(chans)), [str(c) for c in chans])
        ax.set_xlabel("multifd channels")
        ax.set_title(f"migrate, {comp}" + (f" ({view})" if view else ""))
        _style(ax, "CPU s per GiB (median): source + destination")
        ax.set_ylim(top=top * 1.7 or 1.0)  # room for the legend above the bars
        ax.legend(fontsize=7, ncols=2, loc="upper center")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return True


def _median_run(c: Config) -> dict[str, Any] | None:
    runs = [r for r in c.counted() if r.get("series")]
    if not runs:
        return None
    med = statistics.median_low([r["seconds"] for r in runs])
    return next(r for r in runs if r["seconds"] == med)


def live_remaining(configs: list[Config], path: str, title: str) -> bool:
    import matplotlib.pyplot as plt

    live = [(c, r) for c in configs if c.mode == "live" and (r := _median_run(c))]
    if not live:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c, r in live:
        t = [p[0] for p in r["series"]]
        rem = [p[1] / MiB for p in r["series"]]
        end = "" if r.get("converged") else " (not converged)"
        ax.plot(t, rem, linestyle="--" if c.params["auto_converge"] else "-",
                label=c.label + end)
    ax.set_xlabel("seconds since the migration started")
    _finish(fig, ax, "remaining dirty MiB (query-migrate)", title, path)
    return True


def live_downtime(rows: list[dict[str, Any]], path: str, title: str) -> bool:
    """Median downtime (min-max) against the dirty rate: a colour per pattern and
    auto-converge; solid with RAM verification, dashed with --no-verify, dotted the verified
    downtime minus its x-verify-time."""
    import matplotlib.pyplot as plt

    live = [r for r in rows if r["mode"] == "live" and r["error"] is None]
    if not live:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = ["tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple", "tab:brown"]

    def kind(r: dict[str, Any]) -> tuple[str, bool]:
        return r["params"].get("pattern", "random"), r["params"]["auto_converge"]

    kinds = sorted({kind(r) for r in live})
    for r0 in sorted({(kind(r), r["params"].get("verify", True)) for r in live}):
        (pattern, ac), verify = r0
        pts = sorted((r for r in live if (kind(r), r["params"].get("verify", True)) == r0),
                     key=lambda r: r["params"]["dirty_rate"])
        done = [r for r in pts if r.get("converged")]
        name = (f"{pattern}, " + ("auto-converge" if ac else "no auto-converge")
                + ("" if verify else ", --no-verify"))
        color = palette[kinds.index((pattern, ac)) % len(palette)]
        if done:
            x = [r["params"]["dirty_rate"] / MiB for r in done]
            y = [r["downtime_ms"] for r in done]
            ax.errorbar(x, y, yerr=[[yy - r["downtime_min_ms"] for yy, r in zip(y, done,
                                                                                  strict=True)],
                                    [r["downtime_max_ms"] - yy for yy, r in zip(y, done,
                                                                                strict=True)]],
                        marker="o", capsize=3, color=color, label=name,
                        linestyle="-" if verify else "--")
            if verify and all(r.get("verify_ms") is not None for r in done):
                ax.plot(x, [r["downtime_ms"] - r["verify_ms"] for r in done], marker=".",
                        linestyle=":", color=color, label=f"{name}, minus x-verify-time")
        for r in pts:
            if not r.get("converged"):
                ax.axvline(r["params"]["dirty_rate"] / MiB, color=color, linestyle=":",
                           label=f"{name}: not converged at {r['params']['dirty_rate'] / MiB:.0f}"
                                 " MiB/s")
    ax.set_xlabel("guest dirty rate (MiB/s)")
    _finish(fig, ax, "downtime ms (median, min-max)", title, path)
    return True


def write_all(rows: list[dict[str, Any]], configs: list[Config], outdir: str,
              title: str) -> list[str]:
    """Every plot that has data; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    made = []
    for name, draw, data in (("throughput.png", throughput, rows),
                             ("migrate-cpu.png", migrate_cpu, rows),
                             ("live-remaining.png", live_remaining, configs),
                             ("live-downtime.png", live_downtime, rows)):
        path = os.path.join(outdir, name)
        if draw(data, path, title):
            made.append(path)
    return made
