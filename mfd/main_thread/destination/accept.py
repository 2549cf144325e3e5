"""The destination's one port: which connection is which, told by its first bytes.

Mirrors ``migration_ioc_process_incoming`` (QEMU 10): a connection whose first 4 bytes are
``QEVM`` is the main channel, one that starts with the multifd magic is a multifd channel
(its 64-byte ``MultiFDInit_t`` is read here, in the main process, and the connection then
goes to ``channels``, then to its channel process). Unlike QEMU 10, which takes anything
else for a multifd channel and waits for a silent connection in its main loop, anything
else is refused with one warning line (with postcopy-preempt, the first connection after
the main channel is the preempt channel, as QEMU 10.0 takes it, unread), a connection that
says nothing is dropped after :data:`SILENT_S`, and the migration goes on. Channels may
come before the main channel and in any id order.

With TLS (``mfd.workers.tls``) every accepted connection goes to a relay process at once;
what is sorted is the relay's plaintext end, after its first byte said that the handshake
succeeded (QEMU 10.0 sorts TLS connections by order instead: it cannot peek through TLS).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mfd.errors import ProtocolError
from mfd.main_thread.destination.loop import Loop
from mfd.protocol import constants as C
from mfd.protocol import multifd
from mfd.workers import tcp
from mfd.workers import tls as tls_relay
from mfd.workers.tls import TLSOptions

SILENT_S = 5.0
_MAIN = C.QEMU_VM_FILE_MAGIC.to_bytes(4, "big")
_MULTIFD = C.MULTIFD_MAGIC.to_bytes(4, "big")
_RESUME = bytes([C.QEMU_VM_COMMAND]) + C.MIG_CMD_RECV_BITMAP.to_bytes(2, "big")
_TLS_HANDSHAKE = 0x16  # a TLS record's first byte, ClientHello's
MAX_HANDSHAKES = 16  # TLS relays at once (each a process): a port scan spawns no more


@dataclass
class _Pending:
    sock: socket.socket
    who: str
    opened: bool  # False until its TLS relay said the handshake succeeded
    since: float = field(default_factory=time.monotonic)
    head: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class Channel:
    """A multifd channel's connection, its MultiFDInit read."""

    sock: socket.socket
    init: multifd.MultiFDInit
    who: str  # the peer's address, for warnings


