"""One incoming migration, start to end: a coordinator of the package's collaborators.

The session takes the source's events from the main channel one at a time and hands each
to its handler (``Incoming.handlers``: event type -> method); what a handler needs it gets
from a collaborator::

    Loop           the one wait; its check (cancel, --timeout, connections) runs after
                   every wait, the channel pool's included
    Channels       the acceptor, the multifd channels' adoption, start and sync points
    MainChannel    the stream's events; answers on the return path
    IncomingRAM    unnamed RAM (taking over what --prealloc made before listening),
                   receivedmap, page hashes; the main channel's records go in through its
                   MappedPlacer
    SourceState    what the stream says besides RAM (runstate, guest state, hashes)
    Postcopy       its commands, the pause; from LISTEN the guest's uffd (PostcopyRAM):
                   PAGE and ZERO records then go to it, as the preempt channel's pages
    Images, Guest  where the RAM goes at the commit, and what goes at a failure
    Control        the status (one ``MigrationStatus``, moved by ``Control.move`` only),
                   what the monitor thread sees (a snapshot) and asks (cancel)

Every failure goes through :meth:`Incoming.run`'s one funnel (the status, the source told
on the return path, the guest and the RAM removed).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mfd.errors import ProtocolError
from mfd.main_thread.destination.channels import Channels
from mfd.main_thread.destination.loop import Loop
from mfd.main_thread.destination.postcopy import Postcopy
from mfd.main_thread.destination.qmp import Control
from mfd.main_thread.destination.ram import IncomingRAM
from mfd.main_thread.destination.streams import MainChannel
from mfd.main_thread.destination.target import Guest, Images
from mfd.main_thread.state import MigrationStatus, failure
from mfd.options import IncomingOptions
from mfd.protocol import livestream, trailer
from mfd.protocol.devices import GUEST_IDSTR
from mfd.shm import pagehash
from mfd.shm.ramblock import PendingRAM
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

    def runs(self, stopped: bool) -> bool:
        """The guest runs here as it ran at the source (globalstate), unless --stopped."""
        return not stopped and self.runstate in (None, "running")

    def on_device(self, ev: livestream.Device) -> None:
        if ev.state.idstr == "globalstate":
            self.runstate = str(ev.state.fields["runstate"])
        elif ev.state.idstr == GUEST_IDSTR:
            self.guest = ev.state.fields["guest"]  # type: ignore[assignment]

    def on_skipped(self, ev: livestream.Skipped) -> None:
        self.skipped.append(ev.idstr)

    def on_vmdesc(self, ev: livestream.Vmdesc) -> None:
        self.vmdesc_at = time.monotonic()

    def on_hashes(self, ev: livestream.Hashes) -> None:
        self.hashes = ev.tables

    def verify(self, ram: IncomingRAM, verifying: bool, promised: bool,
               hashing: list[float]) -> float | None:
        """An mfd source's page hashes against ours (``verifying``: we hashed what we
        placed; ``promised``: an mfd source said it would send them; ``hashing``: the
        seconds each channel hashed, last round): the milliseconds it took, or None."""
        if self.hashes and not verifying:
            raise ProtocolError("the source sent page hashes after saying it would not "
                                "verify RAM")
        if not self.hashes and promised:
            raise ProtocolError("the source sent no page hashes after saying it would "
                                "verify RAM")
        if not self.hashes:
            return None
        ram.compare(self.hashes)
        return (pagehash.wall_share(hashing) + time.monotonic() - self.vmdesc_at) * 1000


class Incoming:
    def __init__(self, listen: str, *, images: dict[str, str] | None = None,
                 guest: str | None = None, options: IncomingOptions | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        self.addr = tcp.parse_uri(listen)
        self.options = options or IncomingOptions()
        self.warn = warn or (lambda line: print(f"mfd incoming: {line}", file=sys.stderr))
        self.target = Images(images) if images is not None else Guest(guest)
        # QEMU's prealloc=on: RAM allocated and zeroed before listening, outside the
        # migration (and its clock)
        self.prealloc = PendingRAM(self.target.directory(), list(self.options.prealloc),
                                   zeroed=True) if self.options.prealloc else None
        self.control = Control(self.addr, self.options)
        self.loop = Loop(self._check)
        self.main = MainChannel(self.loop, self._lost)
        self.channels = Channels(self.options, self.loop)
        self.postcopy = Postcopy(self.options, self.target, self.loop, self.main,
                                 self.control, self.warn)
        self.source = SourceState()
        self.ram: IncomingRAM | None = None  # from the block list
        self.setup_time = 0.0
        self.handlers: dict[type, Callable[[Any], None]] = {
            livestream.ReturnPath: self.main.on_return_path,
            livestream.Ping: self.main.on_ping,
            livestream.Blocks: self._on_blocks,
            livestream.Flush: lambda ev: self._sync_point(flush=True),
            livestream.SectionEnd: lambda ev: self._sync_point(flush=False),
            livestream.Pages: self._on_pages,  # both to postcopy from LISTEN on
            livestream.ZeroPages: self._on_pages,
            livestream.XbzrlePages: self._on_xbzrle,
            livestream.Advise: self.postcopy.advise,
            livestream.Discard: self._on_discard,
            livestream.Listen: self._on_listen,
            livestream.Run: self._on_run,
            livestream.RecvBitmap: self.postcopy.recv_bitmap,
            livestream.Resume: self.postcopy.resume,
            livestream.Device: self.source.on_device,
            livestream.Skipped: self.source.on_skipped,
            livestream.Vmdesc: self.source.on_vmdesc,
            livestream.Hashes: self.source.on_hashes,
        }
        self._publish()

    def run(self) -> IncomingResult:
        self.channels.open(self.addr, self.warn)
        try:
            while (ev := self.main.next()) is not None:
                handler = self.handlers.get(type(ev))
                if handler is not None:
                    handler(ev)
            result = self._complete()
            self.control.move(S.COMPLETED)
            return result
        except BaseException as e:  # the one error funnel
            status, error, _ = failure(e, lambda: None)
            self.control.move(S(status), error)
            self.main.say_failed(error)
            self.target.discard(self.postcopy.hung_pid())
            raise
        finally:
            self._release()

    def _check(self) -> None:
        """The one place of periodic checks, after every wait: cancel and --timeout, the
        connections sorted since (multifd channels, the main channel, postcopy-preempt's),
        the snapshot the monitor sees."""
        self.control.check()
        self.channels.check()
        main = self.channels.acceptor.take_main()
        if main is not None:
            self.main.attach(*main)
            self.control.move(S.POSTCOPY_RECOVER if self.control.status is S.POSTCOPY_PAUSED
                              else S.ACTIVE)
        sock = self.channels.acceptor.take_preempt()
        if sock is not None:
            self.postcopy.preempt_channel(sock, self._lost)
        self._publish()

    def _publish(self) -> None:
        self.control.publish(
            parameters=self.channels.parameters(), multifd=self.channels.multifd is not False,
            return_path=self.main.return_path, postcopy=self.postcopy.query())

    def _lost(self, e: BaseException) -> None:
        """The main or preempt channel lost its link: postcopy past RUN pauses until the
        source resumes on the next main connection; anything else fails."""
        if not self.postcopy.recoverable(e):
            raise e
        self.postcopy.pause(e)
        self.channels.acceptor.await_resume(self.options.postcopy_preempt)

    # ------------------------------------------------------------------ RAM

    def _on_blocks(self, ev: livestream.Blocks) -> None:
        """The block list: RAM without names, receivedmap, guest."""
        self.ram = IncomingRAM(self.target.directory(), ev.blocks, self.prealloc)
        self.target.prepare(self.ram.blocks)
        self.setup_time = time.monotonic() - self.control.start

    def _start_channels(self, flushed: bool) -> IncomingRAM:
        """At the first sync point or page: the channels, and the main channel's
        placement; the RAM it places into."""
        if self.ram is None:
            raise ProtocolError("main channel: RAM records before the RAM block list")
        if self.channels.pool is None:
            pc = self.postcopy.preempt
            sockets = (self.main.sock, pc.sock if pc else None)
            self.channels.start(self.ram, self.main.decoder.mfd_source, flushed,
                                tuple(s for s in sockets if s is not None))
            self.ram.start_placing(self._verifying())
        return self.ram

    def _verifying(self) -> bool:
        return self.channels.verifying(self.main.decoder.mfd_source)

    def _sync_point(self, flush: bool) -> None:
        self._start_channels(flushed=flush)
        self.channels.sync_point(flush)

    def _on_pages(self, ev: livestream.Pages | livestream.ZeroPages) -> None:
        self._start_channels(flushed=False).place(ev)

    def _on_xbzrle(self, ev: livestream.XbzrlePages) -> None:
        ram = self._start_channels(flushed=False)
        if self.channels.multifd:
            raise ProtocolError("main channel: an XBZRLE page with multifd (QEMU refuses "
                                "xbzrle with multifd: 'Multifd is not compatible with "
                                "xbzrle')")
        if self.postcopy.ram is not None:
            raise ProtocolError("main channel: an XBZRLE page in postcopy (QEMU's postcopy "
                                "loads whole and zero pages only)")
        ram.place(ev)

    # ------------------------------------------------------------------ postcopy

    def _on_discard(self, ev: livestream.Discard) -> None:
        assert self.ram is not None
        self.ram.discard(ev.idstr, ev.runs, self._verifying())

    def _on_listen(self, ev: livestream.Listen) -> None:
        """From LISTEN on, pages go into the running guest through its uffd."""
        self._start_channels(flushed=False)
        assert self.ram is not None
        ram = self.postcopy.listen(self.ram, self._verifying())
        self.handlers[livestream.Pages] = self.handlers[livestream.ZeroPages] = ram.place

    def _on_run(self, ev: livestream.Run) -> None:
        assert isinstance(self.target, Guest)
        self.postcopy.run(self.target.workload(self._said_guest()),
                          self.source.runs(self.options.stopped))

    def _said_guest(self) -> dict | None:
        """An mfd source's guest state (its workload)."""
        return self.source.guest if self.main.decoder.mfd_source else None

    # ------------------------------------------------------------------ the end

    def _complete(self) -> IncomingResult:
        """The stream is complete: RAM checked against the source's hashes, postcopy's
        uffd gone, the RAM named and the guest on it, the result on the return path."""
        if self.channels.pool is None or self.ram is None:
            raise ProtocolError("main channel: the stream ended without RAM")
        verify_ms = self.source.verify(
            self.ram, self._verifying(), self.channels.promised(self.main.decoder.mfd_source),
            self.channels.hashing)
        if verify_ms is None and self.source.skipped:
            self.warn(f"the source is QEMU: its device state ({', '.join(self.source.skipped)}"
                      ") has no place here, only its RAM")
        if self.postcopy.ram is not None:
            self.postcopy.end()
        self.channels.pool.quiesce()  # nothing lands in RAM any more: the guest may take it
        # None: it runs already
        run = None if self.postcopy.ran else self.source.runs(self.options.stopped)
        where = self.target.commit(self.ram.blocks, self.ram.pending.link, run,
                                   self._said_guest())
        self.main.say_completed(verify_ms)
        theirs = self.source.hashes
        # a name for what was compared (= ours), after the downtime
        digests = {k: trailer.blake3_of(v) for k, v in theirs.items()} if theirs else {}
        return IncomingResult("completed", where, self.target.name,
                              (time.monotonic() - self.control.start) * 1000,
                              self.setup_time * 1000, digests, bool(theirs),
                              "mfd" if self.main.decoder.mfd_source else "qemu",
                              self.postcopy.figures)

    def _release(self) -> None:
        self.channels.close()
        self.postcopy.close()
        if self.ram is not None:
            self.ram.close()
        if self.prealloc is not None:
            self.prealloc.close()
        self.main.close()
        wait_relays()
