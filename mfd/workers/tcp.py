"""Plain TCP between the two hosts, as QEMU uses it: addresses, sockets, whole sends and reads.

One listening port per destination. The source connects the main channel and then each
multifd channel to the same address; the destination tells them apart by their first bytes
(``mfd.main_thread.destination.accept``). ZeroMQ stays inside each host, between a main
process and its channel processes: a ZeroMQ socket cannot be handed to another process, a
plain one can.

A peer that vanishes without closing (a cable cut, a paused host) must not hold a migration
for ever: every migration socket has keepalives and ``TCP_USER_TIMEOUT``, so unacknowledged
data or unanswered probes fail the socket within :data:`USER_TIMEOUT_S`. Every blocking wait
here is bounded by :data:`WAIT_S` and calls the caller's ``tick`` between waits (cancel,
timeouts, a dead parent).
"""

from __future__ import annotations

import random
import re
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from mfd.errors import MfdError, UsageError
from mfd.sysutil import IOV_MAX
from mfd.workers import tls as tls_relay

USER_TIMEOUT_S = 10
WAIT_S = 0.1
REFUSED_S = 5.0

_URI = re.compile(r"^tcp:(?://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")

Tick = Callable[[], None]


class LinkLost(MfdError):
    """The peer on the other host went away (closed, reset, or silent too long)."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"tcp:{self.host}:{self.port}"

    @property
    def sockaddr(self) -> tuple[str, int]:
        return self.host.strip("[]"), self.port

    def resolved(self) -> Address:
        """The host looked up once, as QEMU looks it up once when it connects: every channel
        then connects to the same address, and a name that goes away with its host (a
        stopped container) costs no resolver timeouts later."""
        if self.host.startswith("["):
            return self
        try:
            infos = socket.getaddrinfo(self.host, self.port, socket.AF_INET,
                                       socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise MfdError(f"cannot resolve {self.host}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
        return Address(infos[0][4][0], self.port)


def parse_uri(uri: str) -> Address:
    """``tcp://HOST:PORT`` or QEMU's ``tcp:HOST:PORT`` (IPv6 hosts in brackets)."""
    m = _URI.match(uri)
    if not m:
        raise UsageError(f"not a migration address: {uri!r} (expected tcp:HOST:PORT or "
                         "tcp://HOST:PORT)")
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise UsageError(f"port {port} is out of range")
    return Address(m.group(1), port)


def _family(host: str) -> int:
    return socket.AF_INET6 if host.startswith("[") else socket.AF_INET