class Acceptor:
    """Accepts and sorts connections, read as ``loop`` finds them readable; the results
    wait for the caller: :meth:`take_main` (with the stream bytes already read),
    ``channels`` and :meth:`take_preempt`."""

    def __init__(self, listener: socket.socket, loop: Loop, warn: Callable[[str], None],
                 preempt: bool = False, tls: TLSOptions | None = None) -> None:
        self.listener = listener
        self.tls = tls
        self.warn = warn
        self.loop = loop
        self.pending: dict[socket.socket, _Pending] = {}
        self.main: tuple[socket.socket, bytes] | None = None
        self.main_taken = False
        self.channels: list[Channel] = []
        # postcopy-preempt: the next connection after the main channel (QEMU 10.0's rule;
        # it has no header)
        self.expect_preempt = preempt
        self.preempt: socket.socket | None = None
        # postcopy recovery: the source's new main connection starts with RECV_BITMAP, no
        # header (QEMU's migrate-recover waits for it the same way)
        self.expect_resume = False
        loop.watch(listener, self.accept)

    def accept(self) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                self.warn(f"accepting a connection failed: {e.strerror}")
                return
            sock.setblocking(False)
            tcp.tune(sock)
            # the return path's page requests are small writes: none may wait for the ACK
            # of the one before (Nagle), which the source may delay 40 ms
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            who = f"{addr[0]}:{addr[1]}"
            if self.tls is not None:
                if sum(not p.opened for p in self.pending.values()) >= MAX_HANDSHAKES:
                    self.warn(f"refused a connection from {who}: {MAX_HANDSHAKES} TLS "
                              "handshakes are in progress already")
                    sock.close()
                    continue
                sock = tls_relay.server(sock, self.tls)  # the handshake: in the relay
            p = _Pending(sock, who, opened=self.tls is None)
            if p.opened and self._preempt(p):
                continue
            self.pending[sock] = p
            self.loop.watch(sock, lambda p=p: self._read(p))

    def drain(self) -> None:
        """Take every connection the kernel holds and every byte they already sent: what
        has arrived before the main stream needed the channels."""
        self.accept()
        for p in list(self.pending.values()):
            self._read(p)

    def expire(self) -> None:
        now = time.monotonic()
        for p in list(self.pending.values()):
            if p.opened and now - p.since > SILENT_S:
                self._refuse(p, f"it sent {len(p.head)} byte(s) in {SILENT_S:g} s")
            elif not p.opened and now - p.since > 2 * tls_relay.HANDSHAKE_S:
                self._refuse(p, "its TLS relay did not answer")  # (it has a deadline too)

    def _preempt(self, p: _Pending) -> bool:
        """QEMU 10.0's rule, as soon as the connection is open (accepted, or its TLS
        handshake done): the next one after the main channel is the preempt channel. It has
        no header and stays silent until the guest asks for a page (perhaps for minutes)."""
        if not (self.expect_preempt and self.main_taken and not self.expect_resume):
            return False
        self.expect_preempt = False
        if p.sock in self.pending:
            self._done(p)
        self.preempt = p.sock
        return True

    def _read(self, p: _Pending) -> None:
        want = 4 if len(p.head) < 4 or p.head[:4] == _MAIN else multifd.INIT_SIZE
        try:
            # the TLS relay's result first: one byte, or one byte and its reason
            data = p.sock.recv(want - len(p.head) if p.opened else 1)
        except BlockingIOError:
            return
        except OSError as e:
            self._refuse(p, f"connection lost ({e.strerror})")
            return
        if not data:
            self._refuse(p, f"it closed after {len(p.head)} byte(s)")
            return
        if not p.opened:
            if data != tls_relay.OK:
                self._refuse(p, f"TLS: {tls_relay.failure(p.sock)}")
                return
            p.opened, p.since = True, time.monotonic()
            self._preempt(p)
            return
        p.head += data
        if len(p.head) >= 4:
            self._sort(p)

    def _sort(self, p: _Pending) -> None:
        """Its first bytes say what it is (a multifd channel's: once its MultiFDInit is
        whole)."""
        if self.expect_resume and p.head[:3] == _RESUME:
            self.expect_resume = False
            self._done(p)
            self.main = (p.sock, bytes(p.head))
        elif p.head[:4] == _MAIN:
            if self.main is not None or self.main_taken:
                self._refuse(p, "a second main channel (a migration is in progress here)")
                return
            self._done(p)
            self.main = (p.sock, bytes(p.head))
        elif p.head[:4] == _MULTIFD:
            if len(p.head) < multifd.INIT_SIZE:
                return
            try:
                init = multifd.decode_init(p.head, where=f"connection from {p.who}")
            except ProtocolError as e:
                self._refuse(p, str(e))
                return
            self._done(p)
            self.channels.append(Channel(p.sock, init, p.who))
        elif p.head[0] == _TLS_HANDSHAKE and self.tls is None:
            self._refuse(p, "it starts a TLS handshake, and this destination has no TLS "
                         "(--tls-creds)")
        else:
            self._refuse(p, f"it starts with {bytes(p.head[:4]).hex()}, neither a main "
                         "channel (QEVM) nor a multifd channel")

    def take_main(self) -> tuple[socket.socket, bytes] | None:
        main, self.main = self.main, None
        self.main_taken |= main is not None
        return main

    def take_preempt(self) -> socket.socket | None:
        preempt, self.preempt = self.preempt, None
        return preempt

    def sockets(self) -> list[socket.socket]:
        """Every socket held here: the listener and the connections not taken yet."""
        return [self.listener, *self.pending, *(c.sock for c in self.channels),
                *(s for s in (self.main and self.main[0], self.preempt) if s is not None)]

    def await_resume(self, preempt: bool) -> None:
        """Postcopy paused: the next main connection resumes (and the one after it, with
        preempt, is the new preempt channel)."""
        self.expect_resume = True
        self.expect_preempt = preempt
        if self.preempt is not None:  # the old link's, never taken
            self.preempt.close()
        self.preempt = None

    def _done(self, p: _Pending) -> None:
        self.loop.unwatch(p.sock)
        del self.pending[p.sock]

    def _refuse(self, p: _Pending, why: str) -> None:
        self.warn(f"refused a connection from {p.who}: {why}")
        self._done(p)
        p.sock.close()

    def close(self) -> None:
        for p in list(self.pending.values()):
            self._done(p)
            p.sock.close()
        for channel in self.channels:
            channel.sock.close()
        self.channels = []
        if self.main is not None:
            self.main[0].close()
        if self.preempt is not None:
            self.preempt.close()
        self.main = self.preempt = None
        with contextlib.suppress(KeyError):
            self.loop.unwatch(self.listener)
        self.listener.close()
