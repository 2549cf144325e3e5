"""Loopback helpers for migration tests: a TCP relay whose connections can be cut, and a fake
source that can say anything on the main channel and the channels (free ports come from mfd
itself: ``mfd.workers.tcp.free_ports``)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading

from mfd.protocol import constants as C
from mfd.protocol import devices, ram, stream


class Relay:
    """Forwards ports [listen, listen+n) to [target, target+n) on loopback, until ``cut()``
    resets every connection (as a pulled cable would, but at once). With ``record``, what
    each connection's client sent is kept in ``sent`` (in accept order)."""

    def __init__(self, listen: int, target: int, n: int, record: bool = False) -> None:
        self.record = record
        self.sent: list[bytearray] = []
        self.sel = selectors.DefaultSelector()
        self.pairs: dict[socket.socket, socket.socket] = {}
        self.listeners = []
        for i in range(n):
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", listen + i))
            ls.listen()
            ls.setblocking(False)
            self.sel.register(ls, selectors.EVENT_READ, target + i)
            self.listeners.append(ls)
        self.accepted: list[tuple[socket.socket, socket.socket]] = []  # in accept order
        self.to_cut: list[int] = []  # indexes into accepted, reset by the relay's thread
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            while self.to_cut:
                pair = self.accepted[self.to_cut.pop()]
                for s in pair:
                    _reset(s)
                self._drop(pair[0])  # and its peer
            for key, _ in self.sel.select(0.05):
                s = key.fileobj
                if key.data is not None and s in self.listeners:
                    conn, _ = s.accept()
                    out = socket.create_connection(("127.0.0.1", key.data))
                    self.accepted.append((conn, out))
                    self.sent.append(bytearray())
                    for a, b in ((conn, out), (out, conn)):
                        a.setblocking(False)
                        self.pairs[a] = b
                        self.sel.register(a, selectors.EVENT_READ, None)
                    continue
                try:
                    data = s.recv(1 << 20)
                except (BlockingIOError, ConnectionError):
                    continue
                peer = self.pairs.get(s)
                if not data or peer is None:
                    self._drop(s)
                    continue
                if self.record:
                    for i, (client, _) in enumerate(self.accepted):
                        if client is s:
                            self.sent[i] += data
                peer.setblocking(True)
                with contextlib.suppress(OSError):
                    peer.sendall(data)
                peer.setblocking(False)

    def _drop(self, s: socket.socket) -> None:
        for x in (s, self.pairs.pop(s, None)):
            if x is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(x)
                self.pairs.pop(x, None)
                x.close()

    def cut_one(self, k: int) -> None:
        """Reset only the ``k``-th connection accepted (both of its sides); relay the rest."""
        self.to_cut.append(k)

    def cut(self) -> None:
        """Reset every relayed connection (SO_LINGER 0 sends RST) and stop relaying."""
        self.stop.set()
        self.thread.join(5)
        for s in list(self.pairs):
            _reset(s)
            s.close()
        for s in self.listeners:
            s.close()


class FakeSource:
    """Speaks QEMU's wire by hand: multifd channel connections first (as QEMU opens them),
    then the main channel with the setup stream (through the START section's
    MULTIFD_FLUSH, where the destination needs every channel), then whatever a test wants
    to put on a channel."""

    def __init__(self, port: int, size: int = 1 << 20) -> None:
        self.port = port
        self.size = size
        self.links: list[socket.socket] = []
        self.main: socket.socket | None = None

    def channel(self, data: bytes = b"") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if data:
            s.sendall(data)
        self.links.append(s)
        return s

    def start(self) -> None:
        """The main stream up to the first sync point. The destination may have failed on
        a hostile channel already and closed everything: its verdict is what a test reads,
        so a reset here is not an error."""
        with contextlib.suppress(ConnectionRefusedError, ConnectionResetError,
                                 BrokenPipeError):
            self.main = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            self.main.sendall(
                stream.encode_file_header()
                + stream.encode_configuration(stream.Configuration("none"))
                + stream.encode_section_start(C.QEMU_VM_SECTION_START,
                                              devices.RAM_SECTION_ID, "ram", 0, 4)
                + ram.encode_mem_size(self.size) + ram.encode_block_entry("mem", self.size)
                + ram.encode_multifd_flush())

    def close(self) -> None:
        for s in [self.main, *self.links]:
            if s is not None:
                s.close()


def _reset(s: socket.socket) -> None:
    """Make the socket's close send RST rather than FIN (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
