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
channel as it sends it (JOB_HASH), the receive channel from its RAM right after placing it
(``mfd.shm.placer``, the hook every received page ends in).

The process around each is ``mfd.workers.channel``'s: a channel whose connection fails,
whose peer sends anything invalid, or whose main process goes away fails with one line
(ERROR to its main process) and exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import ssl
import time
from dataclasses import dataclass

import numpy as np

from mfd.errors import ProtocolError
from mfd.protocol import messages, multifd
from mfd.protocol.constants import MULTIFD_PACKET_SIZE, MULTIFD_PAGE_COUNT, TARGET_PAGE_SIZE
from mfd.protocol.mapped_ram import page_runs
from mfd.protocol.peer import MAX_PACKET_PAGES
from mfd.shm.pagehash import PageHashes, hash_rows
from mfd.shm.placer import HOT_PAGES, MappedPlacer
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
from mfd.workers.channel import Channel, Link, run_channel
from mfd.workers.methods import RecvState, get_method
from mfd.workers.tls import TLSOptions, goodbye
from mfd.xhooks import NO_HOOKS, XHooks

PAGE = TARGET_PAGE_SIZE
# a packet in more runs than this is read into the channel's buffer in one call and
# written out a run at a time, rather than spliced run by run (two system calls per run)
SPLICE_RUNS = 16
# packets read one after another before the channel looks at its main process again: no
# poll per packet while the connection has more
BURST = 16
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
    # send: the pages of a packet to an mfd peer (JOB_MFD_PACKETS jobs), as the settings say
    packet_pages: int = MULTIFD_PAGE_COUNT
    zero_page_detection: bool = True  # multifd mode: the send channel finds zero pages
    connect_timeout: float = 30.0
    tls: TLSOptions | None = None  # the connection's TLS (send: done in the channel)
    # this end's page hash table (send: filled for JOB_HASH jobs; receive: None when the
    # source is QEMU, which has nothing to compare)
    hashes: RAMBlock | None = None
    # receive: the map shared by every channel; the socket the connection comes on; which
    # blocks were allocated ahead (``--prealloc``: written through the mapping)
    receivedmap: RAMBlock | None = None
    allocated: tuple[bool, ...] = ()
    handoff: int = -1
    # test-only: a receive channel sleeps before placing each packet (channel_delays),
    # ignores SYNC packets (skip_sync: round order is then not kept, the test must fail),
    # damages every packet that has the fault's page, as it places it (fault)
    x: XHooks = NO_HOOKS


class SocketChannel(Channel):
    """What both directions share: RAM mappings, the connection."""

    def __init__(self, cfg: SocketChannelConfig, link: Link, writable: bool) -> None:
        super().__init__(link)
        self.cfg = cfg
        self.method = get_method(cfg.compression)
        self.blocks: list[MappedBlock] = [attach(b, writable=writable) for b in cfg.blocks]
        self.words = [b.words for b in self.blocks]
        self.conn: socket.socket | None = None
        self.hashes = None if cfg.hashes is None else PageHashes(cfg.hashes, list(cfg.blocks))

    def where(self) -> str:
        return f"channel {self.cfg.channel_id}"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.words = []
        if self.hashes is not None:
            self.hashes.close()
        for b in self.blocks:
            b.close()


