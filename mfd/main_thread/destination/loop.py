"""The destination's one wait: every source its main process reacts to, one check after it.

::

    watched    the listener and the connections being sorted (``accept``), the main
               channel, postcopy's uffd and preempt channel: each a callback that takes
               what is there (reads and queues it, places preempt pages, asks for faulted
               pages); none handles the source's stream: the session does, in order
    wait(ms)   poll them, call the ready ones, then ``check``: the session's periodic
               checks (cancel, --timeout, connections sorted since), at least every 100 ms
               of any wait. Once the receive channels run, their pool waits instead (it
               watches the same sources, and ``check`` is its tick): a wait for a sync
               point still serves the faults, the monitor's cancel and new connections
"""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from mfd.main_thread.pipeline import ChannelPool, dispatch, poll_key


class Loop:
    def __init__(self, check: Callable[[], None]) -> None:
        self.check = check  # the session's periodic checks (may raise to end the wait)
        self.watched: dict[object, Callable[[], None]] = {}  # poll key -> its callback
        self.pool: ChannelPool | None = None  # waits for us once the channels run

    def watch(self, source: object, callback: Callable[[], None]) -> None:
        self.watched[poll_key(source)] = callback
        if self.pool is not None:
            self.pool.watch(source, callback)

    def unwatch(self, source: object) -> None:
        del self.watched[poll_key(source)]
        if self.pool is not None:
            self.pool.unwatch(source)

    def join(self, pool: ChannelPool) -> None:
        """The channels run: from now on their pool waits, for them and for our sources
        (``check`` was given to it as its tick)."""
        for source, callback in self.watched.items():
            pool.watch(source, callback)
        self.pool = pool

    def wait(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for anything, call what is ready, then check."""
        if self.pool is not None:
            self.pool.wait(timeout_ms)
            return
        poller = zmq.Poller()
        for source in self.watched:
            poller.register(source, zmq.POLLIN)
        dispatch(self.watched, dict(poller.poll(timeout_ms)))
        self.check()

    def until(self, done: Callable[[], bool], seconds: float, step_ms: int) -> bool:
        """Wait until ``done()``; False if ``seconds`` passed first."""
        deadline = time.monotonic() + seconds
        while not done():
            if time.monotonic() > deadline:
                return False
            self.wait(step_ms)
        return True
