"""The precopy stream read as it arrives: one message at a time, each holding whole records.

Pure, like the file parser (``migration_file``), and built from the same record decoders;
it keeps what spans messages (the open RAM section, the last block named, the sections
started) and turns each message into events for the destination's main process::

    Blocks([(idstr, used_length)])   ram START: MEM_SIZE and the block list
    Flush()                          RAM_SAVE_FLAG_MULTIFD_FLUSH: recv sync
    SectionEnd(final)                EOS of a RAM section (legacy mode syncs here)
    ZeroPages(idstr, pages)          RAM_SAVE_FLAG_ZERO records (legacy zero-page detection)
    Page(idstr, page, data)          RAM_SAVE_FLAG_PAGE (not sent by mfd; QEMU's format)
    Device(DeviceState)              a FULL section mfd knows (globalstate, mfd-guest, timer)
    Eof()                            QEMU_VM_EOF: the stream is complete

Everything is validated before it becomes an event (block names, offsets, section ids,
versions); mapped-ram is refused (it is a file format).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mfd.errors import ProtocolError
from mfd.protocol import constants as C
from mfd.protocol import devices, ram, stream
from mfd.protocol.codec import Reader

_ZERO_CONT = C.RAM_SAVE_FLAG_ZERO | C.RAM_SAVE_FLAG_CONTINUE
_ZERO_RECORD = 9  # be64 word + fill byte


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


@dataclass(frozen=True)
class Page:
    idstr: str
    page: int
    data: bytes


@dataclass(frozen=True)
class Device:
    state: devices.DeviceState


@dataclass(frozen=True)
class Eof:
    pass


Event = Blocks | Flush | SectionEnd | ZeroPages | Page | Device | Eof


class LiveStreamDecoder:
    def __init__(self) -> None:
        self.offset = 0  # stream bytes consumed so far (for messages)
        self.header_done = False
        self.sizes: dict[str, int] = {}
        self.section_names: dict[int, str] = {}
        self.ram_section_id: int | None = None
        self.in_ram: stream.SectionHeader | None = None  # the RAM section being read
        self.ram_complete = False
        self.last_block: str | None = None
        self.done = False

    def feed(self, data: bytes) -> list[Event]:
        if self.done:
            raise ProtocolError(f"main channel at offset {self.offset:#x}: stream bytes "
                                "after EOF")
        r = Reader(data, base=self.offset, what="main channel")
        events: list[Event] = []
        if not self.header_done:
            stream.decode_file_header(r)
            cfg = stream.decode_configuration(r)
            if C.CAP_MAPPED_RAM in cfg.capabilities:
                raise r.error("the stream says mapped-ram: that is a file format, not a "
                              "live migration")
            self.header_done = True
        while r.remaining:
            if self.in_ram is not None:
                self._records(r, events)
                continue
            self._item(r, events)
            if self.done:
                if r.remaining:
                    raise r.error(f"{r.remaining} bytes after EOF")
                break
        self.offset += len(data)
        return events

    def _item(self, r: Reader, events: list[Event]) -> None:
        at = r.pos
        kind = r.peek_u8("next section type")
        if kind == C.QEMU_VM_EOF:
            r.u8("EOF")
            if not self.ram_complete:
                raise r.error("EOF before the RAM section's END", at=at)
            self.done = True
            events.append(Eof())
            return
        if kind == C.QEMU_VM_COMMAND:
            cmd = stream.decode_command(r)
            if cmd.cmd != C.MIG_CMD_SWITCHOVER_START:
                raise r.error(f"command {cmd.name} is not supported by mfd", at=at)
            return
        hdr, name = stream.decode_named_section(r, self.section_names)
        if name == C.RAM_SECTION_IDSTR:
            self._ram_section(r, hdr, at, events)
            return
        if hdr.type != C.QEMU_VM_SECTION_FULL or hdr.idstr not in devices.KNOWN_DEVICES:
            raise r.error(f"section {name!r} ({hdr.type_name}) is not one mfd can load", at=at)
        assert hdr.instance_id is not None
        events.append(Device(devices.decode_device(r, name, hdr.instance_id,
                                                   hdr.version_id or 0)))
        stream.decode_footer(r, hdr.section_id, name)

    def _ram_section(self, r: Reader, hdr: stream.SectionHeader, at: int,
                     events: list[Event]) -> None:
        stream.check_ram_section(r, hdr, at, self.ram_section_id is not None,
                                 self.ram_complete)
        if hdr.type == C.QEMU_VM_SECTION_START:
            self.ram_section_id = hdr.section_id
            _, blocks = ram.decode_block_list(r)
            self.sizes = {idstr: size for idstr, size, _ in blocks}
            events.append(Blocks([(idstr, size) for idstr, size, _ in blocks]))
        self.in_ram = hdr

    def _records(self, r: Reader, events: list[Event]) -> None:
        """RAM records up to EOS (and the section's footer); may end with the message."""
        hdr = self.in_ram
        assert hdr is not None
        while r.remaining:
            if self._zero_run(r, events):
                continue
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
                continue
            assert rec.idstr is not None
            self.last_block = rec.idstr
            page = rec.addr // C.TARGET_PAGE_SIZE
            if kind == C.RAM_SAVE_FLAG_PAGE:
                start = rec.data_offset - r.base
                events.append(Page(rec.idstr, page,
                                   bytes(r.buf[start : start + C.TARGET_PAGE_SIZE])))
            else:
                events.append(ZeroPages(rec.idstr, np.array([page], dtype=np.int64)))

    def _zero_run(self, r: Reader, events: list[Event]) -> bool:
        """Consecutive ZERO|CONTINUE records decoded in one numpy pass (legacy zero-page
        detection sends one per zero page)."""
        if self.last_block is None or r.remaining < 2 * _ZERO_RECORD:
            return False
        n = r.remaining // _ZERO_RECORD
        recs = np.frombuffer(r.buf, dtype=np.uint8, count=n * _ZERO_RECORD,
                             offset=r.pos).reshape(n, _ZERO_RECORD)
        words = recs[:, :8].copy().view(">u8").reshape(-1)
        ok = ((words & np.uint64(ram.FLAG_MASK)) == _ZERO_CONT) & (recs[:, 8] == 0)
        bad = np.flatnonzero(~ok)
        k = int(bad[0]) if len(bad) else n
        if k < 2:
            return False
        addrs = words[:k] & ~np.uint64(ram.FLAG_MASK)
        size = self.sizes[self.last_block]
        if int(addrs.max()) + C.TARGET_PAGE_SIZE > size:
            raise r.error(f"zero page offset {int(addrs.max()):#x} is past the end of block "
                          f"{self.last_block!r} (used_length {size:#x})")
        r.take(k * _ZERO_RECORD, "zero page records")
        events.append(ZeroPages(self.last_block, (addrs // C.TARGET_PAGE_SIZE)
                                .astype(np.int64)))
        return True
