"""The destination's multifd channels: adopted as they connect, started at the first sync
point, synced at each one.

::

    connections  sorted by first bytes (``accept``); a multifd channel's MultiFDInit is
                 checked here, an mfd source's settings in it adopted (the same on every
                 channel, equal to the options given). Until the receive channels exist
                 the connection waits in ``pending``, and is forgotten if it closes before
                 any main channel came (recorded connections replayed, a scan): the source
                 that follows may use its id
    start        at the first sync point or page: multifd or not (a MULTIFD_FLUSH in the
                 ram START section, or channels connected: an mfd source's, late with TLS,
                 get CHANNEL_GRACE_S), then N receive channel processes
                 (``mfd.workers.socket_channel``), each handed its connection as it comes
    sync point   MULTIFD_FLUSH (per round), or each RAM section's EOS (QEMU's
                 multifd-flush-after-each-section): every channel reached its SYNC, then
                 all are released (invariant 2)

What the source does not say (channels, compression, flush mode) comes from the options,
with QEMU's names and defaults; an mfd source says it in its MultiFDInit, and the options
that were not given follow it.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable

from mfd.errors import ProtocolError
from mfd.main_thread.destination.accept import Acceptor, Channel
from mfd.main_thread.destination.loop import Loop
from mfd.main_thread.destination.ram import IncomingRAM
from mfd.main_thread.pipeline import ChannelPool
from mfd.options import IncomingOptions
from mfd.protocol import multifd, peer
from mfd.workers import tcp
from mfd.workers.socket_channel import SocketChannelConfig, recv_main

CHANNEL_GRACE_S = 5.0  # the source's channels connect before its main stream needs them
QEMU_CHANNELS = 2  # QEMU's default multifd-channels
_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR  # the peer closed (data or not)


class Channels:
    def __init__(self, options: IncomingOptions, loop: Loop) -> None:
        self.options = options
        self.loop = loop
        self._acceptor: Acceptor | None = None  # from open()
        self.settings: peer.ChannelSettings | None = None  # an mfd source's (MultiFDInit)
        self.pending: dict[int, Channel] = {}  # channel id -> connection, until started
        self.handed: set[int] = set()  # channel ids whose connection went to its process
        self.multifd: bool | None = None  # decided at the start
        self.flushed = False  # the first sync point was a MULTIFD_FLUSH (per-round sync)
        self.pool: ChannelPool | None = None
        self.hashing: list[float] = []  # seconds each channel hashed pages, last round

    def open(self, addr: tcp.Address, warn: Callable[[str], None]) -> None:
        """Listen: connections are sorted from now on."""
        self._acceptor = Acceptor(tcp.listen(addr, "incoming"), self.loop, warn,
                                  preempt=self.options.postcopy_preempt, tls=self.options.tls)

    @property
    def acceptor(self) -> Acceptor:
        assert self._acceptor is not None, "not listening"
        return self._acceptor

    # ------------------------------------------------------------------ what the source did not say

    @property
    def count(self) -> int:
        s = self.settings
        return self.options.multifd_channels or (s.channels if s else QEMU_CHANNELS)

    @property
    def compression(self) -> str:
        s = self.settings
        return self.options.multifd_compression or (s.compression if s else "none")

    @property
    def legacy(self) -> bool:
        """multifd-flush-after-each-section."""
        if self.options.flush_after_each_section is not None:
            return self.options.flush_after_each_section
        return self.settings.flush_after_each_section if self.settings else False

    def verifying(self, mfd_source: bool) -> bool:
        """We hash what we place: the source is mfd, and did not say --no-verify."""
        return mfd_source and (self.settings.verify if self.settings else True)

    def promised(self, mfd_source: bool) -> bool:
        """The source said (in its MultiFDInit) that it sends its page hashes."""
        return mfd_source and self.settings is not None and self.settings.verify

    def parameters(self) -> dict[str, object]:
        """Their part of ``query-migrate-parameters``."""
        return {"multifd-channels": self.count, "multifd-compression": self.compression,
                "multifd-flush-after-each-section": self.legacy}

    # ------------------------------------------------------------------ connections

    def check(self) -> None:
        """Connections sorted since the last check: a silent one refused, a closed pending
        one forgotten, multifd channels adopted."""
        self.acceptor.expire()
        self._forget_closed()
        while self.acceptor.channels:
            channel = self.acceptor.channels.pop(0)
            try:
                self._adopt(channel)
            except BaseException:
                channel.sock.close()
                raise

    def _forget_closed(self) -> None:
        """Before any main channel: a pending channel whose peer closed (even with data
        unread) is no source's channel any more. Judged only once every connection the
        kernel holds has been sorted: a source's main channel may have come just before its
        channel's close (a source that fails at once), and then the channel is its own."""
        if self.acceptor.main_taken or not self.pending:
            return
        self.acceptor.drain()
        if self.acceptor.main is not None or self.acceptor.pending:
            return
        poll = select.poll()
        for channel in self.pending.values():
            poll.register(channel.sock, _GONE)
        gone = {fd for fd, _ in poll.poll(0)}
        for i, channel in list(self.pending.items()):
            if channel.sock.fileno() in gone:
                self.acceptor.warn(f"forgot multifd channel {i} from {channel.who}: it "
                                   "closed before any main channel came")
                channel.sock.close()
                del self.pending[i]
        if not self.pending:
            self.settings = None  # said by connections that are gone

    def _adopt(self, channel: Channel) -> None:
        init = channel.init
        where = f"multifd channel {init.id}"
        self._adopt_settings(peer.decode_settings(init.unused), init.id)
        multifd.check_init(init, channels=self.count, uuid=self.options.uuid, where=where)
        if init.id in self.pending or init.id in self.handed:
            raise ProtocolError(f"{where} connected twice (a duplicate channel id)")
        if self.multifd is False:
            raise ProtocolError(f"{where} connected, but the source started without multifd")
        if self.pool is None:
            self.pending[init.id] = channel
            return
        if init.id >= self.pool.channels:
            raise ProtocolError(f"{where}: this destination started "
                                f"{self.pool.channels} channel(s)")
        self.pool.hand_over(init.id, channel.sock, _packet_pages(channel))
        self.handed.add(init.id)

    def _adopt_settings(self, settings: peer.ChannelSettings | None, channel: int) -> None:
        """An mfd source's settings, from a channel's MultiFDInit: the same on every
        channel, and equal to the options that were given."""
        if settings is None:
            return
        if self.settings is not None and settings != self.settings:
            raise ProtocolError(f"multifd channel {channel} says {settings}, another said "
                                f"{self.settings}")
        o = self.options
        for given, theirs, what in (
                (o.multifd_channels, settings.channels, "--multifd-channels"),
                (o.multifd_compression, settings.compression, "--multifd-compression"),
                (o.flush_after_each_section, settings.flush_after_each_section,
                 "--multifd-flush-after-each-section")):
            if given is not None and given != theirs:
                raise ProtocolError(f"the source uses {theirs} where this destination has "
                                    f"{given} ({what})")
        self.settings = settings

    # ------------------------------------------------------------------ start, sync points

    def start(self, ram: IncomingRAM, mfd_source: bool, flushed: bool,
              inherited: tuple[socket.socket, ...]) -> None:
        """At the first sync point (``flushed``: a MULTIFD_FLUSH) or page: multifd or not,
        and the receive channels (none without multifd), hashing what they place if
        :meth:`verifying`. ``inherited``: the caller's sockets, closed in every channel
        process."""
        assert self.pool is None
        self.flushed = flushed
        self.acceptor.drain()
        self.check()
        if flushed and not self.pending:
            # an mfd source's channels say how many they are; with TLS they come after
            # their handshakes, later than the main channel's first sync point
            self.loop.until(lambda: bool(self.pending), CHANNEL_GRACE_S, 20)
        self.multifd = flushed or bool(self.pending)
        configs = [SocketChannelConfig(
            channel_id=i, endpoint="", parent_pid=0, blocks=tuple(ram.blocks),
            compression=self.compression, receivedmap=ram.receivedmap_file,
            allocated=tuple(ram.allocated),
            hashes=ram.hash_file if self.verifying(mfd_source) else None, x=self.options.x)
            for i in range(self.count if self.multifd else 0)]
        inherited = (*inherited, *self.acceptor.sockets(),
                     *(c.sock for c in self.pending.values()))
        self.pool = ChannelPool(configs, recv_main, handoff=True, inherited=inherited,
                                tick=self.loop.check)
        self.loop.join(self.pool)
        for i, channel in sorted(self.pending.items()):
            self.pool.hand_over(i, channel.sock, _packet_pages(channel))
            self.handed.add(i)
        self.pending.clear()

    def sync_point(self, flush: bool) -> None:
        """MULTIFD_FLUSH, or a RAM section's EOS: where QEMU's destination syncs its
        channels (per round at MULTIFD_FLUSH; legacy mode at every EOS). A source and a
        destination that disagree on the mode lose pages in QEMU; here they fail."""
        assert self.pool is not None
        if not self.multifd:
            if flush:
                raise ProtocolError("main channel: MULTIFD_FLUSH from a source without "
                                    "multifd channels")
            return
        if flush and self.legacy:
            raise ProtocolError("the source sends MULTIFD_FLUSH (it syncs once per round), "
                                "this destination syncs after each section "
                                "(--multifd-flush-after-each-section)")
        if not flush and not self.legacy and not self.flushed:
            raise ProtocolError("the source syncs after each section (QEMU's "
                                "multifd-flush-after-each-section): start mfd incoming with "
                                "--multifd-flush-after-each-section")
        if flush != self.legacy and not self.options.x.skip_sync:
            if not self.loop.until(lambda: len(self.handed) >= self.count, CHANNEL_GRACE_S,
                                   100):
                raise ProtocolError(
                    f"the source opened {len(self.handed)} multifd channel(s), this "
                    f"destination expects {self.count} (--multifd-channels)")
            self.pool.recv_sync()
            self.hashing = self.pool.take_hashing()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        for channel in self.pending.values():
            channel.sock.close()
        self.pending.clear()
        if self._acceptor is not None:
            self._acceptor.close()


def _packet_pages(channel: Channel) -> int:
    """The pages of the channel's packets: what an mfd source said in its MultiFDInit
    (checked there), QEMU's otherwise."""
    settings = peer.decode_settings(channel.init.unused)
    return settings.packet_pages if settings else multifd.MULTIFD_PAGE_COUNT
