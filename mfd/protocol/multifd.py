"""multifd socket packets: the per-channel handshake and the RAM packet header.

Mirrors ``migration/multifd.c`` (``MultiFDInit_t``, ``multifd_send_initial_packet``,
``multifd_recv_initial_packet``, ``multifd_send_fill_packet``, ``multifd_recv_unfill_packet``)
and ``migration/multifd-nocomp.c`` (``multifd_ram_fill_packet``,
``multifd_ram_unfill_packet``). Pure: bytes in, frozen dataclasses out, no I/O.

One multifd channel carries::

    MultiFDInit (64 bytes, once)
    then repeatedly:
        MultiFDPacket header (320 + 8 * page_count bytes, always full size)
        payload (next_packet_size bytes, only when normal_pages > 0)

The receiver decodes a packet before it reads the payload: everything the payload will be
written against (block, offsets, sizes) is validated here, so a hostile or corrupt peer cannot
make the destination write outside a RAM block ("destination memory safety").
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mfd.errors import ProtocolError
from mfd.protocol.constants import (
    IDSTR_MAX,
    MULTIFD_MAGIC,
    MULTIFD_PAGE_COUNT,
    MULTIFD_VERSION,
    TARGET_PAGE_SIZE,
)

# MULTIFD_FLAG_* (migration/multifd.h, QEMU 10.x)
MULTIFD_FLAG_SYNC = 0x1
# The compression field grew from 3 bits (<= 9.0) to 5 bits (9.2+); its values never moved.
MULTIFD_FLAG_COMPRESSION_MASK = 0x1F << 1
MULTIFD_FLAG_NOCOMP = 0x0
MULTIFD_FLAG_ZLIB = 0x2
MULTIFD_FLAG_ZSTD = 0x4
MULTIFD_FLAG_QPL = 0x8
MULTIFD_FLAG_UADK = 0x10
MULTIFD_FLAG_QATZIP = 0x20
MULTIFD_FLAG_DEVICE_STATE = 0x40  # 10.0: a VFIO device-state packet, a different layout

COMPRESSION_NAMES = {
    MULTIFD_FLAG_NOCOMP: "none",
    MULTIFD_FLAG_ZLIB: "zlib",
    MULTIFD_FLAG_ZSTD: "zstd",
    MULTIFD_FLAG_QPL: "qpl",
    MULTIFD_FLAG_UADK: "uadk",
    MULTIFD_FLAG_QATZIP: "qatzip",
}

INIT_SIZE = 64
_INIT = struct.Struct(">II16sB")  # magic, version, uuid, id; the remaining 39 bytes are zero
UUID_SIZE = 16

# magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages;
# then unused32, unused64[3] (28 bytes), ramblock[256], offset[page_count].
_HDR = struct.Struct(">IIIIIIQI")
RAMBLOCK_AT = 64
RAMBLOCK_SIZE = IDSTR_MAX + 1  # 256: idstr plus its NUL
OFFSETS_AT = RAMBLOCK_AT + RAMBLOCK_SIZE  # 320


def packet_size(page_count: int = MULTIFD_PAGE_COUNT) -> int:
    """Bytes of a RAM packet header: fixed by page_count, however few pages are used."""
    return OFFSETS_AT + 8 * page_count


PACKET_SIZE = packet_size()  # 1344 for 4 KiB pages
assert PACKET_SIZE == 1344

# The largest compressed payload mfd reads before handing it to a method. QEMU's receivers
# keep a buffer of twice the packet size for it (multifd-zlib.c/multifd-zstd.c recv_setup);
# each method then applies its own, tighter, compressBound-style limit.
_MAX_COMPRESSED_FACTOR = 2


def compression_name(bits: int) -> str:
    """``zstd`` for 0x4; unknown values as hex (for error messages)."""
    return COMPRESSION_NAMES.get(bits, f"unknown {bits:#x}")


def _uuid_str(raw: bytes) -> str:
    return str(uuidlib.UUID(bytes=bytes(raw)))


# --- MultiFDInit_t ---------------------------------------------------------------------------


_UNUSED_AT = 32


@dataclass(frozen=True)
class MultiFDInit:
    """``MultiFDInit_t``: the first 64 bytes of every multifd socket."""

    uuid: bytes  # the source's -uuid (16 bytes, zeros if unset); must equal the destination's
    id: int  # channel number 0..channels-1; the destination files the socket under it
    # bytes 32..63, unused by QEMU (zeros); an mfd source says who it is there
    # (``mfd.protocol.peer``)
    unused: bytes = bytes(INIT_SIZE - _UNUSED_AT)


def encode_init(init: MultiFDInit) -> bytes:
    """Mirrors ``multifd_send_initial_packet``: magic, version, uuid, id, zeros."""
    if len(init.uuid) != UUID_SIZE:
        raise ValueError(f"uuid is {len(init.uuid)} bytes, expected {UUID_SIZE}")
    if not 0 <= init.id <= 0xFF:
        raise ValueError(f"channel id {init.id} does not fit in a u8")
    if len(init.unused) != INIT_SIZE - _UNUSED_AT:
        raise ValueError(f"unused part is {len(init.unused)} bytes")
    buf = bytearray(INIT_SIZE)
    _INIT.pack_into(buf, 0, MULTIFD_MAGIC, MULTIFD_VERSION, bytes(init.uuid), init.id)
    buf[_UNUSED_AT:] = init.unused
    return bytes(buf)


def decode_init(buf: bytes | bytearray | memoryview, *, where: str) -> MultiFDInit:
    """Mirrors the first half of ``multifd_recv_initial_packet``: size, magic, version.
    What the fields must equal (uuid, id) is :func:`check_init`'s."""
    size = memoryview(buf).nbytes
    if size != INIT_SIZE:
        raise ProtocolError(f"{where}: MultiFDInit is {size} bytes, expected {INIT_SIZE}")
    magic, version, msg_uuid, chan = _INIT.unpack_from(buf, 0)
    _check_magic(f"{where}: MultiFDInit", magic, version)
    return MultiFDInit(uuid=msg_uuid, id=chan, unused=bytes(buf[_UNUSED_AT:INIT_SIZE]))


