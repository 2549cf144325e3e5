"""mapped-ram: the per-block MappedRamHeader, the file bitmap and the file layout.

Mirrors ``migration/ram.c`` (``mapped_ram_setup_ramblock``, ``parse_ramblock_mapped_ram``,
``ram_save_file_bmap``). Each block's pages live at fixed offsets,
``pages_offset + page_index * page_size``; its bitmap (bit set = page data is in the file) is
an array of little-endian u64 words (x86-64 ``unsigned long``), written once, at completion.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from mfd.protocol import constants as C
from mfd.protocol.codec import Reader

_HDR = struct.Struct(">IQQQ")
assert _HDR.size == C.MAPPED_RAM_HDR_SIZE


@dataclass(frozen=True)
class MappedRamHeader:
    """``MappedRamHeader`` (packed, big-endian): where a block's bitmap and pages live."""

    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int

    def encode(self) -> bytes:
        return _HDR.pack(self.version, self.page_size, self.bitmap_offset, self.pages_offset)


def decode_header(r: Reader, idstr: str) -> MappedRamHeader:
    """Read and validate the fields that do not depend on the file's size.

    QEMU accepts version 0 and 1 and refuses anything above; it accepts any page_size and
    then misreads the bitmap, so mfd insists on the target page size.
    """
    at = r.pos
    if r.remaining < C.MAPPED_RAM_HDR_SIZE:
        raise r.error(f"truncated: MappedRamHeader of block {idstr!r} needs "
                      f"{C.MAPPED_RAM_HDR_SIZE} bytes, only {r.remaining} left")
    hdr = MappedRamHeader(*_HDR.unpack(r.take(C.MAPPED_RAM_HDR_SIZE, "MappedRamHeader")))
    if hdr.version > C.MAPPED_RAM_HDR_VERSION:
        raise r.error(f"block {idstr!r}: MappedRamHeader version {hdr.version} not supported "
                      f"(expected <= {C.MAPPED_RAM_HDR_VERSION})", at=at)
    if hdr.page_size != C.TARGET_PAGE_SIZE:
        raise r.error(f"block {idstr!r}: page_size {hdr.page_size}, expected "
                      f"{C.TARGET_PAGE_SIZE}", at=at)
    if hdr.pages_offset % C.TARGET_PAGE_SIZE:
        raise r.error(f"block {idstr!r}: pages_offset {hdr.pages_offset:#x} is not page "
                      "aligned", at=at)
    return hdr


def bitmap_size(num_pages: int) -> int:
    """Bytes of a bitmap: whole 64-bit words (BITS_TO_LONGS * sizeof(long))."""
    return (num_pages + 63) // 64 * 8


def round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


@dataclass(frozen=True)
class BlockLayout:
    """Where one block's entry, header, bitmap and pages sit in a mapped-ram file."""

    idstr: str
    used_length: int
    entry_offset: int
    header: MappedRamHeader

    @property
    def num_pages(self) -> int:
        return self.used_length // C.TARGET_PAGE_SIZE

    @property
    def header_offset(self) -> int:
        return self.header.bitmap_offset - C.MAPPED_RAM_HDR_SIZE

    @property
    def pages_end(self) -> int:
        """The stream continues here (the next block entry, or the rest of the section)."""
        return self.header.pages_offset + self.used_length


def layout_blocks(blocks: list[tuple[str, int]], first_entry_offset: int) -> list[BlockLayout]:
    """Offsets as ``ram_save_setup`` computes them, starting at the first block entry.

    Entry = u8 len + idstr + be64 used_length; header right after; bitmap right after the
    header; pages at the bitmap's end rounded up to 1 MiB; the next entry at the pages' end.
    """
    out = []
    pos = first_entry_offset
    for idstr, used_length in blocks:
        header_offset = pos + 1 + len(idstr.encode()) + 8
        bitmap_offset = header_offset + C.MAPPED_RAM_HDR_SIZE
        num_pages = used_length // C.TARGET_PAGE_SIZE
        pages_offset = round_up(bitmap_offset + bitmap_size(num_pages),
                                C.MAPPED_RAM_FILE_OFFSET_ALIGNMENT)
        hdr = MappedRamHeader(C.MAPPED_RAM_HDR_VERSION, C.TARGET_PAGE_SIZE, bitmap_offset,
                              pages_offset)
        layout = BlockLayout(idstr, used_length, pos, hdr)
        out.append(layout)
        pos = layout.pages_end
    return out


def bits_to_words(bits: np.ndarray) -> np.ndarray:
    """Page flags (bool/uint8, one per page) -> little-endian u64 bitmap words."""
    packed = np.packbits(bits.astype(bool, copy=False), bitorder="little")
    words = np.zeros(bitmap_size(len(bits)) // 8, dtype="<u8")
    words.view(np.uint8)[: len(packed)] = packed
    return words


def words_to_bits(words: np.ndarray | bytes, num_pages: int) -> np.ndarray:
    """Bitmap words -> bool per page; bits beyond ``num_pages`` are ignored (as QEMU does)."""
    if isinstance(words, np.ndarray):
        raw = np.asarray(words, dtype="<u8").view(np.uint8)
    else:
        raw = np.frombuffer(words, dtype=np.uint8)
    return np.unpackbits(raw, count=num_pages, bitorder="little").astype(bool)


def set_runs(bits: np.ndarray) -> np.ndarray:
    """Runs of set bits as an (n, 2) array of [start, end) page indices (vectorized)."""
    padded = np.concatenate(([False], bits.astype(bool, copy=False), [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return edges.reshape(-1, 2)


def page_runs(pages: np.ndarray) -> np.ndarray:
    """Sorted page indices -> (n, 2) array of [start, end) runs of consecutive pages.

    Called once per packet on the save path: a few numpy calls, no temporaries to stack.
    """
    if len(pages) == 0:
        return np.empty((0, 2), dtype=np.int64)
    pages = pages.astype(np.int64, copy=False)
    brk = np.flatnonzero(pages[1:] != pages[:-1] + 1)
    runs = np.empty((len(brk) + 1, 2), dtype=np.int64)
    runs[0, 0], runs[-1, 1] = pages[0], pages[-1] + 1
    runs[1:, 0] = pages[brk + 1]
    runs[:-1, 1] = pages[brk] + 1
    return runs
