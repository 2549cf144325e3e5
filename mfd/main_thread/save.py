"""The source loop for a mapped-ram file save (``ram_save_setup`` / ``_iterate`` / ``_complete``).

::

    setup     header, configuration, ram START: MEM_SIZE, per block entry + MappedRamHeader,
              EOS; bmap = all ones; the guest's dirty log starts
    round     harvest the guest's log into bmap (bitmap sync); take dirty pages word by word;
              queue <= 128 pages of one block; hand each batch to an idle channel; local sync
              (all channels idle); an empty PART section. Channels report which pages they
              wrote and which were zero; only this process updates file_bmap (invariant 3).
    complete  stop the guest, final harvest and round, sync; file_bmap of every block;
              SWITCHOVER_START, END, timer, globalstate, EOF, vmdesc; fdatasync while the
              channels hash the final RAM chunk by chunk (DIGEST jobs); mfd's trailer
              (chunk digests per block, page counts, guest state); fdatasync

A stopped guest or plain images need exactly one round. The file is written in place, like
QEMU's ``file:`` URI (``ftruncate`` to the offset first); a save that fails cleanly removes
what it wrote, and one killed outright leaves a file every reader refuses (no END, no EOF).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mfd import __version__
from mfd.errors import MfdError
from mfd.main_thread.convergence import AutoConverge, BandwidthMeter, RateLimiter
from mfd.main_thread.pipeline import ChannelPool, OnDone
from mfd.main_thread.scanner import chunk_jobs, dirty_batches, new_bmap, popcount
from mfd.main_thread.stats import MigrationStats
from mfd.options import MigrationParameters, check_params
from mfd.protocol import constants as C
from mfd.protocol import devices, mapped_ram, messages, ram, stream, trailer
from mfd.shm.control import GuestClient
from mfd.shm.ramblock import MappedBlock, RAMBlock, attach
from mfd.workers.file_channel import FileChannelConfig, channel_main

Progress = Callable[[MigrationStats], None]


@dataclass(frozen=True)
class SaveOptions:
    machine: str = "none"
    offset: int = 0  # file:PATH,offset=N: keep the first N bytes (libvirt's header)
    stop_first: bool = False
    runstate: str | None = None  # globalstate; default from the guest's state
    batch_pages: int = C.MULTIFD_PAGE_COUNT  # pages per job: QEMU's 128 (512 KiB)
    # test-only, each disables one mechanism so a test can show it bites: channel i sleeps
    # before reporting each job; no local sync at the end of a round; the guest's dirty
    # log is never harvested (so every write after setup is lost)
    channel_delays: tuple[float, ...] = ()
    skip_round_sync: bool = False
    ignore_dirty_log: bool = False


def _probe_direct_io(path: str) -> bool:
    """QEMU fails when O_DIRECT is refused; mfd says so once and falls back to buffered."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as e:
        print(f"mfd: direct-io: {path}'s filesystem refuses O_DIRECT ({e.strerror}); "
              "using buffered I/O", file=sys.stderr)
        return False
    os.close(fd)
    return True


