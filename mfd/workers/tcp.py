"""ZeroMQ over TCP between the two hosts: addresses, socket options, and noticing a lost peer.

::

    destination                                   source
    main process    ROUTER bind  HOST:PORT    <-  DEALER  main process (main channel)
    channel i       ROUTER bind  HOST:PORT+1+i <- DEALER  channel i

One port per channel, so every receive channel is its own process with its own socket and
no page byte passes through the destination's main process (QEMU takes all channels on one
port and tells them apart by their first bytes; a ZeroMQ socket cannot be handed to another
process, and one process taking every connection would serialise the receive side).

ZeroMQ reconnects silently and would resend queued messages to whoever answers next; a
migration must instead fail when its peer goes away. So every link watches its socket's
monitor: a disconnect of the accepted peer is fatal (:class:`LinkLost`), heartbeats (ZMTP
PING) turn a peer that vanished without closing (cable cut, paused host) into a disconnect
within HEARTBEAT_TIMEOUT, and ``IMMEDIATE`` keeps a channel's packets from queueing for a
peer that is not connected.
"""

from __future__ import annotations

import random
import re
import socket
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from mfd.errors import MfdError, UsageError

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
# messages queued per peer each way: with 512 KiB packets this bounds what is in flight
# per channel (invariant 6), with the kernel's socket buffers below
HWM = 4
# a channel link's kernel socket buffers (SO_SNDBUF/SO_RCVBUF): 8 packets; larger than the
# default, fewer wake-ups per MiB (ZeroMQ over loopback moved 1 GiB 10-15% faster, with a
# quarter less CPU, measured in one run with a bare sender and receiver)
CHANNEL_BUFFER = 4 << 20

_URI = re.compile(r"^tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def channel(self, i: int) -> str:
        """Channel i's endpoint: the port after the main channel's, plus i."""
        return f"tcp://{self.host}:{self.port + 1 + i}"

    @property
    def main(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def resolved(self) -> Address:
        """The host looked up once, as QEMU looks it up once when it connects. ZeroMQ would
        look a name up again on every reconnect, in its I/O thread; when the peer's name
        goes away with the peer (a stopped container), closing the context then waits
        through the resolver's timeouts, tens of seconds."""
        if self.host.startswith("["):
            return self
        try:
            infos = socket.getaddrinfo(self.host, self.port, socket.AF_INET,
                                       socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise MfdError(f"cannot resolve {self.host}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
        return Address(infos[0][4][0], self.port)


def parse_uri(uri: str, channels: int = 0) -> Address:
    """``tcp://HOST:PORT``; the channels take the following ``channels`` ports."""
    m = _URI.match(uri)
    if not m:
        raise UsageError(f"not a migration address: {uri!r} (expected tcp://HOST:PORT)")
    port = int(m.group(2))
    if not 1 <= port <= 65535 - channels:
        raise UsageError(f"port {port} leaves no room for {channels} channel ports after it"
                         if channels and port <= 65535 else f"port {port} is out of range")
    return Address(m.group(1), port)


def peer_socket(ctx: zmq.Context, kind: int, immediate: bool = False,
                buffer: int = -1) -> zmq.Socket:
    """A socket for the other host: no linger, small queues, heartbeats. ``immediate``
    (ZMQ_IMMEDIATE, for a connecting socket that only sends): messages queue only to a
    completed connection. It also drops unread incoming messages when the connection goes,
    so a socket that must read its peer's last words (RESULT, ERROR) goes without it.
    ``buffer``: the kernel's socket buffers (-1: the system's default)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.SNDBUF, buffer)
    sock.setsockopt(zmq.RCVBUF, buffer)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock


def bind(sock: zmq.Socket, endpoint: str, what: str) -> None:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        raise MfdError(f"{what}: cannot listen on {endpoint}: {e.strerror}") from None


def _bindable(host: str, port: int) -> bool:
    """Nobody holds ``port`` (checked without SO_REUSEADDR: a port in TIME_WAIT is taken)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """A port P with P..P+count-1 free (a main channel and its channels), picked at random
    below the kernel's ephemeral range, so that no outgoing connection takes one of them
    between this check and the bind; from the ephemeral range only if there is no room."""
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


class LinkLost(MfdError):
    """The peer on the other host went away (closed, killed, cut, or silent too long)."""


class LinkWatch:
    """The monitor of one peer socket. ``check()`` after the monitor socket polled readable:
    raises :class:`LinkLost` when the connection that carried ``peer_fd`` (receiver) or the
    only connection (sender) is gone."""

    def __init__(self, sock: zmq.Socket, what: str) -> None:
        self.what = what
        self.monitor = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.sock = sock
        self.connected = False  # sender: a connection came up at least once
        self.peer_fd: int | None = None  # receiver: the connection its peer spoke on
        self.strangers = 0  # connections that failed the ZMTP handshake (not ZeroMQ)

    def check(self) -> None:
        while self.monitor.poll(0):
            ev = recv_monitor_message(self.monitor)
            event, value = ev["event"], ev["value"]
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                           zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.strangers += 1
            elif event == zmq.EVENT_DISCONNECTED:
                if self.peer_fd is not None and value == self.peer_fd:
                    raise LinkLost(f"{self.what}: the connection from the peer was lost")
                if self.peer_fd is None and self.connected:
                    raise LinkLost(f"{self.what}: the connection to the peer was lost")

    def close(self) -> None:
        self.monitor.close(0)
