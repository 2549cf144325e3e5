"""One incoming migration, start to end: a coordinator of the package's collaborators.

The session takes the source's events from the main channel one at a time and hands each
to its handler (``Incoming.handlers``: event type -> method); what a handler needs it gets
from a collaborator::

    Loop           the one wait; its check (cancel, --timeout, connections) runs after
                   every wait, the channel pool's included
    Channels       the acceptor, the multifd channels' adoption, start and sync points
    MainChannel    the stream's events; answers on the return path
    IncomingRAM    unnamed RAM, receivedmap, page hashes; the main channel's pages go in
                   through its MappedPlacer
    Postcopy       from LISTEN: the guest's uffd, its faults; PAGE and ZERO records then
                   go to it (and the preempt channel's pages)
    Images, Guest  where the RAM goes at the commit, and what goes at a failure
    Control        what the monitor thread sees (a snapshot) and asks (cancel)

Its state is one ``MigrationStatus``, moved by :meth:`Incoming._move` only; every failure
goes through :meth:`Incoming.run`'s one funnel (the status, the source told on the return
path, the guest and the RAM removed).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mfd.errors import MfdError, ProtocolError
from mfd.main_thread.destination.channels import Channels
from mfd.main_thread.destination.loop import Loop
from mfd.main_thread.destination.postcopy import Postcopy, check_userfaultfd
from mfd.main_thread.destination.qmp import Control
from mfd.main_thread.destination.ram import IncomingRAM
from mfd.main_thread.destination.streams import MainChannel, PreemptChannel
from mfd.main_thread.destination.target import Guest, Images
from mfd.main_thread.migrate import failure
from mfd.main_thread.state import MigrationStatus
from mfd.options import IncomingOptions
from mfd.protocol import livestream, peer, postcopy, returnpath, trailer
from mfd.protocol.devices import GUEST_IDSTR
from mfd.shm import pagehash
from mfd.shm.placer import MappedPlacer
from mfd.workers import tcp
from mfd.workers.tls import wait_relays

S = MigrationStatus


@dataclass
class IncomingResult:
    status: str
    blocks: dict[str, str]  # idstr -> where the RAM is now (shm path or image)
    guest: str | None
    total_time_ms: float
    setup_time_ms: float
    digests: dict[str, str] = field(default_factory=dict)
    verified: bool = False
    source: str = "mfd"  # "mfd" or "qemu"
    postcopy: dict = field(default_factory=dict)  # requests and fault latency, if it ran


@dataclass
class SourceState:
    """What the stream says besides RAM."""

    runstate: str | None = None  # globalstate's: the guest runs here if it ran there
    guest: dict | None = None  # an mfd source's guest state (its workload)
    skipped: list[str] = field(default_factory=list)  # device sections with no place here
    vmdesc_at: float = 0.0  # when the vmdesc came (an mfd source's hashes follow)
    hashes: dict[str, bytes] | None = None  # an mfd source's page hashes

    def on_skipped(self, ev: livestream.Skipped) -> None:
        self.skipped.append(ev.idstr)

    def on_vmdesc(self, ev: livestream.Vmdesc) -> None:
        self.vmdesc_at = time.monotonic()

    def on_hashes(self, ev: livestream.Hashes) -> None:
        self.hashes = ev.tables


class Incoming:
    def __init__(self, listen: str, *, images: dict[str, str] | None = None,
                 guest: str | None = None, options: IncomingOptions | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        if images is not None and guest is not None:
            raise MfdError("incoming takes either images or a guest name, not both")
        self.addr = tcp.parse_uri(listen)
        self.options = options or IncomingOptions()
        self.warn = warn or (lambda line: print(f"mfd incoming: {line}", file=sys.stderr))
        self.target = Images(images) if images is not None else Guest(guest)
        self.control = Control(self.addr, self.options)
        self.status = S.SETUP
        self.loop = Loop(self._check)
        self.main = MainChannel(self.loop, self._lost)
        self.channels = Channels(self.options, self.loop)
        self.source = SourceState()
        self.ram: IncomingRAM | None = None  # from the block list
        self.placer: MappedPlacer | None = None  # the main channel's pages, until LISTEN
        self.postcopy: Postcopy | None = None  # from LISTEN to the end
        self.preempt: PreemptChannel | None = None
        self.ran = False  # postcopy's RUN came: the guest runs (its RAM named at the end)
        self.figures: dict[str, object] = {}  # postcopy's, kept at its end
        self.setup_time = 0.0
        self.handlers: dict[type, Callable[[Any], None]] = {
            livestream.ReturnPath: self._on_return_path,
            livestream.Ping: self._on_ping,
            livestream.Blocks: self._on_blocks,
            livestream.Flush: lambda ev: self._sync_point(flush=True),
            livestream.SectionEnd: lambda ev: self._sync_point(flush=False),
            livestream.Pages: self._on_pages,  # both: postcopy's from LISTEN on
            livestream.ZeroPages: self._on_zero,
            livestream.XbzrlePages: self._on_xbzrle,
            livestream.Advise: self._on_advise,
            livestream.Discard: self._on_discard,
            livestream.Listen: self._on_listen,
            livestream.Run: self._on_run,
            livestream.RecvBitmap: self._on_recv_bitmap,
            livestream.Resume: self._on_resume,
            livestream.Device: self._on_device,
            livestream.Skipped: self.source.on_skipped,
            livestream.Vmdesc: self.source.on_vmdesc,
            livestream.Hashes: self.source.on_hashes,
        }
        self._publish()

    # ------------------------------------------------------------------ run

    def run(self) -> IncomingResult:
        self.channels.open(self.addr, self.warn)
        try:
            while (ev := self.main.next()) is not None:
                handler = self.handlers.get(type(ev))
                if handler is not None:
                    handler(ev)
            result = self._complete()
            self._move(S.COMPLETED)
            return result
        except BaseException as e:  # the one error funnel
            status, error, _ = failure(e, lambda: None)
            self._move(S(status), error=error)
            self.main.say_failed(error)
            self.target.discard(self.postcopy.guest_pid if self.postcopy and self.ran
                                else None)
            raise
        finally:
            self._release()

    def _move(self, status: MigrationStatus, **more: object) -> None:
        self.status = status
        self._publish(**more)

    def _publish(self, **more: object) -> None:
        """What the monitor sees (``qmp.Snapshot``)."""
        self.control.publish(
            status=self.status, parameters=self.channels.parameters(),
            multifd=self.channels.multifd is not False, return_path=self.main.return_path,
            postcopy=self.postcopy.faults.figures() if self.postcopy else self.figures,
            **more)

    def _check(self) -> None:
        """The one place of periodic checks, after every wait: cancel and --timeout, the
        connections sorted since (multifd channels, the main channel, postcopy-preempt's)."""
        self.control.check()
        self.channels.check()
        assert self.channels.acceptor is not None
        main = self.channels.acceptor.take_main()
        if main is not None:
            self.main.attach(*main)
            self._move(S.POSTCOPY_RECOVER if self.status is S.POSTCOPY_PAUSED else S.ACTIVE)
        sock = self.channels.acceptor.take_preempt()
        if sock is not None:
            if self.preempt is not None:
                self.preempt.close()
            self.preempt = PreemptChannel(sock, self.main.decoder.sizes, self.loop,
                                          self._lost)
            self.preempt.postcopy = self.postcopy
        self._publish()

    def _lost(self, e: BaseException) -> None:
        """The main or preempt channel lost its link. Postcopy past RUN pauses (QEMU's
        postcopy-paused): the guest runs here on what arrived, the source holds the rest,
        both wait for the link to come back (the guest's faults are still read, asked for
        once the source is back), unless the stream had ended anyway. Else it fails."""
        if not (self.ran and not self.main.decoder.done and (
                isinstance(e, tcp.LinkLost) or "closed the connection" in str(e))):
            raise e
        self._move(S.POSTCOPY_PAUSED)
        self.warn(f"postcopy paused: {e}; waiting for the source to resume (QEMU's migrate "
                  "with resume) on this port")
        self.main.drop()
        if self.preempt is not None:
            self.preempt.close()
        assert self.channels.acceptor is not None
        self.channels.acceptor.await_resume(self.options.postcopy_preempt)

    # ------------------------------------------------------------------ precopy's events

    def _on_return_path(self, ev: livestream.ReturnPath) -> None:
        self.main.return_path = True

    def _on_ping(self, ev: livestream.Ping) -> None:
        if self.main.return_path:
            self.main.reply(returnpath.encode_pong(
                peer.MFD_PONG if ev.value == peer.MFD_PING else ev.value))

    def _on_blocks(self, ev: livestream.Blocks) -> None:
        """The block list: RAM without names, receivedmap, guest."""
        self.ram = IncomingRAM(self.target.directory(ev.blocks), ev.blocks)
        self.target.prepare(self.ram.blocks)
        self.setup_time = time.monotonic() - self.control.start

    def _start_channels(self, flushed: bool) -> MappedPlacer:
        """At the first sync point or page: the channels; the main channel's placer."""
        if self.placer is None:
            if self.ram is None:
                raise ProtocolError("main channel: RAM records before the RAM block list")
            sockets = (self.main.sock, self.preempt.sock if self.preempt else None)
            self.channels.start(self.ram, self.main.decoder.mfd_source, flushed,
                                tuple(s for s in sockets if s is not None))
            self.placer = self.ram.placer(self._verifying())
        return self.placer

    def _verifying(self) -> bool:
        return self.channels.verifying(self.main.decoder.mfd_source)

    def _sync_point(self, flush: bool) -> None:
        self._start_channels(flushed=flush)
        self.channels.sync_point(flush)

    def _on_pages(self, ev: livestream.Pages) -> None:
        """PAGE records on the main stream (no multifd)."""
        placer = self._start_channels(flushed=False)
        placer.pages(self._block(ev.idstr), ev.pages, ev.data)

    def _on_zero(self, ev: livestream.ZeroPages) -> None:
        placer = self._start_channels(flushed=False)
        placer.zero(self._block(ev.idstr), ev.pages)

    def _on_xbzrle(self, ev: livestream.XbzrlePages) -> None:
        """XBZRLE records (no multifd, as QEMU): each delta applied onto the page here."""
        placer = self._start_channels(flushed=False)
        if self.channels.multifd:
            raise ProtocolError("main channel: an XBZRLE page with multifd (QEMU refuses "
                                "xbzrle with multifd: 'Multifd is not compatible with "
                                "xbzrle')")
        if self.postcopy is not None:
            raise ProtocolError("main channel: an XBZRLE page in postcopy (QEMU's postcopy "
                                "loads whole and zero pages only)")
        placer.xbzrle(self._block(ev.idstr), ev.pages, ev.data, ev.starts, ev.lengths,
                      f"main channel: block {ev.idstr!r}: XBZRLE page")

    def _block(self, idstr: str) -> int:
        assert self.ram is not None
        return self.ram.index[idstr]

    def _on_device(self, ev: livestream.Device) -> None:
        if ev.state.idstr == "globalstate":
            self.source.runstate = str(ev.state.fields["runstate"])
        elif ev.state.idstr == GUEST_IDSTR and self.main.decoder.mfd_source:
            self.source.guest = ev.state.fields["guest"]  # type: ignore[assignment]

    # ------------------------------------------------------------------ postcopy's events

    def _on_advise(self, ev: livestream.Advise) -> None:
        """POSTCOPY_ADVISE: postcopy may follow; fail now if it could not work here."""
        if not self.options.postcopy_ram:
            raise ProtocolError("the source advises postcopy: start mfd incoming with "
                                "--postcopy-ram (QEMU's destination needs the capability "
                                "too)")
        if isinstance(self.target, Images):
            raise MfdError("postcopy runs the guest before its RAM has arrived: it needs a "
                           "guest (--guest), not --image")
        check_userfaultfd()

    def _on_discard(self, ev: livestream.Discard) -> None:
        assert self.ram is not None
        self.ram.discard(ev.idstr, ev.runs, self._verifying())

    def _on_listen(self, ev: livestream.Listen) -> None:
        """POSTCOPY_LISTEN: the guest's uffd comes here; faults are served from now on,
        and pages go into the guest through it."""
        self._start_channels(flushed=False)
        assert self.ram is not None and self.target.client is not None
        self.postcopy = Postcopy.listen(self.target.client, self.ram.blocks,
                                        self.ram.received,
                                        self.ram.hashes if self._verifying() else None)
        self.loop.watch(self.postcopy.fileno(), self._on_faults)
        self.handlers[livestream.Pages] = self.handlers[livestream.ZeroPages] = \
            self.postcopy.place
        if self.preempt is not None:
            self.preempt.postcopy = self.postcopy

    def _on_faults(self) -> None:
        assert self.postcopy is not None
        requests = self.postcopy.requests()
        if requests and self.status is not S.POSTCOPY_PAUSED:  # else asked at resume
            if not self.main.return_path:
                raise ProtocolError("postcopy: the guest needs pages and the source opened "
                                    "no return path to ask for them")
            self.main.reply(requests)

    def _on_run(self, ev: livestream.Run) -> None:
        """POSTCOPY_RUN: the guest goes on from the source's state now; its RAM gets its
        names only once it has all arrived (a destination killed before leaves nothing)."""
        assert isinstance(self.target, Guest) and self.target.client is not None
        self.target.client.execute("postcopy-run", run=self._runs(),
                                   workload=self.target.workload(self.source.guest))
        self.ran = True
        self._move(S.POSTCOPY_ACTIVE)

    def _on_recv_bitmap(self, ev: livestream.RecvBitmap) -> None:
        assert self.ram is not None
        self.main.reply(postcopy.encode_recv_bitmap(
            ev.idstr, self.ram.received[self.ram.index[ev.idstr]] != 0))

    def _on_resume(self, ev: livestream.Resume) -> None:
        assert self.postcopy is not None
        self.main.reply(returnpath.encode_resume_ack() + self.postcopy.requests_again())
        self._move(S.POSTCOPY_ACTIVE)

    # ------------------------------------------------------------------ the end

    def _complete(self) -> IncomingResult:
        """The stream is complete: RAM checked against the source's hashes, postcopy's
        uffd gone, the RAM named and the guest on it, the result on the return path."""
        if self.channels.pool is None or self.ram is None:
            raise ProtocolError("main channel: the stream ended without RAM")
        verify_ms = self._verify()
        if self.postcopy is not None:  # every page is here: the guest's uffd may go
            faults = self.postcopy.faults
            self.figures = {**faults.figures(),
                            "x-latencies-us": [round(x * 1e6) for x in faults.latencies]}
            self.loop.unwatch(self.postcopy.fileno())
            self.postcopy.close()  # first: the guest may be waiting on a page right now
            self.postcopy = None
            if self.preempt is not None:
                self.preempt.postcopy = None
            assert self.target.client is not None
            self.target.client.execute("postcopy-end")
        guest = self.target.name
        self.channels.pool.quiesce()  # nothing lands in RAM any more: the guest may take it
        where = self.target.commit(self.ram.blocks, self.ram.pending.link,
                                   None if self.ran else self._runs(), self.source.guest)
        mfd_source = self.main.decoder.mfd_source
        if self.main.return_path:
            data = returnpath.encode_shut(0)
            if mfd_source:
                data = returnpath.encode(returnpath.MFD_RESULT, peer.encode_result(
                    "completed", verify_ms=verify_ms)) + data
            with contextlib.suppress(tcp.LinkLost):  # the guest runs here now, whatever
                self.main.reply(data)
        theirs = self.source.hashes
        # a name for what was compared (= ours), after the downtime
        digests = {k: trailer.blake3_of(v) for k, v in theirs.items()} if theirs else {}
        return IncomingResult("completed", where, guest,
                              (time.monotonic() - self.control.start) * 1000,
                              self.setup_time * 1000, digests, bool(theirs),
                              "mfd" if mfd_source else "qemu", self.figures)

    def _verify(self) -> float | None:
        """An mfd source's page hashes against ours; the milliseconds it took, or None."""
        assert self.ram is not None
        theirs, settings = self.source.hashes, self.channels.settings
        if theirs and not self._verifying():
            raise ProtocolError("the source sent page hashes after saying it would not "
                                "verify RAM")
        if not theirs and self.main.decoder.mfd_source and settings is not None \
                and settings.verify:
            raise ProtocolError("the source sent no page hashes after saying it would "
                                "verify RAM")
        if theirs:  # an mfd source, unless it was told --no-verify
            self.ram.compare(theirs)
            return (pagehash.wall_share(self.channels.hashing)
                    + time.monotonic() - self.source.vmdesc_at) * 1000
        if self.source.skipped:
            self.warn(f"the source is QEMU: its device state ({', '.join(self.source.skipped)}"
                      ") has no place here, only its RAM")
        return None

    def _runs(self) -> bool:
        """The guest runs here as it ran at the source (globalstate), unless --stopped."""
        return not self.options.stopped and self.source.runstate in (None, "running")

    def _release(self) -> None:
        self.channels.close()
        if self.postcopy is not None:
            self.postcopy.close()
            self.postcopy = None
        self.placer = None
        if self.ram is not None:
            self.ram.close()
        self.main.close()
        if self.preempt is not None:
            self.preempt.close()
        wait_relays()