class FileSaver:
    def __init__(self, path: str, blocks: list[RAMBlock], params: MigrationParameters,
                 options: SaveOptions, guest: GuestClient | None = None,
                 progress: Progress | None = None) -> None:
        self.params = check_params(params, mapped_ram=True)
        names = [b.idstr for b in blocks]
        if len(set(names)) != len(names):
            raise MfdError(f"duplicate RAM block names: {names}")
        if not blocks:
            raise MfdError("nothing to save: no RAM blocks")
        self.path = path
        self.blocks = blocks
        self.options = options
        self.guest = guest
        self.progress = progress
        self.stats = MigrationStats(total=sum(b.used_length for b in blocks))
        self.configuration = stream.Configuration(options.machine, (C.CAP_MAPPED_RAM,))

    # ------------------------------------------------------------------ setup

    def _setup_bytes(self) -> tuple[bytes, list[mapped_ram.BlockLayout]]:
        head = (stream.encode_file_header() + stream.encode_configuration(self.configuration)
                + stream.encode_section_start(C.QEMU_VM_SECTION_START, devices.RAM_SECTION_ID,
                                              C.RAM_SECTION_IDSTR, 0, C.RAM_SECTION_VERSION)
                + ram.encode_mem_size(self.stats.total))
        layout = mapped_ram.layout_blocks([(b.idstr, b.used_length) for b in self.blocks],
                                          self.options.offset + len(head))
        return head, layout

    def _write_stream(self, data: bytes) -> None:
        """The main channel: sequential stream bytes after the last pages region."""
        os.pwrite(self.fd, data, self.stream_pos)
        self.stream_pos += len(data)
        self.stats.transferred += len(data)

    def run(self) -> MigrationStats:
        direct_io = self.params.direct_io
        flags = os.O_WRONLY | os.O_CREAT
        try:
            self.fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise MfdError(f"cannot open {self.path}: {e.strerror}") from None
        completed = False
        try:
            os.ftruncate(self.fd, self.options.offset)
            if direct_io:
                direct_io = _probe_direct_io(self.path)
            self._run(direct_io)
            completed = True
        finally:
            if not completed:
                self.stats.status = "failed"
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, self.options.offset)
                    if self.options.offset == 0:
                        os.unlink(self.path)
            os.close(self.fd)
        return self.stats

    def _run(self, direct_io: bool) -> None:
        head, layout = self._setup_bytes()
        self.layout = layout
        off = self.options.offset
        os.pwrite(self.fd, head, off)
        for lay in layout:
            os.pwrite(self.fd, ram.encode_block_entry(lay.idstr, lay.used_length)
                      + lay.header.encode(), lay.entry_offset)
        self.stream_pos = layout[-1].pages_end
        self.stats.transferred = len(head) + sum(
            1 + len(lay.idstr.encode()) + 8 + C.MAPPED_RAM_HDR_SIZE for lay in layout)
        self._write_stream(ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID))

        self.mapped: list[MappedBlock] = [attach(b) for b in self.blocks]
        self.bmap = [new_bmap(b.num_pages) for b in self.blocks]
        self.file_bmap = [np.zeros(b.num_pages, dtype=bool) for b in self.blocks]
        was_running = False
        if self.guest is not None:
            status = self.guest.query()
            was_running = status["status"] == "running"
            if self.options.stop_first and was_running:
                self.guest.stop()
            self.guest.harvest()  # the dirty log starts now; bmap is all ones anyway
        self.runstate = self.options.runstate or (
            "prelaunch" if self.guest is None else "running" if was_running else "paused")
        live = self.guest is not None and self.guest.query()["status"] == "running"
        # chunk digests: hashed by the channel that writes a whole chunk, where RAM no longer
        # changes; any other chunk with pages in the file is hashed at completion
        self.hashed = [np.zeros(trailer.num_chunks(b.num_pages), dtype=bool)
                       for b in self.blocks]
        self.chunk_table = [np.tile(np.frombuffer(trailer.EMPTY_DIGEST, dtype=np.uint8),
                                    (trailer.num_chunks(b.num_pages), 1)) for b in self.blocks]

        delays = self.options.channel_delays
        configs = [FileChannelConfig(
            channel_id=i, endpoint="", parent_pid=0, path=self.path, saving=True,
            blocks=tuple(self.blocks),
            pages_offsets=tuple(lay.header.pages_offset for lay in layout), direct_io=direct_io,
            zero_page_detection=self.params.zero_page_detection == "multifd",
            digest_chunks=not live, delay=delays[i] if i < len(delays) else 0.0)
            for i in range(self.params.multifd_channels)]
        self.meter = BandwidthMeter()
        self.limiter = RateLimiter(self.params.max_bandwidth)
        self.throttle = AutoConverge(self.params)
        try:
            with ChannelPool(configs, channel_main) as pool:
                self.pool = pool
                self.stats.setup_time = time.monotonic() - self.stats.start
                self.stats.status = "active"
                self._iterate(live)
                self._complete()
        except BaseException:
            if self.guest is not None and was_running:
                with contextlib.suppress(MfdError):
                    self.guest.set_throttle(0)
                    self.guest.cont()  # the source stays authoritative
            raise
        finally:
            for m in self.mapped:
                m.close()

    # ------------------------------------------------------------------ rounds

    def _sent(self, block: int, pages: np.ndarray) -> OnDone:
        return lambda moved, nonzero, digests: self._on_done(block, pages, moved, nonzero,
                                                             digests)

    def _on_done(self, block: int, pages: np.ndarray, moved: int, nonzero: np.ndarray,
                 digest: bytes) -> None:
        if digest:  # the job was one whole chunk, hashed by its channel
            chunk = int(pages[0]) // trailer.CHUNK_PAGES
            self.chunk_table[block][chunk] = np.frombuffer(digest, dtype=np.uint8)
            self.hashed[block][chunk] = True
        else:  # pages sent again (say, in the final round) make their chunks' digests stale
            self.hashed[block][pages // trailer.CHUNK_PAGES] = False
        fb = self.file_bmap[block]
        fb[pages[nonzero]] = True  # written: data is at its slot
        fb[pages[~nonzero]] = False  # zero: nothing written, the bit says "zero"
        n = int(nonzero.sum())
        self.stats.normal += n
        self.stats.duplicate += len(pages) - n
        self.stats.transferred += moved
        self.round_bytes += moved
        self.meter.add(moved)

    def _round(self) -> None:
        """One sweep over every block's bmap, then a local sync and an empty PART."""
        self.round_bytes = 0
        start = time.monotonic()
        legacy = self.params.zero_page_detection == "legacy"
        for i, words in enumerate(self.bmap):
            for pages in dirty_batches(words, self.options.batch_pages):
                self.stats.remaining -= len(pages) * C.TARGET_PAGE_SIZE
                if legacy:  # the main thread finds zero pages (zero-page-detection=legacy)
                    nonzero = self.mapped[i].words[pages].max(axis=1) != 0
                    zero = pages[~nonzero]
                    self.file_bmap[i][zero] = False
                    self.stats.duplicate += len(zero)
                    pages = pages[nonzero]
                    if len(pages) == 0:
                        continue
                self.limiter.account(len(pages) * C.TARGET_PAGE_SIZE)
                self.pool.send(i, pages, self._sent(i, pages))
        if not self.options.skip_round_sync:
            self.pool.sync()
        self.stats.dirty_sync_count += 1
        elapsed = time.monotonic() - start
        self.stats.rounds.append({"round": self.stats.dirty_sync_count,
                                  "bytes": self.round_bytes, "seconds": elapsed})
        if self.progress is not None:
            self.progress(self.stats)

    def _part_section(self) -> None:
        self._write_stream(stream.encode_section_part(C.QEMU_VM_SECTION_PART,
                                                      devices.RAM_SECTION_ID)
                           + ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID))

    def _bitmap_sync(self) -> int:
        """``migration_bitmap_sync``: OR the guest's log into bmap; returns dirty pages."""
        assert self.guest is not None
        status, logs = self.guest.harvest()
        if self.options.ignore_dirty_log:
            logs = [np.zeros_like(w) for w in self.bmap]
        dirty = 0
        for words, log in zip(self.bmap, logs, strict=True):
            if len(log) != len(words):
                raise MfdError("guest returned a dirty log of the wrong size")
            dirty += popcount(log)
            np.bitwise_or(words, log, out=words)
        self.stats.cpu_throttle_percentage = int(status["cpu-throttle-percentage"])
        return dirty

    def _remaining(self) -> int:
        return sum(popcount(w) for w in self.bmap) * C.TARGET_PAGE_SIZE

    def _iterate(self, live: bool) -> None:
        self.stats.remaining = self._remaining()
        if not live:
            self._round()
            self._part_section()
            return
        period_start = time.monotonic()
        period_dirty = 0
        period_xfer = self.stats.transferred
        while True:
            self._round()
            self._part_section()
            dirty = self._bitmap_sync()
            period_dirty += dirty
            self.stats.remaining = self._remaining()
            self.stats.bandwidth = self.meter.bandwidth
            if self.meter.bandwidth:
                self.stats.expected_downtime = self.stats.remaining / self.meter.bandwidth * 1000
            now = time.monotonic()
            if now - period_start >= 1.0:
                self.stats.dirty_pages_rate = period_dirty / (now - period_start)
                pct = self.throttle.on_period(period_dirty * C.TARGET_PAGE_SIZE,
                                              self.stats.transferred - period_xfer)
                if pct is not None:
                    self.guest.set_throttle(pct)
                    self.stats.cpu_throttle_percentage = pct
                period_start, period_dirty, period_xfer = now, 0, self.stats.transferred
            if self.stats.remaining <= self.meter.threshold(self.params.downtime_limit):
                return

    # ------------------------------------------------------------------ completion

    def _complete(self) -> None:
        guest_state = None
        if self.guest is not None:
            self.stats.stop_time = time.monotonic()
            status = self.guest.stop()
            self.limiter.disable()
            self._bitmap_sync()
            self.stats.remaining = self._remaining()
            guest_state = {"name": status["name"], "runstate": self.runstate,
                           "workload": status["workload"]}
        else:
            self.stats.stop_time = time.monotonic()
        self._write_stream(stream.encode_command(stream.Command(C.MIG_CMD_SWITCHOVER_START)))
        if self.guest is not None:
            self._round()  # what the guest dirtied since the last sync
        self.pool.sync()  # every channel idle before file_bmap is written (invariant 3)
        self.stats.remaining = 0
        for lay, fb in zip(self.layout, self.file_bmap, strict=True):
            bmap = mapped_ram.bits_to_words(fb).tobytes()
            os.pwrite(self.fd, bmap, lay.header.bitmap_offset)
            self.stats.transferred += len(bmap)
        rid = devices.RAM_SECTION_ID
        caps = self.configuration.capabilities
        self._write_stream(
            stream.encode_section_part(C.QEMU_VM_SECTION_END, rid) + ram.encode_eos()
            + stream.encode_footer(rid)
            + stream.encode_section_start(C.QEMU_VM_SECTION_FULL, devices.TIMER_SECTION_ID,
                                          "timer", 0, 2)
            + devices.encode_timer() + stream.encode_footer(devices.TIMER_SECTION_ID)
            + stream.encode_section_start(C.QEMU_VM_SECTION_FULL,
                                          devices.GLOBALSTATE_SECTION_ID, "globalstate", 0, 1)
            + devices.encode_globalstate(self.runstate)
            + stream.encode_footer(devices.GLOBALSTATE_SECTION_ID)
            + stream.encode_eof()
            + stream.encode_vmdesc(devices.vmdesc_json(self.options.machine, caps)))
        # the channels hash the final RAM (their mappings are already faulted in) while this
        # thread waits for the fdatasync, which releases the GIL
        syncer = threading.Thread(target=os.fdatasync, args=(self.fd,))
        syncer.start()
        try:
            digests = self._chunk_digests()
        finally:
            syncer.join()  # everything QEMU needs is on disk before the trailer says so
        tr = trailer.Trailer(f"mfd {__version__}", digests, self.stream_pos, guest_state)
        os.pwrite(self.fd, tr.encode(), self.stream_pos)
        os.fdatasync(self.fd)
        self.stats.end_time = time.monotonic()
        self.stats.status = "completed"
        self.digests = digests

    def _chunk_digests(self) -> dict[str, trailer.BlockDigest]:
        """Every block's chunk digests over the pages ``file_bmap`` says are in the file.
        Chunks no channel hashed while writing them are hashed now, by the channels (DIGEST
        jobs); chunks with no page in the file keep the digest of nothing."""
        for i, (fb, hashed) in enumerate(zip(self.file_bmap, self.hashed, strict=True)):
            todo = fb & np.repeat(~hashed, trailer.CHUNK_PAGES)[: len(fb)]
            for pairs in chunk_jobs(todo):
                self.pool.send(i, pairs, self._hashed(self.chunk_table[i], pairs),
                               messages.DIGEST)
        self.pool.sync()
        return {b.idstr: trailer.BlockDigest(table.tobytes(), int(fb.sum()), int((~fb).sum()))
                for b, fb, table in zip(self.blocks, self.file_bmap, self.chunk_table,
                                        strict=True)}

    @staticmethod
    def _hashed(table: np.ndarray, pairs: np.ndarray) -> OnDone:
        def on_done(_moved: int, _mask: np.ndarray, digests: bytes) -> None:
            chunks, rows = trailer.job_digests(pairs, digests)
            table[chunks] = rows
        return on_done