class SendChannel(SocketChannel):
    def __init__(self, cfg: SocketChannelConfig, link: Link) -> None:
        super().__init__(cfg, link, writable=False)
        self.compressor = None if self.method.raw_pages else \
            self.method.send_setup(cfg.level, cfg.packet_pages)
        self.idstrs = [b.idstr for b in cfg.blocks]
        self.extents = [DataExtents(b.fd) for b in self.blocks]

    def start(self) -> None:
        """Connect and send ``MultiFDInit_t`` (``multifd_send_initial_packet``); without
        multifd (no peer) the channel only hashes RAM."""
        if self.cfg.peer is None:
            return
        self.conn = tcp.connect(self.cfg.peer, self.cfg.connect_timeout, self.cfg.tls,
                                relay=False)  # its TLS here: pages encrypted where they are
        init = multifd.MultiFDInit(self.cfg.uuid, self.cfg.channel_id, self.cfg.init_unused)
        self._send([multifd.encode_init(init)])

    def _send(self, buffers: list) -> int:
        assert self.conn is not None
        try:
            return tcp.send_all(self.conn, buffers, self.link.tick)
        except tcp.LinkLost as e:
            raise tcp.LinkLost(f"{self.where()}: {e}") from None

    def handle(self, kind: bytes, job_id: int, block: int, pages: np.ndarray,
               flags: int) -> list:
        page_count = self.cfg.packet_pages if flags & messages.JOB_MFD_PACKETS \
            else MULTIFD_PAGE_COUNT
        if kind == messages.SYNC:
            return self.sync(job_id, page_count)
        if kind == messages.JOB:
            return self.send_pages(job_id, block, pages, page_count,
                                   bool(flags & messages.JOB_HASH))
        return super().handle(kind, job_id, block, pages, flags)

    def send_pages(self, job_id: int, block: int, pages: np.ndarray, page_count: int,
                   hash: bool) -> list:
        """A job in packets of ``page_count`` pages, each ``multifd_send_prepare`` + write:
        find the zero pages, header and pages on the connection straight from guest memory
        (compressed: through this channel's stream, from guest memory too). With ``hash``
        each page's hash goes into the page hash table, read right after its pages went
        out, HOT_PAGES at a time while the kernel's copy left them in the cache (the bytes
        it sent, unless the guest wrote the page since: then it is dirty, and sent and
        hashed again in a later round)."""
        lo, hi = int(pages[0]), int(pages[-1]) + 1
        extents = self.extents[block].runs(lo, hi) if hi - lo == len(pages) else None
        moved = 0
        hashing = 0.0
        nonzero = np.ones(len(pages), dtype=bool)
        for n, at in enumerate(range(0, len(pages), page_count)):
            packet = pages[at : at + page_count]
            mask = nonzero[at : at + len(packet)]
            self._zero_check(block, packet, mask, extents)
            normal = packet[mask]
            # raw pages go out a part at a time, each hashed right after it was sent
            parts = _parts(normal) if hash and self.method.raw_pages and len(normal) \
                else [normal]
            payload: list = self._views(block, parts[0], extents) if len(normal) else []
            size = len(normal) * PAGE
            if payload and not self.method.raw_pages:
                payload = [self.compressor.prepare(payload)]
                size = memoryview(payload[0]).nbytes
            header = multifd.encode_packet(
                flags=self.method.flag, packet_num=job_id + n, ramblock=self.idstrs[block],
                normal=normal.astype(np.uint64) * PAGE,
                zero=packet[~mask].astype(np.uint64) * PAGE, next_packet_size=size,
                page_count=page_count)
            for i, part in enumerate(parts):
                moved += self._send([header, *payload] if i == 0 else
                                    self._views(block, part, extents))
                if hash and len(part):
                    started = time.thread_time()
                    self._hash(block, part, extents)
                    hashing += time.thread_time() - started
            if hash:
                self.hashes.table[block][packet[~mask]] = 0  # a zero page's hash (pagehash)
        return messages.encode_done(job_id, moved, nonzero, hashing=hashing)

    def _hash(self, block: int, normal: np.ndarray,
              extents: list[tuple[int, int]] | None) -> None:
        """The hashes of pages sent (``normal``, increasing) into the table, from guest
        memory, where holes (sent as zeros without zero-page detection, see :meth:`_views`)
        are not read."""
        assert self.hashes is not None
        table = self.hashes.table[block]
        if self.cfg.zero_page_detection or extents is None:
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

    def sync(self, job_id: int, page_count: int) -> list:
        """``multifd_send_sync_main`` (ALL) for this channel: a SYNC packet, no pages."""
        header = multifd.encode_packet(
            flags=multifd.MULTIFD_FLAG_SYNC, packet_num=job_id, ramblock="",
            normal=_NONE, zero=_NONE, next_packet_size=0, page_count=page_count)
        return messages.encode_done(job_id, self._send([header]))

    def close(self) -> None:
        if self.compressor is not None:
            self.compressor.close()
        if isinstance(self.conn, ssl.SSLSocket):
            goodbye(self.conn)
        super().close()


_NONE = np.empty(0, dtype=np.uint64)
_ZEROS = np.zeros((MAX_PACKET_PAGES, WORDS_PER_PAGE), dtype=np.uint64)  # not touched: calloc
_ZEROS.flags.writeable = False


