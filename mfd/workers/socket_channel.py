"""multifd socket channels: one process per channel on each host, QEMU's bytes on a plain
TCP connection between them.

Mirrors ``multifd_send_thread`` / ``multifd_recv_thread`` (``migration/multifd.c``) and
``multifd-nocomp.c``: the send channel connects, writes its ``MultiFDInit_t``, then for each
packet finds the zero pages in guest RAM and ``sendmsg``s the header and the normal pages
straight from the guest's shared memory (compressed: through its streaming context); the
receive channel validates every field and reads the pages straight into the destination's
shared memory (``recvmsg_into``). Page bytes are copied twice, as QEMU copies them: into
the sender's kernel, out of the receiver's.

::

    source main (ROUTER, ipc)   send channel i                  receive channel i   dest main
      --JOB(block, pages)-->    zero check, [compress]   conn handed over by the main process
      <--DONE(bytes, mask)--    header + pages  =====>   validate, place, receivedmap
      --SYNC-->                 SYNC packet     =====>   --SYNCED(packet_num)-->
      <--DONE--                                          waits          <--RELEASE--
                                                         EOF at a packet: --CLOSED-->

Toward an mfd peer both ends hash every page they move (``mfd.shm.pagehash``): the send
channel as it sends it (JOB_HASH), the receive channel from its RAM right after placing it.

A channel whose connection fails, whose peer sends anything invalid, or whose main process
goes away fails with one line (ERROR to its main process) and exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import zmq

from mfd.errors import MfdError, ProtocolError
from mfd.protocol import messages, multifd
from mfd.protocol.constants import MULTIFD_PACKET_SIZE, TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import page_runs
from mfd.shm.pagehash import PageHashes, hash_rows
from mfd.shm.ramblock import (
    WORDS_PER_PAGE,
    DataExtents,
    MappedBlock,
    RAMBlock,
    attach,
    nonzero_pages,
)
from mfd.shm.receivedmap import ReceivedMap
from mfd.workers import tcp
from mfd.workers.file_channel import ERROR_LINGER_MS, die_with_parent
from mfd.workers.methods import get_method
from mfd.workers.tls import TLSOptions, wait_relays
from mfd.xhooks import NO_HOOKS, XHooks

POLL_MS = 500
PAGE = TARGET_PAGE_SIZE
# a packet in more runs than this is read through the mapping in one call rather than
# spliced run by run (two system calls per run)
SPLICE_RUNS = 16
_SPLICE_F_MOVE = 1
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032


@dataclass(frozen=True)
class SocketChannelConfig:
    channel_id: int
    endpoint: str  # the main process's ROUTER (ipc)
    parent_pid: int  # the main process: the channel exits when it is gone
    blocks: tuple[RAMBlock, ...]
    compression: str = "none"
    level: int = 1
    # send: where to connect, and what goes into MultiFDInit
    peer: tcp.Address | None = None
    uuid: bytes = bytes(multifd.UUID_SIZE)
    init_unused: bytes = bytes(32)  # mfd's settings (``mfd.protocol.peer``)
    zero_page_detection: bool = True  # multifd mode: the send channel finds zero pages
    connect_timeout: float = 30.0
    tls: TLSOptions | None = None  # the connection's TLS (its relay does the handshake)
    # this end's page hash table (send: filled for JOB_HASH jobs; receive: None when the
    # source is QEMU, which has nothing to compare)
    hashes: RAMBlock | None = None
    # receive: the map shared by every channel; the socket the connection comes on
    receivedmap: RAMBlock | None = None
    handoff: int = -1
    # test-only: a receive channel sleeps before placing each packet (channel_delays),
    # ignores SYNC packets (skip_sync: round order is then not kept, the test must fail),
    # damages every packet that has the fault's page, as it places it (fault)
    x: XHooks = NO_HOOKS


class _Channel:
    """What both directions share: the main-process link, RAM mappings, the connection."""

    def __init__(self, cfg: SocketChannelConfig, ctx: zmq.Context, writable: bool) -> None:
        self.cfg = cfg
        self.main = ctx.socket(zmq.DEALER)
        self.main.setsockopt(zmq.LINGER, 0)
        self.main.connect(cfg.endpoint)
        self.blocks: list[MappedBlock] = [attach(b, writable=writable) for b in cfg.blocks]
        self.words = [b.words for b in self.blocks]
        self.conn: socket.socket | None = None
        self.poller = zmq.Poller()
        self.poller.register(self.main, zmq.POLLIN)
        self.deferred: list[list[bytes]] = []  # main-process messages read by tick()
        # one packet's pages: a compressed packet's data, pages gathered or read to hash
        self.buffer = np.empty((multifd.MULTIFD_PAGE_COUNT, WORDS_PER_PAGE), dtype=np.uint64)
        self.hashes = None if cfg.hashes is None else PageHashes(cfg.hashes, list(cfg.blocks))

    def where(self) -> str:
        return f"channel {self.cfg.channel_id}"

    def tick(self) -> None:
        """Between waits on the connection: the main process must still be there, and a
        STOP from it ends the channel even while its peer does not read (QEMU's channel
        that stopped reading keeps a send waiting)."""
        if os.getppid() != self.cfg.parent_pid:
            raise SystemExit(0)
        if self.main.poll(0):
            frames = self.main.recv_multipart()
            if frames[0] == messages.STOP:
                raise SystemExit(0)
            self.deferred.append(frames)

    def handle(self, kind: bytes, job_id: int, block: int, pages: np.ndarray,
               flags: int) -> list:
        """A job from the main process."""
        raise RuntimeError(f"{self.where()} cannot do {kind!r} jobs")

    def on_ready(self, source: object) -> None:
        """A socket other than the main process's is readable (receive channels)."""

    def quiesce(self) -> None:
        """QUIESCE from the main process (only receive channels read a connection)."""

    def release(self) -> None:
        """RELEASE from the main process (only receive channels wait for one)."""

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.main.close()  # with its LINGER: 0, or time for a last ERROR to go out
        self.words = []
        if self.hashes is not None:
            self.hashes.close()
        for b in self.blocks:
            b.close()


