"""How a benchmark runs: configurations, interleaved repeats, progress, and undoing it all.

* :class:`Config`: one thing measured (a mode, a tool, its parameters) and a function that
  does one run of it and returns at least ``{"seconds": wall time}``;
* :func:`run_interleaved`: warm-up runs (not counted), then ``repeat`` counted runs,
  interleaved across the configs (A rep 1, B rep 1, ..., A rep 2, ...) so that what is
  compared is measured alternately; a failing config is reported as FAILED with its one-line
  error and the run goes on;
* :class:`RunProgress`: a progress bar on a terminal (rich), one line per run in a log;
* :class:`Cleanup`: everything a run created (files, directories, processes, guests),
  undone in reverse order at the end, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --------------------------------------------------------------------------- configs and runs


@dataclass
class Config:
    key: str
    mode: str  # what is measured: "save", "restore warm", "migrate", "live", "baseline", ...
    tool: str  # "mfd", "qemu", "dd", "memcpy", "tcp"
    label: str
    params: dict[str, Any]
    fn: Callable[[], dict[str, Any]]  # one run; returns at least {"seconds": wall time}
    limit: str | None = None  # key of the baseline config that is this one's physical limit
    runs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def counted(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["ok"] and not r["warmup"]]

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "mode": self.mode, "tool": self.tool, "label": self.label,
                "params": self.params, "limit": self.limit, "error": self.error,
                "runs": self.runs}


class RunProgress:
    """What the person running the benchmark sees: on a terminal a rich progress bar (runs
    done of all, the current config), elsewhere one line per finished run."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> RunProgress:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(),
                                console=Console(file=sys.stderr), transient=False)
            self.bar.__enter__()
        return self

    def group(self, title: str, runs: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task(title, total=runs)
        else:
            log(f"{title}: {runs} runs")

    def start(self, tag: str, c: Config) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=f"[{tag}] {c.mode}: {c.tool} {c.label}")

    def done(self, tag: str, c: Config, line: str) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)
            self.bar.console.print(f"[{tag}] {c.key}: {line}", highlight=False)
        else:
            log(f"[{tag}] {c.key}: {line}")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def run_interleaved(title: str, configs: list[Config], repeat: int, warmup: int,
                    progress: RunProgress,
                    extra: Callable[[dict[str, Any]], str] = lambda res: "") -> None:
    """``warmup`` uncounted runs, then ``repeat`` counted runs, interleaved across
    ``configs``. A config that fails is not run again and reported as FAILED; Ctrl-C
    (KeyboardInterrupt) propagates. ``extra(result)`` adds to the progress line."""
    progress.group(title, len(configs) * (warmup + repeat))
    for rep in range(-warmup + 1, repeat + 1):
        tag = "warm-up" if rep <= 0 else f"rep {rep}/{repeat}"
        for c in configs:
            if c.error is not None:
                progress.done(tag, c, "skipped (failed before)")
                continue
            progress.start(tag, c)
            t0 = time.time()
            load = os.getloadavg()[0]  # other work on the machine skews the figures
            try:
                res = c.fn()
            except KeyboardInterrupt:
                raise
            except Exception as e:
                c.error = one_line(e)
                c.runs.append({"rep": rep, "warmup": rep <= 0, "ok": False, "error": c.error,
                               "traceback": traceback.format_exc(), "started": t0,
                               "loadavg1": load})
                progress.done(tag, c, f"FAILED: {c.error}")
                continue
            c.runs.append({"rep": rep, "warmup": rep <= 0, "ok": True, "started": t0,
                           "loadavg1": load, **res})
            progress.done(tag, c, f"{res['seconds']:.3f} s{extra(res)}")


# --------------------------------------------------------------------------- cleanup


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


class Cleanup:
    """Everything a run created, undone in reverse order by :meth:`run`.

    Each ``add_*`` returns a token; :meth:`done` runs that item now (e.g. a per-run
    process). :meth:`run` ignores SIGINT / SIGTERM while it
    works, so a second Ctrl-C cannot leave half of it undone (``mfd`` makes SIGTERM and
    SIGHUP raise like Ctrl-C, so it runs on those too).
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[str, Callable[[], None]]] = {}
        self._next = 0

    def add(self, what: str, fn: Callable[[], None]) -> int:
        self._next += 1
        self._items[self._next] = (what, fn)
        return self._next

    def add_path(self, path: str) -> int:
        """A file or a directory tree."""
        def rm() -> None:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                unlink(path)
        return self.add(f"remove {path}", rm)

    def add_process(self, proc: subprocess.Popen[Any], what: str) -> int:
        return self.add(f"stop {what} (pid {proc.pid})", lambda: stop_process(proc))

    def done(self, token: int) -> None:
        item = self._items.pop(token, None)
        if item is not None:
            item[1]()

    def run(self) -> None:
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for token in sorted(self._items, reverse=True):
                what, fn = self._items.pop(token)
                try:
                    fn()
                except Exception as e:
                    log(f"cleanup: {what}: {one_line(e)}")
        finally:
            for s, h in old.items():
                signal.signal(s, h)
