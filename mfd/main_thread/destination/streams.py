"""The source's streams into this destination: the main channel, and postcopy-preempt's.

Each is a connection read, as it becomes readable, straight into a sans-I/O decoder
(``mfd.protocol.livestream``)::

    main channel     its events queued in order for the session (:meth:`MainChannel.next`),
                     at most QUEUE_EVENTS ahead (beyond, it is not read until they are
                     handled); our answers go back on it once the source opened the return
                     path. Recovery: a lost link gives way to the next main connection,
                     whose decoder goes on from this one's state
    preempt channel  bare PAGE and ZERO records, the pages the running guest asked for:
                     placed as they come, through postcopy (``faults.PostcopyRAM``)

A lost link (or the source closing the main channel early) goes to the session's ``lost``:
postcopy past RUN pauses there, anything else fails.
"""

from __future__ import annotations

import contextlib
import socket
from collections import deque
from collections.abc import Callable

from mfd.errors import ProtocolError
from mfd.main_thread.destination.faults import PostcopyRAM
from mfd.main_thread.destination.loop import Loop
from mfd.protocol import livestream, peer, returnpath
from mfd.workers import tcp

QUEUE_EVENTS = 256  # decoded events waiting; beyond that the main channel is not read

Lost = Callable[[BaseException], None]


class MainChannel:
    def __init__(self, loop: Loop, lost: Lost) -> None:
        self.loop = loop
        self.lost = lost
        self.sock: socket.socket | None = None  # until the source connects
        self.decoder = livestream.StreamDecoder()
        self.events: deque[livestream.Event] = deque()
        self.return_path = False  # the source opened it: it reads our answers
        self.closed = False  # the source closed it
        self.throttled = False  # not read while QUEUE_EVENTS events wait

    def attach(self, sock: socket.socket, head: bytes) -> None:
        """The source's main connection, and the bytes the acceptor read of it."""
        self.sock = sock
        self.events.extend(self.decoder.feed(head))
        self.loop.watch(sock, self._readable)

    def _readable(self) -> None:
        assert self.sock is not None
        if len(self.events) > QUEUE_EVENTS:
            self.loop.unwatch(self.sock)
            self.throttled = True
            return
        try:
            n = _receive(self.sock, self.decoder, "main channel")
            if n is None:
                return
            if n == 0:
                self.loop.unwatch(self.sock)
                self.closed = True
                self.decoder.close()
                return
        except (tcp.LinkLost, ProtocolError) as e:
            self.lost(e)
            return
        self.events.extend(self.decoder.filled(n))

    def next(self) -> livestream.Event | None:
        """The source's next event, waiting for it; None once the stream is complete."""
        while not self.events:
            if self.decoder.done:
                return None
            if self.throttled:
                self.throttled = False
                assert self.sock is not None
                self.loop.watch(self.sock, self._readable)
            self.loop.wait(100)
        return self.events.popleft()

    def on_return_path(self, ev: livestream.ReturnPath) -> None:
        self.return_path = True

    def on_ping(self, ev: livestream.Ping) -> None:
        """PONG with the PING's value (an mfd source's PING: mfd's PONG)."""
        if self.return_path:
            self.reply(returnpath.encode_pong(
                peer.MFD_PONG if ev.value == peer.MFD_PING else ev.value))

    def reply(self, data: bytes) -> None:
        """On the return path (only once the source opened it)."""
        assert self.sock is not None
        try:
            tcp.send_all(self.sock, [data], self.loop.check)
        except tcp.LinkLost as e:
            self.lost(e)

    def say_completed(self, verify_ms: float | None) -> None:
        """MFD_RESULT to an mfd source, then SHUT(0), if the source opened the return
        path; the guest runs here now, whatever becomes of the link."""
        if not self.return_path:
            return
        data = returnpath.encode_shut(0)
        if self.decoder.mfd_source:
            data = returnpath.encode(returnpath.MFD_RESULT, peer.encode_result(
                "completed", verify_ms=verify_ms)) + data
        with contextlib.suppress(tcp.LinkLost):
            self.reply(data)

    def say_failed(self, error: str) -> None:
        """The migration failed: MFD_RESULT to an mfd source, SHUT(1); best effort."""
        if self.sock is None or not self.return_path or self.closed:
            return
        data = returnpath.encode_shut(1)
        if self.decoder.mfd_source:
            data = returnpath.encode(returnpath.MFD_RESULT,
                                     peer.encode_result("failed", error)) + data
        with contextlib.suppress(OSError):
            self.sock.send(data, socket.MSG_DONTWAIT)

    def drop(self) -> None:
        """The link is gone (postcopy paused): the next main connection resumes."""
        self.close()
        self.closed = self.throttled = False
        self.decoder = self.decoder.resumed("main channel (resumed)")

    def close(self) -> None:
        self.sock = _hang_up(self.loop, self.sock)


class PreemptChannel:
    def __init__(self, sock: socket.socket, sizes: dict[str, int], loop: Loop,
                 lost: Lost) -> None:
        """``sizes``: the main channel's blocks (the preempt channel names no block it
        has not listed)."""
        self.sock: socket.socket | None = sock
        self.decoder = livestream.StreamDecoder("preempt channel", preempt=sizes)
        self.loop = loop
        self.lost = lost
        self.postcopy: PostcopyRAM | None = None  # from LISTEN on: where its pages go
        loop.watch(sock, self._readable)

    def _readable(self) -> None:
        assert self.sock is not None
        try:
            n = _receive(self.sock, self.decoder, "preempt channel")
        except tcp.LinkLost as e:  # as the main channel's loss: QEMU pauses on either
            self.lost(e)
            return
        if n is None:
            return
        if n == 0:  # the source is done with it
            self.close()
            return
        for ev in self.decoder.filled(n):
            if self.postcopy is None:
                raise ProtocolError("preempt channel: pages before POSTCOPY_LISTEN")
            self.postcopy.place(ev)

    def close(self) -> None:
        self.sock = _hang_up(self.loop, self.sock)


def _hang_up(loop: Loop, sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(KeyError):  # not watched while throttled
            loop.unwatch(sock)
        sock.close()


def _receive(sock: socket.socket, decoder: livestream.StreamDecoder, what: str) -> int | None:
    """Bytes from ``sock`` straight into the decoder's buffer: how many (0: closed), None
    when there were none after all."""
    try:
        return sock.recv_into(decoder.buffer())
    except BlockingIOError:
        return None
    except OSError as e:
        raise tcp.LinkLost(f"{what}: connection lost ({e.strerror})") from None