class SendChannel(_Channel):
    def __init__(self, cfg: SocketChannelConfig, ctx: zmq.Context) -> None:
        super().__init__(cfg, ctx, writable=False)
        method = get_method(cfg.compression)
        self.flag = method.flag
        self.compressor = method.send_setup(cfg.level)
        self.nocomp = cfg.compression == "none"
        self.idstrs = [b.idstr for b in cfg.blocks]
        self.extents = [DataExtents(b.fd) for b in self.blocks]

    def start(self) -> None:
        """Connect and send ``MultiFDInit_t`` (``multifd_send_initial_packet``); without
        multifd (no peer) the channel only hashes RAM."""
        if self.cfg.peer is None:
            return
        self.conn = tcp.connect(self.cfg.peer, self.cfg.connect_timeout, self.cfg.tls)
        init = multifd.MultiFDInit(self.cfg.uuid, self.cfg.channel_id, self.cfg.init_unused)
        self._send([multifd.encode_init(init)])

    def _send(self, buffers: list) -> int:
        assert self.conn is not None
        try:
            return tcp.send_all(self.conn, buffers, self.tick)
        except tcp.LinkLost as e:
            raise tcp.LinkLost(f"{self.where()}: {e}") from None

    def handle(self, kind: bytes, job_id: int, block: int, pages: np.ndarray,
               flags: int) -> list:
        if kind == messages.SYNC:
            return self.sync(job_id)
        if kind == messages.JOB:
            return self.send_pages(job_id, block, pages, bool(flags & messages.JOB_HASH))
        return super().handle(kind, job_id, block, pages, flags)

    def send_pages(self, job_id: int, block: int, pages: np.ndarray, hash: bool) -> list:
        """A job of up to JOB_PACKETS packets, each ``multifd_send_prepare`` + write: find
        the zero pages, header and pages on the connection straight from guest memory
        (compressed: through this channel's stream). With ``hash`` each page's hash goes
        into the page hash table, read right after the packet went out (the bytes it
        sent, unless the guest wrote the page since: then it is dirty, and sent and hashed
        again in a later round)."""
        lo, hi = int(pages[0]), int(pages[-1]) + 1
        extents = self.extents[block].runs(lo, hi) if hi - lo == len(pages) else None
        moved = 0
        hashing = 0.0
        nonzero = np.ones(len(pages), dtype=bool)
        words = self.words[block]
        for n, at in enumerate(range(0, len(pages), multifd.MULTIFD_PAGE_COUNT)):
            packet = pages[at : at + multifd.MULTIFD_PAGE_COUNT]
            mask = nonzero[at : at + len(packet)]
            self._zero_check(block, packet, mask, extents)
            normal = packet[mask]
            data = None
            if len(normal) and self.nocomp:
                payload = self._views(block, normal, extents)
                size = len(normal) * PAGE
            elif len(normal):
                data = np.take(words, normal, axis=0, out=self.buffer[: len(normal)])
                payload = [self.compressor.prepare(memoryview(data).cast("B"))]
                size = memoryview(payload[0]).nbytes
            else:
                payload, size = [], 0
            header = multifd.encode_packet(
                flags=self.flag, packet_num=job_id + n, ramblock=self.idstrs[block],
                normal=normal.astype(np.uint64) * PAGE,
                zero=packet[~mask].astype(np.uint64) * PAGE, next_packet_size=size)
            moved += self._send([header, *payload])
            if hash:  # after the send: the kernel's copy left the pages in the cache
                started = time.thread_time()
                self._hash(block, packet, mask, extents, data)
                hashing += time.thread_time() - started
        return messages.encode_done(job_id, moved, nonzero, hashing=hashing)

    def _hash(self, block: int, packet: np.ndarray, mask: np.ndarray,
              extents: list[tuple[int, int]] | None, data: np.ndarray | None) -> None:
        """The packet's page hashes into the table: zero pages hash to 0; the others from
        the compressed packet's gathered ``data``, or from guest memory, where holes (sent
        as zeros without zero-page detection, see :meth:`_views`) are not read."""
        assert self.hashes is not None
        table = self.hashes.table[block]
        table[packet[~mask]] = 0
        normal = packet[mask]
        if data is not None:
            table[normal] = hash_rows(data)
        elif self.cfg.zero_page_detection or extents is None:
            self.hashes.record(block, self.words[block], normal)
        else:
            table[normal] = 0
            for start, end in _clip(extents, int(normal[0]), int(normal[-1]) + 1):
                table[start:end] = hash_rows(self.words[block][start:end])

    def _views(self, block: int, normal: np.ndarray,
               extents: list[tuple[int, int]] | None) -> list:
        """The normal pages as views of guest memory, a run of consecutive pages each.
        Without zero-page detection a first round's pages include holes: they go out from
        a page of zeros, since touching a tmpfs hole through the mapping would allocate
        it."""
        words = self.words[block]
        runs = page_runs(normal).tolist()
        if self.cfg.zero_page_detection or len(runs) != 1 or extents is None:
            return [words[lo:hi] for lo, hi in runs]
        out, at = [], runs[0][0]
        for start, end in _clip(extents, *runs[0]):
            out += [_ZEROS[: start - at], words[start:end]]
            at = end
        out.append(_ZEROS[: runs[0][1] - at])
        return out

    def _zero_check(self, block: int, packet: np.ndarray, mask: np.ndarray,
                    extents: list[tuple[int, int]] | None) -> None:
        """multifd zero-page detection in place in guest memory: ``mask`` is cleared for
        zero pages. ``extents``: where the block has data, for a job of consecutive pages
        (a first round); a scattered job's pages were written, so they all hold data."""
        if not self.cfg.zero_page_detection:
            return
        lo, hi = int(packet[0]), int(packet[-1]) + 1
        runs = [(lo, hi)] if extents is None else _clip(extents, lo, hi)
        mask[:] = nonzero_pages(self.blocks[block], packet, runs)

    def sync(self, job_id: int) -> list:
        """``multifd_send_sync_main`` (ALL) for this channel: a SYNC packet, no pages."""
        header = multifd.encode_packet(
            flags=multifd.MULTIFD_FLAG_SYNC, packet_num=job_id, ramblock="",
            normal=_NONE, zero=_NONE, next_packet_size=0)
        return messages.encode_done(job_id, self._send([header]))

    def close(self) -> None:
        self.compressor.close()
        super().close()


