"""The destination's half of postcopy: the guest runs before its RAM has all arrived.

Mirrors ``migration/savevm.c``'s postcopy commands, with mfd's processes::

    ADVISE     userfaultfd must work here (else fail now, before the guest is stopped)
    DISCARD    the pages still dirty at the source: holes again, not received
               (``IncomingRAM.discard``)
    LISTEN     the guest's uffd comes here (``faults.PostcopyRAM``): its faults are read
               and asked for from now on, and PAGE and ZERO records go in through it
    RUN        the guest runs; its RAM gets its names only once it has all arrived (a
               destination killed before leaves nothing)
    preempt    postcopy-preempt's channel: the pages asked for, placed as they come
    paused     the link lost past RUN (QEMU's postcopy-paused): the guest runs on what
               arrived, its faults are still read and asked for once the source is back:
               the next main connection sends RECV_BITMAP per block, then RESUME
    end        every page is here: the uffd closed, the guest told
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from mfd.errors import MfdError, ProtocolError
from mfd.main_thread.destination.faults import PostcopyRAM
from mfd.main_thread.destination.loop import Loop
from mfd.main_thread.destination.qmp import Control
from mfd.main_thread.destination.ram import IncomingRAM
from mfd.main_thread.destination.streams import Lost, MainChannel, PreemptChannel
from mfd.main_thread.destination.target import Guest, Images
from mfd.main_thread.state import MigrationStatus
from mfd.options import IncomingOptions
from mfd.protocol import livestream, postcopy, returnpath
from mfd.shm.uffd import open_uffd
from mfd.workers import tcp


class Postcopy:
    def __init__(self, options: IncomingOptions, target: Images | Guest, loop: Loop,
                 main: MainChannel, control: Control, warn: Callable[[str], None]) -> None:
        self.options = options
        self.target = target
        self.loop = loop
        self.main = main
        self.control = control  # the status
        self.warn = warn
        self.ram: PostcopyRAM | None = None  # from LISTEN to the end
        self.preempt: PreemptChannel | None = None
        self.ran = False  # RUN came: the guest runs on RAM that has not all arrived
        self.figures: dict[str, object] = {}  # query-migrate's, kept at the end

    def advise(self, ev: livestream.Advise) -> None:
        """ADVISE: postcopy may follow; fail now if it could not work here."""
        if not self.options.postcopy_ram:
            raise ProtocolError("the source advises postcopy: start mfd incoming with "
                                "--postcopy-ram (QEMU's destination needs the capability "
                                "too)")
        if isinstance(self.target, Images):
            raise MfdError("postcopy runs the guest before its RAM has arrived: it needs a "
                           "guest (--guest), not --image")
        os.close(open_uffd())

    def listen(self, ram: IncomingRAM, verifying: bool) -> PostcopyRAM:
        assert self.target.client is not None
        self.ram = PostcopyRAM.listen(self.target.client, ram.blocks, ram.received,
                                      ram.hashes if verifying else None)
        self.loop.watch(self.ram.fileno(), self._on_faults)
        if self.preempt is not None:
            self.preempt.postcopy = self.ram
        return self.ram

    def run(self, workload: dict, run: bool) -> None:
        """RUN: the guest goes on from the source's state (``workload``), running if
        ``run``."""
        assert self.target.client is not None
        self.target.client.execute("postcopy-run", workload=workload, run=run)
        self.ran = True
        self.control.move(MigrationStatus.POSTCOPY_ACTIVE)

    def _on_faults(self) -> None:
        assert self.ram is not None
        requests = self.ram.faults()
        if requests and self.control.status is not MigrationStatus.POSTCOPY_PAUSED:
            if not self.main.return_path:  # (else asked for again at the resume)
                raise ProtocolError("postcopy: the guest needs pages and the source opened "
                                    "no return path to ask for them")
            self.main.reply(requests)

    def preempt_channel(self, sock: socket.socket, lost: Lost) -> None:
        """postcopy-preempt's connection (a new one after a resume)."""
        if self.preempt is not None:
            self.preempt.close()
        self.preempt = PreemptChannel(sock, self.main.decoder.sizes, self.loop, lost)
        self.preempt.postcopy = self.ram

    def recoverable(self, e: BaseException) -> bool:
        """Past RUN, a lost link pauses (the source still holds the rest), unless the
        stream had ended anyway."""
        return self.ran and not self.main.decoder.done and (
            isinstance(e, tcp.LinkLost) or "closed the connection" in str(e))

    def pause(self, why: BaseException) -> None:
        """postcopy-paused: the connections gone; the guest's faults are still read."""
        self.control.move(MigrationStatus.POSTCOPY_PAUSED)
        self.warn(f"postcopy paused: {why}; waiting for the source to resume (QEMU's "
                  "migrate with resume) on this port")
        self.main.drop()
        if self.preempt is not None:
            self.preempt.close()

    def recv_bitmap(self, ev: livestream.RecvBitmap) -> None:
        """The resumed source asks what arrived of a block."""
        assert self.ram is not None
        self.main.reply(postcopy.encode_recv_bitmap(
            ev.idstr, self.ram.received[self.ram.index[ev.idstr]] != 0))

    def resume(self, ev: livestream.Resume) -> None:
        assert self.ram is not None
        self.main.reply(returnpath.encode_resume_ack() + self.ram.again())
        self.control.move(MigrationStatus.POSTCOPY_ACTIVE)

    def end(self) -> None:
        """Every page is here: the guest's uffd may go."""
        assert self.ram is not None and self.target.client is not None
        asked = self.ram.asked
        self.figures = {**asked.figures(),
                        "x-latencies-us": [round(x * 1e6) for x in asked.latencies]}
        self.loop.unwatch(self.ram.fileno())
        self._close_uffd()  # first: the guest may be waiting on a page right now
        self.target.client.execute("postcopy-end")

    def query(self) -> dict[str, object]:
        """query-migrate's figures: the requests and their latency."""
        return self.ram.asked.figures() if self.ram is not None else self.figures

    def hung_pid(self) -> int | None:
        """The guest's process if it ran on RAM that never all arrived (it may be blocked
        on a page that will not come)."""
        return self.ram.guest_pid if self.ram is not None and self.ran else None

    def _close_uffd(self) -> None:
        if self.preempt is not None:
            self.preempt.postcopy = None
        if self.ram is not None:
            self.ram.close()
            self.ram = None

    def close(self) -> None:
        self._close_uffd()
        if self.preempt is not None:
            self.preempt.close()
