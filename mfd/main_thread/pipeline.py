"""The main process's side of the channels: spawn, credit-based dispatch, sync, shutdown.

Mirrors QEMU's ``multifd_send`` / ``multifd_send_sync_main`` with processes instead of
threads::

    ChannelPool.send(job, done)  wait for an idle channel (channels_ready), hand it the job
                                 (pending_job = true); a busy channel never gets a second one
    ChannelPool.sync()           wait until every channel is idle again (SYNC LOCAL)
    ChannelPool.sync(SYNC)       and then hand every channel a SYNC job of its own: it puts
                                 a SYNC packet on its connection (SYNC ALL)
    ChannelPool.recv_sync()      receiver: wait until every channel has reached a SYNC
                                 packet (SYNCED), then RELEASE them all
                                 (``multifd_recv_sync_main``)
    watch(fd, callback)          anything else the main process must react to while it waits
                                 for channels: its peer's main channel, a monitor's cancel
    hand_over(i, sock, pages)    receiver: channel i's connection, accepted by the main
                                 process, goes to channel i (SCM_RIGHTS on a socketpair made
                                 before the fork) and nowhere else
    done(moved, mask, digests)   the job's own callback, in order of completion, in the main
                                 process only

Channels are forked from the main process and run ``target(config)``, then ``os._exit``.
DESIGN.md asked for spawn/forkserver because ZeroMQ contexts and threads do not survive a
fork; mfd keeps that rule where it matters instead: a channel never touches anything
ZeroMQ the parent made (it creates its own context, binds nothing the parent has, and leaves
with ``os._exit`` so no inherited finalizer runs). What fork buys, measured on this 2-core
machine: a channel is ready in milliseconds, where a fresh interpreter importing numpy and
pyzmq took 0.3-0.5 s of CPU per channel (1.4 s for four), longer than a whole 2 GiB save
should take; and unlike multiprocessing's spawn it never re-imports the caller's
``__main__`` (a script using the API needs no ``if __name__ == "__main__"`` guard).
A pidfd is each channel's sentinel. A channel that dies (its pidfd becomes readable) or
reports an ERROR breaks the pool:
the first error wins, the pool raises :class:`BrokenPipeline` and refuses further work.
Shutdown order: one STOP per live channel, join with a deadline, terminate stragglers,
close the socket with LINGER 0, terminate the context, remove the socket directory.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import zmq

from mfd.errors import BrokenPipeline
from mfd.protocol import messages
from mfd.protocol.constants import MULTIFD_PAGE_COUNT
from mfd.sysutil import default_signals

START_TIMEOUT = 60.0
JOIN_TIMEOUT = 5.0
TICK_MS = 100
LAST_WORDS_S = 0.2  # how long a dead channel's last message may lag its exit
_NO_PAGES = np.empty(0, dtype=np.uint32)

OnDone = Callable[[int, np.ndarray, bytes], None]  # bytes moved, nonzero mask, chunk digests


class ChannelPool:
    def __init__(self, configs: list[Any], target: Callable[[Any], None], *,
                 handoff: bool = False, inherited: tuple[Any, ...] = (),
                 tick: Callable[[], None] | None = None) -> None:
        """``configs[i]`` is channel i's frozen config (``endpoint`` and ``parent_pid`` are
        filled in here, and ``handoff``: the channel's end of its socketpair, when
        ``handoff``); each channel process runs ``target(config)``. ``inherited``: the
        caller's sockets, closed in every channel at once (a connection must close when
        its owner closes it, not when the last forked copy goes). ``tick``: the owner's
        periodic checks, called every <= 100 ms while the pool waits, once the channels
        have started (it may raise to abort the wait)."""
        self.broken: BrokenPipeline | None = None
        self.handoffs: list[socket.socket] = []
        self.tmpdir = tempfile.mkdtemp(prefix="mfd-ch-")
        endpoint = f"ipc://{self.tmpdir}/main.sock"
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.bind(endpoint)
        self.procs = ChannelProcesses()
        self.idle: deque[bytes] = deque()
        self.channel_of: dict[bytes, int] = {}
        self.inflight: dict[int, tuple[bytes, OnDone | None]] = {}
        self.next_job = 0
        self.synced: set[bytes] = set()  # channels waiting at their SYNC packet
        # seconds each channel spent hashing pages (``mfd.shm.pagehash``), as it reported
        self.hashing = [0.0] * len(configs)
        self.closed: set[bytes] = set()  # channels whose peer ended their connection
        self.quiesced: set[bytes] = set()
        self.watched: dict[Any, Callable[[], None]] = {}
        self.tick: Callable[[], None] | None = None  # ``tick``, once the channels started
        self.next_tick = 0.0
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        try:
            self._start(configs, target, endpoint, handoff, inherited)
            self.tick = tick
        except BaseException:
            self.close()
            raise

    def _start(self, configs: list[Any], target: Callable[[Any], None], endpoint: str,
               handoff: bool, inherited: tuple[Any, ...]) -> None:
        """Fork the channels and wait until each has said READY."""
        pairs = [socket.socketpair() for _ in configs] if handoff else []
        self.handoffs = [ours for ours, _ in pairs]
        for i, cfg in enumerate(configs):
            cfg = replace(cfg, endpoint=endpoint, parent_pid=os.getpid())
            if handoff:
                cfg = replace(cfg, handoff=pairs[i][1].fileno())
            keep = pairs[i][1] if handoff else None
            closing = [*inherited, *(s for pair in pairs for s in pair if s is not keep)]
            self.poller.register(self.procs.fork(target, cfg, closing), zmq.POLLIN)
        for _, theirs in pairs:
            theirs.close()
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.channel_of) < len(configs):
            if time.monotonic() > deadline:
                raise BrokenPipeline(f"channels did not start within {START_TIMEOUT:g} s")
            self._pump(500)

    @property
    def channels(self) -> int:
        return len(self.procs.pids)

    def watch(self, source: Any, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``source`` (a zmq socket, a socket or a file
        descriptor) is readable while the pool waits; it may raise to abort what the main
        process is doing."""
        key = poll_key(source)
        self.watched[key] = callback
        self.poller.register(key, zmq.POLLIN)

    def unwatch(self, source: Any) -> None:
        key = poll_key(source)
        del self.watched[key]
        self.poller.unregister(key)

    def hand_over(self, channel: int, sock: socket.socket, packet_pages: int) -> None:
        """Give channel ``channel`` its connection, whose packets hold ``packet_pages``
        pages; the main process keeps no copy."""
        try:
            socket.send_fds(self.handoffs[channel], [packet_pages.to_bytes(4, "big")],
                            [sock.fileno()])
        except OSError as e:
            raise self._fail(BrokenPipeline(f"channel {channel} is gone ({e.strerror})")) \
                from None
        finally:
            sock.close()

    def send(self, block: int, pages: np.ndarray, done: OnDone | None = None,
             kind: bytes = messages.JOB, flags: int = 0) -> int:
        """``multifd_send``: hand a job (pages of one block) to an idle channel; ``done`` is
        called with its DONE. Returns the job id. Ids advance by the job's packets of 128
        pages, so a socket channel numbers its packets id, id + 1, ...: QEMU's
        ``packet_num``, one counter over all channels, SYNC packets included."""
        self._check()
        while not self.idle:
            self._pump(None)
        return self._hand(self.idle.popleft(), block, pages, done, kind, flags)

    def _hand(self, ident: bytes, block: int, pages: np.ndarray, done: OnDone | None,
              kind: bytes, flags: int = 0) -> int:
        job_id = self.next_job
        self.next_job += max(1, -(-len(pages) // MULTIFD_PAGE_COUNT)) if kind == messages.JOB \
            else 1
        self.inflight[job_id] = (ident, done)
        # copied, not zero-copy: a job is at most a few KiB, and pyzmq hands each zero-copy
        # frame back through its garbage-collector thread, which cost more than the copy
        self._to(ident, messages.encode_job(job_id, block, pages, kind, flags))
        return job_id

    def _to(self, ident: bytes, frames: list) -> None:
        """Send to one channel; one that is gone (EHOSTUNREACH) breaks the pool."""
        try:
            self.router.send_multipart([ident, *frames])
        except zmq.ZMQError as e:
            i = self.channel_of.get(ident)
            if i is None:
                raise self._fail(BrokenPipeline(f"a channel is gone ({e.strerror})")) from None
            dying = select.select([self.procs.sentinels[i]], [], [], JOIN_TIMEOUT)[0]
            why = self.procs.exit_reason(i) if dying else e.strerror  # say how it died
            raise self._fail(BrokenPipeline(
                f"channel {i} died unexpectedly ({why})")) from None

    def sync(self, kind: bytes | None = None, flags: int = 0) -> None:
        """``multifd_send_sync_main``: return when every channel has finished all work handed
        to it (LOCAL). With ``kind`` (SYNC ALL), each channel is then handed one ``kind`` job
        (with ``flags``) of its own as soon as it is idle, and this returns when all of those
        are done."""
        self._check()
        if kind is not None:
            for ident in list(self.channel_of):
                while ident not in self.idle:
                    self._pump(None)
                self.idle.remove(ident)
                self._hand(ident, 0, _NO_PAGES, None, kind, flags)
        while self.inflight:
            self._pump(None)

    def recv_sync(self) -> None:
        """``multifd_recv_sync_main``: wait until every channel has reached its SYNC packet,
        then release them all. No channel is released
        before all have arrived (invariant 2: no page of the next round can land while an
        older copy is still in flight on another channel)."""
        self._check()
        while len(self.synced) < len(self.channel_of):
            gone = sorted(self.channel_of[c] for c in self.closed - set(self.synced))
            if gone:
                raise self._fail(BrokenPipeline(
                    f"channel {gone[0]}: the source closed it before its SYNC packet"))
            self._pump(None)
        for ident in self.synced:
            self._to(ident, [messages.RELEASE])
        self.synced.clear()

    def take_hashing(self) -> list[float]:
        """Seconds each channel spent hashing pages since the last call."""
        out, self.hashing = self.hashing, [0.0] * len(self.hashing)
        return out

    def quiesce(self) -> None:
        """Receive channels stop reading their connections, and say so: once this returns
        nothing more lands in RAM (the guest may take it), at the cost of one round trip,
        not of :meth:`close`'s wait for the processes to unmap RAM and exit (~50 ms for
        4 channels of 1 GiB)."""
        self._check()
        for ident in self.channel_of:
            self._to(ident, [messages.QUIESCE])
        while len(self.quiesced) < len(self.channel_of):
            self._pump(None)

    def wait(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for anything (channel messages, watched sources)."""
        self._check()
        self._pump(timeout_ms)

    def _check(self) -> None:
        if self.broken is not None:
            raise self.broken

    def _fail(self, error: BrokenPipeline) -> BrokenPipeline:
        if self.broken is None:  # first error wins
            self.broken = error
        return self.broken

    def _pump(self, timeout_ms: int | None) -> None:
        if self.tick is not None:  # bounded waits, so the tick runs at least every 100 ms
            timeout_ms = TICK_MS if timeout_ms is None else min(timeout_ms, TICK_MS)
        events = dict(self.poller.poll(timeout_ms))
        if self.tick is not None and time.monotonic() >= self.next_tick:
            self.next_tick = time.monotonic() + TICK_MS / 1000 / 2
            self.tick()
        dispatch(self.watched, events)
        if self.router in events:
            self._read_messages()
        for i, fd in enumerate(self.procs.sentinels):
            if fd in events:
                # a channel that failed sent ERROR just before it exited: its reason may
                # reach the router just after the exit is seen (pairs with the channel's
                # LINGER on ERROR, mfd.workers.channel)
                deadline = time.monotonic() + LAST_WORDS_S
                while (left := deadline - time.monotonic()) > 0 and \
                        self.router.poll(int(left * 1000) + 1):
                    self._read_messages()
                raise self._fail(BrokenPipeline(
                    f"channel {i} died unexpectedly ({self.procs.exit_reason(i)})"))

    def _read_messages(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._message(frames[0], frames[1:])

    def _message(self, ident: bytes, frames: list[bytes]) -> None:
        kind = frames[0]
        if kind == messages.READY:
            self.channel_of[ident] = messages.decode_ready(frames)
            self.idle.append(ident)
        elif kind == messages.DONE:
            job_id, moved, hashing, mask, digests = messages.decode_done(frames)
            owner, done = self.inflight.pop(job_id)
            assert owner == ident
            self.idle.append(ident)
            self.hashing[self.channel_of[ident]] += hashing
            if done is not None:
                done(moved, mask, digests)
        elif kind == messages.SYNCED:
            if ident in self.synced:
                raise self._fail(BrokenPipeline(
                    f"channel {self.channel_of.get(ident, '?')} reported SYNC twice"))
            self.synced.add(ident)
            self.hashing[self.channel_of[ident]] += messages.decode_synced(frames)[1]
        elif kind == messages.CLOSED:
            self.closed.add(ident)
        elif kind == messages.QUIESCED:
            self.quiesced.add(ident)
        elif kind == messages.ERROR:
            text = frames[1].decode(errors="replace").strip().splitlines()
            ch = self.channel_of.get(ident)
            who = "a channel" if ch is None else f"channel {ch}"  # one that failed at start
            why = text[-1].removeprefix(f"{who}: ") if text else "?"  # its link names it too
            raise self._fail(BrokenPipeline(f"{who} failed: {why}",
                                            link_lost=frames[2:3] == [b"link"]))
        else:
            raise self._fail(BrokenPipeline(f"unexpected message {kind[:16]!r} from a channel"))

    def close(self) -> None:
        """STOP live channels, join with a deadline, terminate stragglers, release sockets."""
        for ident in list(self.channel_of):
            with contextlib.suppress(zmq.ZMQError):
                self.router.send_multipart([ident, messages.STOP], zmq.NOBLOCK)
        self.procs.join(JOIN_TIMEOUT)
        for s in self.handoffs:
            s.close()
        self.handoffs = []
        self.router.close(0)
        self.ctx.term()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> ChannelPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChannelProcesses:
    """The channels as processes: forked from this one, each with a pidfd (its sentinel,
    readable once it exited), joined with a deadline at the end, stragglers terminated."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.sentinels: list[int] = []
        self.statuses: list[int | None] = []

    def fork(self, target: Callable[[Any], None], cfg: Any, closing: list[Any]) -> int:
        """A channel running ``target(cfg)`` once it closed ``closing`` (the caller's
        sockets); returns its sentinel."""
        pid = os.fork()
        if pid == 0:  # the channel: never returns into the caller's code
            status = 1
            try:
                for obj in closing:
                    obj.close()
                default_signals()
                target(cfg)
                status = 0
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 1
            finally:
                os._exit(status)
        self.pids.append(pid)
        self.statuses.append(None)
        self.sentinels.append(os.pidfd_open(pid))
        return self.sentinels[-1]

    def reap(self, i: int) -> int:
        if self.statuses[i] is None:
            _, status = os.waitpid(self.pids[i], 0)
            self.statuses[i] = os.waitstatus_to_exitcode(status)
        return self.statuses[i]

    def exit_reason(self, i: int) -> str:
        """How channel ``i`` ended (it has: its sentinel is readable)."""
        status = self.reap(i)
        if status < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-status).name}"
            return f"killed by signal {-status}"
        return f"exit status {status}"

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` for every channel to exit (each was told to STOP), then
        SIGTERM, then SIGKILL the stragglers."""
        deadline = time.monotonic() + timeout
        for i, fd in enumerate(self.sentinels):
            if self.statuses[i] is not None:
                continue
            for sig, wait in ((None, deadline - time.monotonic()), (signal.SIGTERM, 1.0),
                              (signal.SIGKILL, None)):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pids[i], sig)
                if select.select([fd], [], [], None if wait is None else max(0.0, wait))[0]:
                    break
            self.reap(i)
        for fd in self.sentinels:
            os.close(fd)
        self.sentinels = []


def dispatch(watched: dict[Any, Callable[[], None]], ready: dict[Any, int]) -> None:
    """Call the callback of each watched source that is ready. One may unwatch (and close)
    another ready source, as a lost main channel closes the preempt channel: that one is
    skipped."""
    for source, callback in list(watched.items()):
        if source in ready and watched.get(source) is callback:
            callback()


def poll_key(source: Any) -> Any:
    """What a zmq poller reports ``source`` as: a plain socket by its descriptor."""
    return source.fileno() if isinstance(source, socket.socket) else source
