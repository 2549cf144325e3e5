"""The source of a live migration over TCP: QEMU's precopy with multifd, as processes.

What goes on the wire is QEMU's, byte for byte (``shared/qemu-wire.md``), so the
destination may be ``mfd incoming`` or a real QEMU (``-incoming tcp:...``)::

    connect   the main channel; N channel processes connect to the same address, each
              writes MultiFDInit_t (mfd's settings in its unused bytes)
    setup     stream: header, configuration, OPEN_RETURN_PATH, PING(1), PING(MFD_PING);
              ram START (MEM_SIZE, block list); SYNC on every channel + MULTIFD_FLUSH; EOS.
              The PONG to MFD_PING says who the destination is (``mfd.protocol.peer``).
    rounds    PART: pages to idle channels (without multifd: PAGE/ZERO records on the main
              channel), SYNC ALL + MULTIFD_FLUSH at the end of every pass over RAM (legacy
              --multifd-flush-after-each-section: SYNC only, the destination syncs at EOS);
              EOS (to mfd: PING(MFD_ROUND_PING), whose PONG says how far behind the
              destination is); bitmap sync; convergence, auto-converge
    complete  stop the guest; SWITCHOVER_START; END: the final round; timer, globalstate
              (and to mfd: the guest's own state); EOF; vmdesc; to mfd: the page hashes
              (``mfd.shm.pagehash``: the channels hashed every page as they sent it)
    result    the return path: SHUT(0) -> completed, our guest quits; SHUT(1), a closed
              connection, or mfd's MFD_RESULT(failed) -> failed

Anything that goes wrong (the destination's failure, a lost connection, a dead channel,
cancel, the timeout, Ctrl-C) closes the connections and lets our guest run again: the
source stays authoritative until the destination has said SHUT(0).
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np

from mfd.errors import BrokenPipeline, MfdError, ProtocolError, UsageError
from mfd.main_thread.pipeline import ChannelPool
from mfd.main_thread.precopy import Precopy, Progress
from mfd.main_thread.xbzrle import XbzrleCache
from mfd.options import MigrateOptions, MigrationParameters
from mfd.protocol import constants as C
from mfd.protocol import (
    devices,
    messages,
    peer,
    postcopy,
    ram,
    returnpath,
    stream,
    trailer,
    xbzrle,
)
from mfd.protocol.mapped_ram import page_runs
from mfd.shm import pagehash
from mfd.shm.control import GuestClient
from mfd.shm.ramblock import SHM_DIR, DataExtents, PendingRAM, RAMBlock, nonzero_pages
from mfd.workers import tcp
from mfd.workers.socket_channel import SocketChannelConfig, send_main
from mfd.workers.tls import TLSOptions, tls_parameters, wait_relays

RESULT_TIMEOUT = 60.0  # the destination loads the device state, hashes its RAM, starts
PEER_TIMEOUT = 30.0  # the destination answers PING once it reads the main channel
GRACE_S = 0.3  # after a lost channel, time for the destination's own reason to show up
# packets per job handed to an idle channel: each job costs the main process a round trip
# (~60 us), as much as a channel spends on a packet; 8 packets per job cut that 8-fold
# while a job still takes only milliseconds (the channel writes one packet at a time)
JOB_PACKETS = 8
# pages per sendmsg of PAGE records on the main channel (two buffers each, <= IOV_MAX)
INLINE_PAGES = tcp.IOV_MAX // 2
_PING = 1  # QEMU's own first PING value
# how fast the switchover's verification goes beyond hashing the final round's pages (which
# the channels do as they move them, inside the bandwidth measured): the source's table out
# on the main channel and the destination's comparison, in table bytes per second. Measured
# here: 2 MiB of table (1 GiB of RAM) in ~4 ms, end to end; half that rate, to be safe.
VERIFY_RATE = 250 << 20


class Cancelled(MfdError):
    """``migrate_cancel``, the timeout, or Ctrl-C."""




class Migration(Precopy):
    def __init__(self, uri: str, blocks: list[RAMBlock], params: MigrationParameters,
                 options: MigrateOptions, guest: GuestClient | None = None,
                 progress: Progress | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        super().__init__(blocks, params, guest, progress,
                         batch_pages=JOB_PACKETS * C.MULTIFD_PAGE_COUNT)
        self.addr = tcp.parse_uri(uri)
        self.uri = uri
        self.options = options
        self.tls = self._tls(self.addr)
        self.warn = warn or (lambda line: None)
        self.error: str | None = None  # why it failed or was cancelled
        self.cancel_requested: str | None = None  # set by the monitor thread
        self.pending_params: MigrationParameters | None = None  # likewise
        self.lock = threading.Lock()
        self.result: dict = {}
        self.digests: dict[str, str] = {}
        self.hash_file: PendingRAM | None = None
        self.hashes: pagehash.PageHashes | None = None
        self.sock: socket.socket | None = None
        self.returns = returnpath.ReturnPathDecoder()
        self.peer_mfd: bool | None = None  # None until the PONG to MFD_PING says
        self.shut: int | None = None  # the destination's SHUT status
        self.closed = False  # the destination closed the main channel
        self.last_block: int | None = None  # the block the main channel last named
        self.round_pings: deque[float] = deque()  # when each unanswered round PING went
        self.destination_lag = 0.0  # seconds the destination took to finish the last round
        self.postcopy_requested = False  # migrate-start-postcopy
        self.in_postcopy = False  # the destination's guest may run: never resume ours
        self.unsent: list[np.ndarray] = []  # postcopy: pages not sent since the switch
        self.requests: deque[tuple[int, int, int]] = deque()  # (block, first page, pages)
        self.sizes = {b.idstr: b.used_length for b in blocks}  # what requests may name
        self.index = {b.idstr: i for i, b in enumerate(blocks)}
        self.last_request: str | None = None
        self.preempt: socket.socket | None = None  # postcopy-preempt's channel
        self.preempt_block: int | None = None  # the block its records last named
        self.resume_uri: str | None = None  # postcopy-paused: QMP migrate resume=true
        self.monitored = False  # a QMP monitor serves this migration: it can be resumed
        self.bitmaps_due: set[str] = set()  # recovery: blocks whose RECV_BITMAP is awaited
        self.resume_acked = False
        self.xbzrle = XbzrleCache(self.params.xbzrle_cache_size) if options.xbzrle else None
        self.stats.xbzrle = self.xbzrle.counters if self.xbzrle is not None else None
        # each block's first RAM address: the XBZRLE cache's keys, as QEMU's ram_addr_t
        self.block_base = np.cumsum([0] + [b.used_length for b in blocks[:-1]])
        self.round_pages = 0  # pages the round handled since its start (cache-miss-rate)

    # ------------------------------------------------------------------ main channel

    def _stream(self, data: bytes | list) -> None:
        """Stream bytes on the main channel (a list: buffers sent without a copy)."""
        assert self.sock is not None
        try:
            sent = tcp.send_all(self.sock, data if isinstance(data, list) else [data],
                                self._tick)
        except tcp.LinkLost as e:
            raise tcp.LinkLost(f"main channel: {e}") from None
        self.stats.transferred += sent

    def _on_return_path(self) -> None:
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
                pool = getattr(self, "pool", None)  # none yet if the channels did not start
                if pool is not None:
                    pool.unwatch(self.sock)  # at its end for good: poll it no more
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
            self.unsent[self.index[idstr]] = ~received  # what it lacks is dirty again
            self.bitmaps_due.discard(idstr)
        elif msg.type == returnpath.RESUME_ACK and self.in_postcopy:
            self.resume_acked = True
        elif msg.type in (returnpath.REQ_PAGES, returnpath.REQ_PAGES_ID) and self.in_postcopy:
            req = postcopy.decode_request(msg, self.sizes, self.last_request)
            self.last_request = req.idstr
            self.requests.append((self.index[req.idstr], req.start // C.TARGET_PAGE_SIZE,
                                  req.length // C.TARGET_PAGE_SIZE))
            self.stats.postcopy_requests += 1
        else:
            raise ProtocolError(f"return path: {msg.name} is not something a precopy "
                                "destination sends")

    def _tick(self) -> None:
        """Every <= 100 ms while waiting: the destination, cancel, the timeout, parameters
        set through the monitor."""
        self._on_return_path()
        self._check_destination()
        if self.cancel_requested is not None:
            raise Cancelled(self.cancel_requested)
        timeout = self.options.timeout
        if timeout is not None and time.monotonic() - self.stats.start > timeout:
            raise Cancelled(f"migration did not complete within {timeout:g} s (--timeout)")
        with self.lock:
            params, self.pending_params = self.pending_params, None
        if params is not None:
            self.set_params(params)
        if self.progress is not None and self.stats.status == "active":
            self.stats.bandwidth = self.meter.bandwidth
            self.progress(self.stats)

    def _check_destination(self) -> None:
        """The destination's verdict, once it gave one before we expected it."""
        if self.result.get("status") == "failed" or self.shut not in (None, 0):
            raise MfdError(self._failed_why())
        if self.closed and self.shut is None:
            raise tcp.LinkLost("main channel: connection lost (the destination closed it)")

    def _failed_why(self) -> str:
        if self.result.get("error"):
            return f"destination: {self.result['error']}"
        if self.shut is not None:
            return f"the destination failed to load the migration (SHUT {self.shut})"
        return "the destination closed the connection without a result"

    def _wait_for(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise MfdError(f"the destination did not {what} within {timeout:g} s")
            if self.closed:
                return
            tcp.wait(self.sock, write=False, tick=None)  # type: ignore[arg-type]
            self._tick()

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        self.stats.status = "setup"
        completed = False
        try:
            self.addr = self.addr.resolved()
            self.sock = tcp.connect(self.addr, self.options.connect_timeout, self.tls)
            live = self.start_guest_log()
            self.extents = [DataExtents(m.fd) for m in self.mapped]
            self.hash_file = PendingRAM(SHM_DIR, [("pagehash",
                                                   pagehash.table_size(self.blocks))])
            self.hashes = pagehash.PageHashes(self.hash_file.blocks[0], self.blocks)
            with self._channels() as pool:
                self.pool = pool
                pool.watch(self.sock, self._on_return_path)
                self._setup_stream()
                self._flush_and_sync()
                self._stream(ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID))
                self._wait_for(lambda: self.peer_mfd is not None, PEER_TIMEOUT,
                               "answer PING")
                self._check_destination()
                self.stats.setup_time = time.monotonic() - self.stats.start
                self.stats.status = "active"
                self.iterate(live)
                if self.postcopy_due():
                    self._postcopy()
                else:
                    self._complete()
            completed = True
        except BaseException as e:
            setup = self.stats.status == "setup"
            self.stats.status, self.error, why = failure(e, self._destination_reason)
            if why is None and setup and self.tls is not None and self.error.endswith(
                    "(the destination closed it)"):  # TLS 1.3: a client learns late
                why = f"{self.error}: did it refuse this end's TLS certificate? (its log says)"
            if self.in_postcopy:  # the destination's guest may have run: ours is stale
                self.stats.status = "postcopy-paused"
                raise MfdError(
                    f"postcopy failed after the switch ({why or self.error}): the guest is "
                    "paused here and is not resumed by itself, as QEMU's postcopy-paused "
                    "(it holds every page the destination did not receive)") from e
            self.resume_guest()
            if why is not None:
                raise MfdError(why) from e
            raise
        finally:
            self.release()
            if self.preempt is not None:
                self.preempt.close()
            if self.hashes is not None:
                self.hashes.close()
            if self.hash_file is not None:
                self.hash_file.close()
            if self.sock is not None:
                self.sock.close()
            wait_relays()
        if completed and self.guest is not None and not self.options.keep_source:
            with contextlib.suppress(MfdError):
                self.guest.quit()  # it runs on the destination now

    def set_params(self, params: MigrationParameters) -> None:
        """After the switch to postcopy the push's rate is max-postcopy-bandwidth."""
        super().set_params(params)
        if self.in_postcopy:
            self.limiter.set_bandwidth(params.max_postcopy_bandwidth)

    def _tls(self, addr: tcp.Address) -> TLSOptions | None:
        """The TLS options for connections to ``addr``: the name its certificate must carry
        is tls-hostname, else the URI's host (QEMU's rule), before any lookup."""
        tls = self.options.tls
        if tls is None or tls.hostname:
            return tls
        return replace(tls, hostname=addr.host.strip("[]"))

    def _destination_reason(self) -> str | None:
        """The destination's own verdict, if it gave one just before a channel lost its
        connection (SHUT, or an mfd destination's reason, says why better)."""
        deadline = time.monotonic() + GRACE_S
        with contextlib.suppress(MfdError, OSError):
            while time.monotonic() < deadline and not self.closed and self.shut is None:
                if self.sock is not None:
                    tcp.wait(self.sock, write=False, tick=None)
                    self._on_return_path()
        return self._failed_why() if self.shut not in (None, 0) or self.result.get("error") \
            else None

    def _channels(self) -> ChannelPool:
        """N send channels, connected before the main stream says a word of RAM (QEMU's
        destination reads the main channel only once every channel is there). Without
        multifd there are none: the main channel carries the pages."""
        level = (self.params.multifd_zstd_level if self.params.multifd_compression == "zstd"
                 else self.params.multifd_zlib_level)
        n = self.params.multifd_channels if self.options.multifd else 0
        settings = peer.encode_settings(peer.ChannelSettings(
            n, self.params.multifd_compression, self.options.flush_after_each_section,
            self.options.verify))
        configs = [SocketChannelConfig(
            channel_id=i, endpoint="", parent_pid=0, blocks=tuple(self.blocks),
            compression=self.params.multifd_compression, level=level,
            peer=self.addr if self.options.multifd else None, uuid=self.options.uuid,
            init_unused=settings,
            zero_page_detection=self.params.zero_page_detection == "multifd",
            connect_timeout=self.options.connect_timeout, tls=self.tls,
            hashes=self.hash_file.blocks[0] if self.hash_file else None) for i in range(n)]
        assert self.sock is not None
        return ChannelPool(configs, send_main, inherited=(self.sock,), tick=self._tick)

    @property
    def verifying(self) -> bool:
        """Both ends hash what they move and compare at switchover: an mfd destination,
        unless --no-verify."""
        return bool(self.peer_mfd) and self.options.verify

    def _setup_stream(self) -> None:
        cfg = stream.Configuration(self.options.machine)
        self._stream(
            stream.encode_file_header() + stream.encode_configuration(cfg)
            + stream.encode_command(stream.Command(C.MIG_CMD_OPEN_RETURN_PATH))
            + stream.encode_command(stream.Command(C.MIG_CMD_PING, _PING.to_bytes(4, "big")))
            + stream.encode_command(stream.Command(C.MIG_CMD_PING,
                                                   peer.MFD_PING.to_bytes(4, "big")))
            + (postcopy.encode_advise() if self.options.postcopy else b"")
            + stream.encode_section_start(C.QEMU_VM_SECTION_START, devices.RAM_SECTION_ID,
                                          C.RAM_SECTION_IDSTR, 0, C.RAM_SECTION_VERSION)
            + ram.encode_mem_size(self.stats.total)
            + b"".join(ram.encode_block_entry(b.idstr, b.used_length) for b in self.blocks))

    def _flush_and_sync(self) -> None:
        """``multifd_ram_flush_and_sync``: every channel finishes its work and puts a SYNC
        packet on its connection; then MULTIFD_FLUSH on the main stream (not in legacy
        mode, where the destination syncs at EOS instead). Nothing without multifd."""
        if not self.options.multifd:
            return
        self.pool.sync(messages.SYNC)
        if not self.options.flush_after_each_section:
            self._stream(ram.encode_multifd_flush())

    # ------------------------------------------------------------------ precopy hooks

    def begin_section(self, final: bool) -> None:
        kind = C.QEMU_VM_SECTION_END if final else C.QEMU_VM_SECTION_PART
        self._stream(stream.encode_section_part(kind, devices.RAM_SECTION_ID))
        self.last_block = None  # QEMU names the block again in every section

    def end_round(self) -> None:
        if self.options.multifd and self.options.flush_after_each_section:
            self.pool.sync(messages.SYNC)  # per section: SYNC packets, EOS syncs the receiver
        else:
            self._flush_and_sync()

    def end_section(self, final: bool) -> None:
        if self.xbzrle is not None:
            self.xbzrle.counters.end_round(self.round_pages)
            self.round_pages = 0
        data = ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID)
        if self.peer_mfd and not final:
            data += stream.encode_command(stream.Command(
                C.MIG_CMD_PING, peer.MFD_ROUND_PING.to_bytes(4, "big")))
            self.round_pings.append(time.monotonic())
        self._stream(data)

    def send_pages(self, block: int, pages: np.ndarray) -> None:
        if not self.options.multifd:
            self._send_inline(block, pages)
            return
        flags = messages.JOB_HASH if self.verifying else 0
        self.pool.send(block, pages, self._sent(block, pages), flags=flags)

    def on_legacy_zero(self, block: int, pages: np.ndarray) -> None:
        """zero-page-detection=legacy: RAM_SAVE_FLAG_ZERO records on the main stream."""
        if self.verifying:
            assert self.hashes is not None
            self.hashes.table[block][pages] = 0
        self._stream(self._zero_records(block, pages))

    def _zero_records(self, block: int, pages: np.ndarray) -> bytes:
        addrs = pages.astype(np.int64) * C.TARGET_PAGE_SIZE
        first = ram.encode_zero_page(int(addrs[0]), self._name(block))
        return first + ram.encode_zero_records(addrs[1:])

    def _name(self, block: int) -> str | None:
        """The block's idstr for a record that does not CONTINUE the block named last."""
        if self.last_block == block:
            return None
        self.last_block = block
        return self.blocks[block].idstr

    def _send_inline(self, block: int, pages: np.ndarray) -> None:
        """Without multifd the main channel carries the pages (``ram_save_page``): zero
        pages as ZERO records (found here; holes without a touch), the others as PAGE
        records, each header followed by the page straight from guest memory."""
        words = self.mapped[block].words
        nonzero = np.ones(len(pages), dtype=bool)
        if self.params.zero_page_detection != "none":
            lo, hi = int(pages[0]), int(pages[-1]) + 1
            runs = self.extents[block].runs(lo, hi) if hi - lo == len(pages) else None
            nonzero = nonzero_pages(self.mapped[block], pages, runs)
        before = self.stats.transferred
        zero = pages[~nonzero]
        if len(zero):
            self._stream(self._zero_records(block, zero))
        normal = pages[nonzero]
        if self.verifying:  # no channel to hash them: the main process does, as QEMU's
            assert self.hashes is not None  # migration thread carries them
            self.hashes.table[block][zero] = 0
            self.hashes.record(block, words, normal)
        # QEMU's xbzrle_started: from the second round on (the cache holds what went);
        # never in postcopy (its destination takes whole and zero pages only)
        if self.xbzrle is not None and self.stats.dirty_sync_count >= 1 \
                and not self.in_postcopy:
            self._send_xbzrle(block, zero, normal)
        else:
            self._send_whole(block, normal, _rows(words, normal))
        moved = self.stats.transferred - before
        self.stats.transferred = before  # on_done counts it
        self.on_done(block, pages, moved, nonzero, b"")
        # no pool waits between batches here (the rate limiter sleeps, the socket rarely
        # blocks): cancel, --timeout and the monitor's parameters are seen each batch
        self._tick()

    def _send_whole(self, block: int, pages: np.ndarray, rows: Iterable) -> None:
        """PAGE records, each header followed by the page's bytes (``rows``, in order)."""
        rows = iter(rows)
        for at in range(0, len(pages), INLINE_PAGES):
            part = pages[at : at + INLINE_PAGES]
            self._stream(_page_records(part, itertools.islice(rows, len(part)),
                                       self._name(block)))

    def _send_xbzrle(self, block: int, zero: np.ndarray, normal: np.ndarray) -> None:
        """``save_xbzrle_page`` for the batch (mfd.main_thread.xbzrle): zero pages go into
        the cache, the others are copied once and sent whole or as their deltas."""
        assert self.xbzrle is not None
        base, generation = int(self.block_base[block]), self.stats.dirty_sync_count
        page = np.int64(C.TARGET_PAGE_SIZE)
        if len(zero):
            self.xbzrle.zero_pages(base + zero * page, generation)
        self.round_pages += len(zero) + len(normal)
        if not len(normal):
            return
        rows = self.mapped[block].words.view(np.uint8)[normal]  # QEMU's current_buf
        batch = self.xbzrle.encode(base + normal * page, rows, generation, self.final_round)
        self._send_whole(block, normal[batch.whole], batch.rows)
        if len(batch.encoded):
            before = self.stats.transferred
            self._stream(xbzrle.encode_records(normal[batch.encoded] * page, batch.lengths,
                                               batch.starts, batch.data, self._name(block)))
            # QEMU counts each record but its 8-byte header (idstr included)
            self.xbzrle.counters.bytes += self.stats.transferred - before \
                - 8 * len(batch.encoded)

    # ------------------------------------------------------------------ completion

    def switchover_cost(self) -> float:
        """Seconds the switchover takes beyond sending the final round, with an mfd
        destination: it finishes placing and hashing what is in flight (as far behind as
        it was at the end of the last round: MFD_ROUND_PING), then receives our page hash
        table and compares it with its own (VERIFY_RATE), before it answers."""
        if not self.peer_mfd or self.hash_file is None:
            return 0.0
        table = self.hash_file.blocks[0].used_length if self.verifying else 0
        return self.destination_lag + table / VERIFY_RATE

    def _device_state(self, status: dict | None) -> bytes:
        """timer, globalstate and, to mfd, the guest's own state (its workload)."""
        runstate = "running" if self.was_running else "paused"
        data = (stream.encode_section_start(C.QEMU_VM_SECTION_FULL, devices.TIMER_SECTION_ID,
                                            "timer", 0, 2)
                + devices.encode_timer() + stream.encode_footer(devices.TIMER_SECTION_ID)
                + stream.encode_section_start(C.QEMU_VM_SECTION_FULL,
                                              devices.GLOBALSTATE_SECTION_ID, "globalstate",
                                              0, 1)
                + devices.encode_globalstate(runstate)
                + stream.encode_footer(devices.GLOBALSTATE_SECTION_ID))
        if status is not None and self.peer_mfd:
            guest_state = {"name": status["name"], "runstate": runstate,
                           "workload": status["workload"]}
            data += (stream.encode_section_start(C.QEMU_VM_SECTION_FULL,
                                                 devices.GUEST_SECTION_ID, devices.GUEST_IDSTR,
                                                 0, devices.GUEST_VERSION)
                     + devices.encode_guest(guest_state)
                     + stream.encode_footer(devices.GUEST_SECTION_ID))
        elif status is not None and status["workload"].get("kind") == "kvm":
            self.warn("the destination is QEMU: the guest's KVM vCPU state has no place in "
                      "QEMU's -machine none, only its RAM goes")
        return data

    def _complete(self) -> None:
        status = self.stop_guest()
        self._stream(stream.encode_command(stream.Command(C.MIG_CMD_SWITCHOVER_START)))
        self.pool.take_hashing()
        self.round(final=True)
        hashing = self.pool.take_hashing()
        self._stream(self._device_state(status) + stream.encode_eof()
                     + stream.encode_vmdesc(devices.vmdesc_json(self.options.machine, ())))
        self._finish(hashing)

    def _finish(self, hashing: list[float]) -> None:
        """After EOF and the vmdesc: the page hashes to an mfd destination, its verdict."""
        sending = time.monotonic()
        if self.verifying:
            assert self.hashes is not None
            self._stream(peer.encode_hashes(self.hashes.tables()))
        elif self.peer_mfd:
            self._stream(peer.encode_hashes({}))  # none: --no-verify
        else:
            self.warn("the destination is QEMU: RAM is not verified at switchover (QEMU "
                      "has no digests to compare)")
        sending = time.monotonic() - sending
        self._wait_for(lambda: self.shut is not None, RESULT_TIMEOUT, "say SHUT")
        self._check_destination()  # closed without a word: a lost link (postcopy resumes)
        if self.shut != 0 or (self.peer_mfd and self.result.get("status") != "completed"):
            raise MfdError(self._failed_why())
        self.stats.end_time = time.monotonic()
        if self.verifying:  # a name for what was compared, after the downtime
            assert self.hashes is not None
            self.digests = {k: trailer.blake3_of(t) for k, t in self.hashes.tables().items()}
        # the part of the downtime QEMU does not have: each end hashing the final round's
        # pages (in its channels, in parallel: pagehash.wall_share), the table sent, the
        # destination's comparison (it says how long its part took)
        self.stats.verify_time = (pagehash.wall_share(hashing) + sending
                                  + float(self.result.get("verify_ms", 0)) / 1000) \
            if self.verifying else 0.0
        self.stats.remaining = 0
        self.stats.status = "completed"

    # ------------------------------------------------------------------ postcopy

    def postcopy_due(self) -> bool:
        o = self.options
        return o.postcopy and (self.postcopy_requested or (
            o.postcopy_after is not None
            and time.monotonic() - self.stats.start >= o.postcopy_after))

    def _postcopy(self) -> None:
        """``postcopy_start``: stop the guest, discard what the destination has that is
        stale (every page still dirty, sent before or not), the device state in a package
        that ends with RUN; then the destination's guest runs while the rest is pushed,
        the pages it asks for first."""
        status = self.stop_guest()
        self.limiter.set_bandwidth(self.params.max_postcopy_bandwidth)
        self.in_postcopy = True
        self.unsent = [np.unpackbits(w.view(np.uint8), bitorder="little")[
            : b.used_length // C.TARGET_PAGE_SIZE].astype(bool)
            for w, b in zip(self.bmap, self.blocks, strict=True)]
        discards = b"".join(
            postcopy.encode_discards(b.idstr, [
                (start * C.TARGET_PAGE_SIZE, (end - start) * C.TARGET_PAGE_SIZE)
                for start, end in page_runs(np.flatnonzero(u)).tolist()])
            for b, u in zip(self.blocks, self.unsent, strict=True))
        ping = [stream.encode_command(stream.Command(C.MIG_CMD_PING, n.to_bytes(4, "big")))
                for n in (2, 3, 4)]
        package = (postcopy.encode_bare(C.MIG_CMD_POSTCOPY_LISTEN) + self._device_state(status)
                   + ping[1] + postcopy.encode_bare(C.MIG_CMD_POSTCOPY_RUN))
        self._stream(stream.encode_command(stream.Command(C.MIG_CMD_SWITCHOVER_START))
                     + discards + ping[0] + postcopy.encode_packaged(package) + ping[2])
        self.stats.run_time = time.monotonic()
        self.stats.status = "postcopy-active"
        while True:
            try:
                if self.options.postcopy_preempt:  # after the main channel (QEMU takes the
                    # next connection for it): it is there, its PONG came long ago
                    self.preempt = tcp.connect(self.addr, self.options.connect_timeout,
                                               self.tls)
                    self.preempt_block = None
                self._push()
                self._stream(stream.encode_section_part(C.QEMU_VM_SECTION_END,
                                                        devices.RAM_SECTION_ID)
                             + ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID)
                             + stream.encode_eof()
                             + (stream.encode_vmdesc(devices.vmdesc_json(self.options.machine,
                                                                         ()))
                                if self.peer_mfd else b""))
                self._finish([])
                return
            except tcp.LinkLost as e:
                if self.shut is not None:
                    raise
                self._paused(str(e))

    def _paused(self, why: str) -> None:
        """QEMU's postcopy-paused: the link is gone, the guest stays stopped here with every
        page the destination may lack; a QMP ``migrate`` with ``resume`` (to the same or
        another address) reconnects: RECV_BITMAP per block (what is not there is dirty
        again), POSTCOPY_RESUME, its RESUME_ACK, then the push goes on."""
        if not self.monitored:  # nobody could ever resume it
            raise tcp.LinkLost(why)
        self.stats.status = "postcopy-paused"
        self.warn(f"postcopy paused: {why}; resume with QMP migrate "
                  '{"uri": ..., "resume": true} on this migration\'s monitor')
        for sock in (self.sock, self.preempt):
            if sock is not None:
                with contextlib.suppress(KeyError):
                    self.pool.unwatch(sock)
                sock.close()
        self.sock = self.preempt = None
        while self.resume_uri is None:
            time.sleep(0.05)
            self._tick_paused()
        uri, self.resume_uri = self.resume_uri, None
        self.stats.status = "postcopy-recover"
        self.addr = tcp.parse_uri(uri)
        self.tls = self._tls(self.addr)
        self.addr = self.addr.resolved()
        self.sock = tcp.connect(self.addr, self.options.connect_timeout, self.tls)
        self.returns = returnpath.ReturnPathDecoder()
        self.returns.mfd = bool(self.peer_mfd)
        self.closed, self.result = False, {}
        self.pool.watch(self.sock, self._on_return_path)
        self.requests.clear()
        self.last_request, self.last_block = None, None
        self.bitmaps_due = {b.idstr for b in self.blocks}
        self.resume_acked = False
        self._stream(b"".join(postcopy.encode_recv_bitmap_request(b.idstr)
                              for b in self.blocks)
                     + stream.encode_command(stream.Command(C.MIG_CMD_POSTCOPY_RESUME)))
        self._wait_for(lambda: not self.bitmaps_due and self.resume_acked, PEER_TIMEOUT,
                       "answer RECV_BITMAP and POSTCOPY_RESUME")
        self._check_destination()
        self.stats.remaining = sum(int(u.sum()) for u in self.unsent) * C.TARGET_PAGE_SIZE
        self.stats.status = "postcopy-active"

    def _tick_paused(self) -> None:
        """While paused: cancel and the timeout still apply."""
        if self.cancel_requested is not None:
            raise Cancelled(self.cancel_requested)
        timeout = self.options.timeout
        if timeout is not None and time.monotonic() - self.stats.start > timeout:
            raise Cancelled(f"migration did not complete within {timeout:g} s (--timeout)")

    def migrate_resume(self, uri: str) -> None:
        """QMP ``migrate`` with ``resume``: only a postcopy-paused migration resumes."""
        if self.stats.status != "postcopy-paused":
            raise MfdError(f"migrate resume: the migration is {self.stats.status}, not "
                           "postcopy-paused")
        tcp.parse_uri(uri)
        self.resume_uri = uri

    def _push(self) -> None:
        """The pages not sent since the switch, in order, in one PART section; before
        each batch, the pages the destination asked for (QEMU without preempt: the
        migration thread sends queued pages first and goes on from there). Again from the
        start after a recovery, of what the destination said it lacks."""
        self.begin_section(final=False)
        for block, unsent in enumerate(self.unsent):
            todo = np.flatnonzero(unsent)
            for at in range(0, len(todo), INLINE_PAGES):
                self._serve_requests()
                self._send_unsent(block, todo[at : at + INLINE_PAGES])
        self._serve_requests()
        self._stream(ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID))

    def _serve_requests(self) -> None:
        self._on_return_path()
        while self.requests:
            block, first, n = self.requests.popleft()
            self._send_unsent(block, np.arange(first, first + n, dtype=np.int64),
                              urgent=True)

    def _send_unsent(self, block: int, pages: np.ndarray, urgent: bool = False) -> None:
        """Each page goes once after the switch (QEMU's destination fails on a second);
        a requested one on the preempt channel when there is one."""
        pages = pages[self.unsent[block][pages]]
        if not len(pages):
            return
        self.unsent[block][pages] = False
        self.stats.remaining -= len(pages) * C.TARGET_PAGE_SIZE
        if urgent and self.preempt is not None:
            self._send_preempt(block, pages)
        else:
            self._send_inline(block, pages)

    def _send_preempt(self, block: int, pages: np.ndarray) -> None:
        """``ram_save_host_page_urgent``: PAGE records, bare (no section), straight from
        guest memory, flushed at once."""
        assert self.preempt is not None
        words = self.mapped[block].words
        idstr = None if self.preempt_block == block else self.blocks[block].idstr
        self.preempt_block = block
        try:
            sent = tcp.send_all(self.preempt, _page_records(
                pages, _rows(words, pages), idstr), self._tick)
        except tcp.LinkLost as e:
            raise tcp.LinkLost(f"preempt channel: {e}") from None
        self.stats.transferred += sent
        self.stats.normal += len(pages)
        if self.verifying:
            assert self.hashes is not None
            self.hashes.record(block, words, pages)

    def migrate_start_postcopy(self) -> None:
        if not self.options.postcopy:
            raise MfdError("Enable postcopy with migrate_set_capability before the start of "
                           "migration")
        self.postcopy_requested = True

    # ------------------------------------------------------------------ monitor handlers

    def query_migrate(self) -> dict:
        out = self.stats.query_migrate()
        if self.error is not None:
            out["error-desc"] = self.error
        return out

    def query_migrate_parameters(self) -> dict:
        return self.params.to_qmp() | tls_parameters(self.tls)

    def query_migrate_capabilities(self) -> list[dict]:
        return [{"capability": "multifd", "state": self.options.multifd},
                {"capability": "return-path", "state": True},
                {"capability": "auto-converge", "state": self.params.auto_converge},
                {"capability": "xbzrle", "state": self.xbzrle is not None}]

    def migrate_set_parameters(self, args: dict) -> None:
        args = dict(args)
        if "tls-hostname" in args:  # for the connections of a resume (postcopy recovery)
            name = args.pop("tls-hostname")
            if not isinstance(name, str):
                raise UsageError("Invalid parameter type for 'tls-hostname', expected: string")
            if self.options.tls is None:
                raise UsageError("tls-hostname: this migration has no TLS (--tls-creds)")
            self.options = replace(self.options,
                                   tls=replace(self.options.tls, hostname=name or None))
        self._update({k.replace("-", "_"): v for k, v in args.items()})

    def migrate_set_capabilities(self, capabilities: list[dict]) -> None:
        changes = {}
        for cap in capabilities:
            name, state = cap.get("capability"), cap.get("state")
            if name == "auto-converge" and isinstance(state, bool):
                changes["auto_converge"] = state
            elif name in ("multifd", "return-path") and state is True:
                continue
            else:
                raise UsageError(f"capability {name!r} cannot be set to {state!r} here")
        self._update(changes)

    def _update(self, changes: dict) -> None:
        with self.lock:
            base = self.pending_params or self.params
            self.pending_params = base.updated(changes, mapped_ram=False)

    def migrate_cancel(self) -> None:
        self.cancel_requested = "cancelled by migrate_cancel"