def tune(sock: socket.socket) -> None:
    """Keepalives and a user timeout: a silent peer fails the socket within seconds."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, USER_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_S * 1000)


def listen(addr: Address, what: str) -> socket.socket:
    sock = socket.socket(_family(addr.host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr.sockaddr)
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise MfdError(f"{what}: cannot listen on {addr}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def connect(addr: Address, timeout: float, tls: tls_relay.TLSOptions | None = None,
            nodelay: bool = False, relay: bool = True) -> socket.socket:
    """A connection to ``addr`` (already resolved), within ``timeout`` seconds. A refused
    connection is tried again for up to :data:`REFUSED_S`: a destination started a moment
    before its source may not listen yet. ``nodelay``: TCP_NODELAY (a page asked for goes
    out at once). With ``tls``, once the handshake succeeded (``mfd.workers.tls``): the
    plaintext end of its TLS relay, or, ``relay=False``, the TLS socket itself, for a
    connection :func:`send_all` only writes."""
    deadline = time.monotonic() + timeout
    refused_until = time.monotonic() + min(REFUSED_S, timeout)
    while True:
        sock = socket.socket(_family(addr.host), socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(addr.sockaddr)
            break
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() < refused_until:
                time.sleep(WAIT_S)
                continue
            raise MfdError(f"cannot reach the destination at {addr}: nothing listens "
                           "there (connection refused)") from None
        except TimeoutError:
            sock.close()
            raise MfdError(f"cannot reach the destination at {addr} (no connection within "
                           f"{timeout:g} s)") from None
        except OSError as e:
            sock.close()
            raise MfdError(f"cannot reach the destination at {addr}: "
                           f"{e.strerror or e}") from None
    tune(sock)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        return tls_relay.client(sock, tls, str(addr)) if relay else \
            tls_relay.open_client(sock, tls, str(addr))
    sock.setblocking(False)
    return sock


def send_all(sock: socket.socket, buffers: list, tick: Tick | None = None) -> int:
    """Write every buffer (``sendmsg``, at most IOV_MAX at a time, no copy; over TLS, one
    ``SSL_write`` each) on a non-blocking socket; ``tick`` runs between waits for room.
    Returns the bytes sent."""
    views = [v.cast("B") for v in map(memoryview, buffers) if v.nbytes]
    total = sum(v.nbytes for v in views)
    if isinstance(sock, ssl.SSLSocket):
        _send_tls(sock, views, tick)
        return total
    i = 0
    while i < len(views):
        try:
            n = sock.sendmsg(views[i : i + IOV_MAX])
        except BlockingIOError:
            wait(sock, write=True, tick=tick)
            continue
        except OSError as e:
            raise LinkLost(_why(e)) from None
        i = _advance(views, i, n)
    return total


def _send_tls(sock: ssl.SSLSocket, views: list[memoryview], tick: Tick | None) -> None:
    """One ``SSL_write`` per buffer, straight from it (OpenSSL encrypts it into records of
    16 KiB and writes each to the socket). A write that cannot finish says so after part of
    it went out; OpenSSL keeps its place, and the same buffer is given again."""
    for view in views:
        while True:
            try:
                sock.send(view)  # all of it, or SSLWant*Error
                break
            except ssl.SSLWantWriteError:
                wait(sock, write=True, tick=tick)
            except ssl.SSLWantReadError:  # (a TLS 1.3 key update from the peer, say)
                wait(sock, write=False, tick=tick)
            except OSError as e:
                raise LinkLost(_why(e)) from None


def recv_into(sock: socket.socket, buffers: list, tick: Tick | None = None,
              what: str = "the connection") -> None:
    """Fill every buffer from a non-blocking socket (``recvmsg_into``: straight into them);
    the peer closing first is :class:`LinkLost`."""
    views = [v.cast("B") for v in map(memoryview, buffers) if v.nbytes]
    i = 0
    while i < len(views):
        try:
            n = sock.recvmsg_into(views[i : i + IOV_MAX])[0]
        except BlockingIOError:
            wait(sock, write=False, tick=tick)
            continue
        except OSError as e:
            raise LinkLost(_why(e)) from None
        if n == 0:
            raise LinkLost(f"the peer closed {what} in the middle of a message")
        i = _advance(views, i, n)


def _advance(views: list[memoryview], i: int, n: int) -> int:
    """``n`` more bytes of ``views`` (from ``views[i]`` on) went through: the index of the
    first buffer not done, that buffer cut to what is left of it."""
    while n and i < len(views):
        if n >= views[i].nbytes:
            n -= views[i].nbytes
            i += 1
        else:
            views[i] = views[i][n:]
            n = 0
    return i


def wait(sock: socket.socket, write: bool, tick: Tick | None, timeout: float = WAIT_S
         ) -> None:
    """Up to ``timeout`` for ``sock`` to be writable (or readable), then ``tick`` if it was
    not: callers try again, so every wait stays bounded and watched."""
    r, w, _ = select.select([] if write else [sock], [sock] if write else [], [], timeout)
    if not (r or w) and tick is not None:
        tick()


def _why(e: OSError) -> str:
    return f"connection lost ({e.strerror or e})"


def _bindable(host: str, port: int) -> bool:
    """Nobody holds ``port`` (checked without SO_REUSEADDR: a port in TIME_WAIT is taken)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int = 1, host: str = "127.0.0.1") -> int:
    """A port P with P..P+count-1 free, picked at random below the kernel's ephemeral
    range, so that no outgoing connection takes one of them between this check and the
    bind; from the ephemeral range only if there is no room."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        if low - count > 10000:
            base = rng.randrange(10000, low - count)
        else:
            with socket.socket() as s:
                s.bind((host, 0))
                base = s.getsockname()[1]
        if base + count <= 65536 and all(_bindable(host, base + i) for i in range(count)):
            return base
    raise MfdError(f"found no {count} consecutive free TCP ports on {host}")
