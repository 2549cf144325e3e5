"""RAM section records (``migration/ram.c``): MEM_SIZE and the block list, page records, EOS.

Each record starts with a be64 word ``offset_in_block | flags``; flags are the low bits below
the page size. Mirrors ``ram_save_setup`` (MEM_SIZE + block list), ``save_page_header``,
``save_zero_page`` and ``ram_load_precopy``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mfd.errors import ProtocolError, Truncated
from mfd.protocol import constants as C
from mfd.protocol.codec import Reader, Writer

FLAG_MASK = C.TARGET_PAGE_SIZE - 1
XBZRLE_ENCODING = 0x01  # ENCODING_FLAG_XBZRLE

FLAG_NAMES = {
    C.RAM_SAVE_FLAG_ZERO: "ZERO",
    C.RAM_SAVE_FLAG_MEM_SIZE: "MEM_SIZE",
    C.RAM_SAVE_FLAG_PAGE: "PAGE",
    C.RAM_SAVE_FLAG_EOS: "EOS",
    C.RAM_SAVE_FLAG_CONTINUE: "CONTINUE",
    C.RAM_SAVE_FLAG_XBZRLE: "XBZRLE",
    C.RAM_SAVE_FLAG_HOOK: "HOOK",
    C.RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
    C.RAM_SAVE_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH",
}


def flag_names(flags: int) -> str:
    return "|".join(n for f, n in FLAG_NAMES.items() if flags & f) or "0"


@dataclass(frozen=True)
class RamRecord:
    """One decoded record. ``data_offset`` is the absolute offset of a PAGE's bytes."""

    flags: int
    addr: int
    idstr: str | None = None  # the block, resolved through CONTINUE
    fill: int = 0  # ZERO's fill byte
    data_offset: int = -1
    total: int = 0  # MEM_SIZE's total
    length: int = 0  # an XBZRLE delta's


def encode_mem_size(total: int) -> bytes:
    assert total % C.TARGET_PAGE_SIZE == 0
    return Writer().be64(total | C.RAM_SAVE_FLAG_MEM_SIZE).getvalue()


def encode_block_entry(idstr: str, used_length: int) -> bytes:
    """u8 len + idstr + be64 used_length (mapped-ram's header follows separately)."""
    return Writer().counted_str(idstr).be64(used_length).getvalue()


def encode_eos() -> bytes:
    return Writer().be64(C.RAM_SAVE_FLAG_EOS).getvalue()


def encode_multifd_flush() -> bytes:
    return Writer().be64(C.RAM_SAVE_FLAG_MULTIFD_FLUSH).getvalue()


def encode_page_header(addr: int, flags: int, idstr: str | None) -> bytes:
    """``save_page_header``: the block's name only when the record does not CONTINUE."""
    assert addr & FLAG_MASK == 0
    if idstr is None:
        return Writer().be64(addr | flags | C.RAM_SAVE_FLAG_CONTINUE).getvalue()
    return Writer().be64(addr | flags).counted_str(idstr).getvalue()


def encode_page(addr: int, data: bytes, idstr: str | None) -> bytes:
    assert len(data) == C.TARGET_PAGE_SIZE
    return encode_page_header(addr, C.RAM_SAVE_FLAG_PAGE, idstr) + bytes(data)


def encode_zero_page(addr: int, idstr: str | None) -> bytes:
    return encode_page_header(addr, C.RAM_SAVE_FLAG_ZERO, idstr) + b"\x00"


def encode_zero_records(addrs: np.ndarray) -> bytes:
    """ZERO|CONTINUE records for many pages of the block named just before: 9 bytes each
    (be64 word + fill byte), built with one numpy pass instead of a loop per page."""
    out = np.zeros((len(addrs), 9), dtype=np.uint8)
    words = (addrs.astype(np.uint64)
             | np.uint64(C.RAM_SAVE_FLAG_ZERO | C.RAM_SAVE_FLAG_CONTINUE)).astype(">u8")
    out[:, :8] = words.view(np.uint8).reshape(-1, 8)
    return out.tobytes()


def xbzrle_header(flag: int, length: int, error: Callable[[str], ProtocolError]) -> int:
    """An XBZRLE record's encoding flag and delta length, checked as ``load_xbzrle``."""
    if flag != XBZRLE_ENCODING:
        raise error(f"XBZRLE page with encoding flag {flag:#04x}, expected "
                    f"{XBZRLE_ENCODING:#04x} (QEMU: wrong compression)")
    if length > C.TARGET_PAGE_SIZE:
        raise error(f"XBZRLE delta of {length} bytes, more than a page (QEMU: len overflow)")
    return length