def _rows(words: np.ndarray, pages: np.ndarray) -> Iterable:
    """Each page's row of guest memory, a view (no copy), in order."""
    return (words[p] for p in pages.tolist())


def _page_records(pages: np.ndarray, rows: Iterable, idstr: str | None) -> list:
    """PAGE records of ``pages`` (at most IOV_MAX / 2 of them, sorted) as buffers for one
    sendmsg: each be64 header followed by the page's bytes (``rows``: straight from guest
    memory, or a copy), the first naming the block unless ``idstr`` is None (it CONTINUEs
    the block named last)."""
    addrs = pages.astype(np.uint64) * np.uint64(C.TARGET_PAGE_SIZE)
    first = ram.encode_page_header(int(addrs[0]), C.RAM_SAVE_FLAG_PAGE, idstr)
    rest = (addrs[1:] | np.uint64(C.RAM_SAVE_FLAG_PAGE | C.RAM_SAVE_FLAG_CONTINUE)
            ).astype(">u8")
    headers = [first, *rest.view(np.uint8).reshape(-1, 8)]
    return [b for pair in zip(headers, rows, strict=True) for b in pair]


def failure(e: BaseException, peer_reason: Callable[[], str | None]
            ) -> tuple[str, str, str | None]:
    """How a migration ended on error: its status, the reason, and the other end's own
    reason when a channel lost its connection because that end gave up (it says why
    better)."""
    status = "cancelled" if isinstance(e, Cancelled | KeyboardInterrupt) else "failed"
    lost = isinstance(e, tcp.LinkLost) or (isinstance(e, BrokenPipeline) and e.link_lost)
    why = peer_reason() if lost else None
    return status, why or ("interrupted" if isinstance(e, KeyboardInterrupt) else str(e)), why