def check_init(init: MultiFDInit, *, channels: int, uuid: bytes, where: str) -> None:
    """The second half of ``multifd_recv_initial_packet``: the uuid is the destination's
    own and the id names one of its channels (duplicates are the caller's to refuse)."""
    assert len(uuid) == UUID_SIZE
    if init.uuid != bytes(uuid):
        raise ProtocolError(f"{where}: MultiFDInit uuid {_uuid_str(init.uuid)}, expected "
                            f"{_uuid_str(uuid)} (--uuid)")
    # QEMU refuses only id > channels, which lets id == channels index one past its array of
    # channels; mfd refuses every id that does not name a channel.
    if init.id >= channels:
        raise ProtocolError(f"{where}: MultiFDInit channel id {init.id}, expected 0.."
                            f"{channels - 1} ({channels} channels: does the source have "
                            "more than --multifd-channels?)")


# --- MultiFDPacket_t -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: an ndarray field has no tuple equality
class MultiFDPacket:
    """``MultiFDPacket_t`` as received, validated; offsets in native byte order.

    The payload (``next_packet_size`` bytes) follows on the wire and is not part of this.
    """

    flags: int  # MULTIFD_FLAG_SYNC | compression bits
    pages_alloc: int  # the sender's page_count (QEMU's allocation), <= the receiver's
    normal_pages: int  # pages whose data is in the payload
    next_packet_size: int  # payload bytes; meaningful only when normal_pages > 0
    packet_num: int  # global counter over all channels, SYNC packets included
    zero_pages: int  # pages the receiver fills with zeros (9.0+)
    ramblock: str  # idstr of the block all offsets refer to; "" when the packet has no pages
    offsets: np.ndarray  # uint64 byte offsets in the block: normal ones, then zero ones

    @property
    def normal(self) -> np.ndarray:
        """Offsets of the pages carried in the payload, in payload order."""
        return self.offsets[: self.normal_pages]

    @property
    def zero(self) -> np.ndarray:
        """Offsets of the pages to be zero on the destination."""
        return self.offsets[self.normal_pages :]

    @property
    def sync(self) -> bool:
        return bool(self.flags & MULTIFD_FLAG_SYNC)

    @property
    def payload_size(self) -> int:
        """Bytes the receiver must read after the header.

        QEMU reads a payload only when the packet has normal pages and ignores
        next_packet_size otherwise (QEMU < 9.0 could leave a stale value in SYNC packets).
        """
        return self.next_packet_size if self.normal_pages else 0


