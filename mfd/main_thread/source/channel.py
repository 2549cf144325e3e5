"""The source's main channel: the stream out, the return path in.

Sending is QEMU's QEMUFile on a non-blocking socket (whole buffers, ``sendmsg`` without a
copy, every wait for room bounded by the session's tick). What the destination sends back
(``source_return_path_thread``) is decoded as it arrives, whenever the socket is readable
(the channel pool watches it) or the session ticks, into state the others ask about::

    PONG            to MFD_PING: whether the destination is mfd (``peer_mfd``); to a round's
                    MFD_ROUND_PING: how far behind it is (``destination_lag``)
    SHUT, MFD_RESULT  its verdict (``shut``, ``result``); a closed socket: ``closed``
    REQ_PAGES(_ID)  postcopy: pages it faulted on (``requests``, in order)
    RECV_BITMAP     recovery: what it holds of a block (``bitmaps``)
    RESUME_ACK      recovery: it resumes (``resume_acked``)

Anything else, or a postcopy message before the switch, is a protocol error.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from mfd.errors import MfdError, ProtocolError
from mfd.main_thread.pipeline import ChannelPool
from mfd.main_thread.stats import MigrationStats
from mfd.protocol import constants as C
from mfd.protocol import peer, postcopy, returnpath, stream
from mfd.shm.ramblock import RAMBlock
from mfd.workers import tcp
from mfd.workers.tls import TLSOptions

PEER_TIMEOUT = 30.0  # the destination answers PING once it reads the main channel
GRACE_S = 0.3  # after a lost channel, time for the destination's own reason to show up


def tls_for(tls: TLSOptions | None, addr: tcp.Address) -> TLSOptions | None:
    """The TLS options for connections to ``addr``: the name its certificate must carry
    is tls-hostname, else the URI's host (QEMU's rule), before any lookup."""
    if tls is None or tls.hostname:
        return tls
    return replace(tls, hostname=addr.host.strip("[]"))


class MainChannel:
    def __init__(self, uri: str, tls: TLSOptions | None, connect_timeout: float,
                 blocks: list[RAMBlock], stats: MigrationStats,
                 tick: Callable[[], None]) -> None:
        self.addr = tcp.parse_uri(uri)
        self.tls = tls_for(tls, self.addr)
        self.connect_timeout = connect_timeout
        self.stats = stats  # the stream's bytes count as transferred
        self.tick = tick  # while a send waits for room
        self.sizes = {b.idstr: b.used_length for b in blocks}  # what requests may name
        self.index = {b.idstr: i for i, b in enumerate(blocks)}
        self.sock: socket.socket | None = None
        self.pool: ChannelPool | None = None  # polls the socket while it waits
        self.returns = returnpath.ReturnPathDecoder()
        self.peer_mfd: bool | None = None  # None until the PONG to MFD_PING says
        self.shut: int | None = None  # the destination's SHUT status
        self.result: dict = {}  # an mfd destination's MFD_RESULT
        self.closed = False  # the destination closed the connection
        self.round_pings: deque[float] = deque()  # when each unanswered round PING went
        self.destination_lag = 0.0  # seconds the destination took to finish the last round
        self.postcopy = False  # after the switch: page requests and RESUME_ACK may come
        self.requests: deque[tuple[int, int, int]] = deque()  # (block, first page, pages)
        self.last_request: str | None = None
        self.bitmaps: dict[str, np.ndarray] = {}  # recovery: RECV_BITMAP's received pages
        self.bitmaps_due: set[str] = set()  # recovery: blocks whose RECV_BITMAP is awaited
        self.resume_acked = False

    # ------------------------------------------------------------------ connections

    def open(self) -> None:
        self.addr = self.addr.resolved()
        self.sock = tcp.connect(self.addr, self.connect_timeout, self.tls)

    def connect(self) -> socket.socket:
        """Another connection to the same destination (postcopy-preempt's channel): each
        page goes out as it is written, never held for the ACK of the one before (Nagle,
        which the destination, sending nothing back on it, delays up to 40 ms)."""
        return tcp.connect(self.addr, self.connect_timeout, self.tls, nodelay=True)

    def watch(self, pool: ChannelPool) -> None:
        """The return path is read whenever ``pool`` waits and the socket is readable."""
        self.pool = pool
        pool.watch(self.sock, self.read)

    def drop(self) -> None:
        """Postcopy-paused: the connection is gone (or given up on)."""
        if self.sock is not None:
            if self.pool is not None:
                with contextlib.suppress(KeyError):
                    self.pool.unwatch(self.sock)
            self.sock.close()
        self.sock = None

    def reopen(self, uri: str, tls: TLSOptions | None) -> None:
        """Recovery: a new connection to ``uri`` (no header), with nothing of the last
        one's return path (the destination says again what it holds)."""
        self.addr = tcp.parse_uri(uri)
        self.tls = tls_for(tls, self.addr)
        self.open()
        self.returns = returnpath.ReturnPathDecoder()
        self.returns.mfd = bool(self.peer_mfd)
        self.closed, self.result = False, {}
        assert self.pool is not None
        self.watch(self.pool)
        self.requests.clear()
        self.last_request = None
        self.bitmaps, self.bitmaps_due = {}, set()
        self.resume_acked = False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    # ------------------------------------------------------------------ the stream

    def send(self, data: bytes | list) -> None:
        """Stream bytes (a list: buffers sent without a copy)."""
        assert self.sock is not None
        try:
            sent = tcp.send_all(self.sock, data if isinstance(data, list) else [data],
                                self.tick)
        except tcp.LinkLost as e:
            raise tcp.LinkLost(f"main channel: {e}") from None
        self.stats.transferred += sent

    def round_ping(self) -> bytes:
        """To mfd, after a round's EOS: PING(MFD_ROUND_PING), whose PONG says when the
        destination finished the round."""
        self.round_pings.append(time.monotonic())
        return stream.encode_command(stream.Command(
            C.MIG_CMD_PING, peer.MFD_ROUND_PING.to_bytes(4, "big")))

    # ------------------------------------------------------------------ the return path

    def read(self) -> None:
        """The destination wrote to the return path (or closed the connection)."""
        assert self.sock is not None
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                if self.shut is not None:
                    return
                raise tcp.LinkLost(f"main channel: connection lost ({e.strerror})") from None
            if not data:
                self.closed = True
                if self.pool is not None:  # at its end for good: poll it no more
                    self.pool.unwatch(self.sock)
                return
            for msg in self.returns.feed(data):
                self._message(msg)

    def _message(self, msg: returnpath.Message) -> None:
        if msg.type == returnpath.PONG:
            if msg.value in (peer.MFD_PING, peer.MFD_PONG):
                self.peer_mfd = msg.value == peer.MFD_PONG
            elif msg.value == peer.MFD_ROUND_PING and self.round_pings:
                self.destination_lag = time.monotonic() - self.round_pings.popleft()
        elif msg.type == returnpath.SHUT:
            self.shut = msg.value
        elif msg.type == returnpath.MFD_RESULT:
            self.result = peer.decode_result(msg.data)
        elif msg.type == returnpath.RECV_BITMAP and self.bitmaps_due:
            idstr, received = postcopy.decode_recv_bitmap(msg, self.sizes)
            self.bitmaps[idstr] = received
            self.bitmaps_due.discard(idstr)
        elif msg.type == returnpath.RESUME_ACK and self.postcopy:
            self.resume_acked = True
        elif msg.type in (returnpath.REQ_PAGES, returnpath.REQ_PAGES_ID) and self.postcopy:
            req = postcopy.decode_request(msg, self.sizes, self.last_request)
            self.last_request = req.idstr
            self.requests.append((self.index[req.idstr], req.start // C.TARGET_PAGE_SIZE,
                                  req.length // C.TARGET_PAGE_SIZE))
            self.stats.postcopy_requests += 1
        else:
            raise ProtocolError(f"return path: {msg.name} is not something a precopy "
                                "destination sends")

    def wait(self, timeout: float = tcp.WAIT_S) -> bool:
        """Up to ``timeout`` (100 ms) for the destination to say something (at most 50 ms
        without a connection: postcopy-paused). False: it closed the connection, nothing
        more will come."""
        if self.sock is None:
            time.sleep(min(timeout, 0.05))
            return True
        if self.closed:
            return False
        tcp.wait(self.sock, write=False, tick=None, timeout=timeout)
        return True

    # ------------------------------------------------------------------ its verdict

    def check(self) -> None:
        """The destination's verdict, once it gave one before we expected it."""
        if self.result.get("status") == "failed" or self.shut not in (None, 0):
            raise MfdError(self.failed_why())
        if self.closed and self.shut is None:
            raise tcp.LinkLost("main channel: connection lost (the destination closed it)")

    def failed_why(self) -> str:
        if self.result.get("error"):
            return f"destination: {self.result['error']}"
        if self.shut is not None:
            return f"the destination failed to load the migration (SHUT {self.shut})"
        return "the destination closed the connection without a result"

    def reason(self) -> str | None:
        """The destination's own verdict, if it gave one just before a channel lost its
        connection (SHUT, or an mfd destination's reason, says why better)."""
        deadline = time.monotonic() + GRACE_S
        with contextlib.suppress(MfdError, OSError):
            while time.monotonic() < deadline and not self.closed and self.shut is None \
                    and self.sock is not None:
                tcp.wait(self.sock, write=False, tick=None)
                self.read()
        return self.failed_why() if self.shut not in (None, 0) or self.result.get("error") \
            else None
