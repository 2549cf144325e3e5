"""QEMU's precopy stream read as it arrives, split anywhere: a sans-I/O decoder.

The main channel of a migration is a byte stream; TCP cuts it at arbitrary points (QEMU's
own writes already split a section before its footer). The decoder keeps the bytes of an
unfinished item and decodes items only once they are whole, so any split of the same bytes
gives the same events. It does no I/O: the caller receives straight into
:meth:`StreamDecoder.buffer` and hands over the count (or calls :meth:`feed` with bytes), or,
for a whole stream already in memory (an mmap'd migration file), has it decoded where it lies
with :meth:`StreamDecoder.decode_all` (nothing copied; page data are views of that buffer).
The same items, validations and events serve the live destination and the file parser
(``mfd.protocol.migration_file``)::

    Header(configuration)            file header and configuration section
    ReturnPath()                     OPEN_RETURN_PATH: the source reads our answers
    Ping(value)                      PING: answer PONG(value) (an mfd source's: MFD_PONG)
    SwitchoverStart()                MIG_CMD_SWITCHOVER_START (QEMU 10)
    Advise(page_summary, ...)        POSTCOPY_ADVISE: postcopy may follow the precopy rounds
    Discard(idstr, runs)             POSTCOPY_RAM_DISCARD: these pages are stale, drop them
    Listen()                         POSTCOPY_LISTEN (in the package): fault handling on
    Run()                            POSTCOPY_RUN (the package's end): the guest runs here
    RecvBitmap(idstr)                RECV_BITMAP (recovery, a :meth:`resumed` decoder): send
                                     the source what arrived of this block
    Resume()                         POSTCOPY_RESUME: the source goes on
                                     (PACKAGED itself is transparent: its items are decoded
                                     as they come, checked to end where it says)
    Blocks([(idstr, used_length)])   ram START: MEM_SIZE and the block list
    Flush()                          RAM_SAVE_FLAG_MULTIFD_FLUSH: recv sync
    SectionEnd(final)                EOS of a RAM section (legacy flush mode syncs here)
    ZeroPages(idstr, pages)          RAM_SAVE_FLAG_ZERO records
    Pages(idstr, pages, data)        RAM_SAVE_FLAG_PAGE records (no multifd): ``data`` is a
                                     (pages, 4096) view of the received bytes, valid until the
                                     next :meth:`buffer` or :meth:`feed`; ``offsets``: where
                                     each page's data is in the stream
    XbzrlePages(idstr, pages, data,  RAM_SAVE_FLAG_XBZRLE records (no multifd): page i's delta
                starts, lengths)     is data[starts[i]:starts[i] + lengths[i]] (a view of the
                                     received bytes, valid as Pages' data)
    Device(state)                    a FULL section mfd knows (timer, globalstate, mfd-guest)
    Skipped(idstr)                   a device section mfd has no layout for (after RAM only)
    Eof()                            QEMU_VM_EOF
    Vmdesc(json)                     the vmdesc after EOF
    Hashes(tables)                   an mfd source's page hashes after the vmdesc
    (``done`` is then True; a QEMU source may also just close after EOF: :meth:`close`)

Everything is validated before it becomes an event (block names, offsets, section ids,
versions, lengths); mapped-ram is refused (it is a file format) unless the caller reads a file
and gives the decoder its ``mapped_ram`` hook. Events carry their stream offsets (not compared:
the same stream split differently gives equal events). With ``framing=True`` the decoder also
reports what a describer shows and a loader ignores::

    Section(header)                  every section header (RAM START/PART/END, devices' FULL)
    Command(offset, command)         every command, before its ReturnPath/Ping/SwitchoverStart

With ``file=True`` the stream ends at EOF and its vmdesc, if one follows: later bytes are the
file's (mfd's trailer), never an mfd peer's page hashes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from mfd.errors import ProtocolError, Truncated
from mfd.protocol import constants as C
from mfd.protocol import devices, mapped_ram, peer, postcopy, ram, ramruns, stream
from mfd.protocol.codec import Reader
from mfd.protocol.ramruns import Pages, XbzrlePages, ZeroPages

_VMDESC_MAX = 64 << 20
# a device section mfd cannot parse is skipped to its footer; it is never this large
_SKIP_MAX = 256 << 20
_BUFFER = 1 << 20

# A file's reader of what follows each block entry in a mapped-ram stream: called with the
# reader just after the entry, the block's idstr and used_length, it consumes the block's
# MappedRamHeader and moves the reader to where the stream resumes (after the block's pages
# region: the file is random access, its bitmap and pages are not stream bytes).
MappedRamHook = Callable[[Reader, str, int], mapped_ram.MappedRamHeader]


@dataclass(frozen=True)
class Header:
    configuration: stream.Configuration


@dataclass(frozen=True)
class ReturnPath:
    pass


@dataclass(frozen=True)
class Ping:
    value: int


@dataclass(frozen=True)
class SwitchoverStart:
    pass


@dataclass(frozen=True)
class Listen:
    pass


@dataclass(frozen=True)
class Run:
    pass


@dataclass(frozen=True)
class RecvBitmap:
    idstr: str


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class Blocks:
    blocks: list[tuple[str, int]]
    # absolute offset of each block's entry in the stream
    entries: list[int] = field(default_factory=list, compare=False)
    # mapped-ram: each block's MappedRamHeader, as the decoder's hook read it
    headers: list[mapped_ram.MappedRamHeader] = field(default_factory=list, compare=False)


@dataclass(frozen=True)
class Flush:
    pass


@dataclass(frozen=True)
class SectionEnd:
    final: bool


@dataclass(frozen=True)
class Device:
    state: devices.DeviceState


@dataclass(frozen=True)
class Skipped:
    idstr: str
    offset: int = field(default=-1, compare=False)  # of the section's body
    length: int = field(default=0, compare=False)  # of the body, up to its footer


@dataclass(frozen=True)
class Eof:
    offset: int = field(default=-1, compare=False)


@dataclass(frozen=True)
class Vmdesc:
    json: bytes
    offset: int = field(default=-1, compare=False)


@dataclass(frozen=True)
class Hashes:
    tables: dict[str, bytes]  # block -> its page hash table (``mfd.shm.pagehash``)


@dataclass(frozen=True)
class Section:
    header: stream.SectionHeader  # (framing=True) its offset is in the header


@dataclass(frozen=True)
class Command:
    offset: int  # (framing=True)
    command: stream.Command


Advise = postcopy.Advise
Discard = postcopy.Discard
Event = (Header | ReturnPath | Ping | SwitchoverStart | Advise | Discard | Listen | Run
         | RecvBitmap | Resume | Blocks | Flush | SectionEnd | ZeroPages | Pages
         | XbzrlePages | Device | Skipped | Eof | Vmdesc | Hashes | Section | Command)


class StreamDecoder:
    """``framing``: also Section and Command events; ``file``: the stream ends at EOF and
    its optional vmdesc; ``mapped_ram``: accept mapped-ram, this hook reading what follows
    each block entry (only with :meth:`decode_all`: it moves past bytes never fed)."""

    def __init__(self, what: str = "main channel", *, framing: bool = False,
                 file: bool = False, mapped_ram: MappedRamHook | None = None,
                 preempt: dict[str, int] | None = None) -> None:
        self.what = what
        self.framing = framing
        self.file = file
        self.mapped_ram_hook = mapped_ram
        self.buf = bytearray(_BUFFER)
        self.missing = 0  # what the item cut short by the buffer's end still needs
        self.start = 0  # first byte not decoded yet
        self.end = 0  # end of the bytes received
        self.base = 0  # stream offset of buf[0]
        self.header_done = False
        self.mapped_ram = False  # the configuration says mapped-ram
        self.sizes: dict[str, int] = {}
        self.section_names: dict[int, str] = {}
        self.ram_section_id: int | None = None
        self.in_ram: stream.SectionHeader | None = None  # the RAM section being read
        self.footer_due: stream.SectionHeader | None = None  # after a RAM section's EOS
        self.ram_complete = False
        self.last_block: str | None = None
        self.blocks_end = -1  # mapped-ram: where the stream resumed after the last block
        self.mfd_source = False  # the source sent mfd's PING: it is mfd
        self.blocks_seen = False
        self.advised = False  # POSTCOPY_ADVISE came: postcopy may follow
        self.package_end: int | None = None  # stream offset where PACKAGED's bytes end
        self.listening = False  # POSTCOPY_LISTEN came: postcopy runs
        if preempt is not None:  # postcopy-preempt's channel: bare RAM records, no header,
            self.header_done = True  # no section, no EOS (QEMU 10), of these blocks
            self.sizes = dict(preempt)
            self.in_ram = stream.SectionHeader(C.QEMU_VM_SECTION_PART, -1)
        self.preempt = preempt is not None
        self.resuming = False  # a recovery connection: RECV_BITMAPs, then POSTCOPY_RESUME
        self.eof = False
        self.vmdesc = False
        self.done = False

    def resumed(self, what: str) -> StreamDecoder:
        """Postcopy recovery: the decoder of the new main connection, which goes on from
        this one's state (blocks, sections) with no header: RECV_BITMAP per block,
        POSTCOPY_RESUME, then the rest of the RAM section's records as they come."""
        new = StreamDecoder(what, framing=self.framing)
        for name in ("header_done", "sizes", "section_names", "ram_section_id",
                     "ram_complete", "blocks_seen", "advised", "listening", "mfd_source"):
            setattr(new, name, getattr(self, name))
        new.resuming = True
        return new

    @property
    def offset(self) -> int:
        """Stream bytes decoded so far."""
        return self.base + self.start

    @property
    def _finished(self) -> bool:
        """A file's stream is over: what follows is not for the decoder."""
        return self.done and self.file

    # ------------------------------------------------------------------ bytes in

    def buffer(self, size: int = _BUFFER) -> memoryview:
        """Room for at least ``size`` more bytes, to receive into. A full buffer is replaced
        by a new one holding the undecoded tail (never resized in place: the views the last
        events handed out stay valid while the caller holds them)."""
        size = max(size, min(self.missing, _SKIP_MAX))  # room for the whole pending field
        self.missing = 0
        if len(self.buf) - self.end < size:
            tail = self.end - self.start
            new = bytearray(max(_BUFFER, tail + size))
            new[:tail] = self.buf[self.start : self.end]
            self.base += self.start
            self.buf, self.start, self.end = new, 0, tail
        return memoryview(self.buf)[self.end :]

    def filled(self, n: int) -> list[Event]:
        """``n`` bytes were received into :meth:`buffer`: the events they complete."""
        self.end += n
        events: list[Event] = []
        while self.start < self.end and not self._finished:
            try:
                self._step(events)
            except Truncated as e:
                if self.end - self.start > _SKIP_MAX + _BUFFER:
                    raise
                self.missing = e.missing
                break
        return events

    def feed(self, data: bytes) -> list[Event]:
        view = self.buffer(len(data))
        view[: len(data)] = data
        return self.filled(len(data))

    def decode_all(self, buf, start: int = 0, end: int | None = None) -> Iterator[Event]:
        """The events of a whole stream held in ``buf[start:end]`` (bytes, a memoryview, an
        mmap), decoded where it lies: nothing is copied, a Pages event's data is a view of
        ``buf``, offsets are ``buf``'s. The same items as :meth:`filled`, but the bytes
        cannot grow: one ending inside an item raises :class:`Truncated`. Yields item by
        item, so a caller keeps no more than it wants; stops at the end of ``buf``, or
        (``file``) where the stream ends: then :attr:`offset` is that end. For a fresh
        decoder, which then reads nothing else."""
        assert self.end == 0 and not self.header_done, "decode_all needs a fresh decoder"
        self.buf, self.base, self.start = buf, 0, start
        self.end = len(buf) if end is None else end
        while self.start < self.end and not self._finished:
            events: list[Event] = []
            self._step(events)
            yield from events

    def close(self) -> None:
        """The peer closed the connection: fine after EOF (a QEMU source may skip the
        vmdesc) unless an mfd source still owes its page hashes; anything else is cut short."""
        if self.done or (self.eof and not self.mfd_source and self.start == self.end):
            self.done = True
            return
        where = "after EOF" if self.eof else "before the end of the migration stream"
        raise ProtocolError(f"{self.what}: the source closed the connection at offset "
                            f"{self.base + self.end:#x}, {where}")

    # ------------------------------------------------------------------ items

    def _step(self, events: list[Event]) -> None:
        """Decode the item at ``start``, or raise Truncated having changed nothing."""
        if self.done:
            raise ProtocolError(f"{self.what} at offset {self.offset:#x}: "
                                f"{self.end - self.start} bytes after the end of the "
                                "migration stream")
        r = Reader(self.buf, self.start, base=self.base, end=self.end, what=self.what)
        item: list[Event] = []  # an item cut short leaves no event behind
        self._item(r, item)
        if self.package_end is not None and r.offset >= self.package_end:
            if r.offset > self.package_end:
                raise r.error(f"an item crosses the end of the package at "
                              f"{self.package_end:#x}", at=self.start)
            self.package_end = None
        self.start = r.pos
        events += item

    def _item(self, r: Reader, events: list[Event]) -> None:
        """Decode one whole item or raise Truncated having changed nothing."""
        if not self.header_done:
            stream.decode_file_header(r)
            cfg = stream.decode_configuration(r)
            r.peek_u8("what follows the configuration")  # subsections may still come
            if C.CAP_MAPPED_RAM in cfg.capabilities:
                if self.mapped_ram_hook is None:  # a socket's, or a compressed file's
                    raise r.error("the stream says mapped-ram: " + (
                        "its pages are read at their file offsets, which a compressed file "
                        "does not have (libvirt refuses to compress it too)" if self.file
                        else "that is a file format, not a live migration"))
                self.mapped_ram = True
            self.header_done = True
            events.append(Header(cfg))
        elif self.footer_due is not None:
            stream.decode_footer(r, self.footer_due.section_id, C.RAM_SECTION_IDSTR)
            self.footer_due = None
        elif self.in_ram is not None:
            self._records(r, events)
        elif self.vmdesc:
            events.append(Hashes(peer.decode_hashes(r, {
                idstr: size // C.TARGET_PAGE_SIZE for idstr, size in self.sizes.items()})))
            self.done = True
        elif self.eof:
            at = r.pos
            if r.peek_u8("vmdesc") != C.QEMU_VM_VMDESCRIPTION:
                if self.file:  # the vmdesc is optional; the rest is the file's
                    self.done = True
                    return
                raise r.error("expected the vmdesc after EOF", at=at)
            r.u8("vmdesc")
            n = r.be32("vmdesc length")
            if n > _VMDESC_MAX:
                raise r.error(f"vmdesc of {n} bytes is implausible", at=at)
            events.append(Vmdesc(bytes(r.take(n, "vmdesc JSON")), r.base + at))
            self.vmdesc = True
            self.done = self.file or not self.mfd_source
        else:
            self._section(r, events)

    def _section(self, r: Reader, events: list[Event]) -> None:
        at = r.pos
        kind = r.peek_u8("next section type")
        if kind == C.QEMU_VM_EOF:
            r.u8("EOF")
            if not self.ram_complete:
                raise r.error("EOF before the RAM section's END", at=at)
            self.eof = True
            # QEMU's postcopy stream ends here (no vmdesc), and its source then waits for
            # SHUT; an mfd source still sends the vmdesc and its page hashes
            self.done = self.listening and not self.mfd_source and not self.file
            events.append(Eof(r.base + at))
            return
        if kind == C.QEMU_VM_COMMAND:
            self._command(r, at, events)
            return
        names = dict(self.section_names)
        hdr, name = stream.decode_named_section(r, names)
        if self.framing:
            events.append(Section(hdr))
        if name == C.RAM_SECTION_IDSTR:
            stream.check_ram_section(r, hdr, at, self.ram_section_id is not None,
                                     self.ram_complete)
            if hdr.type == C.QEMU_VM_SECTION_START:
                events.append(self._block_list(r))
                self.ram_section_id = hdr.section_id
            self.section_names = names
            self.in_ram = hdr
            return
        if hdr.type != C.QEMU_VM_SECTION_FULL:
            raise r.error(f"section {name!r} ({hdr.type_name}): mfd loads only RAM as an "
                          "iterative section", at=at)
        assert hdr.instance_id is not None
        if hdr.idstr in devices.KNOWN_DEVICES:
            event: Event = Device(devices.decode_device(r, name, hdr.instance_id,
                                                        hdr.version_id or 0))
            stream.decode_footer(r, hdr.section_id, name)
        elif self.ram_complete:
            body = r.pos
            _skip_section(r, hdr.section_id, name)
            event = Skipped(name, r.base + body, r.pos - 5 - body)
        else:
            raise r.error(f"device section {name!r} before the RAM's END: mfd has no layout "
                          "for it", at=at)
        self.section_names = names
        events.append(event)

    def _block_list(self, r: Reader) -> Blocks:
        """MEM_SIZE and the block list; in a mapped-ram file, the hook reads each block's
        header and moves past its pages region."""
        hook = self.mapped_ram_hook
        headers: list[mapped_ram.MappedRamHeader] = []
        on_block = None
        if self.mapped_ram:
            assert hook is not None

            def on_block(idstr: str, used_length: int, _entry: int) -> None:
                headers.append(hook(r, idstr, used_length))

        _, blocks = ram.decode_block_list(r, on_block)
        self.sizes = {idstr: size for idstr, size, _ in blocks}
        self.blocks_seen = True
        self.blocks_end = r.offset
        return Blocks([(idstr, size) for idstr, size, _ in blocks],
                      [entry for _, _, entry in blocks], headers)

    def _command(self, r: Reader, at: int, events: list[Event]) -> None:
        cmd = stream.decode_command(r)
        if cmd.cmd == C.MIG_CMD_OPEN_RETURN_PATH and not cmd.payload:
            event: Event = ReturnPath()
        elif cmd.cmd == C.MIG_CMD_PING and len(cmd.payload) == 4:
            value = int.from_bytes(cmd.payload, "big")
            self.mfd_source |= value == peer.MFD_PING
            event = Ping(value)
        elif cmd.cmd == C.MIG_CMD_SWITCHOVER_START and not cmd.payload:
            event = SwitchoverStart()
        elif cmd.cmd == C.MIG_CMD_POSTCOPY_ADVISE and not self.blocks_seen:
            event = postcopy.decode_advise(cmd.payload, f"{self.what} at offset {at:#x}")
            self.advised = True
        elif cmd.cmd == C.MIG_CMD_POSTCOPY_RAM_DISCARD and self.advised and self.blocks_seen:
            event = postcopy.decode_discard(cmd.payload, self.sizes,
                                            f"{self.what} at offset {r.base + at:#x}")
        elif cmd.cmd == C.MIG_CMD_PACKAGED and self.advised and len(cmd.payload) == 4:
            n = int.from_bytes(cmd.payload, "big")
            if n > C.MAX_VM_CMD_PACKAGED_SIZE or self.package_end is not None:
                raise r.error(f"PACKAGED of {n} bytes" + (" inside a package" if
                              self.package_end is not None else ", more than 16 MiB"), at=at)
            self.package_end = r.offset + n
            if self.framing:
                events.append(Command(r.base + at, cmd))
            return
        elif cmd.cmd == C.MIG_CMD_POSTCOPY_LISTEN and self.package_end is not None \
                and not cmd.payload and not self.listening:
            event = Listen()
            self.listening = True
        elif cmd.cmd == C.MIG_CMD_POSTCOPY_RUN and self.listening and not cmd.payload:
            event = Run()
        elif cmd.cmd == C.MIG_CMD_RECV_BITMAP and self.resuming:
            event = RecvBitmap(postcopy.decode_block_name(
                cmd.payload, self.sizes, f"{self.what} at offset {r.base + at:#x}: "
                "RECV_BITMAP"))
        elif cmd.cmd == C.MIG_CMD_POSTCOPY_RESUME and self.resuming and not cmd.payload:
            event = Resume()
            self.resuming = False
        else:
            raise r.error(f"command {cmd.name} ({len(cmd.payload)} bytes) is not one mfd "
                          "takes here (COLO and postcopy recovery are not supported; "
                          "postcopy's commands come in QEMU's order)", at=at)
        if self.framing:
            events.append(Command(r.base + at, cmd))
        events.append(event)

    # ------------------------------------------------------------------ RAM records

    def _records(self, r: Reader, events: list[Event]) -> None:
        """One RAM record, or runs of CONTINUE records (one event per run)."""
        hdr = self.in_ram
        assert hdr is not None
        if self.mapped_ram:
            self._mapped_ram_record(r)
        elif self.last_block is not None and ramruns.read(r, self.last_block,
                                                          self.sizes[self.last_block], events):
            return
        rec = ram.decode_record(r, self.sizes, self.last_block)
        kind = rec.flags & ~C.RAM_SAVE_FLAG_CONTINUE
        if self.preempt and kind not in (C.RAM_SAVE_FLAG_PAGE, C.RAM_SAVE_FLAG_ZERO):
            raise r.error(f"RAM record flags {ram.flag_names(kind)} on the preempt channel, "
                          "which carries pages only")
        if kind == C.RAM_SAVE_FLAG_EOS:
            # the event goes out before the footer arrives, as QEMU's loader syncs at EOS:
            # QEMU's source may hold the footer back until its channels have moved on,
            # which in legacy flush mode waits for this very sync
            final = hdr.type == C.QEMU_VM_SECTION_END
            self.ram_complete = final
            self.in_ram = None
            self.footer_due = hdr
            events.append(SectionEnd(final))
            return
        if kind == C.RAM_SAVE_FLAG_MULTIFD_FLUSH:
            events.append(Flush())
            return
        assert rec.idstr is not None
        self.last_block = rec.idstr
        page = np.array([rec.addr // C.TARGET_PAGE_SIZE], dtype=np.int64)
        if kind == C.RAM_SAVE_FLAG_PAGE:
            start = rec.data_offset - r.base
            data = np.frombuffer(self.buf, dtype=np.uint8, count=C.TARGET_PAGE_SIZE,
                                 offset=start).reshape(1, -1)
            events.append(Pages(rec.idstr, page, data, rec.data_offset))
        elif kind == C.RAM_SAVE_FLAG_XBZRLE:
            data = np.frombuffer(self.buf, dtype=np.uint8, count=rec.length,
                                 offset=rec.data_offset - r.base)
            events.append(XbzrlePages(rec.idstr, page, data, np.zeros(1, dtype=np.int64),
                                      np.array([rec.length], dtype=np.int64)))
        else:
            events.append(ZeroPages(rec.idstr, page))

    def _mapped_ram_record(self, r: Reader) -> None:
        """mapped-ram streams carry no record but EOS (QEMU: 'Unexpected RAM flags'): the
        pages are in the file's pages regions. A wrong one right where the stream resumed
        after the last block's pages region means that jump was wrong."""
        at = r.pos
        word = r.be64("RAM record")
        r.pos = at
        if word != C.RAM_SAVE_FLAG_EOS:
            where = (f", right after block {next(reversed(self.sizes))!r}'s pages region (is "
                     "its pages_offset or used_length wrong?)"
                     if r.base + at == self.blocks_end else
                     ": mapped-ram streams carry no page records")
            raise r.error(f"RAM record {word:#x} ({ram.flag_names(word & ram.FLAG_MASK)}) "
                          f"where EOS was expected{where}", at=at)



def _skip_section(r: Reader, section_id: int, idstr: str) -> None:
    """To just after the section's footer (0x7e, be32 id), found by scanning: the
    stream does not record a section's length. A footer counts only where a plausible
    next item follows it (a section, a command, EOF), so the section's own bytes that
    happen to look like its footer are passed over."""
    needle = bytes([C.QEMU_VM_SECTION_FOOTER]) + section_id.to_bytes(4, "big")
    pos = r.pos
    end = r.pos + r.remaining
    limit = min(end, r.pos + _SKIP_MAX)
    while True:
        found = _find(r.buf, needle, pos, limit)
        if found < 0:
            if limit < end:
                raise r.error(f"device section {idstr!r}: no footer within "
                              f"{_SKIP_MAX >> 20} MiB")
            raise Truncated(f"{r.what} at offset {r.offset:#x}: truncated: device "
                            f"section {idstr!r} (layout unknown) has no footer before "
                            "the end of the bytes")
        after = found + len(needle)
        if after >= end:
            raise Truncated(f"{r.what} at offset {r.offset:#x}: truncated: device "
                            f"section {idstr!r} (layout unknown) ends the bytes")
        if r.buf[after] in (C.QEMU_VM_EOF, C.QEMU_VM_SECTION_FULL, C.QEMU_VM_COMMAND):
            r.seek(after, "device section footer")
            return
        pos = found + 1


def _find(buf, needle: bytes, pos: int, end: int) -> int:
    """``buf.find`` for any buffer: a memoryview has none, so it is searched in slices."""
    if hasattr(buf, "find"):  # bytes, bytearray, mmap
        return buf.find(needle, pos, end)
    chunk = 1 << 22
    while pos < end:
        stop = min(end, pos + chunk + len(needle) - 1)
        got = bytes(buf[pos:stop]).find(needle)
        if got >= 0:
            return pos + got
        pos += chunk
    return -1