def encode_packet(*, flags: int, packet_num: int, ramblock: str, normal: np.ndarray,
                  zero: np.ndarray, next_packet_size: int,
                  page_count: int = MULTIFD_PAGE_COUNT) -> bytes:
    """Mirrors ``multifd_send_fill_packet`` + ``multifd_ram_fill_packet`` (QEMU 10).

    Always ``packet_size(page_count)`` bytes, zero-filled first as 10.x does, with
    pages_alloc = page_count. ``normal``/``zero`` are byte offsets in ``ramblock``. A SYNC
    packet is ``flags=MULTIFD_FLAG_SYNC`` with no pages and ``ramblock=""``.
    """
    normal = np.asarray(normal, dtype=np.uint64)
    zero = np.asarray(zero, dtype=np.uint64)
    n_normal, n_zero = len(normal), len(zero)
    if n_normal + n_zero > page_count:
        raise ValueError(f"{n_normal} normal + {n_zero} zero pages exceed page_count "
                         f"{page_count}")
    name = ramblock.encode("utf-8")
    if len(name) > IDSTR_MAX or b"\0" in name:
        raise ValueError(f"ramblock {ramblock[:40]!r} is not a valid idstr (at most "
                         f"{IDSTR_MAX} bytes, no NUL)")
    if not 0 <= flags <= 0xFFFF_FFFF or not 0 <= next_packet_size <= 0xFFFF_FFFF:
        raise ValueError(f"flags {flags:#x} or next_packet_size {next_packet_size} does not "
                         "fit in a u32")
    buf = bytearray(packet_size(page_count))
    _HDR.pack_into(buf, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags, page_count, n_normal,
                   next_packet_size, packet_num, n_zero)
    buf[RAMBLOCK_AT : RAMBLOCK_AT + len(name)] = name
    # One vectorised byte-swapping store per kind, straight into the packet (no page loop).
    offs = np.frombuffer(buf, dtype=">u8", count=n_normal + n_zero, offset=OFFSETS_AT)
    offs[:n_normal] = normal
    offs[n_normal:] = zero
    return bytes(buf)


def decode_packet(buf: bytes | bytearray | memoryview, *, blocks: Mapping[str, int],
                  compression_flag: int, where: str,
                  page_count: int = MULTIFD_PAGE_COUNT) -> MultiFDPacket:
    """Mirrors ``multifd_recv_unfill_packet`` + ``multifd_ram_unfill_packet``, stricter.

    ``blocks`` maps idstr to used_length; ``compression_flag`` is the receiver's own
    MULTIFD_FLAG_* method. Every field the payload will be written against is checked, so
    a packet that passes can only address whole pages inside a known block. Raises
    :class:`ProtocolError` starting with ``where`` (e.g. ``"channel 2"``).
    """
    size = memoryview(buf).nbytes
    expected_size = packet_size(page_count)
    if size != expected_size:
        raise ProtocolError(f"{where}: multifd packet is {size} bytes, expected "
                            f"{expected_size}")
    (magic, version, flags, pages_alloc, normal, next_packet_size, packet_num,
     zero) = _HDR.unpack_from(buf, 0)
    _check_magic(f"{where}: multifd packet", magic, version)
    at = f"{where}: multifd packet {packet_num}"
    if flags & MULTIFD_FLAG_DEVICE_STATE:
        raise ProtocolError(f"{at}: device-state packets (flag {MULTIFD_FLAG_DEVICE_STATE:#x},"
                            " VFIO) are not supported")
    unknown = flags & ~(MULTIFD_FLAG_SYNC | MULTIFD_FLAG_COMPRESSION_MASK)
    if unknown:
        raise ProtocolError(f"{at}: flags {flags:#x} have unknown bits {unknown:#x}, not "
                            "supported")
    if pages_alloc > page_count:
        raise ProtocolError(f"{at}: pages_alloc {pages_alloc}, expected at most "
                            f"{page_count}")
    if normal > pages_alloc:
        raise ProtocolError(f"{at}: {normal} normal pages, expected at most pages_alloc "
                            f"{pages_alloc}")
    if zero > pages_alloc - normal:
        raise ProtocolError(f"{at}: {zero} zero pages, expected at most "
                            f"{pages_alloc - normal} (pages_alloc {pages_alloc} - {normal} "
                            "normal)")
    if normal + zero == 0:
        # A SYNC (or empty) packet: QEMU looks at neither block nor compression bits, and
        # 10.x SYNC packets carry no compression bits at all.
        return MultiFDPacket(flags, pages_alloc, 0, next_packet_size, packet_num, 0, "",
                             _readonly(np.empty(0, dtype=np.uint64)))

    # QEMU checks the method in its recv hook, which runs only for packets with pages.
    comp = flags & MULTIFD_FLAG_COMPRESSION_MASK
    if comp != compression_flag:
        raise ProtocolError(f"{at}: compression flags {comp:#x} ({compression_name(comp)}), "
                            f"expected {compression_flag:#x} "
                            f"({compression_name(compression_flag)})")
    _check_payload_size(at, compression_flag, normal, next_packet_size, page_count)

    # QEMU forces ramblock[255] = 0 so the name is terminated whatever the peer sent.
    raw = bytes(memoryview(buf)[RAMBLOCK_AT : RAMBLOCK_AT + IDSTR_MAX])
    raw = raw.split(b"\0", 1)[0]
    try:
        ramblock = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{at}: ramblock {raw[:40]!r} is not UTF-8") from None
    used_length = blocks.get(ramblock)
    if used_length is None:
        raise ProtocolError(f"{at}: unknown ram block {ramblock!r}")

    offsets = np.frombuffer(buf, dtype=">u8", count=normal + zero,
                            offset=OFFSETS_AT).astype(np.uint64)  # a copy, native order
    _check_offsets(at, offsets, normal, ramblock, used_length)
    return MultiFDPacket(flags, pages_alloc, normal, next_packet_size, packet_num, zero,
                         ramblock, _readonly(offsets))


