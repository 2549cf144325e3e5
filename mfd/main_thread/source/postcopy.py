"""Postcopy on the source: the switch, the push, postcopy-paused and recovery (QEMU's).

::

    due        migrate-start-postcopy, or --postcopy-after's time has come (checked between
               batches of a round, as QEMU between its iterations)
    switch     postcopy_start: stop the guest; discard on the destination every page still
               dirty (sent before or not); the device state in a PACKAGED blob that ends
               with RUN: the destination's guest runs from here, ours never again
    push       the pages not sent since the switch, in order, in one PART section, at
               max-postcopy-bandwidth; then END, EOF and the verdict (Switchover.finish)
    requests   the pages the destination asked for, at once (on the preempt channel when
               there is one): before each batch of the push, and whenever the push waits
               for the rate limiter's window (they count in it, they never wait for it)
    pause      the link is lost: postcopy-paused, the guest stays stopped here with every
               page the destination may lack, until QMP ``migrate`` with ``resume``
    recover    a new main connection: RECV_BITMAP per block (what the destination lacks is
               unsent again), POSTCOPY_RESUME, its RESUME_ACK; the push goes on
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from mfd.main_thread.source.channel import PEER_TIMEOUT
from mfd.main_thread.source.preempt import Preempt
from mfd.main_thread.source.ramstream import INLINE_PAGES, RamStream
from mfd.main_thread.source.session import Session
from mfd.main_thread.source.switchover import Switchover
from mfd.main_thread.state import MigrationStatus
from mfd.options import MigrateOptions
from mfd.protocol import constants as C
from mfd.protocol import devices, postcopy, ram, stream
from mfd.protocol.mapped_ram import page_runs
from mfd.workers import tcp


def _ping(n: int) -> bytes:
    return stream.encode_command(stream.Command(C.MIG_CMD_PING, n.to_bytes(4, "big")))


class Postcopy:
    def __init__(self, session: Session, options: MigrateOptions, stream_: RamStream,
                 switchover: Switchover, preempt: Preempt | None, monitored: bool,
                 warn: Callable[[str], None]) -> None:
        self.session = session
        self.channel, self.precopy, self.stats = session.channel, session.precopy, session.stats
        self.options = options
        self.stream = stream_
        self.switchover = switchover
        self.preempt = preempt  # None without postcopy-preempt
        self.monitored = monitored  # a QMP monitor serves this migration: it can resume
        self.warn = warn
        self.unsent: list[np.ndarray] = []  # per block: pages not sent since the switch

    def due(self) -> bool:
        o = self.options
        return o.postcopy and (self.session.control.postcopy_requested or (
            o.postcopy_after is not None
            and time.monotonic() - self.stats.start >= o.postcopy_after))

    def run(self) -> None:
        """The switch, then the push until the destination's verdict; a lost link pauses
        and, once resumed, the push goes on."""
        self._switch()
        self.precopy.limiter.wait = self._wait_serving
        while True:
            try:
                if self.preempt is not None:
                    self.preempt.open()
                self._push()
                self.channel.send(
                    stream.encode_section_part(C.QEMU_VM_SECTION_END, devices.RAM_SECTION_ID)
                    + ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID)
                    + stream.encode_eof()
                    + (stream.encode_vmdesc(devices.vmdesc_json(self.options.machine, ()))
                       if self.channel.peer_mfd else b""))
                self.switchover.finish([])
                return
            except tcp.LinkLost as e:
                if self.channel.shut is not None:
                    raise
                self._pause(str(e))

    def _switch(self) -> None:
        """``postcopy_start``: stop the guest, discard what the destination has that is
        stale (every page still dirty, sent before or not), the device state in a package
        that ends with RUN."""
        status = self.switchover.stop()
        self.session.enter_postcopy()
        self.stream.postcopy()
        blocks = self.precopy.blocks
        self.unsent = [np.unpackbits(w.view(np.uint8), bitorder="little")[
            : b.used_length // C.TARGET_PAGE_SIZE].astype(bool)
            for w, b in zip(self.precopy.bmap, blocks, strict=True)]
        discards = b"".join(
            postcopy.encode_discards(b.idstr, [
                (start * C.TARGET_PAGE_SIZE, (end - start) * C.TARGET_PAGE_SIZE)
                for start, end in page_runs(np.flatnonzero(u)).tolist()])
            for b, u in zip(blocks, self.unsent, strict=True))
        package = (postcopy.encode_bare(C.MIG_CMD_POSTCOPY_LISTEN)
                   + self.switchover.device_state(status)
                   + _ping(3) + postcopy.encode_bare(C.MIG_CMD_POSTCOPY_RUN))
        self.channel.send(stream.encode_command(stream.Command(C.MIG_CMD_SWITCHOVER_START))
                          + discards + _ping(2) + postcopy.encode_packaged(package)
                          + _ping(4))
        self.stats.run_time = time.monotonic()
        self.session.move(MigrationStatus.POSTCOPY_ACTIVE)

    # ------------------------------------------------------------------ the push

    def _push(self) -> None:
        """The pages not sent since the switch, in order, in one PART section; before
        each batch, the pages the destination asked for (QEMU without preempt: the
        migration thread sends queued pages first and goes on from there). Again from the
        start after a recovery, of what the destination said it lacks."""
        self.stream.begin_section(final=False)
        for block, unsent in enumerate(self.unsent):
            todo = np.flatnonzero(unsent)
            for at in range(0, len(todo), INLINE_PAGES):
                self._serve_requests()
                self._send_unsent(block, todo[at : at + INLINE_PAGES])
        self._serve_requests()
        self.channel.send(ram.encode_eos() + stream.encode_footer(devices.RAM_SECTION_ID))

    def _serve_requests(self) -> None:
        self.channel.read()
        requests = self.channel.requests
        while requests:
            block, first, n = requests.popleft()
            self._send_unsent(block, np.arange(first, first + n, dtype=np.int64),
                              urgent=True)

    def _wait_serving(self, seconds: float) -> None:
        """The push waits for the rate limiter's window: a page asked for meanwhile goes at
        once (QEMU: the request posts ``rate_limit_sem``, which cuts the migration thread's
        wait short; with preempt its return-path thread sends the page itself)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not self.channel.wait(left):  # closed: nothing more to serve
                time.sleep(left)
                return
            self._serve_requests()

    def _send_unsent(self, block: int, pages: np.ndarray, urgent: bool = False) -> None:
        """Each page goes once after the switch (QEMU's destination fails on a second);
        a requested one on the preempt channel when there is one."""
        pages = pages[self.unsent[block][pages]]
        if not len(pages):
            return
        self.unsent[block][pages] = False
        self.stats.remaining -= len(pages) * C.TARGET_PAGE_SIZE
        if urgent and self.preempt is not None:
            self.preempt.send(block, pages)
        else:
            self.stream.inline(block, pages)

    # ------------------------------------------------------------------ pause, recovery

    def _pause(self, why: str) -> None:
        """QEMU's postcopy-paused: the link is gone, the guest stays stopped here with every
        page the destination may lack; a QMP ``migrate`` with ``resume`` (to the same or
        another address) reconnects and recovers."""
        if not self.monitored:  # nobody could ever resume it
            raise tcp.LinkLost(why)
        self.session.move(MigrationStatus.POSTCOPY_PAUSED)
        self.warn(f"postcopy paused: {why}; resume with QMP migrate "
                  '{"uri": ..., "resume": true} on this migration\'s monitor')
        self.channel.drop()
        if self.preempt is not None:
            self.preempt.close()
        control = self.session.control
        self.session.wait(lambda: control.resume_uri is not None)
        uri = control.take_resume()
        assert uri is not None
        self._recover(uri)

    def _recover(self, uri: str) -> None:
        """RECV_BITMAP per block (what is not there is unsent again), POSTCOPY_RESUME, its
        RESUME_ACK."""
        self.session.move(MigrationStatus.POSTCOPY_RECOVER)
        self.session.reconnect(uri)
        channel = self.channel
        channel.bitmaps_due = {b.idstr for b in self.precopy.blocks}
        channel.send(b"".join(postcopy.encode_recv_bitmap_request(b.idstr)
                              for b in self.precopy.blocks)
                     + stream.encode_command(stream.Command(C.MIG_CMD_POSTCOPY_RESUME)))
        self.session.wait(lambda: not channel.bitmaps_due and channel.resume_acked,
                          PEER_TIMEOUT, "answer RECV_BITMAP and POSTCOPY_RESUME")
        channel.check()
        for idstr, received in channel.bitmaps.items():
            self.unsent[channel.index[idstr]] = ~received  # what it lacks is dirty again
        self.stats.remaining = sum(int(u.sum()) for u in self.unsent) * C.TARGET_PAGE_SIZE
        self.session.move(MigrationStatus.POSTCOPY_ACTIVE)
