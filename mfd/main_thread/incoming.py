"""The destination of a live migration: ``mfd incoming --listen tcp://HOST:PORT``.

::

    listen on PORT (main channel); strangers and garbage are answered and ignored
    HELLO      uuid, channels, compression; the source's address is now the only one heard
    stream     ram START: the block list -> unnamed RAM (PendingRAM), receivedmap, a paused
               guest on that RAM (or image files), N receive channels listening on
               PORT+1..PORT+N -> READY
               MULTIFD_FLUSH (legacy: EOS) -> recv sync: every channel reached its SYNC,
               then all are released (invariant 2); ZERO records: QEMU's zero-page rule;
               device sections: the guest's state; EOF
    DIGESTS    the source's RAM at switchover, chunk by chunk, against ours (hashed by the
               channels); equal -> the RAM gets its names, the guest takes it and runs
    RESULT     completed -> the source's guest quits

Until RESULT nothing has a name: a destination that fails removes its guest and its RAM,
and one killed outright leaves nothing behind (the RAM is held only by descriptors).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zmq

from mfd.errors import MfdError, ProtocolError
from mfd.main_thread.digests import ChunkTable
from mfd.main_thread.migrate import GRACE_MS, LINGER_MS, Cancelled, failure
from mfd.main_thread.pipeline import ChannelPool
from mfd.protocol import livestream, mainchannel, trailer
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.devices import GUEST_IDSTR
from mfd.shm import control
from mfd.shm.ramblock import SHM_DIR, MappedBlock, PendingRAM, RAMBlock, attach, shm_path
from mfd.shm.receivedmap import ReceivedMap, map_size
from mfd.workers import tcp
from mfd.workers.socket_channel import SocketChannelConfig, recv_main


@dataclass(frozen=True)
class IncomingOptions:
    timeout: float | None = None  # give up when no migration completed within this
    # test-only: receive channel i sleeps before placing each packet; no recv sync at all
    # (channels do not stop at SYNC packets, MULTIFD_FLUSH does not wait): round order is
    # then not kept and a test must see it fail
    channel_delays: tuple[float, ...] = ()
    skip_sync: bool = False
    stopped: bool = False  # the guest stays paused after the migration (QEMU's -S)


@dataclass
class IncomingResult:
    status: str
    blocks: dict[str, str]  # idstr -> where the RAM is now (shm path or image)
    guest: str | None
    total_time_ms: float
    setup_time_ms: float
    digests: dict[str, str] = field(default_factory=dict)
    verified: bool = False


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
        self.queue: deque[list[bytes]] = deque()
        self.pool: ChannelPool | None = None
        self.pending: PendingRAM | None = None
        self.rmap_ram: PendingRAM | None = None
        self.receivedmap: ReceivedMap | None = None
        self.guest: control.GuestClient | None = None
        self.mapped: list[MappedBlock] = []
        self.guest_state: dict | None = None

    # ------------------------------------------------------------------ main channel

    def _tick(self) -> None:
        """While waiting (also inside the pool): the link, the source's messages (queued in
        order; ERROR fails at once), cancel and the timeout."""
        try:
            self.link.check()
        except tcp.LinkLost:
            self.main.poll(GRACE_MS)  # the source's ERROR, saying why, may still be coming
            self._drain()
            raise
        if self.link.strangers:
            self.warn(f"refused {self.link.strangers} connection(s) that did not speak ZeroMQ")
            self.link.strangers = 0
        self._drain()
        if self.cancel_requested is not None:
            raise Cancelled(self.cancel_requested)
        timeout = self.options.timeout
        if timeout is not None and time.monotonic() - self.start > timeout:
            raise Cancelled(f"no migration completed within {timeout:g} s (--timeout)")

    def _drain(self) -> None:
        while self.main.poll(0):
            frames = self.main.recv_multipart(copy=False)
            ident, body = frames[0].bytes, [f.bytes for f in frames[1:]]
            if self.source is None:
                self._hello(ident, body, frames[1])
            elif ident != self.source:
                self._refuse(ident, "a migration is already in progress here")
            elif body and body[0] == mainchannel.ERROR:
                raise MfdError(f"source: {mainchannel.error_text(body)}")
            else:
                self.queue.append(body)

    def _refuse(self, ident: bytes, why: str) -> None:
        self.warn(f"refused a peer: {why}")
        with contextlib.suppress(zmq.ZMQError):
            self.main.send_multipart([ident, *mainchannel.encode_error(why)], zmq.NOBLOCK)

    def _hello(self, ident: bytes, body: list[bytes], frame: zmq.Frame) -> None:
        try:
            self.hello = mainchannel.decode_hello(body)
        except ProtocolError as e:
            self._refuse(ident, str(e))
            return
        self.source = ident
        self.link.peer_fd = frame.get(zmq.SRCFD)
        self.status = "active"

    def _next(self) -> list[bytes]:
        """The source's next message; meanwhile the channels are watched too (a channel that
        fails, say on a bad handshake, fails the migration at once)."""
        while not self.queue:
            if self.pool is not None:
                self.pool.wait(100)
            else:
                self.main.poll(100)
                self._tick()
        return self.queue.popleft()

    def _send(self, frames: list[bytes]) -> None:
        assert self.source is not None
        self.main.send_multipart([self.source, *frames])

    # ------------------------------------------------------------------ run

    def run(self) -> IncomingResult:
        self.source: bytes | None = None
        self.ctx = zmq.Context()
        self.main = tcp.peer_socket(self.ctx, zmq.ROUTER)
        self.link = tcp.LinkWatch(self.main, "main channel")
        try:
            tcp.bind(self.main, self.addr.main, "incoming")
            while self.source is None:
                self.main.poll(100)
                self._tick()
            result = self._migrate()
            self.status = "completed"
            return result
        except BaseException as e:
            self.status, self.error, why = failure(e, self.main, "source")
            if self.source is not None:
                with contextlib.suppress(Exception):
                    self._send(mainchannel.encode_error(
                        f"the destination {self.status}: {self.error}"))
            self._discard()
            if why is not None:
                raise MfdError(why) from e
            raise
        finally:
            self._release()
            self.link.close()
            self.main.close(LINGER_MS)  # RESULT or ERROR gets out before we go
            self.ctx.term()

    def _migrate(self) -> IncomingResult:
        decoder = livestream.LiveStreamDecoder()
        sync = self.options.skip_sync is False
        legacy = self.hello.flush_after_each_section
        while not decoder.done:
            frames = self._next()
            if frames[0] != mainchannel.STREAM or len(frames) != 2:
                raise ProtocolError(f"main channel: expected stream bytes, got "
                                    f"{frames[0][:16]!r}")
            for ev in decoder.feed(frames[1]):
                if isinstance(ev, livestream.Blocks):
                    self._setup(ev.blocks)
                    self._send([mainchannel.READY, b"{}"])
                elif isinstance(ev, livestream.Flush):
                    if sync and not legacy:
                        self._recv_sync()
                elif isinstance(ev, livestream.SectionEnd):
                    if sync and legacy:
                        self._recv_sync()
                elif isinstance(ev, livestream.ZeroPages):
                    self._zero(ev.idstr, ev.pages)
                elif isinstance(ev, livestream.Page):
                    self._page(ev.idstr, ev.page, ev.data)
                elif isinstance(ev, livestream.Device) and ev.state.idstr == GUEST_IDSTR:
                    self.guest_state = ev.state.fields["guest"]  # type: ignore[assignment]
        if self.pool is None:
            raise ProtocolError("main channel: the stream ended without a RAM block list")
        chunks = {b.idstr: trailer.num_chunks(b.num_pages) for b in self.blocks}
        ours = self._ram_digests()  # while the source hashes its side
        frames = self._next()
        if frames[0] != mainchannel.DIGESTS:
            raise ProtocolError(f"main channel: expected DIGESTS after EOF, got "
                                f"{frames[0][:16]!r}")
        theirs = mainchannel.decode_digests(frames, chunks)
        for b in self.blocks:
            _compare(b.idstr, theirs[b.idstr], ours[b.idstr])
        where = self._commit()
        self._send(mainchannel.encode_json(mainchannel.RESULT, {"status": "completed"}))
        return IncomingResult("completed", where, self.guest_name if self.guest else None,
                              (time.monotonic() - self.start) * 1000, self.setup_time * 1000,
                              {k: trailer.blake3_of(v) for k, v in ours.items()}, True)

    def _recv_sync(self) -> None:
        """Every channel at its SYNC; then what the round did to the chunk digests."""
        self.chunks.merge(self._pool().recv_sync())

    def _pool(self) -> ChannelPool:
        if self.pool is None:
            raise ProtocolError("main channel: MULTIFD_FLUSH before the RAM block list")
        return self.pool

    # ------------------------------------------------------------------ setup

    def _setup(self, blocks: list[tuple[str, int]]) -> None:
        """The block list arrived: RAM without names, receivedmap, guest, channels."""
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
        self.chunks = ChunkTable(self.blocks)
        self.rmap_ram = PendingRAM(SHM_DIR, [("receivedmap", map_size(self.blocks))])
        self.receivedmap = ReceivedMap(self.rmap_ram.blocks[0], self.blocks)
        self.mapped = [attach(b, writable=True) for b in self.blocks]
        self.words = [m.words for m in self.mapped]
        if self.images is None:
            self.guest_name = self.guest_name or self.hello.guest or "vm0"
            argv = ["--name", self.guest_name, "--stopped"]
            for b in self.blocks:
                argv += ["--attach", f"{b.idstr}={b.path}"]
            self.guest = control.start_guest_daemon(argv, self.guest_name)
        delays = self.options.channel_delays
        configs = [SocketChannelConfig(
            channel_id=i, endpoint="", parent_pid=0, blocks=tuple(self.blocks),
            peer=self.addr.channel(i), uuid=self.hello.uuid, channels=self.hello.channels,
            compression=self.hello.compression, receivedmap=self.rmap_ram.blocks[0],
            delay=delays[i] if i < len(delays) else 0.0, skip_sync=self.options.skip_sync)
            for i in range(self.hello.channels)]
        self.pool = ChannelPool(configs, recv_main)
        self.pool.tick = self._tick
        self.pool.watch(self.main, self._drain)
        self.setup_time = time.monotonic() - self.start

    def _zero(self, idstr: str, pages: np.ndarray) -> None:
        """Zero records on the main stream: QEMU's rule, as the channels apply it."""
        block = self.index[idstr]
        self.chunks.stale(block, pages)
        self.receivedmap.zero_pages(block, self.words[block], pages)

    def _page(self, idstr: str, page: int, data: bytes) -> None:
        block = self.index[idstr]
        self.chunks.stale(block, np.array([page]))
        self.words[block][page] = np.frombuffer(data, dtype=np.uint64)
        self.receivedmap.received[block][page] = 1

    # ------------------------------------------------------------------ completion

    def _ram_digests(self) -> dict[str, bytes]:
        """Our RAM, chunk by chunk: what the channels hashed as they placed it, and the
        chunks touched since, hashed now."""
        self.chunks.complete(self._pool())
        return self.chunks.tables()

    def _commit(self) -> dict[str, str]:
        """Name the RAM; the guest takes it and runs (or the images appear)."""
        assert self.pending is not None
        self._pool().close()
        self.pool = None
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
            workload = (self.guest_state or {}).get("workload") or \
                self.guest.query()["workload"]
            self.guest.execute("commit", blocks=paths, workload=workload,
                               run=not self.options.stopped)
            named.clear()  # the guest owns them now
            self.guest.close()
            self.guest = None
            return paths
        finally:
            for p in named:
                with contextlib.suppress(OSError):
                    os.unlink(p)

    def _discard(self) -> None:
        if self.guest is not None:
            with contextlib.suppress(MfdError):
                self.guest.quit()
            self.guest.close()
            self.guest = None

    def _release(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self.words = []
        for m in self.mapped:
            m.close()
        self.mapped = []
        if self.receivedmap is not None:
            self.receivedmap.close()
            self.receivedmap = None
        for p in (self.pending, self.rmap_ram):
            if p is not None:
                p.close()

    # ------------------------------------------------------------------ monitor handlers

    def query_migrate(self) -> dict:
        out: dict[str, object] = {"status": self.status,
                                  "total-time": round((time.monotonic() - self.start) * 1000)}
        if self.error is not None:
            out["error-desc"] = self.error
        return out

    def query_migrate_parameters(self) -> dict:
        hello = getattr(self, "hello", None)
        if hello is None:
            return {}
        return {"multifd-channels": hello.channels, "multifd-compression": hello.compression}

    def query_migrate_capabilities(self) -> list[dict]:
        return [{"capability": "multifd", "state": True}]

    def migrate_set_parameters(self, args: dict) -> None:
        raise MfdError("the destination takes its parameters from the source")

    def migrate_set_capabilities(self, capabilities: list[dict]) -> None:
        raise MfdError("the destination takes its capabilities from the source")

    def migrate_cancel(self) -> None:
        self.cancel_requested = "cancelled by migrate_cancel"


def _compare(idstr: str, theirs: bytes, ours: bytes) -> None:
    a = np.frombuffer(theirs, dtype=np.uint8).reshape(-1, trailer.DIGEST_SIZE)
    b = np.frombuffer(ours, dtype=np.uint8).reshape(-1, trailer.DIGEST_SIZE)
    bad = np.flatnonzero((a != b).any(axis=1))
    if len(bad):
        chunk = trailer.CHUNK_PAGES * TARGET_PAGE_SIZE
        raise MfdError(f"RAM differs from the source's at switchover: block {idstr!r}, "
                       f"{len(bad)} chunk(s) of {chunk >> 10} KiB, first at offset "
                       f"{int(bad[0]) * chunk:#x}")
