"""Postcopy's bytes: the commands on the main channel and the page requests coming back.

Pure. Mirrors QEMU's ``migration/savevm.c`` (``qemu_savevm_send_postcopy_advise``,
``qemu_savevm_send_postcopy_ram_discard``, ``qemu_savevm_send_packaged``,
``loadvm_postcopy_*``) and ``migration/migration.c`` (``migrate_send_rp_req_pages``,
``source_return_path_thread``), as QEMU 10 puts them on the wire
(``shared/postcopy-facts.md`` section 8)::

    main channel, command payloads (u8 0x08, be16 cmd, be16 len, payload)
      POSTCOPY_ADVISE      be64 RAM page-size summary (OR of the blocks' page sizes),
                           be64 target page size; or empty (dirty bitmaps only)
      POSTCOPY_LISTEN      empty: the destination registers its RAM for faults
      POSTCOPY_RUN         empty: its vCPUs start
      POSTCOPY_RAM_DISCARD u8 version 0, u8 n, idstr[n], u8 0, up to 12 x (be64 start,
                           be64 length) in bytes within the block
      PACKAGED             be32 length; that many bytes of stream follow (LISTEN, the
                           device state, PING, RUN), read whole before they are loaded
    return path, message data (be16 type, be16 len, data)
      REQ_PAGES_ID         be64 start, be32 length, u8 n, idstr[n] (a new block)
      REQ_PAGES            be64 start, be32 length (the last block named)
    recovery after a cut link (a new main connection, no header)
      RECV_BITMAP (cmd)    u8 n, idstr[n]: send me what you received of this block
      POSTCOPY_RESUME      empty: go on
      RECV_BITMAP (rp)     u8 n, idstr[n]; then, outside the length: be64 size, the
                           received bitmap as little-endian u64 words, be64 end mark
      RESUME_ACK (rp)      be32 1
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from mfd.errors import ProtocolError
from mfd.protocol import constants as C
from mfd.protocol import returnpath, stream
from mfd.protocol.codec import Reader

DISCARD_RUNS = 12  # runs per DISCARD command (MAX_DISCARDS_PER_COMMAND)
_ADVISE = struct.Struct(">QQ")
_RUN = struct.Struct(">QQ")
_REQ = struct.Struct(">QI")


@dataclass(frozen=True)
class Advise:
    page_summary: int  # the OR of the blocks' host page sizes
    target_page_size: int


@dataclass(frozen=True)
class Discard:
    idstr: str
    runs: tuple[tuple[int, int], ...]  # (start, length) in bytes within the block


@dataclass(frozen=True)
class PageRequest:
    idstr: str  # named (REQ_PAGES_ID) or the previous request's (REQ_PAGES)
    start: int  # byte offset in the block
    length: int


def encode_advise(page_size: int = C.TARGET_PAGE_SIZE) -> bytes:
    return stream.encode_command(stream.Command(
        C.MIG_CMD_POSTCOPY_ADVISE, _ADVISE.pack(page_size, C.TARGET_PAGE_SIZE)))


def decode_advise(payload: bytes, what: str) -> Advise:
    """QEMU's destination refuses a page size it does not run (``loadvm_postcopy_handle_
    advise``): here every block has 4 KiB pages."""
    if len(payload) != _ADVISE.size:
        raise ProtocolError(f"{what}: POSTCOPY_ADVISE of {len(payload)} bytes, expected 16 "
                            "(an empty one advises dirty bitmaps only, which mfd has not)")
    summary, target = _ADVISE.unpack(payload)
    if target != C.TARGET_PAGE_SIZE or summary != C.TARGET_PAGE_SIZE:
        raise ProtocolError(f"{what}: POSTCOPY_ADVISE says page sizes {summary:#x} (host) "
                            f"and {target:#x} (target), mfd has {C.TARGET_PAGE_SIZE:#x} only")
    return Advise(summary, target)


def encode_bare(cmd: int) -> bytes:
    """LISTEN, RUN: no payload."""
    return stream.encode_command(stream.Command(cmd))


def encode_discards(idstr: str, runs: Iterable[tuple[int, int]]) -> bytes:
    """A block's discard runs, DISCARD_RUNS per command, as QEMU batches them."""
    name = idstr.encode()
    out, batch = [], []
    for run in runs:
        batch.append(run)
        if len(batch) == DISCARD_RUNS:
            out.append(_discard(name, batch))
            batch = []
    if batch:
        out.append(_discard(name, batch))
    return b"".join(out)


def _discard(name: bytes, runs: list[tuple[int, int]]) -> bytes:
    payload = (bytes([0, len(name)]) + name + b"\0"
               + b"".join(_RUN.pack(start, length) for start, length in runs))
    return stream.encode_command(stream.Command(C.MIG_CMD_POSTCOPY_RAM_DISCARD, payload))


def decode_discard(payload: bytes, sizes: dict[str, int], what: str) -> Discard:
    """Validated against the blocks: page-aligned runs inside the block."""
    r = Reader(payload, what=f"{what}: POSTCOPY_RAM_DISCARD")
    if r.u8("version") != 0:
        raise r.error(f"version {payload[0]}, expected 0", at=0)
    n = r.u8("idstr length")
    idstr = bytes(r.take(n, "idstr")).decode(errors="replace")
    if r.u8("terminator") != 0:
        raise r.error("the idstr is not followed by 0")
    if idstr not in sizes:
        raise r.error(f"unknown block {idstr!r}")
    if r.remaining % _RUN.size:
        raise r.error(f"{r.remaining} bytes of runs, not a multiple of 16")
    runs = []
    while r.remaining:
        start, length = _RUN.unpack(bytes(r.take(_RUN.size, "run")))
        if (start | length) % C.TARGET_PAGE_SIZE or start + length > sizes[idstr]:
            raise r.error(f"run {start:#x}+{length:#x} is not whole pages inside block "
                          f"{idstr!r} ({sizes[idstr]:#x} bytes)")
        runs.append((start, length))
    return Discard(idstr, tuple(runs))


