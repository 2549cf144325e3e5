"""What mfd adds to QEMU's protocol between two mfd ends, and how each end finds out.

Nothing here is configured: each end learns by itself whether its peer is mfd or QEMU, and
a QEMU peer never receives a byte it would refuse::

    source -> destination  PING(MFD_PING) on the main channel, after OPEN_RETURN_PATH and
                           QEMU's own PING(1). QEMU answers any PING with a PONG of the
                           same value; an mfd destination answers PONG(MFD_PONG) instead.
    source -> destination  PING(MFD_ROUND_PING) after every round, to an mfd destination:
                           its PONG (any destination echoes the value) comes once the
                           destination placed (and hashed) the round, so the source knows
                           how far behind it is, a part of the switchover it must count.
    source -> destination  bytes 32..63 of every MultiFDInit (unused by QEMU, zeros from a
                           QEMU source): "mfd" 1, channels, compression, flush mode, so an
                           mfd destination adopts what it was not told; and whether RAM is
                           verified (not with mfd migrate --no-verify: then no hashing);
                           and the pages of its multifd packets to an mfd destination
                           (MFD_PACKET_PAGES: 4 MiB, the job a channel is handed, against
                           QEMU's 512 KiB; the per-packet work of both ends divided by 8).
                           A QEMU destination ignores the bytes and, since the source
                           knows its peer (the PONG) before its first packet, only ever
                           gets QEMU's 128-page packets.
    source -> destination  after EOF and the vmdesc, to an mfd destination only: the page
                           hashes of its RAM at switchover (``mfd.shm.pagehash``, the
                           HASHES record below), compared there page by page.
    destination -> source  MFD_RESULT on the return path before SHUT, to an mfd source only:
                           {"status": "completed" | "failed", "error", "verify_ms": the
                           destination's part of the switchover spent verifying} (JSON).

The source's guest state (``mfd-guest``: the workload and a KVM vCPU) goes as a device
section only to an mfd destination; QEMU refuses sections it does not know.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import orjson

from mfd.errors import ProtocolError
from mfd.protocol.codec import Reader
from mfd.protocol.constants import MULTIFD_PAGE_COUNT
from mfd.protocol.multifd import COMPRESSION_NAMES, INIT_SIZE

MFD_PING = 0x6D666401  # "mfd" 1
MFD_PONG = 0x6D666402
MFD_ROUND_PING = 0x6D666403

_MARK = b"mfd\x01"
_SETTINGS = struct.Struct(">4sBBBBH")

MFD_PACKET_PAGES = 1024  # pages of a multifd packet between two mfd ends (4 MiB)
MAX_PACKET_PAGES = 4096  # the most a destination accepts: 16 MiB a packet, per channel
_COMPRESSION = {name: bits for bits, name in COMPRESSION_NAMES.items()}

HASHES_MAGIC = b"MFDH"
HASH_SIZE = 8  # one little-endian u64 per page


@dataclass(frozen=True)
class ChannelSettings:
    """What an mfd source's MultiFDInit says of its multifd setup."""

    channels: int
    compression: str
    flush_after_each_section: bool
    verify: bool = True  # the source sends its page hashes: hash what is placed
    packet_pages: int = MFD_PACKET_PAGES  # the pages of each of its multifd packets


def encode_settings(s: ChannelSettings) -> bytes:
    """The 32 unused bytes of MultiFDInit."""
    raw = _SETTINGS.pack(_MARK, s.channels, _COMPRESSION[s.compression],
                         int(s.flush_after_each_section), int(s.verify), s.packet_pages)
    return raw.ljust(INIT_SIZE - 32, b"\0")


def decode_settings(unused: bytes) -> ChannelSettings | None:
    """None for a QEMU source (zeros); garbage after mfd's mark is a protocol error."""
    if not unused.startswith(_MARK):
        return None
    _, channels, bits, flush, verify, pages = _SETTINGS.unpack_from(unused)
    if bits not in COMPRESSION_NAMES or flush > 1 or verify > 1 or channels < 1:
        raise ProtocolError(f"MultiFDInit: mfd settings {unused[:10].hex()} make no sense")
    if not MULTIFD_PAGE_COUNT <= pages <= MAX_PACKET_PAGES:
        raise ProtocolError(f"MultiFDInit: multifd packets of {pages} pages, expected "
                            f"{MULTIFD_PAGE_COUNT} to {MAX_PACKET_PAGES}")
    return ChannelSettings(channels, COMPRESSION_NAMES[bits], bool(flush), bool(verify),
                           pages)


def encode_hashes(tables: dict[str, bytes | memoryview]) -> list[bytes | memoryview]:
    """MFDH, be32 length + JSON {block: pages}, be64 length, then the tables in that order
    (a list of buffers: the tables go out without a copy)."""
    head = orjson.dumps({name: len(t) // HASH_SIZE for name, t in tables.items()})
    size = sum(len(t) for t in tables.values())
    return [HASHES_MAGIC + struct.pack(">I", len(head)) + head + struct.pack(">Q", size),
            *tables.values()]


def decode_hashes(r: Reader, pages: dict[str, int]) -> dict[str, bytes]:
    """``pages``: the number of pages of each block (from its size), in any order. An
    empty record ({}) says the source does not verify (``mfd migrate --no-verify``)."""
    at = r.pos
    if bytes(r.take(4, "mfd page hashes magic")) != HASHES_MAGIC:
        raise r.error("expected mfd's page hashes after the vmdesc", at=at)
    n = r.be32("mfd page hashes header length")
    if n > 1 << 20:
        raise r.error(f"mfd page hashes header of {n} bytes", at=at)
    try:
        head = orjson.loads(bytes(r.take(n, "mfd page hashes header")))
    except orjson.JSONDecodeError:
        raise r.error("mfd page hashes header is not JSON", at=at) from None
    if head != pages and head != {}:
        raise r.error(f"mfd page hashes for {head!r}, expected {pages!r}", at=at)
    size = r.be64("mfd page hashes length")
    if size != HASH_SIZE * sum(head.values()):
        raise r.error(f"mfd page hashes of {size} bytes, expected "
                      f"{HASH_SIZE * sum(head.values())}", at=at)
    body = r.take(size, "mfd page hashes")
    out, pos = {}, 0
    for name, count in head.items():  # the sender's order
        out[name] = bytes(body[pos : pos + HASH_SIZE * count])
        pos += HASH_SIZE * count
    return out


def encode_result(status: str, error: str | None = None,
                  verify_ms: float | None = None) -> bytes:
    body: dict[str, object] = {"status": status}
    if error is not None:
        body["error"] = error[:4000]
    if verify_ms is not None:
        body["verify_ms"] = round(verify_ms, 3)
    return orjson.dumps(body)


def decode_result(data: bytes) -> dict:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("return path: MFD_RESULT is not JSON") from None
    if not isinstance(body, dict) or body.get("status") not in ("completed", "failed"):
        raise ProtocolError(f"return path: MFD_RESULT {body!r}")
    return body
