"""QEMU's precopy stream read as it arrives, split anywhere: a sans-I/O decoder.

The main channel of a migration is a byte stream; TCP cuts it at arbitrary points (QEMU's
own writes already split a section before its footer). The decoder keeps the bytes of an
unfinished item and decodes items only once they are whole, so any split of the same bytes
gives the same events. It does no I/O: the caller receives straight into
:meth:`StreamDecoder.buffer` and hands over the count (or calls :meth:`feed` with bytes)::

    Header(configuration)            file header and configuration section
    ReturnPath()                     OPEN_RETURN_PATH: the source reads our answers
    Ping(value)                      PING: answer PONG(value) (an mfd source's: MFD_PONG)
    SwitchoverStart()                MIG_CMD_SWITCHOVER_START (QEMU 10)
    Blocks([(idstr, used_length)])   ram START: MEM_SIZE and the block list
    Flush()                          RAM_SAVE_FLAG_MULTIFD_FLUSH: recv sync
    SectionEnd(final)                EOS of a RAM section (legacy flush mode syncs here)
    ZeroPages(idstr, pages)          RAM_SAVE_FLAG_ZERO records
    Pages(idstr, pages, data)        RAM_SAVE_FLAG_PAGE records (no multifd): ``data`` is a
                                     (pages, 4096) view of the received bytes, valid until the
                                     next :meth:`buffer` or :meth:`feed`
    Device(state)                    a FULL section mfd knows (timer, globalstate, mfd-guest)
    Skipped(idstr)                   a device section mfd has no layout for (after RAM only)
    Eof()                            QEMU_VM_EOF
    Vmdesc(json)                     the vmdesc after EOF
    Digests(tables)                  an mfd source's RAM digests after the vmdesc
    (``done`` is then True; a QEMU source may also just close after EOF: :meth:`close`)

Everything is validated before it becomes an event (block names, offsets, section ids,
versions, lengths); mapped-ram is refused (it is a file format).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mfd.errors import ProtocolError, Truncated
from mfd.protocol import constants as C
from mfd.protocol import devices, peer, ram, stream, trailer
from mfd.protocol.codec import Reader

_ZERO_CONT = C.RAM_SAVE_FLAG_ZERO | C.RAM_SAVE_FLAG_CONTINUE
_ZERO_RECORD = 9  # be64 word + fill byte
_PAGE_CONT = C.RAM_SAVE_FLAG_PAGE | C.RAM_SAVE_FLAG_CONTINUE
_PAGE_RECORD = 8 + C.TARGET_PAGE_SIZE
_VMDESC_MAX = 64 << 20
# a device section mfd cannot parse is skipped to its footer; it is never this large
_SKIP_MAX = 256 << 20
_BUFFER = 1 << 20


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
class Blocks:
    blocks: list[tuple[str, int]]


@dataclass(frozen=True)
class Flush:
    pass


@dataclass(frozen=True)
class SectionEnd:
    final: bool


@dataclass(frozen=True)
class ZeroPages:
    idstr: str
    pages: np.ndarray


@dataclass(frozen=True, eq=False)
class Pages:
    idstr: str
    pages: np.ndarray
    data: np.ndarray  # (len(pages), TARGET_PAGE_SIZE) uint8


@dataclass(frozen=True)
class Device:
    state: devices.DeviceState


@dataclass(frozen=True)
class Skipped:
    idstr: str


@dataclass(frozen=True)
class Eof:
    pass


@dataclass(frozen=True)
class Vmdesc:
    json: bytes


@dataclass(frozen=True)
class Digests:
    tables: dict[str, bytes]


Event = (Header | ReturnPath | Ping | SwitchoverStart | Blocks | Flush | SectionEnd
         | ZeroPages | Pages | Device | Skipped | Eof | Vmdesc | Digests)


class StreamDecoder:
    def __init__(self, what: str = "main channel") -> None:
        self.what = what
        self.buf = bytearray(_BUFFER)
        self.start = 0  # first byte not decoded yet
        self.end = 0  # end of the bytes received
        self.base = 0  # stream offset of buf[0]
        self.header_done = False
        self.sizes: dict[str, int] = {}
        self.section_names: dict[int, str] = {}
        self.ram_section_id: int | None = None
        self.in_ram: stream.SectionHeader | None = None  # the RAM section being read
        self.ram_complete = False
        self.last_block: str | None = None
        self.mfd_source = False  # the source sent mfd's PING: it is mfd
        self.eof = False
        self.vmdesc = False
        self.done = False

    @property
    def offset(self) -> int:
        """Stream bytes decoded so far."""
        return self.base + self.start

    # ------------------------------------------------------------------ bytes in

    def buffer(self, size: int = _BUFFER) -> memoryview:
        """Room for at least ``size`` more bytes, to receive into. A full buffer is replaced
        by a new one holding the undecoded tail (never resized in place: the views the last
        events handed out stay valid while the caller holds them)."""
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
        while self.start < self.end:
            if self.done:
                raise ProtocolError(f"{self.what} at offset {self.offset:#x}: "
                                    f"{self.end - self.start} bytes after the end of the "
                                    "migration stream")
            r = Reader(self.buf, self.start, base=self.base, end=self.end, what=self.what)
            try:
                self._item(r, events)
            except Truncated:
                if self.end - self.start > _SKIP_MAX + _BUFFER:
                    raise
                break
            self.start = r.pos
        return events

    def feed(self, data: bytes) -> list[Event]:
        view = self.buffer(len(data))
        view[: len(data)] = data
        return self.filled(len(data))

    def close(self) -> None:
        """The peer closed the connection: fine after EOF (a QEMU source may skip the
        vmdesc) unless an mfd source still owes its digests; anything else is cut short."""
        if self.done or (self.eof and not self.mfd_source and self.start == self.end):
            self.done = True
            return
        where = "after EOF" if self.eof else "before the end of the migration stream"
        raise ProtocolError(f"{self.what}: the source closed the connection at offset "
                            f"{self.base + self.end:#x}, {where}")

    # ------------------------------------------------------------------ items

    def _item(self, r: Reader, events: list[Event]) -> None:
        """Decode one whole item or raise Truncated having changed nothing."""
        if not self.header_done:
            stream.decode_file_header(r)
            cfg = stream.decode_configuration(r)
            r.peek_u8("what follows the configuration")  # subsections may still come
            if C.CAP_MAPPED_RAM in cfg.capabilities:
                raise r.error("the stream says mapped-ram: that is a file format, not a "
                              "live migration")
            self.header_done = True
            events.append(Header(cfg))
        elif self.in_ram is not None:
            self._records(r, events)
        elif self.vmdesc:
            events.append(Digests(peer.decode_digests(r, {
                idstr: trailer.num_chunks(size // C.TARGET_PAGE_SIZE)
                for idstr, size in self.sizes.items()})))
            self.done = True
        elif self.eof:
            at = r.pos
            if r.peek_u8("vmdesc") != C.QEMU_VM_VMDESCRIPTION:
                raise r.error("expected the vmdesc after EOF", at=at)
            r.u8("vmdesc")
            n = r.be32("vmdesc length")
            if n > _VMDESC_MAX:
                raise r.error(f"vmdesc of {n} bytes is implausible", at=at)
            events.append(Vmdesc(bytes(r.take(n, "vmdesc JSON"))))
            self.vmdesc = True
            self.done = not self.mfd_source
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
            events.append(Eof())
            return
        if kind == C.QEMU_VM_COMMAND:
            events.append(self._command(r, at))
            return
        names = dict(self.section_names)
        hdr, name = stream.decode_named_section(r, names)
        if name == C.RAM_SECTION_IDSTR:
            stream.check_ram_section(r, hdr, at, self.ram_section_id is not None,
                                     self.ram_complete)
            if hdr.type == C.QEMU_VM_SECTION_START:
                _, blocks = ram.decode_block_list(r)
                self.ram_section_id = hdr.section_id
                self.sizes = {idstr: size for idstr, size, _ in blocks}
                events.append(Blocks([(idstr, size) for idstr, size, _ in blocks]))
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
            self._skip(r, hdr.section_id, name)
            event = Skipped(name)
        else:
            raise r.error(f"device section {name!r} before the RAM's END: mfd has no layout "
                          "for it", at=at)
        self.section_names = names
        events.append(event)

    def _command(self, r: Reader, at: int) -> Event:
        cmd = stream.decode_command(r)
        if cmd.cmd == C.MIG_CMD_OPEN_RETURN_PATH and not cmd.payload:
            return ReturnPath()
        if cmd.cmd == C.MIG_CMD_PING and len(cmd.payload) == 4:
            value = int.from_bytes(cmd.payload, "big")
            self.mfd_source |= value == peer.MFD_PING
            return Ping(value)
        if cmd.cmd == C.MIG_CMD_SWITCHOVER_START and not cmd.payload:
            return SwitchoverStart()
        raise r.error(f"command {cmd.name} ({len(cmd.payload)} bytes) is not one mfd "
                      "takes (postcopy and COLO are not supported)", at=at)

    def _skip(self, r: Reader, section_id: int, idstr: str) -> None:
        """To just after the section's footer (0x7e, be32 id), found by scanning: the
        stream does not record a section's length. A footer counts only where a plausible
        next item follows it (a section, a command, EOF), so the section's own bytes that
        happen to look like its footer are passed over."""
        needle = bytes([C.QEMU_VM_SECTION_FOOTER]) + section_id.to_bytes(4, "big")
        pos = r.pos
        limit = min(self.end, r.pos + _SKIP_MAX)
        while True:
            found = self.buf.find(needle, pos, limit)
            if found < 0:
                if limit < self.end:
                    raise r.error(f"device section {idstr!r}: no footer within "
                                  f"{_SKIP_MAX >> 20} MiB")
                raise Truncated(f"{self.what}: device section {idstr!r} continues")
            after = found + len(needle)
            if after >= self.end:
                raise Truncated(f"{self.what}: device section {idstr!r} continues")
            if self.buf[after] in (C.QEMU_VM_EOF, C.QEMU_VM_SECTION_FULL, C.QEMU_VM_COMMAND):
                r.seek(after, "device section footer")
                return
            pos = found + 1

    # ------------------------------------------------------------------ RAM records

    def _records(self, r: Reader, events: list[Event]) -> None:
        """One RAM record, or a run of them that numpy decodes at once."""
        hdr = self.in_ram
        assert hdr is not None
        if self._zero_run(r, events) or self._page_run(r, events):
            return
        rec = ram.decode_record(r, self.sizes, self.last_block)
        kind = rec.flags & ~C.RAM_SAVE_FLAG_CONTINUE
        if kind == C.RAM_SAVE_FLAG_EOS:
            stream.decode_footer(r, hdr.section_id, C.RAM_SECTION_IDSTR)
            final = hdr.type == C.QEMU_VM_SECTION_END
            self.ram_complete = final
            self.in_ram = None
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
            events.append(Pages(rec.idstr, page, data))
        else:
            events.append(ZeroPages(rec.idstr, page))

    def _run(self, r: Reader, size: int, flags: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Consecutive CONTINUE records of ``size`` bytes with these flags: (records, page
        numbers) of the run, its offsets checked against the block; None if there is none."""
        if self.last_block is None or r.remaining < size:
            return None
        n = r.remaining // size
        recs = np.frombuffer(self.buf, dtype=np.uint8, count=n * size,
                             offset=r.pos).reshape(n, size)
        words = recs[:, :8].copy().view(">u8").reshape(-1)
        ok = (words & np.uint64(ram.FLAG_MASK)) == flags
        bad = np.flatnonzero(~ok)
        k = int(bad[0]) if len(bad) else n
        if k == 0:
            return None
        addrs = words[:k] & ~np.uint64(ram.FLAG_MASK)
        limit = self.sizes[self.last_block]
        if int(addrs.max()) + C.TARGET_PAGE_SIZE > limit:
            raise r.error(f"page offset {int(addrs.max()):#x} is past the end of block "
                          f"{self.last_block!r} (used_length {limit:#x})")
        return recs[:k], (addrs // C.TARGET_PAGE_SIZE).astype(np.int64)

    def _zero_run(self, r: Reader, events: list[Event]) -> bool:
        """ZERO|CONTINUE records (legacy zero-page detection sends one per zero page)."""
        run = self._run(r, _ZERO_RECORD, _ZERO_CONT)
        if run is None:
            return False
        recs, pages = run
        fills = np.flatnonzero(recs[:, 8])
        if len(fills):
            raise r.error(f"zero page record with fill byte {int(recs[fills[0], 8]):#04x}, "
                          "expected 0", at=r.pos + int(fills[0]) * _ZERO_RECORD + 8)
        r.take(len(pages) * _ZERO_RECORD, "zero page records")
        assert self.last_block is not None
        events.append(ZeroPages(self.last_block, pages))
        return True

    def _page_run(self, r: Reader, events: list[Event]) -> bool:
        """PAGE|CONTINUE records (pages on the main channel, without multifd)."""
        run = self._run(r, _PAGE_RECORD, _PAGE_CONT)
        if run is None:
            return False
        recs, pages = run
        r.take(len(pages) * _PAGE_RECORD, "page records")
        assert self.last_block is not None
        events.append(Pages(self.last_block, pages, recs[:, 8:]))
        return True
