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

import numpy as np

from mfd import __version__
from mfd.errors import MfdError
from mfd.main_thread.digests import ChunkTable
from mfd.main_thread.pipeline import ChannelPool
from mfd.main_thread.precopy import Precopy, Progress
from mfd.main_thread.stats import MigrationStats
from mfd.options import MigrationParameters, SaveOptions
from mfd.protocol import constants as C
from mfd.protocol import devices, mapped_ram, ram, stream, trailer
from mfd.shm.control import GuestClient
from mfd.shm.ramblock import RAMBlock
from mfd.workers.file_channel import FileChannelConfig, channel_main


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


class FileSaver(Precopy):
    def __init__(self, path: str, blocks: list[RAMBlock], params: MigrationParameters,
                 options: SaveOptions, guest: GuestClient | None = None,
                 progress: Progress | None = None) -> None:
        super().__init__(blocks, params, guest, progress,
                         options.batch_pages, options.x)
        self.path = path
        self.options = options
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

        self.file_bmap = [np.zeros(b.num_pages, dtype=bool) for b in self.blocks]
        try:
            live = self.start_guest_log(self.options.stop_first)
            self.runstate = self.options.runstate or (
                "prelaunch" if self.guest is None else "running" if self.was_running
                else "paused")
            # chunk digests: hashed by the channel that writes a whole chunk, where RAM no
            # longer changes; any other chunk with pages in the file is hashed at completion
            self.chunks = ChunkTable(self.blocks)
            configs = [FileChannelConfig(
                channel_id=i, endpoint="", parent_pid=0, path=self.path, saving=True,
                blocks=tuple(self.blocks),
                pages_offsets=tuple(lay.header.pages_offset for lay in layout),
                direct_io=direct_io,
                zero_page_detection=self.params.zero_page_detection == "multifd",
                digest_chunks=not live, x=self.options.x)
                for i in range(self.params.multifd_channels)]
            with ChannelPool(configs, channel_main) as pool:
                self.pool = pool
                self.stats.setup_time = time.monotonic() - self.stats.start
                self.stats.status = "active"
                self.iterate(live)
                self._complete()
        except BaseException:
            self.resume_guest()
            raise
        finally:
            self.release()

    # ------------------------------------------------------------------ rounds

    def on_done(self, block: int, pages: np.ndarray, moved: int, nonzero: np.ndarray,
                digest: bytes) -> None:
        self.chunks.job_done(block, pages, digest)
        fb = self.file_bmap[block]
        fb[pages[nonzero]] = True  # written: data is at its slot
        fb[pages[~nonzero]] = False  # zero: nothing written, the bit says "zero"
        super().on_done(block, pages, moved, nonzero, digest)

    def on_legacy_zero(self, block: int, pages: np.ndarray) -> None:
        self.file_bmap[block][pages] = False

    def end_round(self) -> None:
        self.pool.sync()  # SYNC LOCAL: mapped-ram writes no SYNC packets, no MULTIFD_FLUSH

    def end_section(self, final: bool) -> None:
        """An empty PART section per round, as QEMU writes one per ram_save_iterate; the
        final round's pages belong to the END section, written after the bitmaps."""
        if final:
            return
        self._write_stream(stream.encode_section_part(C.QEMU_VM_SECTION_PART,
                                                      devices.RAM_SECTION_ID)
                           + ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID))

    # ------------------------------------------------------------------ completion

    def _complete(self) -> None:
        guest_state = None
        status = self.stop_guest()
        if status is not None:
            guest_state = {"name": status["name"], "runstate": self.runstate,
                           "workload": status["workload"]}
        self._write_stream(stream.encode_command(stream.Command(C.MIG_CMD_SWITCHOVER_START)))
        if self.guest is not None:
            self.round(final=True)  # what the guest dirtied since the last sync
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
        self.chunks.complete(self.pool, lambda i, pages: pages & self.file_bmap[i])
        tables = self.chunks.tables()
        return {b.idstr: trailer.BlockDigest(tables[b.idstr], int(fb.sum()), int((~fb).sum()))
                for b, fb in zip(self.blocks, self.file_bmap, strict=True)}
