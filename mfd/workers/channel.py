"""One channel process, whatever it moves pages through: the skeleton every kind plugs into.

A channel process (``mfd.main_thread.pipeline.ChannelPool`` forks it) is one loop around one
DEALER socket to its main process's ROUTER; what it does with a job is its kind's::

    run_channel(cfg, Kind)   SIGINT ignored (Ctrl-C is the main process's to handle), dies
                             with the main process; one zmq context, one DEALER (Link)
    Kind(cfg, link)          its resources: RAM mappings, a file, a connection
    kind.start()             before READY (a send channel connects)
    READY -->
    loop                     STOP: leave
                             JOB, SYNC, DIGEST: kind.handle(...) --> its reply (DONE)
                             RELEASE, QUIESCE: kind.release(), kind.quiesce() (QUIESCED -->)
                             another descriptor it watches is readable: kind.on_ready(fd)
                             the main process gone: leave
    ERROR -->                on any failure, once: one line for an MfdError (what the user
                             reads), a traceback otherwise (a bug), and b"link" when the
                             connection to the other host was lost; sent with LINGER, so the
                             main process reads why before it sees the process gone
    kind.close(), link, context   in that order, whatever happened

Kinds: ``mfd.workers.file_channel.FileChannel`` (mapped-ram save and restore),
``mfd.workers.socket_channel.SendChannel`` and ``RecvChannel`` (multifd over TCP).
"""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from mfd.errors import MfdError
from mfd.protocol import messages
from mfd.sysutil import set_parent_death_signal
from mfd.workers.tcp import LinkLost

POLL_MS = 500  # how often an idle channel checks that its main process is still there
ERROR_LINGER_MS = 2000  # how long a failing channel's last ERROR may take to go out


class Link:
    """The channel's side of its main process: the DEALER, and the poller that also watches
    whatever else the channel reads (a connection handed over, the connection itself)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, parent_pid: int) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.parent_pid = parent_pid
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.deferred: list[list[bytes]] = []  # messages read by tick(), handled next

    def send(self, frames: list) -> None:
        self.sock.send_multipart(frames)

    def watch(self, fd: int) -> None:
        self.poller.register(fd, zmq.POLLIN)

    def unwatch(self, fd: int) -> None:
        self.poller.unregister(fd)

    def orphaned(self) -> bool:
        return os.getppid() != self.parent_pid

    def tick(self) -> None:
        """Between waits inside a job (a connection that does not read or write): the main
        process must still be there, and a STOP from it ends the channel even then (QEMU's
        channel whose peer stopped reading keeps a send waiting)."""
        if self.orphaned():
            raise SystemExit(0)
        if self.sock.poll(0):
            frames = self.sock.recv_multipart()
            if frames[0] == messages.STOP:
                raise SystemExit(0)
            self.deferred.append(frames)

    def next(self) -> tuple[list[bytes] | None, list[Any]]:
        """The next message from the main process (or None) and the other watched sources
        that are readable, waiting up to POLL_MS when there is neither."""
        ready = dict(self.poller.poll(0 if self.deferred else POLL_MS))
        frames = None
        if self.deferred:
            frames = self.deferred.pop(0)
        elif self.sock in ready:
            frames = self.sock.recv_multipart()  # small frames: copies are cheapest
        return frames, [s for s in ready if s is not self.sock]

    def fail(self, error: Exception) -> None:
        """ERROR to the main process, kept for it to read after this process is gone."""
        text = str(error) if isinstance(error, MfdError) else traceback.format_exc()
        self.send([messages.ERROR, text.encode(), b"link" if isinstance(error, LinkLost)
                   else b""])
        self.sock.setsockopt(zmq.LINGER, ERROR_LINGER_MS)

    def close(self) -> None:
        self.sock.close()  # with its LINGER: 0, or time for a last ERROR to go out


class Channel:
    """What a kind of channel does; the skeleton calls these, a kind overrides what it
    needs. ``link``: for a kind that waits inside a job (``link.tick``), watches a
    descriptor or tells the main process something unasked (SYNCED, CLOSED)."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def start(self) -> None:
        """Before READY."""

    def handle(self, kind: bytes, job_id: int, block: int, pages: np.ndarray,
               flags: int) -> list:
        """A job from the main process (JOB, SYNC, DIGEST); returns the reply's frames."""
        raise RuntimeError(f"unexpected message {kind[:16]!r}")

    def on_ready(self, source: Any) -> None:
        """A descriptor the channel watches is readable."""

    def release(self) -> None:
        """RELEASE: every channel reached its SYNC packet (receive channels)."""

    def quiesce(self) -> None:
        """QUIESCE: read nothing more (receive channels)."""

    def close(self) -> None:
        """Release what the kind holds; once, whatever happened."""


def run_channel(cfg: Any, kind: Callable[[Any, Link], Channel]) -> None:
    """Process entry point of a channel of ``kind``. ``cfg``: its frozen config, with
    ``channel_id``, ``endpoint`` and ``parent_pid`` (filled in by the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    set_parent_death_signal(signal.SIGTERM)  # never outlive it: it alone unlinks shm
    if os.getppid() != cfg.parent_pid:  # died before PR_SET_PDEATHSIG was in place
        return
    ctx = zmq.Context()
    link: Link | None = None
    channel: Channel | None = None
    try:
        link = Link(ctx, cfg.endpoint, cfg.parent_pid)
        channel = kind(cfg, link)
        channel.start()
        link.send(messages.encode_ready(cfg.channel_id))
        _loop(channel, link)
    except SystemExit:
        raise
    except Exception as e:
        if link is not None:
            link.fail(e)
        raise SystemExit(1) from None
    finally:
        if channel is not None:
            channel.close()
        if link is not None:
            link.close()
        ctx.destroy(0)  # also a socket of a channel that failed half-built


def _loop(channel: Channel, link: Link) -> None:
    while True:
        frames, ready = link.next()
        if frames is not None:
            kind = frames[0]
            if kind == messages.STOP:
                return
            if kind == messages.RELEASE:
                channel.release()
            elif kind == messages.QUIESCE:
                channel.quiesce()
                link.send([messages.QUIESCED])
            elif kind in (messages.JOB, messages.SYNC, messages.DIGEST):
                job_id, block, pages, flags = messages.decode_job(frames)
                link.send(channel.handle(kind, job_id, block, pages, flags))
            else:
                raise RuntimeError(f"unexpected message {kind[:16]!r}")
        for source in ready:
            channel.on_ready(source)
        if frames is None and not ready and link.orphaned():
            return
