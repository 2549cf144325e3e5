"""Loopback helpers for migration tests: a TCP relay whose connections can be cut, and a fake
mfd source that can say anything on the main channel and the channels (free port ranges
come from mfd itself: ``mfd.workers.tcp.free_ports``)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time

import orjson
import zmq

from mfd.protocol import constants as C
from mfd.protocol import devices, mainchannel, ram, stream
from mfd.workers import tcp


class Relay:
    """Forwards ports [listen, listen+n) to [target, target+n) on loopback, until ``cut()``
    resets every connection (as a pulled cable would, but at once)."""

    def __init__(self, listen: int, target: int, n: int) -> None:
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
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.05):
                s = key.fileobj
                if key.data is not None and s in self.listeners:
                    conn, _ = s.accept()
                    out = socket.create_connection(("127.0.0.1", key.data))
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

    def cut(self) -> None:
        """Reset every relayed connection (SO_LINGER 0 sends RST) and stop relaying."""
        self.stop.set()
        self.thread.join(5)
        for s in list(self.pairs):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        for s in self.listeners:
            s.close()


class FakeSource:
    """Speaks mfd's main channel by hand: HELLO, the setup stream, then whatever a test wants
    to put on a channel's link."""

    def __init__(self, port: int, channels: int = 1, compression: str = "none",
                 size: int = 1 << 20, uuid: bytes = b"\x11" * 16) -> None:
        self.ctx = zmq.Context()
        self.port = port
        self.uuid = uuid
        self.channels = channels
        self.main = tcp.peer_socket(self.ctx, zmq.DEALER)
        self.main.connect(f"tcp://127.0.0.1:{port}")
        self.main.send_multipart([mainchannel.HELLO, orjson.dumps({
            "mfd": 1, "uuid": uuid.hex(), "channels": channels, "compression": compression,
            "zero-page-detection": "multifd", "flush-after-each-section": False,
            "page-size": 4096, "guest": None})])
        setup = (stream.encode_file_header()
                 + stream.encode_configuration(stream.Configuration("none"))
                 + stream.encode_section_start(C.QEMU_VM_SECTION_START,
                                               devices.RAM_SECTION_ID, "ram", 0, 4)
                 + ram.encode_mem_size(size) + ram.encode_block_entry("mem", size))
        self.main.send_multipart([mainchannel.STREAM, setup])
        if not self.main.poll(30_000):
            raise TimeoutError("incoming did not answer")
        self.reply = self.main.recv_multipart()
        self.links: dict[int, zmq.Socket] = {}

    def channel(self, i: int, port_index: int | None = None) -> zmq.Socket:
        s = tcp.peer_socket(self.ctx, zmq.DEALER)
        s.connect(f"tcp://127.0.0.1:{self.port + 1 + (i if port_index is None else port_index)}")
        self.links[i] = s
        return s

    def close(self) -> None:
        for s in [self.main, *self.links.values()]:
            s.close(0)
        self.ctx.term()


def wait_until(cond, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()
