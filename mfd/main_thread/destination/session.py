"""The destination of a live migration: ``mfd incoming --listen tcp:HOST:PORT``.

The source may be ``mfd migrate`` or a real QEMU (``migrate uri=tcp:HOST:PORT``): the wire
is QEMU's (``shared/qemu-wire.md``)::

    one port   the main channel (QEVM) and N multifd channels (MultiFDInit), told apart by
               their first bytes (``mfd.main_thread.accept``); strangers get a warning line
    stream     read as it arrives by the sans-I/O decoder (``mfd.protocol.livestream``):
               OPEN_RETURN_PATH, PING -> PONG; ram START: the block list -> unnamed RAM
               (PendingRAM), receivedmap, a paused guest on that RAM (or image files);
               the first sync point: N receive channels, each handed its connection
               MULTIFD_FLUSH (legacy: EOS) -> recv sync: every channel reached its SYNC,
               then all are released (invariant 2); ZERO/PAGE records (no multifd): placed
               here; device sections: globalstate's runstate, an mfd source's guest state
    complete   EOF, vmdesc; from an mfd source its page hashes, compared page by page with
               ours (``mfd.shm.pagehash``: each channel hashed every page it placed, from
               RAM, as it placed it): equal -> the RAM gets its names, the guest takes it
               and runs (as QEMU's runstate says, unless --stopped)
    result     on the return path (if the source opened it): MFD_RESULT to an mfd source,
               then SHUT(0); SHUT(1) on failure

What the source does not say (channels, compression, flush mode, uuid) comes from the
options, with QEMU's names and defaults; an mfd source says it in its MultiFDInit and
options that were not given follow it. Until the result nothing has a name: a destination
that fails removes its guest and its RAM, and one killed outright leaves nothing behind
(the RAM is held only by descriptors).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zmq

from mfd.errors import MfdError, ProtocolError
from mfd.main_thread import postcopy_dst
from mfd.main_thread.accept import Acceptor
from mfd.main_thread.migrate import Cancelled, failure
from mfd.main_thread.pipeline import ChannelPool, dispatch, poll_key
from mfd.main_thread.postcopy_dst import PostcopyPlacer
from mfd.options import IncomingOptions
from mfd.protocol import livestream, multifd, peer, postcopy, returnpath, trailer, xbzrle
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.devices import GUEST_IDSTR
from mfd.shm import control, pagehash
from mfd.shm.ramblock import SHM_DIR, MappedBlock, PendingRAM, RAMBlock, attach, shm_path
from mfd.shm.receivedmap import ReceivedMap, map_size
from mfd.workers import tcp
from mfd.workers.socket_channel import SocketChannelConfig, recv_main
from mfd.workers.tls import tls_parameters, wait_relays

CHANNEL_GRACE_S = 5.0  # the source's channels connect before its main stream needs them
QUEUE_EVENTS = 256  # decoded events waiting; beyond that the main channel is not read
_QEMU_CHANNELS = 2  # QEMU's default multifd-channels




@dataclass
class IncomingResult:
    status: str
    blocks: dict[str, str]  # idstr -> where the RAM is now (shm path or image)
    guest: str | None
    total_time_ms: float
    setup_time_ms: float
    digests: dict[str, str] = field(default_factory=dict)
    verified: bool = False
    source: str = "mfd"  # "mfd" or "qemu"
    postcopy: dict = field(default_factory=dict)  # requests and fault latency, if it ran


class Incoming:
    def __init__(self, listen: str, *, images: dict[str, str] | None = None,
                 guest: str | None = None, options: IncomingOptions | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        if images is not None and guest is not None:
            raise MfdError("incoming takes either images or a guest name, not both")
        self.addr = tcp.parse_uri(listen)
        self.images = images
        self.guest_name = guest
        self.options = options or IncomingOptions()
        self.warn = warn or (lambda line: print(f"mfd incoming: {line}", file=sys.stderr))
        self.status = "setup"
        self.error: str | None = None
        self.cancel_requested: str | None = None
        self.start = time.monotonic()
        self.setup_time = 0.0
        self.watched: dict[object, Callable[[], None]] = {}
        self.events: deque[livestream.Event] = deque()
        self.decoder = livestream.StreamDecoder()
        self.conn: socket.socket | None = None  # the main channel
        self.main_closed = False
        self.main_paused = False
        self.acceptor: Acceptor | None = None
        self.return_path = False  # the source opened it: it reads our answers
        self.mfd_settings: peer.ChannelSettings | None = None
        self.conns: dict[int, socket.socket] = {}  # channel id -> connection, until handed
        self.handed: set[int] = set()
        self.multifd: bool | None = None  # decided at the first sync point
        self.start_flushed = False  # the ram START section had a MULTIFD_FLUSH
        self.runstate: str | None = None
        self.skipped: list[str] = []
        self.pool: ChannelPool | None = None
        self.pending: PendingRAM | None = None
        self.rmap_ram: PendingRAM | None = None
        self.receivedmap: ReceivedMap | None = None
        self.hash_file: PendingRAM | None = None
        self.hashes: pagehash.PageHashes | None = None
        self.round_hashing: list[float] = []  # seconds each channel hashed, last round
        self.guest: control.GuestClient | None = None
        self.mapped: list[MappedBlock] = []
        self.words: list[np.ndarray] = []
        self.guest_state: dict | None = None
        self.vmdesc_at = 0.0
        self.preempt: socket.socket | None = None  # postcopy-preempt's channel
        self.preempt_decoder: livestream.StreamDecoder | None = None
        self.postcopy: PostcopyPlacer | None = None  # from LISTEN on
        self.postcopy_ran = False  # RUN came: the guest runs (its RAM named at the end)
        self.postcopy_stats: dict[str, object] = {}  # requests and latency, kept at the end

    # ------------------------------------------------------------------ what the source did not say

    @property
    def channels(self) -> int:
        s = self.mfd_settings
        return self.options.multifd_channels or (s.channels if s else _QEMU_CHANNELS)

    @property
    def compression(self) -> str:
        s = self.mfd_settings
        return self.options.multifd_compression or (s.compression if s else "none")

    @property
    def legacy(self) -> bool:
        """multifd-flush-after-each-section."""
        s = self.mfd_settings
        if self.options.flush_after_each_section is not None:
            return self.options.flush_after_each_section
        return s.flush_after_each_section if s else False

    @property
    def verifying(self) -> bool:
        """We hash what we place: the source is mfd, and did not say --no-verify."""
        s = self.mfd_settings
        return self.decoder.mfd_source and (s.verify if s else True)

    def _adopt(self, settings: peer.ChannelSettings | None, channel: int) -> None:
        """An mfd source's settings, from a channel's MultiFDInit: the same on every
        channel, and equal to the options that were given."""
        if settings is None:
            return
        if self.mfd_settings is not None and settings != self.mfd_settings:
            raise ProtocolError(f"multifd channel {channel} says {settings}, another said "
                                f"{self.mfd_settings}")
        o = self.options
        for given, theirs, what in (
                (o.multifd_channels, settings.channels, "--multifd-channels"),
                (o.multifd_compression, settings.compression, "--multifd-compression"),
                (o.flush_after_each_section, settings.flush_after_each_section,
                 "--multifd-flush-after-each-section")):
            if given is not None and given != theirs:
                raise ProtocolError(f"the source uses {theirs} where this destination has "
                                    f"{given} ({what})")
        self.mfd_settings = settings

    # ------------------------------------------------------------------ waiting

    def _watch(self, source: object, callback: Callable[[], None]) -> None:
        self.watched[poll_key(source)] = callback
        if self.pool is not None:
            self.pool.watch(source, callback)

    def _unwatch(self, source: object) -> None:
        del self.watched[poll_key(source)]
        if self.pool is not None:
            self.pool.unwatch(source)

    def _wait(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for anything: connections, the main channel, the
        channels (through the pool once it exists); then the periodic checks."""
        if self.pool is not None:
            self.pool.wait(timeout_ms)  # its tick is ours
            return
        poller = zmq.Poller()
        for source in self.watched:
            poller.register(source, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        dispatch(self.watched, ready)
        self._tick()

    def _tick(self) -> None:
        """While waiting (also inside the pool): new connections, cancel, the timeout."""
        assert self.acceptor is not None
        self.acceptor.expire()
        self._take_connections()
        if self.cancel_requested is not None:
            raise Cancelled(self.cancel_requested)
        timeout = self.options.timeout
        if timeout is not None and time.monotonic() - self.start > timeout:
            raise Cancelled(f"no migration completed within {timeout:g} s (--timeout)")

    def _take_connections(self) -> None:
        assert self.acceptor is not None
        main = self.acceptor.take_main()
        if main is not None:
            self.conn, head = main
            self.events.extend(self.decoder.feed(head))
            self._watch(self.conn, self._on_main)
            self.status = "postcopy-recover" if self.status == "postcopy-paused" else "active"
        if self.acceptor.preempt is not None and self.preempt is None:
            self.preempt, self.acceptor.preempt = self.acceptor.preempt, None
            self.preempt_decoder = livestream.StreamDecoder("preempt channel",
                                                            preempt=self.decoder.sizes)
            self._watch(self.preempt, self._on_preempt)
        while self.acceptor.channels:
            sock, init = self.acceptor.channels.pop(0)
            try:
                self._channel(sock, init)
            except BaseException:
                sock.close()
                raise

    def _channel(self, sock: socket.socket, init: multifd.MultiFDInit) -> None:
        where = f"multifd channel {init.id}"
        self._adopt(peer.decode_settings(init.unused), init.id)
        multifd.check_init(init, channels=self.channels, uuid=self.options.uuid, where=where)
        if init.id in self.conns or init.id in self.handed:
            raise ProtocolError(f"{where} connected twice (a duplicate channel id)")
        if self.multifd is False:
            raise ProtocolError(f"{where} connected, but the source started without multifd")
        if self.pool is not None:
            if init.id >= self.pool.channels:
                raise ProtocolError(f"{where}: this destination started "
                                    f"{self.pool.channels} channel(s)")
            self.pool.hand_over(init.id, sock)
            self.handed.add(init.id)
        else:
            self.conns[init.id] = sock

    def _on_main(self) -> None:
        """The main channel is readable: stream bytes into the decoder, events queued in
        order (the handling of one may wait for channels, which calls this again)."""
        assert self.conn is not None
        if len(self.events) > QUEUE_EVENTS:
            self._unwatch(self.conn)
            self.main_paused = True
            return
        try:
            n = _receive(self.conn, self.decoder, "main channel")
            if n is None:
                return
            if n == 0:
                self._unwatch(self.conn)
                self.main_closed = True
                self.decoder.close()
                return
        except (tcp.LinkLost, ProtocolError) as e:
            if not self._recoverable(e):
                raise
            self._pause(str(e))
            return
        self.events.extend(self.decoder.filled(n))

    def _recoverable(self, e: BaseException) -> bool:
        """Postcopy, past RUN, lost its link: the guest runs here on what arrived and the
        source still holds the rest; both wait for the link to come back (QEMU's
        postcopy-paused), unless the stream had ended anyway."""
        return self.postcopy_ran and not self.decoder.done and (
            isinstance(e, tcp.LinkLost) or "closed the connection" in str(e))

    def _pause(self, why: str) -> None:
        """postcopy-paused: connections gone; the guest's faults are still read (asked for
        once the source is back); the next main connection resumes."""
        self.status = "postcopy-paused"
        self.warn(f"postcopy paused: {why}; waiting for the source to resume (QEMU's migrate "
                  "with resume) on this port")
        for sock in (self.conn, self.preempt):
            if sock is not None:
                with contextlib.suppress(KeyError):
                    self._unwatch(sock)
                sock.close()
        self.conn = self.preempt = None
        self.main_closed = self.main_paused = False
        self.decoder = self.decoder.resumed("main channel (resumed)")
        assert self.acceptor is not None
        self.acceptor.await_resume(self.options.postcopy_preempt)

    def _next(self) -> livestream.Event | None:
        """The source's next event; None once the stream is complete."""
        while not self.events:
            if self.decoder.done:
                return None
            if self.main_paused:
                self.main_paused = False
                assert self.conn is not None
                self._watch(self.conn, self._on_main)
            self._wait(100)
        return self.events.popleft()

    def _reply(self, data: bytes) -> None:
        """On the return path (only once the source opened it)."""
        assert self.conn is not None
        try:
            tcp.send_all(self.conn, [data], self._tick)
        except tcp.LinkLost as e:
            if not self._recoverable(e):
                raise
            self._pause(str(e))

    # ------------------------------------------------------------------ run

    def run(self) -> IncomingResult:
        self.acceptor = Acceptor(tcp.listen(self.addr, "incoming"), self.warn, self._watch,
                                 self._unwatch, preempt=self.options.postcopy_preempt,
                                 tls=self.options.tls)
        try:
            result = self._migrate()
            self.status = "completed"
            return result
        except BaseException as e:
            self.status, self.error, _ = failure(e, lambda: None)
            self._say_failed(self.error)
            self._discard()
            raise
        finally:
            self._release()
            self.acceptor.close()
            for sock in (self.conn, self.preempt):
                if sock is not None:
                    sock.close()
            for sock in self.conns.values():
                sock.close()
            wait_relays()

    def _say_failed(self, error: str) -> None:
        """The source's return path, best effort: MFD_RESULT to mfd, SHUT(1)."""
        if self.conn is None or not self.return_path or self.main_closed:
            return
        data = returnpath.encode_shut(1)
        if self.decoder.mfd_source:
            data = returnpath.encode(returnpath.MFD_RESULT,
                                     peer.encode_result("failed", error)) + data
        with contextlib.suppress(OSError):
            self.conn.send(data, socket.MSG_DONTWAIT)

    def _migrate(self) -> IncomingResult:
        while self.conn is None:
            self._wait(100)
        theirs: dict[str, bytes] | None = None
        while (ev := self._next()) is not None:
            if isinstance(ev, livestream.ReturnPath):
                self.return_path = True
            elif isinstance(ev, livestream.Ping):
                if self.return_path:
                    self._reply(returnpath.encode_pong(
                        peer.MFD_PONG if ev.value == peer.MFD_PING else ev.value))
            elif isinstance(ev, livestream.Blocks):
                self._setup(ev.blocks)
            elif isinstance(ev, livestream.Flush):
                self._sync_point(flush=True)
            elif isinstance(ev, livestream.SectionEnd):
                self._sync_point(flush=False)
            elif isinstance(ev, livestream.ZeroPages):
                self._start_channels()
                if self.postcopy is not None:
                    self.postcopy.zero(self.index[ev.idstr], ev.pages)
                else:
                    self._zero(ev.idstr, ev.pages)
            elif isinstance(ev, livestream.Pages):
                self._start_channels()
                if self.postcopy is not None:
                    self.postcopy.pages(self.index[ev.idstr], ev.pages, ev.data)
                else:
                    self._pages(ev.idstr, ev.pages, ev.data)
            elif isinstance(ev, livestream.XbzrlePages):
                self._start_channels()
                self._xbzrle(ev)
            elif isinstance(ev, livestream.Advise):
                self._advise()
            elif isinstance(ev, livestream.Discard):
                i = self.index[ev.idstr]
                assert self.receivedmap is not None and self.hashes is not None
                postcopy_dst.discard(self.mapped[i], self.receivedmap.received[i],
                                     self.hashes.table[i] if self.verifying else None,
                                     ev.runs)
            elif isinstance(ev, livestream.Listen):
                self._listen()
            elif isinstance(ev, livestream.Run):
                self._postcopy_run()
            elif isinstance(ev, livestream.RecvBitmap):
                assert self.receivedmap is not None
                self._reply(postcopy.encode_recv_bitmap(
                    ev.idstr, self.receivedmap.received[self.index[ev.idstr]] != 0))
            elif isinstance(ev, livestream.Resume):
                assert self.postcopy is not None
                self._reply(returnpath.encode_resume_ack() + self.postcopy.requests_again())
                self.status = "postcopy-active"
            elif isinstance(ev, livestream.Device):
                if ev.state.idstr == "globalstate":
                    self.runstate = str(ev.state.fields["runstate"])
                elif ev.state.idstr == GUEST_IDSTR and self.decoder.mfd_source:
                    self.guest_state = ev.state.fields["guest"]  # type: ignore[assignment]
            elif isinstance(ev, livestream.Skipped):
                self.skipped.append(ev.idstr)
            elif isinstance(ev, livestream.Vmdesc):
                self.vmdesc_at = time.monotonic()  # what follows is the source's hashes
            elif isinstance(ev, livestream.Hashes):
                theirs = ev.tables
        if self.pool is None:
            raise ProtocolError("main channel: the stream ended without RAM")
        digests: dict[str, str] = {}
        verify_ms = None
        if theirs and not self.verifying:
            raise ProtocolError("the source sent page hashes after saying it would not "
                                "verify RAM")
        if not theirs and self.decoder.mfd_source and self.mfd_settings is not None \
                and self.mfd_settings.verify:
            raise ProtocolError("the source sent no page hashes after saying it would "
                                "verify RAM")
        if theirs:  # an mfd source, unless it was told --no-verify
            assert self.hashes is not None
            for b, ours in zip(self.blocks, self.hashes.table, strict=True):
                _compare(b.idstr, theirs[b.idstr], ours)
            verify_ms = (pagehash.wall_share(self.round_hashing)
                         + time.monotonic() - self.vmdesc_at) * 1000
        elif self.skipped:
            self.warn(f"the source is QEMU: its device state ({', '.join(self.skipped)}) "
                      "has no place here, only its RAM")
        guest = self.guest_name if self.guest is not None else None
        if self.postcopy is not None:  # every page is here: the guest's uffd may go
            self.postcopy_stats = {"postcopy-requests": self.postcopy.requests,
                                   **self.postcopy.latency(),
                                   "x-latencies-us": [round(x * 1e6)
                                                      for x, _ in self.postcopy.latencies]}
            self._unwatch(self.postcopy.fileno())
            self.postcopy.close()  # first: the guest may be waiting on a page right now
            self.postcopy = None
            assert self.guest is not None
            self.guest.execute("postcopy-end")
        where = self._commit(start=not self.postcopy_ran)
        if self.return_path:
            data = returnpath.encode_shut(0)
            if self.decoder.mfd_source:
                data = returnpath.encode(returnpath.MFD_RESULT, peer.encode_result(
                    "completed", verify_ms=verify_ms)) + data
            with contextlib.suppress(tcp.LinkLost):  # the guest runs here now, whatever
                self._reply(data)
        if theirs:  # a name for what was compared (= ours), after the downtime
            digests = {k: trailer.blake3_of(v) for k, v in theirs.items()}
        return IncomingResult("completed", where, guest,
                              (time.monotonic() - self.start) * 1000, self.setup_time * 1000,
                              digests, bool(theirs),
                              "mfd" if self.decoder.mfd_source else "qemu",
                              self.postcopy_stats)

    # ------------------------------------------------------------------ sync points

    def _sync_point(self, flush: bool) -> None:
        """MULTIFD_FLUSH, or a RAM section's EOS: where QEMU's destination syncs its
        channels (per round at MULTIFD_FLUSH; legacy mode at every EOS). A source and a
        destination that disagree on the mode lose pages in QEMU; here they fail."""
        first = self.pool is None
        if flush and first:
            self.start_flushed = True
        self._start_channels()
        if not self.multifd:
            if flush:
                raise ProtocolError("main channel: MULTIFD_FLUSH from a source without "
                                    "multifd channels")
            return
        if flush and self.legacy:
            raise ProtocolError("the source sends MULTIFD_FLUSH (it syncs once per round), "
                                "this destination syncs after each section "
                                "(--multifd-flush-after-each-section)")
        if not flush and not self.legacy and not self.start_flushed:
            raise ProtocolError("the source syncs after each section (QEMU's "
                                "multifd-flush-after-each-section): start mfd incoming with "
                                "--multifd-flush-after-each-section")
        if flush != self.legacy and not self.options.x.skip_sync:
            self._await_channels()
            pool = self._pool()
            pool.recv_sync()
            self.round_hashing = pool.take_hashing()

    def _await_channels(self) -> None:
        deadline = time.monotonic() + CHANNEL_GRACE_S
        while len(self.handed) < self.channels:
            if time.monotonic() > deadline:
                raise ProtocolError(
                    f"the source opened {len(self.handed)} multifd channel(s), this "
                    f"destination expects {self.channels} (--multifd-channels)")
            self._wait(100)

    def _pool(self) -> ChannelPool:
        if self.pool is None:
            raise ProtocolError("main channel: RAM records before the RAM block list")
        return self.pool

    # ------------------------------------------------------------------ setup

    def _setup(self, blocks: list[tuple[str, int]]) -> None:
        """The block list arrived: RAM without names, receivedmap, guest."""
        if self.images is not None:
            missing = sorted(set(self.images) ^ {idstr for idstr, _ in blocks})
            if missing:
                raise MfdError(f"the source's RAM blocks {[b for b, _ in blocks]} do not match "
                               f"the images given ({sorted(self.images)})")
            dirs = {os.path.dirname(os.path.abspath(self.images[i])) for i, _ in blocks}
            if len(dirs) != 1:
                raise MfdError("all --image files must be in one directory")
            directory = dirs.pop()
        else:
            directory = SHM_DIR
        self.pending = PendingRAM(directory, blocks)
        self.blocks: list[RAMBlock] = self.pending.blocks
        self.index = {b.idstr: i for i, b in enumerate(self.blocks)}
        self.rmap_ram = PendingRAM(SHM_DIR, [("receivedmap", map_size(self.blocks))])
        self.receivedmap = ReceivedMap(self.rmap_ram.blocks[0], self.blocks)
        self.hash_file = PendingRAM(SHM_DIR, [("pagehash", pagehash.table_size(self.blocks))])
        self.hashes = pagehash.PageHashes(self.hash_file.blocks[0], self.blocks)
        self.mapped = [attach(b, writable=True) for b in self.blocks]
        self.words = [m.words for m in self.mapped]
        if self.images is None:
            self.guest_name = self.guest_name or "vm0"
            argv = ["--name", self.guest_name, "--stopped"]
            for b in self.blocks:
                argv += ["--attach", f"{b.idstr}={b.path}"]
            self.guest = control.start_guest_daemon(argv, self.guest_name)
        self.setup_time = time.monotonic() - self.start

    def _start_channels(self) -> None:
        """At the first sync point (or page): multifd or not, and the receive channels,
        each handed its connection as it comes. Without multifd there are none: the main
        channel's pages are placed (and hashed) here."""
        if self.pool is not None:
            return
        if self.pending is None:
            raise ProtocolError("main channel: RAM records before the RAM block list")
        assert self.acceptor is not None and self.rmap_ram is not None
        self.acceptor.drain()
        self._take_connections()
        if self.start_flushed and not self.conns:
            # an mfd source's channels say how many they are; with TLS they come after
            # their handshakes, later than the main channel's first sync point
            deadline = time.monotonic() + CHANNEL_GRACE_S
            while not self.conns and not self.handed and time.monotonic() < deadline:
                self._wait(20)
        self.multifd = self.start_flushed or bool(self.conns)
        n = self.channels if self.multifd else 0
        hashes = self.hash_file.blocks[0] if self.verifying and self.hash_file else None
        configs = [SocketChannelConfig(
            channel_id=i, endpoint="", parent_pid=0, blocks=tuple(self.blocks),
            compression=self.compression, receivedmap=self.rmap_ram.blocks[0],
            hashes=hashes, x=self.options.x) for i in range(n)]
        inherited = (self.acceptor.listener, *self.acceptor.pending, *self.conns.values(),
                     *([self.conn] if self.conn is not None else []))
        self.pool = ChannelPool(configs, recv_main, handoff=True, inherited=inherited,
                                tick=self._tick)
        for source, callback in self.watched.items():
            self.pool.watch(source, callback)
        for i, sock in sorted(self.conns.items()):
            self.pool.hand_over(i, sock)
            self.handed.add(i)
        self.conns.clear()

    def _zero(self, idstr: str, pages: np.ndarray) -> None:
        """ZERO records on the main stream: QEMU's rule, as the channels apply it."""
        block = self.index[idstr]
        assert self.receivedmap is not None
        again = self.receivedmap.zero_pages(block, self.words[block], pages)
        if self.verifying:  # no channel to hash them: here, as a channel would
            assert self.hashes is not None
            self.hashes.zeroed(block, self.words[block], pages, again)

    def _pages(self, idstr: str, pages: np.ndarray, data: np.ndarray) -> None:
        """PAGE records on the main stream (no multifd): from the stream's buffer into RAM."""
        block = self.index[idstr]
        self.words[block].view(np.uint8).reshape(len(self.words[block]), -1)[pages] = data
        assert self.receivedmap is not None
        self.receivedmap.received[block][pages] = 1
        if self.verifying:
            assert self.hashes is not None
            self.hashes.record(block, self.words[block], pages)

    def _xbzrle(self, ev: livestream.XbzrlePages) -> None:
        """XBZRLE records (no multifd, as QEMU): each delta applied onto the page here."""
        if self.multifd:
            raise ProtocolError("main channel: an XBZRLE page with multifd (QEMU refuses "
                                "xbzrle with multifd: 'Multifd is not compatible with "
                                "xbzrle')")
        if self.postcopy is not None:
            raise ProtocolError("main channel: an XBZRLE page in postcopy (QEMU's postcopy "
                                "loads whole and zero pages only)")
        block = self.index[ev.idstr]
        words = self.words[block]
        xbzrle.decode_into(words.view(np.uint8), ev.pages, ev.data, ev.starts, ev.lengths,
                           f"main channel: block {ev.idstr!r}: XBZRLE page")
        assert self.receivedmap is not None
        self.receivedmap.received[block][ev.pages] = 1
        if self.verifying:
            assert self.hashes is not None
            self.hashes.record(block, words, ev.pages)

    # ------------------------------------------------------------------ postcopy

    def _advise(self) -> None:
        """POSTCOPY_ADVISE: postcopy may follow; fail now if it could not work here."""
        if not self.options.postcopy_ram:
            raise ProtocolError("the source advises postcopy: start mfd incoming with "
                                "--postcopy-ram (QEMU's destination needs the capability "
                                "too)")
        if self.images is not None:
            raise MfdError("postcopy runs the guest before its RAM has arrived: it needs a "
                           "guest (--guest), not --image")
        postcopy_dst.check_userfaultfd()

    def _listen(self) -> None:
        """POSTCOPY_LISTEN: the guest's uffd comes here; faults are served from now on."""
        self._start_channels()
        assert self.guest is not None and self.receivedmap is not None
        self.postcopy = PostcopyPlacer(self.blocks, self.receivedmap,
                                       self.hashes if self.verifying else None, self.guest)
        self._watch(self.postcopy.fileno(), self._on_faults)

    def _postcopy_run(self) -> None:
        """POSTCOPY_RUN: the guest goes on from the source's state now; its RAM gets its
        names only once it has all arrived (a destination killed before leaves nothing)."""
        assert self.guest is not None
        run = not self.options.stopped and self.runstate in (None, "running")
        self.guest.execute("postcopy-run", workload=self._workload(), run=run)
        self.postcopy_ran = True
        self.status = "postcopy-active"

    def _workload(self) -> dict:
        assert self.guest is not None
        return (self.guest_state or {}).get("workload") or self.guest.query()["workload"]

    def _on_preempt(self) -> None:
        """The preempt channel: the pages the guest asked for, placed as they come."""
        assert self.preempt is not None and self.preempt_decoder is not None
        try:
            n = _receive(self.preempt, self.preempt_decoder, "preempt channel")
        except tcp.LinkLost as e:  # as the main channel's loss: QEMU pauses on either
            if not self._recoverable(e):
                raise
            self._pause(str(e))
            return
        if n is None:
            return
        if n == 0:  # the source is done with it
            self._unwatch(self.preempt)
            self.preempt.close()
            self.preempt = None
            return
        self._preempt_events(self.preempt_decoder.filled(n))

    def _preempt_events(self, events: list[livestream.Event]) -> None:
        for ev in events:
            if self.postcopy is None:
                raise ProtocolError("preempt channel: pages before POSTCOPY_LISTEN")
            if isinstance(ev, livestream.Pages):
                self.postcopy.pages(self.index[ev.idstr], ev.pages, ev.data)
            elif isinstance(ev, livestream.ZeroPages):
                self.postcopy.zero(self.index[ev.idstr], ev.pages)

    def _on_faults(self) -> None:
        assert self.postcopy is not None
        requests = self.postcopy.faults()
        if requests and self.status != "postcopy-paused":  # else asked again at resume
            if not self.return_path:
                raise ProtocolError("postcopy: the guest needs pages and the source opened "
                                    "no return path to ask for them")
            self._reply(requests)

    def _commit(self, start: bool = True) -> dict[str, str]:
        """Name the RAM; the guest takes it and runs (or the images appear); after
        postcopy (``start`` False) it runs already."""
        assert self.pending is not None
        self._pool().quiesce()  # nothing lands in RAM any more: the guest may take it
        named: list[str] = []
        try:
            if self.images is not None:
                for i, b in enumerate(self.blocks):
                    final = self.images[b.idstr]
                    tmp = f"{final}.mfd-incoming-{os.getpid()}"
                    self.pending.link(i, tmp)
                    named.append(tmp)
                    os.replace(tmp, final)
                    named.remove(tmp)
                return dict(self.images)
            assert self.guest is not None and self.guest_name is not None
            paths = {}
            for i, b in enumerate(self.blocks):
                paths[b.idstr] = shm_path(self.guest_name, b.idstr)
                self.pending.link(i, paths[b.idstr])
                named.append(paths[b.idstr])
            run = not self.options.stopped and self.runstate in (None, "running")
            if start:
                self.guest.execute("commit", blocks=paths, workload=self._workload(), run=run)
            else:
                self.guest.execute("commit", blocks=paths)
            named.clear()  # the guest owns them now
            self.guest.close()
            self.guest = None
            return paths
        finally:
            for p in named:
                with contextlib.suppress(OSError):
                    os.unlink(p)

    def _discard(self) -> None:
        if self.postcopy is not None and self.postcopy_ran:
            # postcopy failed after RUN: the guest ran on RAM that never all arrived (the
            # source still holds all of it); it may be blocked on a page that will not come
            with contextlib.suppress(OSError):
                os.kill(self.postcopy.guest_pid, signal.SIGKILL)
        if self.guest is not None:
            with contextlib.suppress(MfdError):
                self.guest.quit()
            self.guest.close()
            self.guest = None

    def _release(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.postcopy is not None:
            self.postcopy.close()
            self.postcopy = None
        self.words = []
        for m in self.mapped:
            m.close()
        self.mapped = []
        if self.receivedmap is not None:
            self.receivedmap.close()
            self.receivedmap = None
        if self.hashes is not None:
            self.hashes.close()
            self.hashes = None
        for p in (self.pending, self.rmap_ram, self.hash_file):
            if p is not None:
                p.close()

    # ------------------------------------------------------------------ monitor handlers

    def query_migrate(self) -> dict:
        out: dict[str, object] = {"status": self.status,
                                  "total-time": round((time.monotonic() - self.start) * 1000)}
        if self.postcopy is not None:
            self.postcopy_stats = {"postcopy-requests": self.postcopy.requests,
                                   **self.postcopy.latency()}
        out.update(self.postcopy_stats)
        if self.error is not None:
            out["error-desc"] = self.error
        return out

    def query_migrate_parameters(self) -> dict:
        return {"multifd-channels": self.channels, "multifd-compression": self.compression,
                "multifd-flush-after-each-section": self.legacy,
                **tls_parameters(self.options.tls)}

    def query_migrate_capabilities(self) -> list[dict]:
        return [{"capability": "multifd", "state": self.multifd is not False},
                {"capability": "return-path", "state": self.return_path}]

    def migrate_set_parameters(self, args: dict) -> None:
        raise MfdError("set the destination's parameters with mfd incoming's options")

    def migrate_set_capabilities(self, capabilities: list[dict]) -> None:
        raise MfdError("set the destination's capabilities with mfd incoming's options")

    def migrate_cancel(self) -> None:
        self.cancel_requested = "cancelled by migrate_cancel"

    def migrate_recover(self, uri: str) -> None:
        """QEMU's migrate-recover: mfd incoming resumes on the port it listens on anyway
        (a postcopy-paused destination takes the source's next main connection)."""
        if tcp.parse_uri(uri).port != self.addr.port:
            raise MfdError(f"migrate-recover: this destination listens at {self.addr}, "
                           "and resumes there")
        if self.status != "postcopy-paused":
            raise MfdError(f"migrate-recover: the migration is {self.status}, not "
                           "postcopy-paused")


def _receive(sock: socket.socket, decoder: livestream.StreamDecoder, what: str) -> int | None:
    """Bytes from ``sock`` straight into the decoder's buffer: how many (0: closed), None
    when there were none after all."""
    try:
        return sock.recv_into(decoder.buffer())
    except BlockingIOError:
        return None
    except OSError as e:
        raise tcp.LinkLost(f"{what}: connection lost ({e.strerror})") from None


def _compare(idstr: str, theirs: bytes, ours: np.ndarray) -> None:
    diff = pagehash.first_difference(theirs, ours)
    if diff is not None:
        count, page = diff
        raise MfdError(f"RAM differs from the source's at switchover: block {idstr!r}, "
                       f"{count} page(s), first at offset {page * TARGET_PAGE_SIZE:#x}")
