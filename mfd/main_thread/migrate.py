"""The source of a live migration over TCP: QEMU's precopy with multifd, as processes.

::

    connect the main channel, HELLO (uuid, channels, compression)
    setup     stream: header, configuration, ram START (MEM_SIZE, block list); READY from
              the destination (its RAM and channels wait); N channels connect, each sends
              MultiFDInit_t; SYNC on every channel + MULTIFD_FLUSH; EOS
    rounds    PART: pages to idle channels, SYNC ALL + MULTIFD_FLUSH at the end of every
              pass over RAM (legacy --multifd-flush-after-each-section: SYNC only, the
              destination syncs at EOS); EOS; bitmap sync; convergence, auto-converge
    complete  stop the guest; SWITCHOVER_START; END: the final round; device sections
              (globalstate, the guest's own state); EOF; DIGESTS of the RAM at switchover;
              RESULT from the destination (digests equal, its guest runs) -> our guest quits

Anything that goes wrong (the destination's ERROR, a lost link, a dead channel, cancel, the
timeout, Ctrl-C) sends ERROR to the destination and lets our guest run again: the source
stays authoritative until the destination has said it runs the guest.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np
import zmq

from mfd.errors import BrokenPipeline, MfdError, ProtocolError, UsageError
from mfd.main_thread.digests import ChunkTable
from mfd.main_thread.pipeline import ChannelPool
from mfd.main_thread.precopy import Precopy, Progress
from mfd.options import MigrationParameters, check_params
from mfd.protocol import constants as C
from mfd.protocol import devices, mainchannel, messages, ram, stream, trailer
from mfd.shm.control import GuestClient
from mfd.shm.ramblock import RAMBlock
from mfd.workers import tcp
from mfd.workers.socket_channel import SocketChannelConfig, send_main

CONNECT_TIMEOUT = 30.0
RESULT_TIMEOUT = 60.0  # the destination hashes its RAM and starts its guest
LINGER_MS = 1000  # at close, time for a last message (RESULT, ERROR) to leave
GRACE_MS = 300  # after a lost link, time for the peer's last message to show up
# packets per job handed to an idle channel: each job costs the main process a round trip
# (~60 us), as much as a channel spends on a packet; 8 packets per job cut that 8-fold
# while a job still takes only milliseconds (the channel writes one packet at a time)
JOB_PACKETS = 8


class Cancelled(MfdError):
    """``migrate_cancel``, the timeout, or Ctrl-C."""


@dataclass(frozen=True)
class MigrateOptions:
    machine: str = "none"
    flush_after_each_section: bool = False  # QEMU's multifd-flush-after-each-section
    timeout: float | None = None  # cancel when the migration would take longer
    connect_timeout: float = CONNECT_TIMEOUT
    keep_source: bool = False  # the source guest stays paused afterwards (QEMU's postmigrate)


class Migration(Precopy):
    def __init__(self, uri: str, blocks: list[RAMBlock], params: MigrationParameters,
                 options: MigrateOptions, guest: GuestClient | None = None,
                 progress: Progress | None = None) -> None:
        super().__init__(blocks, check_params(params, mapped_ram=False), guest, progress,
                         batch_pages=JOB_PACKETS * C.MULTIFD_PAGE_COUNT)
        self.addr = tcp.parse_uri(uri, params.multifd_channels)
        self.uri = uri
        self.options = options
        self.uuid = uuid.uuid4().bytes
        self.error: str | None = None  # why it failed or was cancelled
        self.cancel_requested: str | None = None  # set by the monitor thread
        self.pending_params: MigrationParameters | None = None  # likewise
        self.lock = threading.Lock()
        self.result: dict = {}
        self.digests: dict[str, str] = {}

    # ------------------------------------------------------------------ main channel

    def _connect(self) -> None:
        self.ctx = zmq.Context()
        self.main = tcp.peer_socket(self.ctx, zmq.DEALER)
        self.link = tcp.LinkWatch(self.main, "main channel")
        self.addr = self.addr.resolved()
        self.main.connect(self.addr.main)
        deadline = time.monotonic() + self.options.connect_timeout
        while not self.link.connected:
            if time.monotonic() > deadline:
                where = self.uri if self.addr.main == self.uri else \
                    f"{self.uri} ({self.addr.host})"
                raise MfdError(f"cannot reach the destination at {where} (no "
                               f"connection within {self.options.connect_timeout:g} s)")
            self.link.monitor.poll(50)
            self.link.check()

    def _wait_out(self) -> None:
        """Wait until the main channel can take a message, watching everything else."""
        while not self.main.poll(50, zmq.POLLOUT):
            self._tick()

    def _send(self, frames: list[bytes]) -> None:
        self._wait_out()
        self.main.send_multipart(frames)

    def _stream(self, data: bytes) -> None:
        self._send([mainchannel.STREAM, data])
        self.stats.transferred += len(data)

    def _from_destination(self) -> None:
        """Messages from the destination while we work: READY and RESULT are kept for
        ``_wait_reply``, ERROR fails the migration at once."""
        while self.main.poll(0):
            frames = self.main.recv_multipart()
            if frames[0] == mainchannel.ERROR:
                raise MfdError(f"destination: {mainchannel.error_text(frames)}")
            if frames[0] in (mainchannel.READY, mainchannel.RESULT):
                self.replies.append(frames)
            else:
                raise ProtocolError(f"main channel: unexpected {frames[0][:16]!r} from the "
                                    "destination")

    def _tick(self) -> None:
        """Every <= 100 ms while waiting: the link, the destination, cancel, the timeout,
        parameters set through the monitor."""
        self._from_destination()
        if self._answered:
            return  # the destination has said RESULT and may well have hung up since
        try:
            self.link.check()
        except tcp.LinkLost:
            # the monitor's event can overtake the last message (RESULT, or an ERROR that
            # says why): give it a moment to arrive
            if self.main.poll(GRACE_MS):
                self._from_destination()
            if not self._answered:
                raise
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

    @property
    def _answered(self) -> bool:
        return any(f[0] == mainchannel.RESULT for f in self.replies)

    def _wait_reply(self, kind: bytes, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for frames in self.replies:
                if frames[0] == kind:
                    self.replies.remove(frames)
                    return mainchannel.decode_json(frames, kind)
            if time.monotonic() > deadline:
                raise MfdError(f"the destination did not answer within {timeout:g} s")
            self.main.poll(50)
            self._tick()

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        self.replies: list[list[bytes]] = []
        self.stats.status = "setup"
        completed = False
        try:
            self._connect()
            live = self.start_guest_log()
            self.chunks = ChunkTable(self.blocks)
            self._send(mainchannel.Hello(
                self.uuid, self.params.multifd_channels, self.params.multifd_compression,
                self.params.zero_page_detection, self.options.flush_after_each_section,
                self.guest.name if self.guest is not None else None).encode())
            self._setup_stream()
            self._wait_reply(mainchannel.READY, self.options.connect_timeout)
            level = (self.params.multifd_zstd_level if self.params.multifd_compression == "zstd"
                     else self.params.multifd_zlib_level)
            configs = [SocketChannelConfig(
                channel_id=i, endpoint="", parent_pid=0, blocks=tuple(self.blocks),
                peer=self.addr.channel(i), uuid=self.uuid,
                channels=self.params.multifd_channels,
                compression=self.params.multifd_compression, level=level,
                zero_page_detection=self.params.zero_page_detection == "multifd",
                connect_timeout=self.options.connect_timeout)
                for i in range(self.params.multifd_channels)]
            with ChannelPool(configs, send_main) as pool:
                self.pool = pool
                pool.tick = self._tick
                self._flush_and_sync(setup=True)
                self._stream(ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID))
                self.stats.setup_time = time.monotonic() - self.stats.start
                self.stats.status = "active"
                self.iterate(live)
                self._complete()
            completed = True
        except BaseException as e:
            self.stats.status, self.error, why = failure(e, getattr(self, "main", None),
                                                         "destination")
            with contextlib.suppress(Exception):
                self.main.send_multipart(mainchannel.encode_error(
                    f"the source {self.stats.status}: {self.error}"), zmq.NOBLOCK)
            self.resume_guest()
            if why is not None:
                raise MfdError(why) from e
            raise
        finally:
            self.release()
            if hasattr(self, "main"):
                self.link.close()
                self.main.close(LINGER_MS)  # the ERROR we may just have sent gets out
                self.ctx.term()
        if completed and self.guest is not None and not self.options.keep_source:
            with contextlib.suppress(MfdError):
                self.guest.quit()  # it runs on the destination now

    def _setup_stream(self) -> None:
        cfg = stream.Configuration(self.options.machine)
        data = (stream.encode_file_header() + stream.encode_configuration(cfg)
                + stream.encode_section_start(C.QEMU_VM_SECTION_START, devices.RAM_SECTION_ID,
                                              C.RAM_SECTION_IDSTR, 0, C.RAM_SECTION_VERSION)
                + ram.encode_mem_size(self.stats.total)
                + b"".join(ram.encode_block_entry(b.idstr, b.used_length) for b in self.blocks))
        self._stream(data)

    def _flush_and_sync(self, setup: bool = False) -> None:
        """``multifd_ram_flush_and_sync``: every channel finishes its work and puts a SYNC
        packet on its link; then MULTIFD_FLUSH on the main stream (not in legacy mode, where
        the destination syncs at EOS instead)."""
        self.pool.sync(messages.SYNC)
        if not self.options.flush_after_each_section:
            self._stream(ram.encode_multifd_flush())

    # ------------------------------------------------------------------ precopy hooks

    def begin_section(self, final: bool) -> None:
        kind = C.QEMU_VM_SECTION_END if final else C.QEMU_VM_SECTION_PART
        self._stream(stream.encode_section_part(kind, devices.RAM_SECTION_ID))

    def end_round(self) -> None:
        if self.options.flush_after_each_section:
            self.pool.sync(messages.SYNC)  # per section: SYNC packets, EOS syncs the receiver
        else:
            self._flush_and_sync()

    def end_section(self, final: bool) -> None:
        self._stream(ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID))

    def on_done(self, block: int, pages: np.ndarray, moved: int, nonzero: np.ndarray,
                digests: bytes) -> None:
        self.chunks.job_done(block, pages, digests)
        super().on_done(block, pages, moved, nonzero, digests)

    def on_legacy_zero(self, block: int, pages: np.ndarray) -> None:
        """zero-page-detection=legacy: RAM_SAVE_FLAG_ZERO records on the main stream."""
        self.chunks.stale(block, pages)
        idstr = self.blocks[block].idstr
        addrs = pages.astype(np.int64) * C.TARGET_PAGE_SIZE
        first = ram.encode_zero_page(int(addrs[0]), idstr)
        rest = ram.encode_zero_records(addrs[1:])
        self._stream(first + rest)

    # ------------------------------------------------------------------ completion

    def _complete(self) -> None:
        status = self.stop_guest()
        self._stream(stream.encode_command(stream.Command(C.MIG_CMD_SWITCHOVER_START)))
        self.round(final=True)
        runstate = "running" if self.was_running else "paused"
        guest_state = {"name": status["name"], "runstate": runstate,
                       "workload": status["workload"]} if status is not None else None
        self._stream(
            stream.encode_section_start(C.QEMU_VM_SECTION_FULL,
                                        devices.GLOBALSTATE_SECTION_ID, "globalstate", 0, 1)
            + devices.encode_globalstate(runstate)
            + stream.encode_footer(devices.GLOBALSTATE_SECTION_ID)
            + stream.encode_section_start(C.QEMU_VM_SECTION_FULL, devices.GUEST_SECTION_ID,
                                          devices.GUEST_IDSTR, 0, devices.GUEST_VERSION)
            + devices.encode_guest(guest_state)
            + stream.encode_footer(devices.GUEST_SECTION_ID)
            + stream.encode_eof())
        verify_start = time.monotonic()
        tables = self._ram_digests()
        self._send(mainchannel.encode_digests(tables))
        self.result = self._wait_reply(mainchannel.RESULT, RESULT_TIMEOUT)
        if self.result.get("status") != "completed":
            raise MfdError(f"destination: {self.result.get('error', 'failed')}")
        self.stats.end_time = time.monotonic()
        # part of the downtime QEMU does not have: both ends hashing the chunks that changed
        # since they were hashed in flight, the comparison, the guest taking over its RAM
        self.stats.verify_time = self.stats.end_time - verify_start
        self.stats.remaining = 0
        self.stats.status = "completed"

    def _ram_digests(self) -> dict[str, bytes]:
        """Every block's RAM content at switchover, chunk by chunk: what the channels hashed
        as they sent it, and the chunks that changed since, hashed now by the channels."""
        self.chunks.complete(self.pool)
        tables = self.chunks.tables()
        self.digests = {name: trailer.blake3_of(t) for name, t in tables.items()}
        return tables

    # ------------------------------------------------------------------ monitor handlers

    def query_migrate(self) -> dict:
        out = self.stats.query_migrate()
        if self.error is not None:
            out["error-desc"] = self.error
        return out

    def query_migrate_parameters(self) -> dict:
        return self.params.to_qmp()

    def query_migrate_capabilities(self) -> list[dict]:
        return [{"capability": "multifd", "state": True},
                {"capability": "auto-converge", "state": self.params.auto_converge}]

    def migrate_set_parameters(self, args: dict) -> None:
        self._update({k.replace("-", "_"): v for k, v in args.items()})

    def migrate_set_capabilities(self, capabilities: list[dict]) -> None:
        changes = {}
        for cap in capabilities:
            name, state = cap.get("capability"), cap.get("state")
            if name == "auto-converge" and isinstance(state, bool):
                changes["auto_converge"] = state
            elif name == "multifd" and state is True:
                continue
            else:
                raise UsageError(f"capability {name!r} cannot be set to {state!r} here")
        self._update(changes)

    def _update(self, changes: dict) -> None:
        live_ok = {"max_bandwidth", "downtime_limit", "auto_converge", "cpu_throttle_initial",
                   "cpu_throttle_increment", "cpu_throttle_tailslow", "max_cpu_throttle",
                   "throttle_trigger_threshold"}
        bad = sorted(set(changes) - live_ok)
        if bad:
            raise UsageError(f"parameter {bad[0].replace('_', '-')!r} cannot be changed "
                             "while migrating")
        with self.lock:
            base = self.pending_params or self.params
            try:
                new = replace(base, **changes)
            except TypeError as e:
                raise UsageError(str(e)) from None
            self.pending_params = check_params(new, mapped_ram=False)

    def migrate_cancel(self) -> None:
        self.cancel_requested = "cancelled by migrate_cancel"


def failure(e: BaseException, sock: zmq.Socket | None, peer: str) -> tuple[str, str, str | None]:
    """How a migration ended on error: its status, the reason, and the other end's own
    reason when a channel lost its link because that end gave up (it says why better)."""
    status = "cancelled" if isinstance(e, Cancelled | KeyboardInterrupt) else "failed"
    why = peer_error(sock, peer) if sock is not None and isinstance(e, BrokenPipeline) \
        and e.link_lost else None
    return status, why or ("interrupted" if isinstance(e, KeyboardInterrupt) else str(e)), why


def peer_error(sock: zmq.Socket, peer: str) -> str | None:
    """The other end's own reason, if it sent one (ERROR) just before going away: a channel
    that lost its link tells less than that."""
    deadline = time.monotonic() + GRACE_MS / 1000
    with contextlib.suppress(zmq.ZMQError):
        while time.monotonic() < deadline:
            if sock.poll(20):
                frames = sock.recv_multipart()
                if sock.type == zmq.ROUTER:
                    frames = frames[1:]
                if frames and frames[0] == mainchannel.ERROR:
                    return f"{peer}: {mainchannel.error_text(frames)}"
    return None
