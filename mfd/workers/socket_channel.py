"""multifd socket channels: one process per channel on each host, one TCP link between them.

Mirrors ``multifd_send_thread`` / ``multifd_recv_thread`` (``migration/multifd.c``) and
``multifd-nocomp.c``: the send channel reads its pages straight from the guest's shared memory,
finds zero pages, compresses the rest with its own streaming context and writes one
``MultiFDPacket`` (header frame + payload frame); the receive channel validates every field,
decompresses and places the pages straight into the destination's shared memory.

::

    source main (ROUTER, ipc)   send channel i            receive channel i   dest main
      --JOB(block, pages)-->    zero check, compress   (ROUTER, tcp PORT+1+i) (ROUTER, ipc)
      <--DONE(bytes, mask)--    [packet, payload] ====>  validate, decompress,
      --SYNC-->                 [SYNC packet] ========>  place, receivedmap
      <--DONE--                                          --SYNCED(packet_num)-->
                                                         waits     <--RELEASE--
      --DIGEST(chunks)-->       hash final RAM           hash final RAM <--DIGEST--
      <--DONE(digests)--                                 --DONE(digests)-->

A channel whose link goes down, whose peer sends anything invalid, or whose main process
goes away fails with one line (ERROR to its main process) and exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from dataclasses import dataclass

import numpy as np
import zmq

from mfd.errors import MfdError, ProtocolError
from mfd.protocol import messages, multifd
from mfd.protocol.constants import TARGET_PAGE_SIZE
from mfd.protocol.trailer import CHUNK_PAGES, whole_chunks
from mfd.shm.ramblock import (
    WORDS_PER_PAGE,
    MappedBlock,
    RAMBlock,
    attach,
    data_runs,
    nonzero_rows,
)
from mfd.shm.receivedmap import ReceivedMap
from mfd.workers import tcp
from mfd.workers.file_channel import die_with_parent
from mfd.workers.methods import get_method
from mfd.workers.ramdigest import packet_digest, ram_digests

POLL_MS = 500


@dataclass(frozen=True)
class SocketChannelConfig:
    channel_id: int
    endpoint: str  # the main process's ROUTER (ipc)
    parent_pid: int  # the main process: the channel exits when it is gone
    blocks: tuple[RAMBlock, ...]
    peer: str  # tcp endpoint: the destination channel's (send) or our own to bind (receive)
    uuid: bytes  # this migration's; every channel's MultiFDInit carries it
    channels: int
    compression: str = "none"
    level: int = 1
    zero_page_detection: bool = True  # multifd mode: the send channel finds zero pages
    receivedmap: RAMBlock | None = None  # receive: the map shared by every channel
    connect_timeout: float = 30.0
    # test-only: a receive channel sleeps this long before placing each packet; a receive
    # channel ignores SYNC packets (round order is then not kept: the test must fail)
    delay: float = 0.0
    skip_sync: bool = False


class _Channel:
    """What both directions share: the main-process link, RAM mappings, the peer link."""

    def __init__(self, cfg: SocketChannelConfig, ctx: zmq.Context, kind: int,
                 writable: bool) -> None:
        self.cfg = cfg
        self.main = ctx.socket(zmq.DEALER)
        self.main.setsockopt(zmq.LINGER, 0)
        self.main.connect(cfg.endpoint)
        self.blocks: list[MappedBlock] = [attach(b, writable=writable) for b in cfg.blocks]
        self.words = [b.words for b in self.blocks]
        self.peer = tcp.peer_socket(ctx, kind, immediate=kind == zmq.DEALER,
                                    buffer=tcp.CHANNEL_BUFFER)
        self.link = tcp.LinkWatch(self.peer, f"channel {cfg.channel_id}")
        self.poller = zmq.Poller()
        self.poller.register(self.main, zmq.POLLIN)
        # one packet's (or digest chunk's) pages, reused: the send side lets the link copy
        # the payload (copy=True), since a zero-copy frame would pin the buffer until sent
        # and pyzmq's release of such frames (its garbage-collector thread) cost more than
        # copying 512 KiB in cache
        self.buffer = np.empty((multifd.MULTIFD_PAGE_COUNT, WORDS_PER_PAGE), dtype=np.uint64)
        self.poller.register(self.link.monitor, zmq.POLLIN)

    def where(self) -> str:
        return f"channel {self.cfg.channel_id}"

    def wait(self, sock: zmq.Socket, event: int, deadline: float | None = None,
             what: str = "") -> None:
        """Poll ``sock`` for ``event`` while watching the link and the parent; bounded."""
        poller = zmq.Poller()
        poller.register(sock, event)
        poller.register(self.link.monitor, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(POLL_MS))
            if self.link.monitor in ready:
                self.link.check()
            if ready.get(sock, 0) & event:
                return
            if os.getppid() != self.cfg.parent_pid:
                raise SystemExit(0)
            if deadline is not None and time.monotonic() > deadline:
                raise MfdError(f"{self.where()}: {what} within {self.cfg.connect_timeout:g} s")

    def send_peer(self, frames: list) -> None:
        self.wait(self.peer, zmq.POLLOUT)
        self.peer.send_multipart(frames)

    def handle(self, kind: bytes, job_id: int, block: int, pages: np.ndarray) -> list:
        """A job from the main process; both directions hash RAM (DIGEST)."""
        if kind == messages.DIGEST:
            return self.digests(job_id, block, pages)
        raise RuntimeError(f"{self.where()} cannot do {kind!r} jobs")

    def on_peer(self) -> None:
        """The link is readable (only receive channels listen to it)."""

    def release(self) -> None:
        """RELEASE from the main process (only receive channels wait for one)."""

    def digests(self, job_id: int, block: int, pairs: np.ndarray) -> list:
        """The RAM content digests of whole chunks (``mfd.workers.ramdigest``)."""
        return messages.encode_done(job_id, 0, None,
                                    ram_digests(self.blocks[block], pairs, self.buffer))

    def close(self) -> None:
        self.link.close()
        self.peer.close(0)
        self.main.close(0)
        self.words = []
        for b in self.blocks:
            b.close()


class SendChannel(_Channel):
    def __init__(self, cfg: SocketChannelConfig, ctx: zmq.Context) -> None:
        super().__init__(cfg, ctx, zmq.DEALER, writable=False)
        method = get_method(cfg.compression)
        self.flag = method.flag
        self.compressor = method.send_setup(cfg.level)
        self.idstrs = [b.idstr for b in cfg.blocks]

    def start(self) -> None:
        """Connect and send ``MultiFDInit_t`` (``multifd_send_initial_packet``)."""
        self.peer.connect(self.cfg.peer)
        self.wait(self.peer, zmq.POLLOUT, time.monotonic() + self.cfg.connect_timeout,
                  f"no connection to {self.cfg.peer}")
        self.peer.send(multifd.encode_init(multifd.MultiFDInit(self.cfg.uuid,
                                                               self.cfg.channel_id)))

    def handle(self, kind: bytes, job_id: int, block: int, pages: np.ndarray) -> list:
        if kind == messages.SYNC:
            return self.sync(job_id)
        if kind == messages.JOB:
            return self.send_pages(job_id, block, pages)
        return super().handle(kind, job_id, block, pages)

    def send_pages(self, job_id: int, block: int, pages: np.ndarray) -> list:
        """A job of up to JOB_PACKETS packets, each ``multifd_send_prepare`` + write: copy
        the pages out of guest memory, find the zero ones, compress, header and payload on
        the link. A packet that is one whole chunk is hashed from the copy it sent
        (``mfd.main_thread.digests``)."""
        whole = set(whole_chunks(pages, self.cfg.blocks[block].num_pages)[0].tolist())
        moved = 0
        digests = bytearray()
        nonzero = np.ones(len(pages), dtype=bool)
        for n, at in enumerate(range(0, len(pages), multifd.MULTIFD_PAGE_COUNT)):
            packet = pages[at : at + multifd.MULTIFD_PAGE_COUNT]
            mask = nonzero[at : at + len(packet)]
            data = self._copy(block, packet, mask)
            if self.cfg.zero_page_detection:  # multifd: on the private copy, in cache
                rows = nonzero_rows(data, slice(0, len(data)))
                if not rows.all():
                    mask[np.flatnonzero(mask)[~rows]] = False
                    data = data[rows]
            normal = packet[mask]
            payload = self.compressor.prepare(memoryview(data).cast("B")) if len(normal) \
                else b""
            header = multifd.encode_packet(
                flags=self.flag, packet_num=job_id + n, ramblock=self.idstrs[block],
                normal=normal.astype(np.uint64) * TARGET_PAGE_SIZE,
                zero=packet[~mask].astype(np.uint64) * TARGET_PAGE_SIZE,
                next_packet_size=len(payload))
            self.send_peer([header, payload] if len(payload) else [header])
            moved += len(header) + len(payload)
            if n in whole:
                digests += packet_digest(mask, data,
                                         checked=self.cfg.zero_page_detection)
        return messages.encode_done(job_id, moved, nonzero, bytes(digests))

    def _copy(self, block: int, packet: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The packet's pages that may hold data, copied out of guest memory once into this
        channel's buffer, in page order: what is checked, compressed, sent and hashed is
        this private copy. Contiguous pages (a first round) are read with ``preadv`` (no
        page faults, no mapping to populate), with multifd zero-page detection only where
        the block's file has data: the other pages are holes, zero without a touch, and
        ``mask`` is cleared for them. Scattered
        pages (dirty ones, never holes) are gathered through the mapping."""
        mapped = self.blocks[block]
        lo, hi = int(packet[0]), int(packet[-1]) + 1
        if hi - lo != len(packet):
            return np.take(mapped.words, packet, axis=0, out=self.buffer[: len(packet)])
        # zero-page-detection none sends every page as data, holes read as zeros (reading a
        # tmpfs hole with preadv allocates nothing)
        runs = data_runs(mapped.fd, lo, hi) if self.cfg.zero_page_detection else [(lo, hi)]
        mask[:] = False
        k = 0
        for start, end in runs:
            out = self.buffer[k : k + end - start]
            n = os.preadv(mapped.fd, [out], start * TARGET_PAGE_SIZE)
            if n != out.nbytes:
                raise OSError(f"short read of guest RAM: {n} of {out.nbytes} bytes")
            mask[start - lo : end - lo] = True
            k += end - start
        return self.buffer[:k]

    def sync(self, job_id: int) -> list:
        """``multifd_send_sync_main`` (ALL) for this channel: a SYNC packet, no pages."""
        header = multifd.encode_packet(
            flags=multifd.MULTIFD_FLAG_SYNC, packet_num=job_id, ramblock="",
            normal=_NONE, zero=_NONE, next_packet_size=0)
        self.send_peer([header])
        return messages.encode_done(job_id, len(header))

    def close(self) -> None:
        self.compressor.close()
        super().close()