def decode_block_entry(r: Reader) -> tuple[str, int, int]:
    """Returns (idstr, used_length, entry offset)."""
    at = r.offset
    idstr = r.counted_str("block idstr")
    if not idstr:
        raise r.error("empty block idstr", at=at - r.base)
    used_length = r.be64(f"used_length of block {idstr!r}")
    if used_length == 0 or used_length % C.TARGET_PAGE_SIZE:
        raise r.error(f"block {idstr!r}: used_length {used_length:#x} is not a positive "
                      f"multiple of {C.TARGET_PAGE_SIZE}", at=r.pos - 8)
    return idstr, used_length, at


def decode_block_list(r: Reader, on_block: Callable[[str, int, int], None] | None = None
                      ) -> tuple[int, list[tuple[str, int, int]]]:
    """MEM_SIZE and the blocks (``ram_load_precopy``/``parse_ramblocks``): returns the total
    and (idstr, used_length, entry offset) per block. ``on_block`` reads what follows each
    entry (mapped-ram's header)."""
    at = r.pos
    word = r.be64("RAM MEM_SIZE record")
    if word & FLAG_MASK != C.RAM_SAVE_FLAG_MEM_SIZE:
        raise r.error(f"first RAM record {word:#x} is not MEM_SIZE", at=at)
    total = word & ~FLAG_MASK
    remaining = total
    blocks: list[tuple[str, int, int]] = []
    names: set[str] = set()
    while remaining > 0:
        try:
            idstr, used_length, entry = decode_block_entry(r)
        except ProtocolError as e:
            if not blocks or isinstance(e, Truncated):
                raise
            raise ProtocolError(f"{e} (MEM_SIZE {total:#x} leaves {remaining:#x} bytes for "
                                f"a block after {blocks[-1][0]!r}: is a used_length "
                                "or MEM_SIZE wrong?)") from None
        if idstr in names:
            raise r.error(f"block {idstr!r} listed twice", at=entry - r.base)
        if used_length > remaining:
            raise r.error(f"block {idstr!r} used_length {used_length:#x} exceeds what "
                          f"MEM_SIZE {total:#x} leaves ({remaining:#x})", at=entry - r.base)
        remaining -= used_length
        names.add(idstr)
        blocks.append((idstr, used_length, entry))
        if on_block is not None:
            on_block(idstr, used_length, entry)
    if not blocks:
        raise r.error("MEM_SIZE is 0: no RAM blocks", at=at)
    return total, blocks


def decode_record(r: Reader, blocks: dict[str, int], last_block: str | None) -> RamRecord:
    """One page record or EOS/MULTIFD_FLUSH; validates the block and the offset in it.

    ``blocks`` maps idstr -> used_length (the block list); ``last_block`` resolves CONTINUE.
    """
    at = r.pos
    word = r.be64("RAM record")
    flags = word & FLAG_MASK
    addr = word & ~FLAG_MASK
    kind = flags & ~C.RAM_SAVE_FLAG_CONTINUE
    if kind in (C.RAM_SAVE_FLAG_EOS, C.RAM_SAVE_FLAG_MULTIFD_FLUSH):
        if addr or flags & C.RAM_SAVE_FLAG_CONTINUE:
            raise r.error(f"RAM record {word:#x}: {flag_names(kind)} with an address", at=at)
        return RamRecord(flags, 0)
    if kind not in (C.RAM_SAVE_FLAG_PAGE, C.RAM_SAVE_FLAG_ZERO, C.RAM_SAVE_FLAG_XBZRLE):
        raise r.error(f"unexpected RAM flags {flags:#x} ({flag_names(flags)})", at=at)
    if flags & C.RAM_SAVE_FLAG_CONTINUE:
        if last_block is None:
            raise r.error("RAM record with CONTINUE but no block named before", at=at)
        idstr = last_block
    else:
        idstr = r.counted_str("page record block idstr")
        if idstr not in blocks:
            raise r.error(f"page record names unknown block {idstr!r}", at=at)
    if addr + C.TARGET_PAGE_SIZE > blocks[idstr]:
        raise r.error(f"page offset {addr:#x} is past the end of block {idstr!r} "
                      f"(used_length {blocks[idstr]:#x})", at=at)
    if kind == C.RAM_SAVE_FLAG_ZERO:
        fill = r.u8("zero page fill byte")
        if fill:
            raise r.error(f"zero page record with fill byte {fill:#04x}, expected 0",
                          at=r.pos - 1)
        return RamRecord(flags, addr, idstr)
    if kind == C.RAM_SAVE_FLAG_XBZRLE:
        length = xbzrle_header(r.u8("XBZRLE encoding flag"), r.be16("XBZRLE length"),
                               lambda why: r.error(why, at=r.pos - 3))
        data_offset = r.offset
        r.take(length, f"XBZRLE delta at {addr:#x} of block {idstr!r}")
        return RamRecord(flags, addr, idstr, data_offset=data_offset, length=length)
    data_offset = r.offset
    r.take(C.TARGET_PAGE_SIZE, f"page data at {addr:#x} of block {idstr!r}")
    return RamRecord(flags, addr, idstr, data_offset=data_offset)