_NONE = np.empty(0, dtype=np.uint64)
_ZEROS = np.zeros((multifd.MULTIFD_PAGE_COUNT, WORDS_PER_PAGE), dtype=np.uint64)
_ZEROS.flags.writeable = False


def _clip(runs: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of ``runs`` inside [lo, hi)."""
    return [(max(a, lo), min(b, hi)) for a, b in runs if a < hi and b > lo]


class RecvChannel(_Channel):
    def __init__(self, cfg: SocketChannelConfig, ctx: zmq.Context) -> None:
        super().__init__(cfg, ctx, writable=True)
        method = get_method(cfg.compression)
        self.flag = method.flag
        self.nocomp = cfg.compression == "none"
        self.max_payload = method.max_payload
        self.decompressor = method.recv_setup()
        self.sizes = {b.idstr: b.used_length for b in cfg.blocks}
        self.index = {b.idstr: i for i, b in enumerate(cfg.blocks)}
        self.header = bytearray(multifd.PACKET_SIZE)
        self.payload = bytearray(0 if self.nocomp else self.max_payload)
        self.pipe = os.pipe()
        with contextlib.suppress(OSError):  # room for a whole packet: fewer splice calls
            fcntl.fcntl(self.pipe[1], _F_SETPIPE_SZ, MULTIFD_PACKET_SIZE)
        self.pipe_size = fcntl.fcntl(self.pipe[1], _F_GETPIPE_SZ)
        self.handoff = socket.socket(fileno=cfg.handoff)
        self.poller.register(self.handoff.fileno(), zmq.POLLIN)
        self.waiting = False  # at a SYNC packet, until RELEASE
        self.quiesced = False  # QUIESCE: reads nothing more, for good
        assert cfg.receivedmap is not None
        self.receivedmap = ReceivedMap(cfg.receivedmap, list(cfg.blocks))
        self.hashing = 0.0  # seconds spent hashing pages since the last SYNC

    def close(self) -> None:
        self.decompressor.close()
        self.receivedmap.close()
        self.handoff.close()
        for fd in self.pipe:
            os.close(fd)
        super().close()

    def start(self) -> None:
        """The connection comes later, from the main process (:meth:`on_ready`)."""

    def on_ready(self, source: object) -> None:
        """``source``: the descriptor the poller reported."""
        if source == self.handoff.fileno():
            self._take_connection()
        elif self.conn is not None and source == self.conn.fileno() and not self.quiesced:
            self._packet()  # (quiesced: the poll saw it readable before QUIESCE came)

    def _take_connection(self) -> None:
        """The main process accepted our source channel's connection and read its
        MultiFDInit: from now on its bytes are ours alone."""
        _, fds, _, _ = socket.recv_fds(self.handoff, 16, 1)
        if not fds:
            raise RuntimeError(f"{self.where()}: the main process handed over no connection")
        self.conn = socket.socket(fileno=fds[0])
        self.conn.setblocking(False)
        self.poller.unregister(self.handoff.fileno())
        if not self.quiesced:
            self.poller.register(self.conn.fileno(), zmq.POLLIN)

    def release(self) -> None:
        if self.waiting and not self.quiesced:
            self.waiting = False
            assert self.conn is not None
            self.poller.register(self.conn.fileno(), zmq.POLLIN)

    def quiesce(self) -> None:
        """Read no more: whatever the peer still sends never lands in RAM."""
        self.quiesced = True
        if self.conn is not None:
            with contextlib.suppress(KeyError):  # not registered: waiting, or at its end
                self.poller.unregister(self.conn.fileno())

    def _recv(self, buffers: list) -> None:
        assert self.conn is not None
        try:
            tcp.recv_into(self.conn, buffers, self.tick, "the channel")
        except tcp.LinkLost as e:
            raise tcp.LinkLost(f"{self.where()}: {e}") from None

    def _splice(self, fd: int, runs: list[tuple[int, int]]) -> None:
        """The packet's pages from the connection straight into the RAM file: socket ->
        pipe moves the kernel's buffers (the whole payload fits the pipe), pipe -> file
        copies them into the page cache once, run by run at each run's offset. Measured on
        this machine (512 MiB, loopback, a fresh tmpfs file): 0.46-0.60 s, against
        0.74-0.79 s for recvmsg_into through the mapping, which takes a fault and zeroes
        each new page before writing it."""
        assert self.conn is not None
        size = sum(hi - lo for lo, hi in runs) * PAGE
        got = 0
        while got < size:
            try:
                n = os.splice(self.conn.fileno(), self.pipe[1], size - got,
                              flags=_SPLICE_F_MOVE)
            except BlockingIOError:
                tcp.wait(self.conn, write=False, tick=self.tick)
                continue
            except OSError as e:
                raise tcp.LinkLost(f"{self.where()}: connection lost ({e.strerror})") \
                    from None
            if n == 0:
                raise tcp.LinkLost(f"{self.where()}: the peer closed the channel in the middle "
                                   "of a message")
            got += n
            if got < size and got < self.pipe_size:
                continue  # fill the pipe first: fewer calls to empty it
            runs = self._drain(fd, runs, got)
            size -= got
            got = 0

    def _drain(self, fd: int, runs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
        """Move ``n`` bytes from the pipe into the file along ``runs``; the runs left."""
        while n:
            lo, hi = runs[0]
            take = min(n, (hi - lo) * PAGE)
            moved = 0
            while moved < take:
                moved += os.splice(self.pipe[0], fd, take - moved,
                                   offset_dst=lo * PAGE + moved, flags=_SPLICE_F_MOVE)
            n -= take
            left = lo + take // PAGE
            runs = runs[1:] if left == hi else [(left, hi), *runs[1:]]
        return runs

    def _packet(self) -> None:
        """One packet from the connection (``multifd_recv_thread``), or its clean end."""
        assert self.conn is not None
        try:
            got = self.conn.recv_into(self.header)
        except BlockingIOError:
            return
        except OSError as e:
            raise tcp.LinkLost(f"{self.where()}: connection lost ({e.strerror})") from None
        if got == 0:  # at a packet boundary: the source is done with this channel
            self.poller.unregister(self.conn.fileno())
            self.main.send_multipart([messages.CLOSED])
            return
        self._recv([memoryview(self.header)[got:]])
        pkt = multifd.decode_packet(self.header, blocks=self.sizes, compression_flag=self.flag,
                                    where=self.where())
        if pkt.normal_pages and not self.nocomp and pkt.next_packet_size > self.max_payload:
            raise ProtocolError(f"{self.where()}: packet {pkt.packet_num} payload of "
                                f"{pkt.next_packet_size} bytes (at most {self.max_payload})")
        if pkt.normal_pages or pkt.zero_pages:
            if self.cfg.x.delay(self.cfg.channel_id):
                time.sleep(self.cfg.x.delay(self.cfg.channel_id))
            self.place(pkt)
        if pkt.flags & multifd.MULTIFD_FLAG_SYNC and not self.cfg.x.skip_sync:
            self.main.send_multipart(messages.encode_synced(pkt.packet_num, self.hashing))
            self.hashing = 0.0
            # wait at the SYNC: read nothing more from the connection until RELEASE
            self.poller.unregister(self.conn.fileno())
            self.waiting = True

    def place(self, pkt: multifd.MultiFDPacket) -> None:
        """``multifd_nocomp_recv`` / the compressed recv methods, then the zero pages.
        Uncompressed pages go from the socket straight into the block's RAM (spliced into
        its file run by run, or, in many short runs, read through its mapping); compressed
        ones are decompressed into this channel's buffer, then written to the block's file
        (consecutive pages) or scattered through the mapping."""
        block = self.index[pkt.ramblock]
        mapped = self.blocks[block]
        words = self.words[block]
        received = self.receivedmap.received[block]
        normal = (pkt.normal // PAGE).astype(np.intp)
        zero = (pkt.zero // PAGE).astype(np.intp)
        fault = self.cfg.x.fault
        if fault is not None and not (block == 0 and fault[1] in normal):
            fault = None
        via_file: list[tuple[int, int]] = []  # runs written to the file, not mapped here
        if fault is not None and fault[0] == "drop":
            self._recv([self.buffer[: len(normal)]] if self.nocomp
                       else [memoryview(self.payload)[: pkt.next_packet_size]])
            _say_fault("drop", mapped, normal)
            normal = normal[:0]
        elif len(normal) and self.nocomp:
            runs = page_runs(normal).tolist()
            if len(runs) <= SPLICE_RUNS:
                self._splice(mapped.fd, runs)
                via_file = runs
            else:  # QEMU's order (zero pages swapped out): one recvmsg_into, not a splice each
                self._recv([words[lo:hi] for lo, hi in runs])
        elif len(normal):
            payload = memoryview(self.payload)[: pkt.next_packet_size]
            self._recv([payload])
            data = self.buffer[: len(normal)]
            self.decompressor.recv(payload, memoryview(data).cast("B"))
            runs = page_runs(normal).tolist()
            if len(runs) == 1:  # consecutive pages in order (QEMU's need not be)
                n = os.pwrite(mapped.fd, data, runs[0][0] * PAGE)
                if n != data.nbytes:
                    raise OSError(f"short write to RAM: {n} of {data.nbytes} bytes")
                via_file = runs
            else:
                words[normal] = data
        if fault is not None and fault[0] != "drop":
            _damage(fault[0], mapped, fault[1])
        received[normal] = 1
        again = self.receivedmap.zero_pages(block, words, zero) if len(zero) else zero
        if self.hashes is not None:  # read back from RAM as placed
            started = time.thread_time()
            for lo, hi in via_file:  # mapped in one call per run, not a fault per page:
                mapped.populate(lo, hi)  # 0.68 + 0.52 us a page hashed, 2.5 + 0.52 by preadv
            self.hashes.record(block, words, normal)
            self.hashes.zeroed(block, words, zero, again)
            self.hashing += time.thread_time() - started


def _damage(fault: str, mapped: MappedBlock, page: int) -> None:
    """Test-only: damage ``page``, just placed (FAULTS)."""
    at = page * PAGE
    if fault == "corrupt":
        byte = os.pread(mapped.fd, 1, at + 100)
        os.pwrite(mapped.fd, bytes([byte[0] ^ 0x5A]), at + 100)
        _say_fault(fault, mapped, np.array([page]))
        return
    # as if it had gone to ``other`` instead, leaving ``page`` zero
    other = page + 1 if page + 1 < mapped.block.num_pages else page - 1
    os.pwrite(mapped.fd, os.pread(mapped.fd, PAGE, at), other * PAGE)
    os.pwrite(mapped.fd, bytes(PAGE), at)
    _say_fault(fault, mapped, np.array([page, other]))


def _say_fault(fault: str, mapped: MappedBlock, pages: np.ndarray) -> None:
    """One line a test reads: which pages it damaged."""
    offsets = ",".join(f"{p * PAGE:#x}" for p in np.sort(pages).tolist())
    print(f"mfd: test fault {fault}: block {mapped.block.idstr!r} offsets {offsets}",
          file=sys.stderr, flush=True)


def _loop(channel: SendChannel | RecvChannel, cfg: SocketChannelConfig) -> None:
    channel.start()
    channel.main.send_multipart(messages.encode_ready(cfg.channel_id))
    while True:
        ready = dict(channel.poller.poll(0 if channel.deferred else POLL_MS))
        if channel.deferred or channel.main in ready:
            frames = channel.deferred.pop(0) if channel.deferred else \
                channel.main.recv_multipart()
            kind = frames[0]
            if kind == messages.STOP:
                return
            if kind == messages.RELEASE:
                channel.release()
            elif kind == messages.QUIESCE:
                channel.quiesce()
                channel.main.send_multipart([messages.QUIESCED])
            elif kind in (messages.JOB, messages.SYNC):
                job_id, block, pages, flags = messages.decode_job(frames)
                channel.main.send_multipart(channel.handle(kind, job_id, block, pages, flags))
            else:
                raise RuntimeError(f"unexpected message {kind[:16]!r}")
        for source in list(ready):
            if source is not channel.main:
                channel.on_ready(source)
        if not ready and os.getppid() != cfg.parent_pid:
            return


def channel_main(cfg: SocketChannelConfig, receive: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    die_with_parent()
    if os.getppid() != cfg.parent_pid:
        return
    ctx = zmq.Context()
    channel: SendChannel | RecvChannel | None = None
    try:
        channel = RecvChannel(cfg, ctx) if receive else SendChannel(cfg, ctx)
        _loop(channel, cfg)
    except SystemExit:
        raise
    except Exception as e:
        text = str(e) if isinstance(e, MfdError) else traceback.format_exc()
        if channel is not None:
            channel.main.send_multipart([messages.ERROR, text.encode(),
                                         b"link" if isinstance(e, tcp.LinkLost) else b""])
            # the main process must read why before it sees the process gone ("died
            # unexpectedly"): closing with LINGER 0 could drop the message
            channel.main.setsockopt(zmq.LINGER, ERROR_LINGER_MS)
        raise SystemExit(1) from None
    finally:
        if channel is not None:
            channel.close()
        ctx.destroy(0)  # also a socket of a channel that failed half-built
        wait_relays()  # its connection's TLS relay, ending now that it is closed


def send_main(cfg: SocketChannelConfig) -> None:
    channel_main(cfg, receive=False)


def recv_main(cfg: SocketChannelConfig) -> None:
    channel_main(cfg, receive=True)