_NONE = np.empty(0, dtype=np.uint64)


class RecvChannel(_Channel):
    def __init__(self, cfg: SocketChannelConfig, ctx: zmq.Context) -> None:
        super().__init__(cfg, ctx, zmq.ROUTER, writable=True)
        method = get_method(cfg.compression)
        self.flag = method.flag
        self.decompressor = method.recv_setup()
        self.sizes = {b.idstr: b.used_length for b in cfg.blocks}
        self.index = {b.idstr: i for i, b in enumerate(cfg.blocks)}
        self.source: bytes | None = None  # the ZeroMQ identity of our source channel
        self.poller.register(self.peer, zmq.POLLIN)
        self.waiting = False  # at a SYNC packet, until RELEASE
        assert cfg.receivedmap is not None
        self.receivedmap = ReceivedMap(cfg.receivedmap, list(cfg.blocks))
        self._new_report()

    def close(self) -> None:
        self.decompressor.close()
        self.receivedmap.close()
        super().close()

    def _new_report(self) -> None:
        self.hashed: list[tuple[int, int]] = []
        self.digest_rows = bytearray()
        self.touched: list[np.ndarray] = []

    def report(self) -> messages.RoundReport:
        """What this round did to chunk digests (sent with SYNCED), then start afresh."""
        touched = np.concatenate(self.touched) if self.touched else np.empty((0, 2), np.uint32)
        out = messages.RoundReport(np.array(self.hashed, dtype=np.uint32).reshape(-1, 2),
                                   bytes(self.digest_rows), touched)
        self._new_report()
        return out

    def start(self) -> None:
        tcp.bind(self.peer, self.cfg.peer, self.where())

    def on_peer(self) -> None:
        synced = self.from_peer()
        if synced is not None:
            self.main.send_multipart(messages.encode_synced(synced[0], self.report()))
            # wait at the SYNC: read nothing more from the link until RELEASE
            self.poller.unregister(self.peer)
            self.waiting = True

    def release(self) -> None:
        if self.waiting:
            self.waiting = False
            self.poller.register(self.peer, zmq.POLLIN)

    def from_peer(self) -> tuple[int, ...] | None:
        """One message from the link: the handshake, a packet, or a stranger's noise.
        Returns the packet_num of a SYNC packet (the caller then waits for RELEASE)."""
        frames = self.peer.recv_multipart(copy=False)
        ident = frames[0].bytes
        body = frames[1:]
        if self.source is None:
            if len(body) != 1:
                raise ProtocolError(f"{self.where()}: expected MultiFDInit_t, got a message "
                                    f"of {len(body)} frames")
            init = multifd.decode_init(body[0].buffer, channels=self.cfg.channels,
                                       uuid=self.cfg.uuid, where=self.where())
            if init.id != self.cfg.channel_id:
                raise ProtocolError(
                    f"{self.where()}: MultiFDInit_t names channel {init.id}, on channel "
                    f"{self.cfg.channel_id}'s port (duplicate channel id?)")
            self.source = ident
            self.link.peer_fd = body[0].get(zmq.SRCFD)
            return None
        if ident != self.source:  # a second peer on a port that is in use: not ours
            with contextlib.suppress(zmq.ZMQError):
                self.peer.send_multipart([ident, b"mfd: this channel is taken"],
                                         zmq.NOBLOCK)
            return None
        if len(body) not in (1, 2):
            raise ProtocolError(f"{self.where()}: a packet of {len(body)} frames, expected "
                                "the header and at most one payload frame")
        pkt = multifd.decode_packet(body[0].buffer, blocks=self.sizes,
                                    compression_flag=self.flag, where=self.where())
        payload = body[1].buffer if len(body) == 2 else b""
        if len(payload) != pkt.next_packet_size:
            raise ProtocolError(f"{self.where()}: packet {pkt.packet_num} payload is "
                                f"{len(payload)} bytes, next_packet_size says "
                                f"{pkt.next_packet_size}")
        if pkt.normal_pages or pkt.zero_pages:
            if self.cfg.delay:
                time.sleep(self.cfg.delay)
            self.place(pkt, payload)
        if pkt.flags & multifd.MULTIFD_FLAG_SYNC and not self.cfg.skip_sync:
            return (pkt.packet_num,)
        return None

    def place(self, pkt: multifd.MultiFDPacket, payload) -> None:
        """``multifd_nocomp_recv`` / the compressed recv methods, then the zero pages.

        The payload is decompressed into this channel's buffer, in cache (uncompressed, it
        is used as it is), then written to the block's file: one ``pwrite`` for
        contiguous pages (a first round), which lets tmpfs allocate the pages without a page
        fault each (a 1 GiB receive: 1.46 -> 1.01 s of system time), or a scatter through
        the mapping for pages here and there."""
        block = self.index[pkt.ramblock]
        mapped = self.blocks[block]
        received = self.receivedmap.received[block]
        normal = (pkt.normal // TARGET_PAGE_SIZE).astype(np.intp)
        zero = (pkt.zero // TARGET_PAGE_SIZE).astype(np.intp)
        data = self.buffer[: len(normal)]
        if len(normal):
            pages = self.decompressor.recv(payload, memoryview(data).cast("B"))
            data = np.frombuffer(pages, dtype=np.uint64).reshape(-1, WORDS_PER_PAGE)
            lo, hi = int(normal[0]), int(normal[-1]) + 1
            if hi - lo == len(normal):
                n = os.pwrite(mapped.fd, data, lo * TARGET_PAGE_SIZE)
                if n != data.nbytes:
                    raise OSError(f"short write to RAM: {n} of {data.nbytes} bytes")
                received[lo:hi] = 1
            else:
                self.words[block][normal] = data
                received[normal] = 1
        if len(zero):
            self.receivedmap.zero_pages(block, self.words[block], zero)
        self._account(block, normal, zero, data)

    def _account(self, block: int, normal: np.ndarray, zero: np.ndarray,
                 data: np.ndarray) -> None:
        """A packet that is exactly one whole chunk is hashed now, from the data it just
        wrote; any other packet makes the digests of the chunks it touched stale."""
        pages = np.sort(np.concatenate((normal, zero)))
        whole, chunks = whole_chunks(pages, self.cfg.blocks[block].num_pages)
        if len(whole) and len(pages) <= CHUNK_PAGES:  # the one packet is a whole chunk
            chunk = int(chunks[0])
            mask = np.zeros(len(pages), dtype=bool)
            mask[normal - chunk * CHUNK_PAGES] = True
            if not np.all(normal[1:] > normal[:-1]):  # not in page order: hash as in RAM
                data = self.words[block][np.flatnonzero(mask) + chunk * CHUNK_PAGES]
            self.hashed.append((block, chunk))
            self.digest_rows += packet_digest(mask, data)
        else:
            chunks = np.unique(pages // CHUNK_PAGES).astype(np.uint32)
            self.touched.append(np.stack((np.full_like(chunks, block), chunks), axis=1))


def _loop(channel: SendChannel | RecvChannel, cfg: SocketChannelConfig) -> None:
    channel.start()
    channel.main.send_multipart(messages.encode_ready(cfg.channel_id))
    while True:
        ready = dict(channel.poller.poll(POLL_MS))
        if channel.link.monitor in ready:
            channel.link.check()
        if channel.main in ready:
            frames = channel.main.recv_multipart()
            kind = frames[0]
            if kind == messages.STOP:
                return
            if kind == messages.RELEASE:
                channel.release()
            elif kind in (messages.JOB, messages.SYNC, messages.DIGEST):
                job_id, block, pages = messages.decode_job(frames)
                channel.main.send_multipart(channel.handle(kind, job_id, block, pages))
            else:
                raise RuntimeError(f"unexpected message {kind[:16]!r}")
        if channel.peer in ready:
            channel.on_peer()
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
        raise SystemExit(1) from None
    finally:
        if channel is not None:
            channel.close()
        ctx.term()


def send_main(cfg: SocketChannelConfig) -> None:
    channel_main(cfg, receive=False)


def recv_main(cfg: SocketChannelConfig) -> None:
    channel_main(cfg, receive=True)