def _check_magic(what: str, magic: int, version: int) -> None:
    if magic != MULTIFD_MAGIC:
        raise ProtocolError(f"{what} magic {magic:#010x}, expected {MULTIFD_MAGIC:#010x}")
    if version != MULTIFD_VERSION:
        raise ProtocolError(f"{what} version {version}, expected {MULTIFD_VERSION}")


def _check_payload_size(at: str, compression_flag: int, normal: int, next_packet_size: int,
                        page_count: int) -> None:
    """The receiver reads next_packet_size bytes next: bound it before anything allocates."""
    data = normal * TARGET_PAGE_SIZE
    if compression_flag == MULTIFD_FLAG_NOCOMP:
        # QEMU readv()s normal * page_size bytes and ignores the field; a mismatch means the
        # peer and mfd disagree on where the next packet starts.
        if next_packet_size != data:
            raise ProtocolError(f"{at}: next_packet_size {next_packet_size}, expected "
                                f"{data} ({normal} normal pages, no compression)")
    elif normal == 0:
        # multifd_send_prepare_common: a packet of only zero pages has no payload.
        if next_packet_size:
            raise ProtocolError(f"{at}: next_packet_size {next_packet_size} with no normal "
                                "pages, expected 0")
    else:
        limit = _MAX_COMPRESSED_FACTOR * page_count * TARGET_PAGE_SIZE
        if next_packet_size > limit:
            raise ProtocolError(f"{at}: next_packet_size {next_packet_size}, expected at "
                                f"most {limit}")


def _check_offsets(at: str, offsets: np.ndarray, normal: int, ramblock: str,
                   used_length: int) -> None:
    """Every offset addresses a whole page inside the block (vectorised)."""
    last = used_length - TARGET_PAGE_SIZE  # QEMU: offset > used_length - page_size
    bad = (offsets & np.uint64(TARGET_PAGE_SIZE - 1)) != 0
    if last < 0:
        bad[:] = True  # a block smaller than a page holds no page (QEMU's check would wrap)
    else:
        bad |= offsets > np.uint64(last)
    if not bad.any():
        return
    i = int(np.argmax(bad))
    off = int(offsets[i])
    kind = f"normal page {i}" if i < normal else f"zero page {i - normal}"
    if off % TARGET_PAGE_SIZE:
        problem = f"is not aligned to the page size {TARGET_PAGE_SIZE}"
    elif last < 0:
        problem = f"is outside the block (used_length {used_length:#x} is less than a page)"
    else:
        problem = (f"is beyond the block's last page (used_length {used_length:#x}, "
                   f"expected offset <= {last:#x})")
    raise ProtocolError(f"{at}: {kind} offset {off:#x} in block {ramblock!r} {problem}")


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)  # the dataclass is frozen; so are its offsets
    return a