def _breaks(pages: np.ndarray) -> int:
    """Where ``pages`` (in payload order) stop being consecutive: runs - 1."""
    return int(np.count_nonzero(np.diff(pages) != 1))


def _parts(pages: np.ndarray) -> list[np.ndarray]:
    """``pages`` in parts of HOT_PAGES, in their order."""
    return [pages[i : i + HOT_PAGES] for i in range(0, len(pages), HOT_PAGES)]


def _clip(runs: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of ``runs`` inside [lo, hi)."""
    return [(max(a, lo), min(b, hi)) for a, b in runs if a < hi and b > lo]


class RecvChannel(SocketChannel):
    def __init__(self, cfg: SocketChannelConfig, link: Link) -> None:
        super().__init__(cfg, link, writable=True)
        self.sizes = {b.idstr: b.used_length for b in cfg.blocks}
        self.index = {b.idstr: i for i, b in enumerate(cfg.blocks)}
        # sized for the connection's packets once it comes (_take_connection)
        self.page_count = 0
        self.decompressor: RecvState | None = None
        self.header = bytearray()
        self.pages = np.empty((0, WORDS_PER_PAGE), dtype=np.uint64)  # a packet's, decoded
        self.payload = bytearray()  # a compressed packet's payload
        self.pipe = os.pipe()
        with contextlib.suppress(OSError):  # room for a whole packet: fewer splice calls
            fcntl.fcntl(self.pipe[1], _F_SETPIPE_SZ, MULTIFD_PACKET_SIZE)
        self.pipe_size = fcntl.fcntl(self.pipe[1], _F_GETPIPE_SZ)
        self.handoff = socket.socket(fileno=cfg.handoff)
        link.watch(self.handoff.fileno())
        self.waiting = False  # at a SYNC packet, until RELEASE
        self.quiesced = False  # QUIESCE: reads nothing more, for good
        assert cfg.receivedmap is not None
        self.receivedmap = ReceivedMap(cfg.receivedmap, list(cfg.blocks))
        ram = (self.blocks, self.receivedmap.received, self.hashes, list(cfg.allocated))
        self.placer = MappedPlacer(*ram) if cfg.x.fault is None else \
            _DamagingPlacer(*ram, cfg.x.fault)

    def close(self) -> None:
        if self.decompressor is not None:
            self.decompressor.close()
        self.receivedmap.close()
        self.handoff.close()
        for fd in self.pipe:
            os.close(fd)
        super().close()

    def on_ready(self, source: object) -> None:
        """``source``: the descriptor the poller reported."""
        if source == self.handoff.fileno():
            self._take_connection()
        elif self.conn is not None and source == self.conn.fileno() and not self.quiesced:
            # (quiesced: the poll saw it readable before QUIESCE came)
            for _ in range(BURST):
                if not self._packet():
                    break

    def _take_connection(self) -> None:
        """The main process accepted our source channel's connection and read its
        MultiFDInit: from now on its bytes are ours alone. With it comes the pages of its
        packets (QEMU's 128, or what an mfd source said in its MultiFDInit)."""
        data, fds, _, _ = socket.recv_fds(self.handoff, 16, 1)
        if not fds or len(data) != 4:
            raise RuntimeError(f"{self.where()}: the main process handed over no connection")
        self.conn = socket.socket(fileno=fds[0])
        self.conn.setblocking(False)
        self.page_count = int.from_bytes(data, "big")
        self.header = bytearray(multifd.packet_size(self.page_count))
        self.pages = np.empty((self.page_count, WORDS_PER_PAGE), dtype=np.uint64)
        if not self.method.raw_pages:
            self.decompressor = self.method.recv_setup(self.page_count)
            self.payload = bytearray(self.method.max_payload(self.page_count))
        self.link.unwatch(self.handoff.fileno())
        if not self.quiesced:
            self.link.watch(self.conn.fileno())

    def release(self) -> None:
        if self.waiting and not self.quiesced:
            self.waiting = False
            assert self.conn is not None
            self.link.watch(self.conn.fileno())

    def quiesce(self) -> None:
        """Read no more: whatever the peer still sends never lands in RAM."""
        self.quiesced = True
        if self.conn is not None:
            with contextlib.suppress(KeyError):  # not registered: waiting, or at its end
                self.link.unwatch(self.conn.fileno())

    def _recv(self, buffers: list) -> None:
        assert self.conn is not None
        try:
            tcp.recv_into(self.conn, buffers, self.link.tick, "the channel")
        except tcp.LinkLost as e:
            raise tcp.LinkLost(f"{self.where()}: {e}") from None

    def _splice(self, fd: int, runs: list[tuple[int, int]]) -> None:
        """The packet's pages from the connection straight into the RAM file: socket ->
        pipe moves the kernel's buffers (a pipe's worth at a time), pipe -> file copies
        them into the page cache once, run by run at each run's offset. Measured on this
        machine (512 MiB, loopback, a fresh tmpfs file): 0.46-0.60 s, against 0.74-0.79 s
        for recvmsg_into through the mapping, which takes a fault and zeroes each new page
        before writing it."""
        assert self.conn is not None
        spans = [(lo * PAGE, hi * PAGE) for lo, hi in runs]  # bytes: a pipe's worth may
        size = sum(hi - lo for lo, hi in spans)              # end inside a page
        got = 0
        while got < size:
            try:
                n = os.splice(self.conn.fileno(), self.pipe[1], size - got,
                              flags=_SPLICE_F_MOVE)
            except BlockingIOError:
                tcp.wait(self.conn, write=False, tick=self.link.tick)
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
            spans = self._drain(fd, spans, got)
            size -= got
            got = 0

    def _drain(self, fd: int, spans: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
        """Move ``n`` bytes from the pipe into the file along ``spans`` (byte ranges);
        the spans left."""
        while n:
            lo, hi = spans[0]
            take = min(n, hi - lo)
            moved = 0
            while moved < take:
                moved += os.splice(self.pipe[0], fd, take - moved, offset_dst=lo + moved,
                                   flags=_SPLICE_F_MOVE)
            n -= take
            spans = spans[1:] if lo + take == hi else [(lo + take, hi), *spans[1:]]
        return spans

    def _packet(self) -> bool:
        """One packet from the connection (``multifd_recv_thread``), or its clean end;
        False when there is nothing more to read for now (nothing came yet, the end, or
        a SYNC packet to wait at)."""
        assert self.conn is not None
        try:
            got = self.conn.recv_into(self.header)
        except BlockingIOError:
            return False
        except OSError as e:
            raise tcp.LinkLost(f"{self.where()}: connection lost ({e.strerror})") from None
        if got == 0:  # at a packet boundary: the source is done with this channel
            self.link.unwatch(self.conn.fileno())
            self.link.send([messages.CLOSED])
            return False
        if got < len(self.header):
            self._recv([memoryview(self.header)[got:]])
        pkt = multifd.decode_packet(self.header, blocks=self.sizes,
                                    compression_flag=self.method.flag, where=self.where(),
                                    page_count=self.page_count)
        if pkt.normal_pages and pkt.next_packet_size > len(self.payload) and \
                not self.method.raw_pages:
            raise ProtocolError(f"{self.where()}: packet {pkt.packet_num} payload of "
                                f"{pkt.next_packet_size} bytes (at most "
                                f"{len(self.payload)})")
        if pkt.normal_pages or pkt.zero_pages:
            if self.cfg.x.delay(self.cfg.channel_id):
                time.sleep(self.cfg.x.delay(self.cfg.channel_id))
            self.place(pkt)
        if pkt.flags & multifd.MULTIFD_FLAG_SYNC and not self.cfg.x.skip_sync:
            self.link.send(messages.encode_synced(pkt.packet_num, self.placer.take_hashing()))
            # wait at the SYNC: read nothing more from the connection until RELEASE
            self.link.unwatch(self.conn.fileno())
            self.waiting = True
            return False
        return True

    def place(self, pkt: multifd.MultiFDPacket) -> None:
        """``multifd_nocomp_recv`` / the compressed recv methods, then the zero pages, all
        ending in the placer (``mfd.shm.placer``). Raw pages in order (an mfd source's)
        are spliced from the socket into the block's file run by run, in payload order (a
        page named twice keeps its later copy); in many runs (QEMU's, whose zero pages
        are swapped out of order) they are read into this channel's buffer at once, as
        compressed ones are decoded into it, and the placer writes them a run at a time."""
        block = self.index[pkt.ramblock]
        normal = (pkt.normal // PAGE).astype(np.intp)
        zero = (pkt.zero // PAGE).astype(np.intp)
        if self._drops(block, normal):  # test-only: received and thrown away
            scratch = self.pages if self.method.raw_pages else self.payload
            self._recv([memoryview(scratch).cast("B")[: pkt.next_packet_size]])
        elif len(normal) and self.placer.allocated[block]:
            self._into_mapping(pkt, block, normal)
        elif len(normal):
            if self.method.raw_pages and _breaks(normal) < SPLICE_RUNS:
                for part in _parts(normal):  # each hashed while it is in the cache
                    self._splice(self.blocks[block].fd, page_runs(part).tolist())
                    self.placer.placed(block, part, None)
            else:
                self.placer.pages(block, normal, self._read_pages(pkt, len(normal)))
        if len(zero):
            self.placer.zero(block, zero)

    def _into_mapping(self, pkt: multifd.MultiFDPacket, block: int, normal: np.ndarray
                      ) -> None:
        """RAM allocated ahead (``--prealloc``): its pages exist, so mapping a packet's in
        allocates nothing, and they land with one copy, as in QEMU's readv into its RAM:
        raw ones straight from the socket (a buffer per run, in payload order: a page named
        twice keeps its later copy), compressed ones decoded straight into RAM when they
        are consecutive (an mfd source's), else through the channel's buffer."""
        if not self.method.raw_pages and _breaks(normal):
            self.placer.pages(block, normal, self._read_pages(pkt, len(normal)))
            return
        self.placer.map_in(block, np.sort(normal))
        words = self.words[block]
        if self.method.raw_pages:
            for part in _parts(normal):  # each hashed while it is in the cache
                self._recv([words[lo:hi] for lo, hi in page_runs(part).tolist()])
                self.placer.placed(block, part, None)
        else:
            first = int(normal[0])
            self._decode(pkt, words[first : first + len(normal)])
            self.placer.placed(block, normal, None)

    def _read_pages(self, pkt: multifd.MultiFDPacket, count: int) -> np.ndarray:
        """The packet's ``count`` normal pages, in payload order, in this channel's buffer:
        read as they are, or decoded from the payload (straight into the buffer)."""
        pages = self.pages[:count]
        if self.method.raw_pages:
            self._recv([pages])
        else:
            self._decode(pkt, pages)
        return pages

    def _decode(self, pkt: multifd.MultiFDPacket, out: np.ndarray) -> None:
        """The packet's payload read and decoded straight into ``out`` (whole pages)."""
        payload = memoryview(self.payload)[: pkt.next_packet_size]
        self._recv([payload])
        assert self.decompressor is not None
        self.decompressor.recv(payload, memoryview(out).cast("B"))

    def _drops(self, block: int, normal: np.ndarray) -> bool:
        """Test-only (``XHooks.fault`` "drop"): this packet's pages are thrown away."""
        fault = self.cfg.x.fault
        return fault is not None and fault[0] == "drop" and block == 0 and \
            bool((normal == fault[1]).any())


class _DamagingPlacer(MappedPlacer):
    """Test-only (``XHooks.fault`` "corrupt", "misplace"): the fault's page, each time it
    is placed, damaged in RAM before the hook reads it back, so that verification must
    catch it; what it damaged the test knows from the hook (``XHooks.damaged``)."""

    def __init__(self, blocks: list[MappedBlock], received: list[np.ndarray],
                 hashes: PageHashes | None, allocated: list[bool],
                 fault: tuple[str, int]) -> None:
        super().__init__(blocks, received, hashes, allocated)
        self.fault = fault

    def placed(self, block: int, pages: np.ndarray, rows: np.ndarray | None) -> None:
        kind, page = self.fault
        if kind != "drop" and block == 0 and bool((pages == page).any()):
            ram = self.words[0].view(np.uint8).reshape(len(self.words[0]), -1)
            if kind == "corrupt":
                ram[page, 100] ^= 0x5A
            else:  # as if it had gone to the next page instead, leaving it zero
                other = page + 1 if page + 1 < len(ram) else page - 1
                ram[other] = ram[page]
                ram[page] = 0
        super().placed(block, pages, rows)


def send_main(cfg: SocketChannelConfig) -> None:
    run_channel(cfg, SendChannel)


def recv_main(cfg: SocketChannelConfig) -> None:
    run_channel(cfg, RecvChannel)
