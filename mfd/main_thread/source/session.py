"""One live migration's session: its state, what the monitor asks of it, the periodic
checks, and the one error funnel::

    status    a MigrationStatus, moved only by Session.move (query-migrate's status, the
              monitor's MIGRATION events)
    Control   what the monitor thread and the migration share, under one lock
    tick      every <= 100 ms while the migration waits (for its channels, for room on a
              socket, for the destination, for a resume): the return path and the
              destination's verdict, cancel, the timeout, new parameters, progress
    wait      until a condition holds, ticking (the one loop for every wait on the
              destination and for a resume)
    fail      the one funnel: failed or cancelled and why (the destination's own reason
              when a link was lost); the guest runs again, unless the destination's may
              have run (postcopy): then postcopy-paused
    close     every connection and resource, whatever happened
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import NoReturn

from mfd.errors import Cancelled, MfdError
from mfd.main_thread.precopy import Precopy
from mfd.main_thread.source.channel import MainChannel
from mfd.main_thread.state import MigrationStatus, failure
from mfd.main_thread.stats import MigrationStats
from mfd.options import MigrateOptions, MigrationParameters
from mfd.workers.tls import TLSOptions, wait_relays


class Control:
    """What the monitor thread and the migration share, under one lock. Requests go one
    way (cancel, new parameters, the switch to postcopy, a resume's address, tls-hostname)
    and the migration takes them at its next tick; what queries read goes the other way
    (the parameters in force, the connections' TLS options, the error). The counters are
    read as they stand, one attribute at a time, as QEMU's query-migrate reads its
    ``mig_stats`` atomics one by one."""

    def __init__(self, params: MigrationParameters, tls_options: TLSOptions | None,
                 stats: MigrationStats) -> None:
        self._lock = threading.Lock()
        self.stats = stats
        self.params = params  # in force
        self.tls_options = tls_options  # as given; tls-hostname sets the name for a resume
        # set by the session: the connections' TLS options (the URI's host as the name,
        # unless tls-hostname), and why the migration failed or was cancelled
        self.tls: TLSOptions | None = None
        self.error: str | None = None
        self._pending: MigrationParameters | None = None
        self._cancel: str | None = None
        self._postcopy = False
        self._resume: str | None = None

    # ------------------------------------------------------------------ the monitor's side

    def query_migrate(self) -> dict:
        out = self.stats.query_migrate()
        if self.error is not None:
            out["error-desc"] = self.error
        return out

    @property
    def status(self) -> MigrationStatus:
        return self.stats.status

    def cancel(self, why: str) -> None:
        with self._lock:
            self._cancel = why

    def update_params(self, changes: dict) -> None:
        """New values for some parameters (``MigrationParameters.updated``: what may change
        live, QAPI's types, the checks made at the start), over those already asked for."""
        with self._lock:
            self._pending = (self._pending or self.params).updated(changes, mapped_ram=False)

    def set_tls_hostname(self, name: str | None) -> None:
        with self._lock:
            assert self.tls_options is not None
            self.tls_options = replace(self.tls_options, hostname=name)

    def start_postcopy(self) -> None:
        with self._lock:
            self._postcopy = True

    def resume(self, uri: str) -> None:
        with self._lock:
            self._resume = uri

    # ------------------------------------------------------------------ the migration's side

    @property
    def cancel_requested(self) -> str | None:
        return self._cancel

    @property
    def postcopy_requested(self) -> bool:
        return self._postcopy

    @property
    def resume_uri(self) -> str | None:
        return self._resume

    def take_params(self) -> MigrationParameters | None:
        """New parameters, if any were set since the last call; they are in force now."""
        with self._lock:
            params, self._pending = self._pending, None
            if params is not None:
                self.params = params
            return params

    def take_resume(self) -> str | None:
        with self._lock:
            uri, self._resume = self._resume, None
            return uri


class Session:
    """The state of one live migration and its connections (the main channel, and what
    the coordinator hands over to be closed at the end)."""

    def __init__(self, uri: str, options: MigrateOptions, precopy: Precopy,
                 control: Control) -> None:
        self.options = options
        self.precopy = precopy
        self.stats = precopy.stats
        self.control = control
        self.channel = MainChannel(uri, options.tls, options.connect_timeout, precopy.blocks,
                                   self.stats, self.tick)
        control.tls = self.channel.tls
        self.in_postcopy = False  # the destination's guest may run: never resume ours
        self.resources = contextlib.ExitStack()  # closed at the end, before the channel

    def move(self, status: MigrationStatus) -> None:
        self.stats.status = status

    def enter_postcopy(self) -> None:
        """postcopy_start, once the guest stopped: from here the destination's guest may
        run (ours is never resumed), it may ask for pages, and the push's rate is
        max-postcopy-bandwidth."""
        self.precopy.limiter.set_bandwidth(self.precopy.params.max_postcopy_bandwidth)
        self.in_postcopy = True
        self.channel.postcopy = True

    def reconnect(self, uri: str) -> None:
        """Recovery: the main channel again, to ``uri``, with the TLS options as they are
        now (tls-hostname may have been set meanwhile)."""
        self.channel.reopen(uri, self.control.tls_options)
        self.control.tls = self.channel.tls

    # ------------------------------------------------------------------ waiting

    def tick(self) -> None:
        """Every <= 100 ms while waiting: the destination, cancel, the timeout, parameters
        set through the monitor, progress."""
        if self.channel.sock is not None:  # none while postcopy is paused
            self.channel.read()
            self.channel.check()
        why = self.control.cancel_requested
        if why is not None:
            raise Cancelled(why)
        timeout = self.options.timeout
        if timeout is not None and time.monotonic() - self.stats.start > timeout:
            raise Cancelled(f"migration did not complete within {timeout:g} s (--timeout)")
        params = self.control.take_params()
        if params is not None:
            self.precopy.set_params(params)
            if self.in_postcopy:  # the push's rate is max-postcopy-bandwidth
                self.precopy.limiter.set_bandwidth(params.max_postcopy_bandwidth)
        if self.stats.status == MigrationStatus.ACTIVE:
            self.precopy.report()

    def wait(self, done: Callable[[], bool], timeout: float | None = None,
             what: str = "") -> None:
        """Until ``done()``, ticking; at most ``timeout`` seconds for the destination to
        ``what``. Returns early when the destination closed the connection (the caller's
        check says what that means)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            if deadline is not None and time.monotonic() > deadline:
                raise MfdError(f"the destination did not {what} within {timeout:g} s")
            if not self.channel.wait():
                return
            self.tick()

    # ------------------------------------------------------------------ the end

    def fail(self, e: BaseException) -> NoReturn:
        """The one error funnel: failed or cancelled, and the one error that says why."""
        setup = self.stats.status == MigrationStatus.SETUP
        status, error, why = failure(e, self.channel.reason)
        self.control.error = error
        if why is None and setup and self.channel.tls is not None and error.endswith(
                "(the destination closed it)"):  # TLS 1.3: a client learns late
            why = f"{error}: did it refuse this end's TLS certificate? (its log says)"
        if self.in_postcopy:  # the destination's guest may have run: ours is stale
            self.move(MigrationStatus.POSTCOPY_PAUSED)
            raise MfdError(
                f"postcopy failed after the switch ({why or error}): the guest is "
                "paused here and is not resumed by itself, as QEMU's postcopy-paused "
                "(it holds every page the destination did not receive)") from e
        self.move(status)
        self.precopy.resume_guest()
        if why is not None:
            raise MfdError(why) from e
        raise e

    def close(self) -> None:
        self.resources.close()
        self.channel.close()
        wait_relays()