def encode_packaged(blob: bytes) -> bytes:
    if len(blob) > C.MAX_VM_CMD_PACKAGED_SIZE:
        raise ValueError(f"a package of {len(blob)} bytes")
    return stream.encode_command(stream.Command(C.MIG_CMD_PACKAGED,
                                                len(blob).to_bytes(4, "big"))) + blob


def encode_request(start: int, length: int, idstr: str | None) -> bytes:
    """REQ_PAGES_ID when the block changes (``idstr``), else REQ_PAGES."""
    if idstr is None:
        return returnpath.encode(returnpath.REQ_PAGES, _REQ.pack(start, length))
    name = idstr.encode()
    return returnpath.encode(returnpath.REQ_PAGES_ID,
                             _REQ.pack(start, length) + bytes([len(name)]) + name)


def decode_request(msg: returnpath.Message, sizes: dict[str, int],
                   last: str | None) -> PageRequest:
    """A page request, checked as QEMU's source checks it (``migrate_handle_rp_req_pages``):
    a known block, whole pages inside it; REQ_PAGES needs a block named before."""
    what = f"return path: {msg.name}"
    if len(msg.data) < _REQ.size:
        raise ProtocolError(f"{what} of {len(msg.data)} bytes")
    start, length = _REQ.unpack_from(msg.data)
    idstr = last
    if msg.type == returnpath.REQ_PAGES_ID:
        n = msg.data[_REQ.size] if len(msg.data) > _REQ.size else -1
        if n < 1 or len(msg.data) != _REQ.size + 1 + n:
            raise ProtocolError(f"{what}: its idstr does not fill the message")
        idstr = msg.data[_REQ.size + 1 :].decode(errors="replace")
    if idstr is None:
        raise ProtocolError(f"{what} before any block was named")
    if idstr not in sizes:
        raise ProtocolError(f"{what}: unknown block {idstr!r}")
    if length == 0 or (start | length) % C.TARGET_PAGE_SIZE or start + length > sizes[idstr]:
        raise ProtocolError(f"{what}: {start:#x}+{length:#x} is not whole pages inside "
                            f"block {idstr!r} ({sizes[idstr]:#x} bytes)")
    return PageRequest(idstr, start, length)


RECV_BITMAP_END = 0x0123456789ABCDEF  # RAMBLOCK_RECV_BITMAP_ENDING
_U64 = struct.Struct(">Q")


def encode_recv_bitmap_request(idstr: str) -> bytes:
    name = idstr.encode()
    return stream.encode_command(stream.Command(C.MIG_CMD_RECV_BITMAP,
                                                bytes([len(name)]) + name))


def decode_block_name(payload: bytes, sizes: dict[str, int], what: str) -> str:
    """RECV_BITMAP's block: u8 n, idstr[n], a block of this migration."""
    if not payload or len(payload) != 1 + payload[0]:
        raise ProtocolError(f"{what}: the block name does not fill its {len(payload)} bytes")
    idstr = payload[1:].decode(errors="replace")
    if idstr not in sizes:
        raise ProtocolError(f"{what}: unknown block {idstr!r}")
    return idstr


def encode_recv_bitmap(idstr: str, received: np.ndarray) -> bytes:
    """The destination's answer (``ramblock_recv_bitmap_send``): bit i set = page i here."""
    name = idstr.encode()
    bits = np.packbits(received.astype(bool), bitorder="little")
    bits = np.concatenate([bits, np.zeros(-len(bits) % 8, dtype=np.uint8)])
    return (returnpath.encode(returnpath.RECV_BITMAP, bytes([len(name)]) + name)
            + _U64.pack(len(bits)) + bits.tobytes() + _U64.pack(RECV_BITMAP_END))


def decode_recv_bitmap(msg: returnpath.Message, sizes: dict[str, int]) -> tuple[str, np.ndarray]:
    """(block, received per page) from a RECV_BITMAP message (its data: the name, then what
    follows outside its length: ``returnpath`` keeps it with the message)."""
    what = "return path: RECV_BITMAP"
    n = msg.data[0] if msg.data else 0
    idstr = decode_block_name(msg.data[: 1 + n], sizes, what)
    rest = msg.data[1 + n :]
    size = _U64.unpack_from(rest)[0]
    pages = sizes[idstr] // C.TARGET_PAGE_SIZE
    if size != -(-pages // 64) * 8 or len(rest) != 16 + size:
        raise ProtocolError(f"{what}: {size} bytes of bitmap for block {idstr!r}, expected "
                            f"{-(-pages // 64) * 8}")
    if _U64.unpack_from(rest, 8 + size)[0] != RECV_BITMAP_END:
        raise ProtocolError(f"{what}: no end mark after block {idstr!r}'s bitmap")
    bits = np.unpackbits(np.frombuffer(rest, dtype=np.uint8, count=size, offset=8),
                         bitorder="little")[:pages].astype(bool)
    return idstr, bits
