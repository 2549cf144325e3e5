"""Walk a whole QEMU migration stream held in a buffer and describe (and validate) it.

Pure: it reads only the given buffer (an mmap of the file in practice) and returns a
:class:`MigrationFile`. It understands both of QEMU's RAM encodings:

* mapped-ram: every block entry carries a MappedRamHeader, the stream jumps past each
  block's pages region, and page data is found through the bitmap;
* the classic stream: pages are PAGE/ZERO records inside START/PART/END sections; the walk
  records each page's *last* record (a later round's copy wins), so a loader can place the
  final RAM with vectorized copies.

Everything read is validated before it is used: a file that would make a loader write
outside a block, or that lacks its END section or EOF, is refused here, before any I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mfd.errors import ProtocolError
from mfd.protocol import constants as C
from mfd.protocol import devices, mapped_ram, ram, stream, trailer
from mfd.protocol.codec import Reader

PAGE_ABSENT = -2  # stream format: no record for the page
PAGE_ZERO = -1  # stream format: last record was ZERO


@dataclass
class RamBlockEntry:
    idstr: str
    used_length: int
    entry_offset: int
    mapped_ram: mapped_ram.MappedRamHeader | None = None
    # stream format only: per page PAGE_ABSENT, PAGE_ZERO or the absolute offset of its data
    page_state: np.ndarray | None = None

    @property
    def num_pages(self) -> int:
        return self.used_length // C.TARGET_PAGE_SIZE

    @property
    def header_offset(self) -> int | None:
        if self.mapped_ram is None:
            return None
        return self.mapped_ram.bitmap_offset - C.MAPPED_RAM_HDR_SIZE


@dataclass
class MigrationFile:
    start: int
    file_size: int
    version: int = 0
    configuration: stream.Configuration | None = None
    mem_size: int = 0
    blocks: list[RamBlockEntry] = field(default_factory=list)
    sections: list[stream.SectionHeader] = field(default_factory=list)
    commands: list[tuple[int, stream.Command]] = field(default_factory=list)
    record_counts: dict[str, int] = field(default_factory=dict)
    devices: list[devices.DeviceState] = field(default_factory=list)
    skipped_devices: list[tuple[str, int, int]] = field(default_factory=list)
    ram_complete: bool = False
    eof_offset: int | None = None
    vmdesc_offset: int | None = None
    vmdesc: bytes | None = None
    stream_end: int | None = None
    trailer: trailer.Trailer | None = None
    trailing_bytes: int = 0

    @property
    def mapped_ram(self) -> bool:
        return self.configuration is not None and \
            C.CAP_MAPPED_RAM in self.configuration.capabilities

    def block(self, idstr: str) -> RamBlockEntry:
        for b in self.blocks:
            if b.idstr == idstr:
                return b
        raise KeyError(idstr)


def parse(buf, file_size: int | None = None, start: int = 0) -> MigrationFile:
    """Walk the stream in ``buf`` from ``start`` (``file:PATH,offset=N``) to EOF and beyond."""
    size = len(buf) if file_size is None else file_size
    r = Reader(buf, start, end=size, what="migration file")
    mf = MigrationFile(start=start, file_size=size)
    if size - start == 0:
        raise ProtocolError("migration file is empty" + (f" after offset {start:#x}" if start
                                                           else ""))
    mf.version = stream.decode_file_header(r)
    mf.configuration = stream.decode_configuration(r)
    _Walker(r, mf).run()
    _parse_tail(r, mf)
    return mf


class _Walker:
    def __init__(self, r: Reader, mf: MigrationFile) -> None:
        self.r = r
        self.mf = mf
        self.ram_section_id: int | None = None
        self.sizes: dict[str, int] = {}
        self.by_name: dict[str, RamBlockEntry] = {}
        self.last_block: str | None = None
        self.section_names: dict[int, str] = {}
        self.resumes_after: tuple[int, str] = (-1, "")  # mapped-ram: (pos, block) after pages

    def count(self, name: str) -> None:
        self.mf.record_counts[name] = self.mf.record_counts.get(name, 0) + 1

    def run(self) -> None:
        r, mf = self.r, self.mf
        while True:
            at = r.pos
            if not r.remaining:
                raise r.error("truncated: the file ends before QEMU_VM_EOF (a save that did not "
                              "complete, or a cut copy)")
            kind = r.peek_u8("next section type")
            if kind == C.QEMU_VM_EOF:
                r.u8("EOF")
                mf.eof_offset = r.base + at
                if self.ram_section_id is None:
                    raise r.error("stream has no RAM section before EOF", at=at)
                if not mf.ram_complete:
                    raise r.error("stream reached EOF without the RAM section's END", at=at)
                return
            if kind == C.QEMU_VM_COMMAND:
                mf.commands.append((r.base + at, stream.decode_command(r)))
                continue
            hdr, name = stream.decode_named_section(r, self.section_names)
            mf.sections.append(hdr)
            if name == C.RAM_SECTION_IDSTR:
                self.ram_section(hdr, at)
            elif hdr.type == C.QEMU_VM_SECTION_FULL:
                self.device_section(hdr, at)
            else:
                raise r.error(f"iterative section {name!r} is not RAM: mfd cannot read it",
                              at=at)
            stream.decode_footer(r, hdr.section_id, name)

    def ram_section(self, hdr: stream.SectionHeader, at: int) -> None:
        r, mf = self.r, self.mf
        stream.check_ram_section(r, hdr, at, self.ram_section_id is not None, mf.ram_complete)
        if hdr.type == C.QEMU_VM_SECTION_START:
            self.ram_section_id = hdr.section_id
            self.block_list()
        else:
            self.count(hdr.type_name)
        self.records()
        if hdr.type == C.QEMU_VM_SECTION_END:
            mf.ram_complete = True

    def block_list(self) -> None:
        """MEM_SIZE and the blocks; mapped-ram's header follows each entry."""
        mf = self.mf

        def on_block(idstr: str, used_length: int, entry: int) -> None:
            block = RamBlockEntry(idstr, used_length, entry)
            if mf.mapped_ram:
                self.mapped_ram_block(block)
            else:
                block.page_state = np.full(block.num_pages, PAGE_ABSENT, dtype=np.int64)
            mf.blocks.append(block)
            self.by_name[idstr] = block
            self.sizes[idstr] = used_length

        mf.mem_size, _ = ram.decode_block_list(self.r, on_block)
        self.count("MEM_SIZE")

    def mapped_ram_block(self, block: RamBlockEntry) -> None:
        """Validate the header against the file, then continue after the pages region."""
        r = self.r
        hdr_at = r.pos
        hdr = mapped_ram.decode_header(r, block.idstr)
        header_end = r.offset
        bmap_end = hdr.bitmap_offset + mapped_ram.bitmap_size(block.num_pages)
        if hdr.bitmap_offset < header_end:
            raise r.error(f"block {block.idstr!r}: bitmap_offset {hdr.bitmap_offset:#x} points "
                          f"into the stream before the header's end ({header_end:#x})",
                          at=hdr_at)
        if bmap_end > r.base + r.pos + r.remaining:
            raise r.error(f"block {block.idstr!r}: bitmap {hdr.bitmap_offset:#x}..{bmap_end:#x}"
                          " is past the end of the file (truncated?)", at=hdr_at)
        if hdr.pages_offset < bmap_end:
            raise r.error(f"block {block.idstr!r}: pages_offset {hdr.pages_offset:#x} overlaps "
                          f"the bitmap (ends at {bmap_end:#x})", at=hdr_at)
        block.mapped_ram = hdr
        end = hdr.pages_offset + block.used_length
        if end > r.base + r.pos + r.remaining:
            raise r.error(f"block {block.idstr!r}: pages region {hdr.pages_offset:#x}..{end:#x} "
                          "is past the end of the file (truncated?)", at=hdr_at)
        r.seek(end - r.base, f"end of block {block.idstr!r} pages")
        self.resumes_after = (r.pos, block.idstr)

    def records(self) -> None:
        """Records up to EOS. mapped-ram streams carry none but EOS (QEMU: 'Unexpected RAM
        flags' otherwise)."""
        r, mf = self.r, self.mf
        if mf.mapped_ram:
            at = r.pos
            word = r.be64("RAM record")
            if word != C.RAM_SAVE_FLAG_EOS:
                pos, idstr = self.resumes_after
                where = (f", right after block {idstr!r}'s pages region (is its pages_offset "
                         "or used_length wrong?)" if pos == at else
                         ": mapped-ram streams carry no page records")
                raise r.error(f"RAM record {word:#x} ({ram.flag_names(word & ram.FLAG_MASK)}) "
                              f"where EOS was expected{where}", at=at)
            self.count("EOS")
            return
        while True:
            at = r.pos
            rec = ram.decode_record(r, self.sizes, self.last_block)
            kind = rec.flags & ~C.RAM_SAVE_FLAG_CONTINUE
            if kind == C.RAM_SAVE_FLAG_EOS:
                self.count("EOS")
                return
            if kind == C.RAM_SAVE_FLAG_MULTIFD_FLUSH:
                self.count("MULTIFD_FLUSH")
                continue
            self.last_block = rec.idstr
            state = self.by_name[rec.idstr].page_state
            assert state is not None
            if kind == C.RAM_SAVE_FLAG_PAGE:
                self.count("PAGE")
                state[rec.addr // C.TARGET_PAGE_SIZE] = rec.data_offset
            else:
                self.count("ZERO")
                state[rec.addr // C.TARGET_PAGE_SIZE] = PAGE_ZERO

    def device_section(self, hdr: stream.SectionHeader, at: int) -> None:
        r, mf = self.r, self.mf
        assert hdr.idstr is not None and hdr.instance_id is not None
        if hdr.idstr in devices.KNOWN_DEVICES:
            mf.devices.append(devices.decode_device(r, hdr.idstr, hdr.instance_id,
                                                    hdr.version_id or 0))
            return
        # The stream has no section lengths; find this section's footer (0x7e + be32 id)
        # followed by a plausible next byte. Good enough to show the rest of the file.
        needle = bytes([C.QEMU_VM_SECTION_FOOTER]) + hdr.section_id.to_bytes(4, "big")
        buf = r.buf
        pos = r.pos
        end = r.pos + r.remaining
        while True:
            found = bytes(buf[pos:end]).find(needle) if end - pos < (1 << 24) else \
                _find(buf, needle, pos, end)
            if found < 0:
                raise r.error(f"device section {hdr.idstr!r}: layout unknown and its footer "
                              "was not found", at=at)
            cand = pos + found
            nxt = cand + len(needle)
            if nxt >= end or buf[nxt] <= C.QEMU_VM_COMMAND:
                mf.skipped_devices.append((hdr.idstr, r.base + r.pos, cand - r.pos))
                r.seek(cand, "device footer")
                return
            pos = cand + 1


def _find(buf, needle: bytes, pos: int, end: int) -> int:
    chunk = 1 << 22
    while pos < end:
        got = bytes(buf[pos : min(end, pos + chunk + len(needle))]).find(needle)
        if got >= 0:
            return pos + got
        pos += chunk
    return -1


def _parse_tail(r: Reader, mf: MigrationFile) -> None:
    """Optional vmdesc after EOF, then mfd's trailer (found from the end) or stray bytes."""
    if r.remaining and r.peek_u8("vmdesc") == C.QEMU_VM_VMDESCRIPTION:
        mf.vmdesc_offset = r.offset
        mf.vmdesc = stream.decode_vmdesc(r)
    mf.stream_end = r.offset
    tail_len = min(trailer.TAIL_SIZE, mf.file_size)
    tail = bytes(r.buf[mf.file_size - tail_len : mf.file_size])
    if mf.file_size - mf.stream_end >= trailer.TAIL_SIZE and trailer.has_trailer(tail):
        mf.trailer = trailer.decode_trailer(r.buf, mf.file_size)
        _check_trailer_blocks(mf)
    else:
        mf.trailing_bytes = mf.file_size - mf.stream_end


def _check_trailer_blocks(mf: MigrationFile) -> None:
    """The trailer describes the blocks the stream lists, page for page; if not, the stream
    was changed after mfd wrote it (the trailer's digest covers only the trailer)."""
    assert mf.trailer is not None and mf.stream_end is not None
    names = [b.idstr for b in mf.blocks]
    if sorted(mf.trailer.blocks) != sorted(names):
        raise ProtocolError(f"mfd trailer at offset {mf.stream_end:#x} lists RAM block(s) "
                            f"{', '.join(map(repr, mf.trailer.blocks))} but the stream has "
                            f"{', '.join(map(repr, names))} (file changed after the save?)")
    if not mf.mapped_ram:
        raise ProtocolError(f"mfd trailer at offset {mf.stream_end:#x} after a stream without "
                            "mapped-ram (mfd writes its trailer only into mapped-ram files)")
    for b in mf.blocks:
        d = mf.trailer.blocks[b.idstr]
        if len(d.chunks) != trailer.num_chunks(b.num_pages) * trailer.DIGEST_SIZE:
            raise ProtocolError(f"mfd trailer at offset {mf.stream_end:#x} has "
                                f"{len(d.chunks) // trailer.DIGEST_SIZE} chunk digests for "
                                f"block {b.idstr!r}, expected "
                                f"{trailer.num_chunks(b.num_pages)} (file changed after the "
                                "save?)")
        if d.normal_pages + d.zero_pages != b.num_pages:
            raise ProtocolError(f"mfd trailer at offset {mf.stream_end:#x} counts "
                                f"{d.normal_pages + d.zero_pages} pages for block {b.idstr!r}, "
                                f"the stream {b.num_pages} (file changed after the save?)")


def read_bitmap(buf, block: RamBlockEntry) -> np.ndarray:
    """A mapped-ram block's file_bmap as bool per page (bits past the block ignored)."""
    hdr = block.mapped_ram
    assert hdr is not None
    n = mapped_ram.bitmap_size(block.num_pages)
    return mapped_ram.words_to_bits(bytes(buf[hdr.bitmap_offset : hdr.bitmap_offset + n]),
                                    block.num_pages)
