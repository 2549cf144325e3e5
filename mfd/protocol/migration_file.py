"""A whole QEMU migration file held in a buffer, described (and validated).

Pure: it reads only the given buffer (an mmap of the file in practice) and returns a
:class:`MigrationFile`. The stream in it is QEMU's precopy stream, decoded where it lies by
the same sans-I/O decoder as a live migration's main channel
(:meth:`mfd.protocol.livestream.StreamDecoder.decode_all`: nothing is copied); this module
adds what only a file has::

    buffer --decode_all--> events --> MigrationFile (sections, commands, record counts,
      |                                blocks, devices, EOF, vmdesc)
      |   mapped-ram: after each block entry, mapped_ram_header reads the MappedRamHeader,
      |               checks it against the file and jumps over the bitmap and pages region
      |   stream:     each page's last record -> page_state (data, zero or none)
      +-- after EOF/vmdesc: mfd's trailer, found from the end of the file

It understands both of QEMU's RAM encodings:

* mapped-ram: every block entry carries a MappedRamHeader, the stream jumps past each
  block's pages region, and page data is found through the bitmap;
* the classic stream: pages are PAGE/ZERO records inside START/PART/END sections; the parse
  records each page's final state (data, zero, or no record), which ``mfd inspect`` shows. A
  loader places the pages as the records come (a later round's copy replaces an earlier one),
  from this buffer or from a decompressed stream fed to :func:`on_event` piece by piece.

Everything read is validated before it is used: a file that would make a loader write
outside a block, or that lacks its END section or EOF, is refused here, before any I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mfd.errors import ProtocolError
from mfd.protocol import constants as C
from mfd.protocol import devices, livestream, mapped_ram, stream, trailer
from mfd.protocol.codec import Reader

# stream format: a page's last record (page_state)
PAGE_ABSENT = 0  # none
PAGE_ZERO = 1  # ZERO
PAGE_DATA = 2  # PAGE


@dataclass
class RamBlockEntry:
    idstr: str
    used_length: int
    entry_offset: int
    mapped_ram: mapped_ram.MappedRamHeader | None = None
    # stream format only: per page PAGE_ABSENT, PAGE_ZERO or PAGE_DATA
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
    start: int  # of QEMU's stream in the file
    file_size: int
    compression: str | None = None  # the stream is compressed (offsets are the stream's)
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
    """The stream in ``buf`` from ``start`` (``file:PATH,offset=N``) to EOF and beyond."""
    size = len(buf) if file_size is None else file_size
    if size - start == 0:
        raise ProtocolError("migration file is empty" + (f" after offset {start:#x}" if start
                                                           else ""))
    try:
        return _parse(buf, size, start)
    except ProtocolError as e:
        error, message = type(e), str(e)
    # Raised afresh, without the frames of the parse: their page views pin ``buf``, an mmap
    # the caller closes on failure (mfd.main_thread.load.OpenedFile).
    raise error(message)


def _parse(buf, size: int, start: int) -> MigrationFile:
    mf = MigrationFile(start=start, file_size=size)
    dec = livestream.StreamDecoder("migration file", framing=True, file=True,
                                   mapped_ram=mapped_ram_header)
    for ev in dec.decode_all(buf, start, size):
        on_event(mf, ev)
    if not dec.eof:
        raise ProtocolError(truncated(dec.offset))
    mf.stream_end = dec.offset
    _parse_tail(buf, mf)
    return mf


def truncated(offset: int) -> str:
    return (f"migration file at offset {offset:#x}: truncated: the file ends before "
            "QEMU_VM_EOF (a save that did not complete, or a cut copy)")


def _count(mf: MigrationFile, name: str, n: int = 1) -> None:
    mf.record_counts[name] = mf.record_counts.get(name, 0) + n


def on_event(mf: MigrationFile, ev: livestream.Event) -> None:
    """What the file keeps of one event of its stream."""
    match ev:  # page events first: there can be one per few pages
        case livestream.ZeroPages(idstr, pages):
            _count(mf, "ZERO", len(pages))
            _state(mf.block(idstr))[pages] = PAGE_ZERO
        case livestream.Pages(idstr, pages):
            _count(mf, "PAGE", len(pages))
            _state(mf.block(idstr))[pages] = PAGE_DATA
        case livestream.XbzrlePages(idstr, pages):
            _count(mf, "XBZRLE", len(pages))
            _state(mf.block(idstr))[pages] = PAGE_DATA
        case livestream.Header(configuration):
            mf.version = C.QEMU_VM_FILE_VERSION  # the decoder takes no other
            mf.configuration = configuration
        case livestream.Section(hdr):
            mf.sections.append(hdr)
            if hdr.type in (C.QEMU_VM_SECTION_PART, C.QEMU_VM_SECTION_END):  # RAM's only
                _count(mf, hdr.type_name)
        case livestream.Command(offset, command):
            mf.commands.append((offset, command))
        case livestream.Blocks(blocks, entries, headers):
            mf.mem_size = sum(size for _, size in blocks)
            _count(mf, "MEM_SIZE")
            for i, ((idstr, used_length), entry) in enumerate(zip(blocks, entries,
                                                                 strict=True)):
                b = RamBlockEntry(idstr, used_length, entry)
                if mf.mapped_ram:
                    b.mapped_ram = headers[i]
                else:
                    b.page_state = np.full(b.num_pages, PAGE_ABSENT, dtype=np.uint8)
                mf.blocks.append(b)
        case livestream.Flush():
            _count(mf, "MULTIFD_FLUSH")
        case livestream.SectionEnd(final):
            _count(mf, "EOS")
            mf.ram_complete = final
        case livestream.Device(state):
            mf.devices.append(state)
        case livestream.Skipped(idstr, offset, length):
            mf.skipped_devices.append((idstr, offset, length))
        case livestream.Eof(offset):
            mf.eof_offset = offset
        case livestream.Vmdesc(json, offset):
            mf.vmdesc, mf.vmdesc_offset = json, offset
        # ReturnPath, Ping, SwitchoverStart: in mf.commands (a file never has Hashes)


def _state(block: RamBlockEntry) -> np.ndarray:
    assert block.page_state is not None  # page records: the stream format
    return block.page_state


def mapped_ram_header(r: Reader, idstr: str, used_length: int) -> mapped_ram.MappedRamHeader:
    """The decoder's hook after each block entry of a mapped-ram stream: the block's
    MappedRamHeader, checked against the file; the stream continues after the pages region
    (the bitmap and the pages are not stream bytes: the file is read at random)."""
    hdr_at = r.pos
    hdr = mapped_ram.decode_header(r, idstr)
    header_end = r.offset
    file_end = r.base + r.pos + r.remaining
    bmap_end = hdr.bitmap_offset + mapped_ram.bitmap_size(used_length // C.TARGET_PAGE_SIZE)
    if hdr.bitmap_offset < header_end:
        raise r.error(f"block {idstr!r}: bitmap_offset {hdr.bitmap_offset:#x} points into the "
                      f"stream before the header's end ({header_end:#x})", at=hdr_at)
    if bmap_end > file_end:
        raise r.error(f"block {idstr!r}: bitmap {hdr.bitmap_offset:#x}..{bmap_end:#x} is past "
                      "the end of the file (truncated?)", at=hdr_at)
    if hdr.pages_offset < bmap_end:
        raise r.error(f"block {idstr!r}: pages_offset {hdr.pages_offset:#x} overlaps the "
                      f"bitmap (ends at {bmap_end:#x})", at=hdr_at)
    end = hdr.pages_offset + used_length
    if end > file_end:
        raise r.error(f"block {idstr!r}: pages region {hdr.pages_offset:#x}..{end:#x} is past "
                      "the end of the file (truncated?)", at=hdr_at)
    r.seek(end - r.base, f"end of block {idstr!r} pages")
    return hdr


def _parse_tail(buf, mf: MigrationFile) -> None:
    """After the stream (EOF and its vmdesc): mfd's trailer (found from the end) or stray
    bytes."""
    assert mf.stream_end is not None
    tail_len = min(trailer.TAIL_SIZE, mf.file_size)
    tail = bytes(buf[mf.file_size - tail_len : mf.file_size])
    if mf.file_size - mf.stream_end >= trailer.TAIL_SIZE and trailer.has_trailer(tail):
        mf.trailer = trailer.decode_trailer(buf, mf.file_size)
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
