"""What a person watching a migration sees: a live view on a terminal, a line per round in a log.

On a terminal (stderr is a TTY) the view is a small table redrawn a few times a second with
`rich <https://github.com/Textualize/rich>`_ (``rich.live``): it handles terminal width,
redraw without flicker and clean teardown on Ctrl-C, which hand-written ANSI codes do badly.
Anywhere else (``docker compose`` logs, CI) it prints one plain line per round, so a log
shows the migration converging without control characters.

The view lasts as long as the migration (:func:`shown` around the call that migrates): its
last frame is drawn before anything the caller prints about the result, so the summary
comes last on the terminal.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from mfd.main_thread.precopy import Progress
from mfd.main_thread.stats import MigrationStats
from mfd.units import human

REDRAW = 0.2  # seconds between redraws of the live view


def fields(stats: MigrationStats) -> dict[str, str]:
    q = stats.query_migrate()
    r = q["ram"]
    x = q.get("xbzrle-cache")
    xbzrle = {} if not isinstance(x, dict) else {
        "xbzrle": f"{x['pages']} pages in {human(x['bytes'])}, encoding rate "
                  f"{x['encoding-rate']:.1f}, cache misses {x['cache-miss-rate']:.0%}, "
                  f"overflow {x['overflow']}"}
    return {
        "status": str(q["status"]),
        "round": str(r["dirty-sync-count"]),
        "transferred": human(r["transferred"]),
        "remaining": human(r["remaining"]),
        "throughput": f"{stats.bandwidth / (1 << 20):.0f} MiB/s",
        "dirty rate": f"{stats.dirty_pages_rate * 4096 / (1 << 20):.0f} MiB/s",
        "throttle": f"{stats.cpu_throttle_percentage}%",
        "expected downtime": f"{q['expected-downtime']} ms",
        **xbzrle,
    }


class LiveView:
    """``update(stats)`` as often as you like; it redraws at most every REDRAW seconds."""

    def __init__(self, title: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.title = title
        self.tty = self.stream.isatty()
        self.live = None
        self.stats: MigrationStats | None = None
        self.last = 0.0
        self.last_round = -1

    def __enter__(self) -> LiveView:
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(file=self.stream), auto_refresh=False,
                             transient=False)
            self.live.__enter__()
        return self

    def update(self, stats: MigrationStats) -> None:
        self.stats = stats
        now = time.monotonic()
        if self.live is not None:
            if now - self.last >= REDRAW:
                self.last = now
                self.live.update(self._table(stats), refresh=True)
            return
        # a log: one line per round, once its bitmap sync has counted what is left
        if stats.rounds and "remaining" in stats.rounds[-1] \
                and len(stats.rounds) != self.last_round:
            self.last_round = len(stats.rounds)
            f = fields(stats)
            print(f"{self.title}: " + "  ".join(f"{k} {v}" for k, v in f.items()
                                                if k != "status"),
                  file=self.stream, flush=True)

    def _table(self, stats: MigrationStats):
        from rich.table import Table

        t = Table(title=self.title, show_header=False, title_justify="left")
        t.add_column(style="bold")
        t.add_column(justify="right")
        for k, v in fields(stats).items():
            t.add_row(k, v)
        return t

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            if self.stats is not None:  # the final state, whatever the redraw rate skipped
                self.live.update(self._table(self.stats), refresh=True)
            self.live.__exit__(None, None, None)


@contextlib.contextmanager
def shown(view: LiveView | None) -> Iterator[Progress | None]:
    """``view`` while the block runs (the call that migrates), its last frame drawn when the
    block ends; yields the progress callback to give that call (None without a view)."""
    if view is None:
        yield None
        return
    with view:
        yield view.update
